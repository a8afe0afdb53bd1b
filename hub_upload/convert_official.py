"""`qwen-vl convert official SRC OUT`: an official Qwen-VL / Qwen-VL-Chat checkpoint directory → a complete Hub repo.

The weight files are copied byte for byte (their names already are the ones this package uses); around them the
repo gets this package's `config.json` (auto_map for every Auto class), remote-code files, tokenizer and processor
files, the generation config and a model card.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from modeling_qwen_vl import (
    QwenVLConfig,
    QwenVLForConditionalGeneration,
    QwenVLProcessor,
    QwenVLTokenizer,
)

from .model_card import render_model_card
from .shards import SHARD_INDEX, safetensors_files

COPY_CHUNK = 64 * 1024 * 1024


def _weight_files(source: Path) -> list[Path]:
    """The safetensors files of `source`, from its index when sharded; refuses pickle-only checkpoints."""
    shards = safetensors_files(source)
    if missing := [name for name in shards if not (source / name).exists()]:
        raise ValueError(f"{source / SHARD_INDEX} names shards that are not in {source}: {', '.join(missing)}")
    if shards:
        index = [source / SHARD_INDEX] if (source / SHARD_INDEX).is_file() else []
        return index + [source / name for name in shards]
    raise ValueError(
        f"No safetensors weights in {source} (model.safetensors or model.safetensors.index.json). Convert pickled "
        "*.bin weights to safetensors first; this tool does not load pickles."
    )


def _check_weight_names(config: QwenVLConfig, files: list[Path]) -> None:
    """Every official key must be a parameter or buffer of the model, and the reverse (no missing, no unexpected)."""
    with torch.device("meta"):
        expected = set(QwenVLForConditionalGeneration(config).state_dict())
    found = set()
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as weights:
                found.update(weights.keys())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            "The checkpoint's weight names do not match Qwen-VL's: "
            f"missing {missing[:10]}{' …' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}."
        )


def _copy_with_progress(files: list[Path], out: Path) -> None:
    total = sum(path.stat().st_size for path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Copying weights") as bar:
        for path in files:
            with path.open("rb") as src, (out / path.name).open("wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))


def _generation_config(source: Path, tokenizer: QwenVLTokenizer, is_chat: bool) -> GenerationConfig:
    """The source's generation config, or the official chat defaults for a chat model; chat models also stop at
    `<|im_end|>` / `<|im_start|>` so pipelines end their replies where `model.chat` does."""
    if (source / "generation_config.json").exists():
        config = GenerationConfig.from_pretrained(source)
    elif is_chat:
        config = GenerationConfig(
            chat_format="chatml", max_window_size=6144, max_new_tokens=512, do_sample=True, top_p=0.5, top_k=0
        )
    else:
        config = GenerationConfig(max_new_tokens=512)
    config.pad_token_id = tokenizer.eod_id
    config.eos_token_id = tokenizer.chat_stop_ids if is_chat else tokenizer.eod_id
    return config


def convert_official(
    source: str | Path, out: str | Path, *, repo_id: str | None = None, chat: bool | None = None
) -> Path:
    """Turn the official checkpoint directory `source` into a Hub-ready directory `out` and return `out`.

    `chat` marks a chat model (generation defaults, model card); by default it is read from the source's generation
    config (`chat_format: chatml`). Raises `ValueError` when the source is incomplete or its weights, tokenizer and
    config disagree.
    """
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} has no config.json: pass an official Qwen-VL checkpoint directory.")
    if not (source / "qwen.tiktoken").is_file():
        raise ValueError(f"{source} has no qwen.tiktoken: the official checkpoints ship it beside config.json.")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new output directory.")
    raw_config = json.loads((source / "config.json").read_text())
    if raw_config.get("model_type") != "qwen" or "visual" not in raw_config:
        raise ValueError(f"{source}/config.json is not a Qwen-VL config (model_type 'qwen' with a 'visual' section).")

    config = QwenVLConfig.from_pretrained(source)
    tokenizer = QwenVLTokenizer(str(source / "qwen.tiktoken"))
    if tokenizer.img_start_id != config.image_start_id:
        raise ValueError(
            f"qwen.tiktoken puts <img> at id {tokenizer.img_start_id} but config.json says image_start_id="
            f"{config.image_start_id}: the tokenizer does not belong to this checkpoint."
        )
    files = _weight_files(source)
    _check_weight_names(config, files)
    if chat is None:
        generation = source / "generation_config.json"
        chat = generation.exists() and json.loads(generation.read_text()).get("chat_format") == "chatml"

    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [QwenVLForConditionalGeneration.__name__]
    config.save_pretrained(out)
    # The remote code, as `save_pretrained` copies it: the model's module and every module it imports relatively
    # (configuration, processing, tokenization, image processing, text format, grounding).
    custom_object_save(QwenVLForConditionalGeneration, out)
    QwenVLProcessor.for_model(config, tokenizer).save_pretrained(out)
    _generation_config(source, tokenizer, chat).save_pretrained(out)
    _copy_with_progress(files, out)
    repo_id = repo_id or out.name
    render_model_card(repo_id, base_model=None, model_name=repo_id.split("/")[-1]).save(out / "README.md")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl convert official", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="official checkpoint directory (config.json, safetensors, qwen.tiktoken)")
    parser.add_argument("out", help="new directory for the Hub repo")
    parser.add_argument("--repo-id", help="Hub repo id used in the model card (default: the output folder name)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="mark as a chat model")
    args = parser.parse_args(argv)
    try:
        out = convert_official(args.source, args.out, repo_id=args.repo_id, chat=args.chat)
    except ValueError as error:
        parser.exit(2, f"qwen-vl convert official: error: {error}\n")
    print(f"Wrote {out}")
    return 0
