"""Held-out evaluation of the demo's chat model, and its figures (loss curves, grounding examples)."""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from modeling_qwen_vl import draw_grounding, parse_grounding

from .world import (
    CAPTION_PROMPT,
    COLOURS,
    COUNT_PROMPT,
    NUMBER_WORDS,
    SHAPES,
    Scene,
    grounding_prompt,
)

_PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_COUNT = re.compile(rf"\b(\d+|{'|'.join(NUMBER_WORDS)})\b", re.IGNORECASE)


def iou(a, b) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_count(text: str) -> int | None:
    """The first number in `text` (digits or a number word), or None."""
    match = _COUNT.search(text)
    if match is None:
        return None
    value = match.group(1).lower()
    return int(value) if value.isdigit() else NUMBER_WORDS.index(value)


def parse_pairs(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption mentions."""
    return set(_PAIR.findall(text))


@torch.no_grad()
def generate(model, processor, queries: list[tuple[str, str]], max_new_tokens: int, batch_size: int, desc: str):
    """Greedy single-turn chat replies to `(image path, question)` queries, batched (left padding)."""
    tokenizer = processor.tokenizer
    stops = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    replies = []
    for start in tqdm(range(0, len(queries), batch_size), desc=desc):
        batch = queries[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for _, question in batch
        ]
        inputs = processor(images=[[path] for path, _ in batch], text=texts, return_tensors="pt").to(model.device)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.eod_id
        )
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            replies.append(tokenizer.decode(row[:end]).strip())
    return replies


def evaluate(model, processor, scenes: list[Scene], root: Path, batch_size: int = 32) -> tuple[dict, list[dict]]:
    """
    Ask the model, for every held-out scene, for its caption, its number of shapes and the box of each shape ("Where
    is the red triangle?"). Returns the metrics and one prediction record per scene:
    - `grounding_accuracy`: share of shapes whose first predicted box has IoU >= 0.5 with the true box (a reply
      without a box counts as a miss);
    - `counting_accuracy`: share of scenes whose count is right;
    - `caption_accuracy`: share of captions naming exactly the right set of (colour, shape) pairs.
    """
    model.eval()
    paths = [str((root / scene.image).resolve()) for scene in scenes]
    captions = generate(model, processor, [(p, CAPTION_PROMPT) for p in paths], 48, batch_size, "Eval: captions")
    counts = generate(model, processor, [(p, COUNT_PROMPT) for p in paths], 4, batch_size, "Eval: counting")
    targets = [(i, shape) for i, scene in enumerate(scenes) for shape in scene.shapes]
    queries = [(paths[i], grounding_prompt(f"the {shape.name}")) for i, shape in targets]
    boxes = generate(model, processor, queries, 32, batch_size, "Eval: grounding")

    records = [
        {"image": paths[i], "caption": captions[i], "caption_ok": parse_pairs(captions[i]) == {(s.colour, s.kind) for s in scene.shapes},
         "count": counts[i], "count_ok": parse_count(counts[i]) == len(scene.shapes), "grounding": []}
        for i, scene in enumerate(scenes)
    ]
    for (i, shape), reply in zip(targets, boxes):
        parsed = parse_grounding(reply)
        truth = scenes[i].box_1000(shape)
        overlap = iou(parsed[0]["box"], truth) if parsed else 0.0
        records[i]["grounding"].append(
            {"phrase": f"the {shape.name}", "reply": reply, "true_box": truth,
             "pred_box": parsed[0]["box"] if parsed else None, "iou": round(overlap, 4)}
        )
    ious = [g["iou"] for record in records for g in record["grounding"]]
    metrics = {
        "grounding_accuracy": round(sum(v >= 0.5 for v in ious) / len(ious), 4),
        "counting_accuracy": round(sum(r["count_ok"] for r in records) / len(records), 4),
        "caption_accuracy": round(sum(r["caption_ok"] for r in records) / len(records), 4),
        "mean_iou": round(sum(ious) / len(ious), 4),
        "box_parse_rate": round(sum(g["pred_box"] is not None for r in records for g in r["grounding"]) / len(ious), 4),
        "heldout_images": len(scenes),
        "grounding_queries": len(ious),
    }
    return metrics, records


def loss_history(directory: Path) -> list[tuple[int, float]]:
    """`(step, training loss)` of every logged step of a stage, from its `trainer_state.json`."""
    history = json.loads((Path(directory) / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def plot_loss_curves(histories: dict[str, list[tuple[int, float]]], path: Path):
    """Training loss against step for every stage (`loss_history` of each)."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.4), squeeze=False)
    for axis, (stage, points) in zip(axes[0], histories.items()):
        axis.plot(*zip(*points), marker=".", linewidth=1)
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _true_boxes(image: Image.Image, boxes: list[tuple[int, ...]]) -> Image.Image:
    """Draw 0-1000 boxes as a white line inside a black one, visible on any background."""
    draw = ImageDraw.Draw(image)
    for box in boxes:
        x1, y1, x2, y2 = (v * image.width / 1000 for v in box)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=1)
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=1)
    return image


def plot_grounding(records: list[dict], path: Path, count: int = 16, scale: int = 3):
    """A grid of held-out images: true boxes (white/black) and the predicted boxes, labelled with their phrase."""
    records = records[:count]
    columns = 4
    rows = (len(records) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, record in zip(axes.flat, records):
        with Image.open(record["image"]) as image:
            image = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
        image = _true_boxes(image, [g["true_box"] for g in record["grounding"]])
        predicted = [
            {"phrase": g["phrase"].removeprefix("the "), "box": tuple(v * image.width / 1000 for v in g["pred_box"])}
            for g in record["grounding"]
            if g["pred_box"] is not None
        ]
        axis.imshow(draw_grounding(image, predicted, line_width=2))
        hits = sum(g["iou"] >= 0.5 for g in record["grounding"])
        axis.set_title(f"IoU≥0.5: {hits}/{len(record['grounding'])}, count: {record['count']}", fontsize=9)
    fig.suptitle("Held-out images: predicted boxes (coloured, labelled) and true boxes (white with black edge)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
