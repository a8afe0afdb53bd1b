"""How far the opt-in int8 CPU routes move Qwen-VL's outputs from float32, on unmodified official-format checkpoints.

For every checkpoint (by default the official fixtures A, B and E of `../shared/reference/fixtures`; more directories,
e.g. the demo's `OUT/checkpoint`, can be named on the command line) it loads the float32 model and the same files
through each int8 route, then compares
- logits on the fixture's golden batch (images included, every position): max |diff| / max |float32 logit|, and the
  share of positions whose argmax token is unchanged;
- greedy generation of the fixture's prompt: the share of new tokens equal to float32's (and to the official golden
  tokens, where the checkpoint has them).

Prints a table and writes it to `benchmarks/RESULTS.md` (section `int8-deviation`).

    python benchmarks/int8_deviation.py [CHECKPOINT_DIR ...] [--new-tokens 16]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import write_results  # noqa: E402

from modeling_qwen_vl import QwenVLForConditionalGeneration  # noqa: E402

REFERENCE = Path(os.environ.get("QWEN_VL_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


def load_int8(path: Path, route: str) -> QwenVLForConditionalGeneration:
    """The checkpoint at `path`, as it is, through one int8 route (see README, "int8 on CPU")."""
    if route == "int8 torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return QwenVLForConditionalGeneration.from_pretrained(
            path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        ).eval()
    from torch.ao.quantization import quantize_dynamic

    model = QwenVLForConditionalGeneration.from_pretrained(path).eval()
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def inputs_for(path: Path, new_tokens: int) -> tuple[dict, dict, list[int] | None]:
    """(batch for logits, prompt for greedy generation, official new tokens or None) of a checkpoint directory."""
    golden_file = path / "golden.safetensors"
    if golden_file.exists():
        golden, meta = load_file(golden_file), json.loads((path / "golden.json").read_text())
        batch = {k: golden[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        row = meta["generate"]["prompt_row"]
        keep = golden["attention_mask"][row].bool()
        input_ids = golden["input_ids"][row][keep][None]
        start_id = QwenVLForConditionalGeneration.config_class.from_pretrained(path).image_start_id
        first = int((golden["input_ids"][:row] == start_id).sum())
        count = int((input_ids == start_id).sum())
        prompt = {"input_ids": input_ids, "pixel_values": golden["pixel_values"][first : first + count]}
        return batch, prompt, meta["generate"]["new_tokens"]
    # Any other checkpoint: a text prompt of ordinary ids (no images needed to compare the language model)
    input_ids = torch.arange(100, 100 + 24)[None]
    return {"input_ids": input_ids}, {"input_ids": input_ids}, None


def compare(path: Path, routes: list[str], new_tokens: int) -> list[str]:
    reference = QwenVLForConditionalGeneration.from_pretrained(path).eval()
    batch, prompt, official = inputs_for(path, new_tokens)
    steps = len(official) if official else new_tokens
    greedy = dict(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(model):
        with torch.inference_mode():
            logits = model(**batch).logits
            tokens = model.generate(**prompt, **greedy)[0, prompt["input_ids"].shape[1] :].tolist()
        return logits, tokens

    base_logits, base_tokens = run(reference)
    rows = []
    for route in routes:
        logits, tokens = run(load_int8(path, route))
        keep = batch.get("attention_mask", torch.ones(batch["input_ids"].shape, dtype=torch.long)).bool()
        rel = ((logits - base_logits).abs().max() / base_logits.abs().max()).item()
        argmax = (logits.argmax(-1) == base_logits.argmax(-1))[keep].float().mean().item()
        same = sum(a == b for a, b in zip(tokens, base_tokens)) / steps
        versus_official = f"{sum(a == b for a, b in zip(tokens, official)) / steps:.0%}" if official else "n/a"
        first_split = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), None)
        rows.append(
            f"| {path.name} | {route} | {rel:.2e} | {argmax:.1%} | {same:.0%} ({steps} tokens"
            + (f", first differs at {first_split}" if first_split is not None else "")
            + f") | {versus_official} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="default: the official fixtures A, B and E")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens for checkpoints without golden ones")
    args = parser.parse_args()
    paths = args.checkpoints or [REFERENCE / "fixtures" / name for name in ("fixture_a", "fixture_b", "fixture_e")]
    routes = ["int8 dynamic"]
    try:
        import torchao  # noqa: F401

        routes.insert(0, "int8 torchao")
    except ImportError:
        print("torchao not installed: only the quantize_dynamic route is compared", file=sys.stderr)
    lines = [
        "## int8 on CPU: deviation from float32",
        "",
        f"torch {torch.__version__}; checkpoints loaded unmodified. `int8 torchao` = `TorchAoConfig(Int8WeightOnlyConfig())`"
        " (int8 weights, float32 compute); `int8 dynamic` = `torch.ao.quantization.quantize_dynamic` on every `nn.Linear`"
        " (int8 weights and per-call int8 activations).",
        "",
        "| checkpoint | route | logits max abs diff / max abs logit | argmax unchanged | greedy tokens equal to float32 | equal to official |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        if not path.exists():
            print(f"skipping {path}: not found", file=sys.stderr)
            continue
        lines += compare(path, routes, args.new_tokens)
    section = "\n".join(lines)
    print(section)
    write_results("int8-deviation", section)


if __name__ == "__main__":
    main()
