"""`qwen-vl eval`: held-out evaluation of a Qwen-VL checkpoint with batched greedy generation.

    qwen-vl eval grounding --model DIR --data refcoco_val.jsonl --image_root images/ --output_dir eval/
    qwen-vl eval vqa       --model DIR --data vqa.jsonl --chat
    qwen-vl eval caption   --model DIR --data captions.jsonl --chat --prompt "Describe the image."

Each task reads JSONL records (`image` is a path, relative to `--image_root` if given):
- `grounding`, the official RefCOCO evaluation format: `{"image", "sent", "bbox": [x1, y1, x2, y2] in pixels,
  "width", "height"}`. The first `(x1,y1),(x2,y2)` of the reply is the predicted box (official regex); it is scaled to
  pixels with `--box_scale` and counts as correct at IoU >= 0.5 (`Acc@0.5`). A reply without a box scores IoU 0.
  Box scale: this package writes and parses boxes on a 0-1000 scale (`format_grounding`, `parse_grounding`: pixel =
  value * side / 1000), so 1000 is the default; the official eval script divides by 999 (`--box_scale 999`), which
  moves a box by at most 0.1% of the side.
- `vqa`: `{"image", "question", "answer"}` (or `"answers": [...]`): exact match after lower-casing and stripping
  spaces and a final period.
- `caption`: `{"image", "objects": ["red circle", ...]}`: exact-set accuracy, a reply is right when the set of object
  phrases it mentions (out of every phrase in the file, whole words) is exactly the record's set.

Prompts: `--prompt` is a `str.format` template (`{}` is the `sent` or `question`). Without `--chat` the text follows
the image directly, as in the official evaluation of the base model (grounding: `<img>..</img><ref>{}</ref>`, the
official prompt up to its `<box>`, which the processor refuses unclosed: the model writes it); with `--chat` it is one
user turn of the processor's chat template. Writes `metrics.json` and `predictions.jsonl`
(one record per example with the reply and its score) to `--output_dir`.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

TASKS = ("grounding", "vqa", "caption")
DEFAULT_PROMPTS = {
    "grounding": {False: "<ref>{}</ref>", True: "<ref>{}</ref>"},
    "vqa": {False: "{} Answer:", True: "{}"},
    "caption": {False: "Describe the image:", True: "Describe the image."},
}
# The official evaluation's box pattern (eval_mm/evaluate_grounding.py): the first "(x1,y1),(x2,y2)".
BOX_PATTERN = re.compile(r"\((.*?)\),\((.*?)\)")


def box_iou(a, b) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(reply: str, width: float, height: float, box_scale: float = 1000) -> tuple[float, ...] | None:
    """The first `(x1,y1),(x2,y2)` of `reply` in pixels of a `width x height` image (`value / box_scale * side`)."""
    match = BOX_PATTERN.search(reply)
    if match is None:
        return None
    try:
        (x1, y1), (x2, y2) = ([float(v) for v in part.split(",")] for part in match.groups())
    except ValueError:
        return None
    return (x1 / box_scale * width, y1 / box_scale * height, x2 / box_scale * width, y2 / box_scale * height)


def normalize_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


@torch.no_grad()
def generate_replies(
    model, processor, images: list, prompts: list[str], *, chat: bool, batch_size: int = 16,
    max_new_tokens: int = 32, desc: str = "Generating",
) -> list[str]:
    """Greedy replies to one `(image, prompt)` pair each, `batch_size` at a time (left padding); `images` are paths
    or PIL images. With `chat`, the prompt is a user turn of the chat template, else it follows the image directly."""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must pair up, got {len(images)} images and {len(prompts)} prompts.")
    tokenizer = processor.tokenizer
    stops = tokenizer.chat_stop_ids
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    replies = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            batch = prompts[start : start + batch_size]
            if chat:
                texts = [
                    processor.apply_chat_template(
                        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                        tokenize=False, add_generation_prompt=True,
                    )
                    for prompt in batch
                ]
            else:
                texts = [f"<img></img>{prompt}" for prompt in batch]
            inputs = processor(
                images=[[image] for image in images[start : start + batch_size]], text=texts, return_tensors="pt"
            ).to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tokenizer.eod_id,
            )
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                end = next((i for i, token in enumerate(row) if token in stops), len(row))
                replies.append(tokenizer.decode(row[:end]).strip())
    finally:
        tokenizer.padding_side = padding_side
    return replies


def _check_records(records: list[dict], task: str):
    required = {"grounding": ("image", "sent", "bbox", "width", "height"), "vqa": ("image", "question"),
                "caption": ("image", "objects")}[task]
    for index, record in enumerate(records):
        missing = [key for key in required if key not in record]
        if task == "vqa" and "answer" not in record and "answers" not in record:
            missing.append("answer")
        if missing:
            raise ValueError(f"{task} record {index} lacks {missing}; expected the fields {list(required)}.")


def score(task: str, records: list[dict], replies: list[str], box_scale: float = 1000) -> tuple[dict, list[dict]]:
    """Metrics of `replies` to `records` and one prediction record each (the record, its reply and its score)."""
    predictions = []
    if task == "grounding":
        for record, reply in zip(records, replies):
            box = parse_box(reply, record["width"], record["height"], box_scale)
            overlap = box_iou(box, record["bbox"]) if box is not None else 0.0
            predictions.append({**record, "reply": reply, "pred_bbox": box, "iou": round(overlap, 4),
                                "correct": overlap >= 0.5})
        ious = [p["iou"] for p in predictions]
        metrics = {"accuracy@0.5": sum(p["correct"] for p in predictions) / len(predictions),
                   "mean_iou": sum(ious) / len(ious),
                   "box_parse_rate": sum(p["pred_bbox"] is not None for p in predictions) / len(predictions),
                   "box_scale": box_scale}
    elif task == "vqa":
        for record, reply in zip(records, replies):
            answers = record.get("answers") or [record["answer"]]
            correct = normalize_answer(reply) in {normalize_answer(str(a)) for a in answers}
            predictions.append({**record, "reply": reply, "correct": correct})
        metrics = {"exact_match": sum(p["correct"] for p in predictions) / len(predictions)}
    elif task == "caption":
        vocabulary = sorted({phrase for record in records for phrase in record["objects"]}, key=len, reverse=True)
        pattern = re.compile(r"\b(" + "|".join(re.escape(phrase) for phrase in vocabulary) + r")\b", re.IGNORECASE)
        for record, reply in zip(records, replies):
            mentioned = sorted({m.lower() for m in pattern.findall(reply)})
            correct = set(mentioned) == {phrase.lower() for phrase in record["objects"]}
            predictions.append({**record, "reply": reply, "mentioned": mentioned, "correct": correct})
        metrics = {"exact_set": sum(p["correct"] for p in predictions) / len(predictions)}
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    metrics = {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}
    return {"task": task, "examples": len(predictions), **metrics}, predictions


def evaluate(
    model, processor, task: str, records: list[dict], *, image_root: str | Path | None = None, chat: bool = False,
    prompt: str | None = None, batch_size: int = 16, max_new_tokens: int | None = None, box_scale: float = 1000,
) -> tuple[dict, list[dict]]:
    """Generate a reply to every record of `task` and score them (see the module docstring); returns the metrics
    and the per-example predictions."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if not records:
        raise ValueError("records is empty: nothing to evaluate.")
    _check_records(records, task)
    template = DEFAULT_PROMPTS[task][chat] if prompt is None else prompt
    field = {"grounding": "sent", "vqa": "question", "caption": None}[task]
    prompts = [template.format(record[field]) if field else template for record in records]
    root = Path(image_root) if image_root is not None else None
    images = [str(root / record["image"]) if root is not None else record["image"] for record in records]
    if max_new_tokens is None:
        max_new_tokens = {"grounding": 32, "vqa": 8, "caption": 64}[task]
    replies = generate_replies(
        model, processor, images, prompts, chat=chat, batch_size=batch_size, max_new_tokens=max_new_tokens,
        desc=f"Eval {task}",
    )
    return score(task, records, replies, box_scale)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path} is not a file: pass a JSONL file of {'/'.join(TASKS)} records.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(output_dir: str | Path, metrics: dict, predictions: list[dict], name: str = "") -> Path:
    """`output_dir/{name}metrics.json` and `output_dir/{name}predictions.jsonl`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    (output_dir / f"{name}predictions.jsonl").write_text(lines)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (with its processor)")
    parser.add_argument("--data", required=True, help="JSONL records (see `qwen-vl eval --help`)")
    parser.add_argument("--image_root", help="directory of relative image paths")
    parser.add_argument("--output_dir", default="eval_out", help="where metrics.json and predictions.jsonl go")
    parser.add_argument("--chat", action="store_true", help="ask through the chat template (chat models)")
    parser.add_argument("--prompt", help="prompt template, `{}` is the phrase or question")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--box_scale", type=float, default=1000, help="box coordinate scale (official eval: 999)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--trust_remote_code", action="store_true", help="load a Hub repo's remote code")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoModelForCausalLM, AutoProcessor

    try:
        records = read_jsonl(args.data)[: args.limit]
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        metrics, predictions = evaluate(
            model, processor, args.task, records, image_root=args.image_root, chat=args.chat, prompt=args.prompt,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, box_scale=args.box_scale,
        )
    except ValueError as error:
        parser.exit(1, f"qwen-vl eval: error: {error}\n")
    write_results(args.output_dir, metrics, predictions)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
