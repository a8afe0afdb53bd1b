"""The demo's held-out `qwen-vl eval` records and its figures (loss curves, grounding examples)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image, ImageDraw

from modeling_qwen_vl import draw_grounding

from .world import COUNT_PROMPT, Scene, count_answer


def eval_records(scenes: list[Scene]) -> dict[str, list[dict]]:
    """The held-out questions as `qwen-vl eval` records: every shape's referring expression "the red triangle" in the
    RefCOCO format (pixel box), the number of shapes as VQA, and the caption's set of "colour kind" objects."""
    grounding, counting, caption = [], [], []
    for scene in scenes:
        side = scene.image_size
        grounding += [
            {"image": scene.image, "sent": f"the {shape.name}", "bbox": list(shape.box), "width": side, "height": side}
            for shape in scene.shapes
        ]
        counting.append({"image": scene.image, "question": COUNT_PROMPT, "answer": count_answer(scene)})
        caption.append({"image": scene.image, "objects": [shape.name for shape in scene.shapes]})
    return {"grounding": grounding, "counting": counting, "caption": caption}


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


def _true_boxes(image: Image.Image, boxes: list[list[float]], scale: float) -> Image.Image:
    """Draw pixel boxes (times `scale`) as a white line inside a black one, visible on any background."""
    draw = ImageDraw.Draw(image)
    for box in boxes:
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=1)
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=1)
    return image


def plot_grounding(predictions: dict[str, list[dict]], root: Path, path: Path, count: int = 16, scale: int = 3):
    """A grid of the first `count` held-out images: true boxes (white/black) and predicted boxes, labelled with their
    phrase; titled with the hits and the predicted count (`predictions` of `qwen_vl.demo.run.evaluate_heldout`)."""
    by_image: dict[str, list[dict]] = {}
    for prediction in predictions["grounding"]:
        by_image.setdefault(prediction["image"], []).append(prediction)
    counts = {p["image"]: p["reply"] for p in predictions["counting"]}
    images = list(by_image)[:count]
    columns = 4
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, name in zip(axes.flat, images):
        queries = by_image[name]
        with Image.open(Path(root) / name) as image:
            image = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
        image = _true_boxes(image, [q["bbox"] for q in queries], scale)
        predicted = [
            {"phrase": q["sent"].removeprefix("the "), "box": tuple(v * scale for v in q["pred_bbox"])}
            for q in queries
            if q["pred_bbox"] is not None
        ]
        axis.imshow(draw_grounding(image, predicted, line_width=2))
        hits = sum(q["correct"] for q in queries)
        axis.set_title(f"IoU≥0.5: {hits}/{len(queries)}, count: {counts.get(name)}", fontsize=9)
    fig.suptitle("Held-out images: predicted boxes (coloured, labelled) and true boxes (white with black edge)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
