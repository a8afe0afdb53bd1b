"""Loading a saved Qwen-VL repo for serving: model, processor and the ids that end a ChatML reply."""

import argparse

import torch

from modeling_qwen_vl import QwenVLForConditionalGeneration, QwenVLProcessor

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_parser(prog: str, description: str, port: int) -> argparse.ArgumentParser:
    """The arguments `qwen-vl serve` and `qwen-vl web` share: the repo, where to listen, how to load it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model", help="local repo directory or Hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_model(path: str, dtype: str = "auto", device: str = "cpu"):
    """
    Load the model (in eval mode, on `device`) and processor of the local repo or Hub id `path`.

    `dtype` is one of `DTYPES` ("auto" keeps the checkpoint's dtype). The tokenizer pads on the left, as batched
    generation needs. Returns `(model, processor)`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    model = QwenVLForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    processor = QwenVLProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def reply_end_ids(model, tokenizer) -> list[int]:
    """Ids that end a ChatML reply: the generation config's `eos_token_id`s plus `<|im_end|>`, `<|im_start|>` and
    `<|endoftext|>` (as `model.chat` stops), so a repo whose generation config names only `<|endoftext|>` still ends
    its replies at the turn boundary."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    ids = configured + tokenizer.chat_stop_ids
    return list(dict.fromkeys(ids))
