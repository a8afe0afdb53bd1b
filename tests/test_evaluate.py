"""`qwen-vl eval` (recipes/evaluate.py): scoring rules, the box scale, and a run on a tiny checkpoint."""

import json

import pytest
from PIL import Image

from qwen_vl.recipes.evaluate import BOX_PATTERN, evaluate, main, parse_box, score


def test_box_scale_1000_is_the_packages_and_999_the_official_evals():
    from modeling_qwen_vl import format_grounding

    pixel_box = (40.0, 20.0, 120.0, 180.0)
    reply = format_grounding("the cat", pixel_box, (200, 200))  # what a model trained on this package writes
    assert parse_box(reply, 200, 200) == pytest.approx(pixel_box, abs=0.2)
    official = parse_box(reply, 200, 200, box_scale=999)
    assert official == pytest.approx(tuple(v * 1000 / 999 for v in parse_box(reply, 200, 200)))
    metrics, _ = score(
        "grounding", [{"sent": "the cat", "bbox": list(pixel_box), "width": 200, "height": 200}], [reply]
    )
    assert metrics["accuracy@0.5"] == 1.0 and metrics["mean_iou"] > 0.99 and metrics["box_scale"] == 1000


def test_grounding_follows_the_official_regex_and_scores_misses_as_zero():
    assert BOX_PATTERN.search("<ref>a</ref><box>(1,2),(3,4)</box>").groups() == ("1,2", "3,4")
    records = [{"sent": "x", "bbox": [0, 0, 50, 50], "width": 100, "height": 100}] * 3
    replies = ["(0,0),(500,500)", "(500,500),(999,999)", "no box here"]
    metrics, predictions = score("grounding", records, replies)
    assert [p["correct"] for p in predictions] == [True, False, False]
    assert predictions[2]["pred_bbox"] is None and predictions[2]["iou"] == 0.0
    assert metrics["accuracy@0.5"] == pytest.approx(1 / 3, abs=1e-4) and metrics["box_parse_rate"] == pytest.approx(
        2 / 3, abs=1e-4
    )


def test_vqa_exact_match_and_caption_exact_set():
    metrics, _ = score(
        "vqa", [{"question": "q", "answer": "Two"}, {"question": "q", "answers": ["3", "three"]}], ["two.", "four"]
    )
    assert metrics["exact_match"] == 0.5
    records = [{"objects": ["red circle", "blue square"]}, {"objects": ["red circle"]}]
    replies = ["Two shapes: a small blue square and a large red circle.", "A red circle and a blue square."]
    metrics, predictions = score("caption", records, replies)
    assert [p["correct"] for p in predictions] == [True, False] and metrics["exact_set"] == 0.5


def test_bad_records_name_the_missing_fields(tiny_model_factory, tiny_processor):
    with pytest.raises(ValueError, match="lacks \\['bbox'"):
        evaluate(None, tiny_processor, "grounding", [{"image": "a.png", "sent": "x", "width": 1, "height": 1}])
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate(None, tiny_processor, "detection", [{"image": "a.png"}])


def test_cli_runs_batched_generation_and_writes_metrics_and_predictions(tmp_path, tiny_model_factory, tiny_processor):
    from qwen_vl import cli

    model = tiny_model_factory()
    model.generation_config.pad_token_id = tiny_processor.tokenizer.eod_id
    model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    records = [
        {"image": f"{i}.png", "sent": "the hello", "bbox": [0, 0, 32, 24], "width": 64, "height": 48} for i in range(3)
    ]
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = [
        "eval",
        "grounding",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "ref.jsonl"),
        "--image_root",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "out"),
        "--batch_size",
        "2",
        "--max_new_tokens",
        "4",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["task"] == "grounding" and metrics["examples"] == 3 and 0 <= metrics["accuracy@0.5"] <= 1
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["image"] for p in predictions] == [r["image"] for r in records]
    assert all(isinstance(p["reply"], str) and "iou" in p for p in predictions)
    with pytest.raises(SystemExit) as exit_info:
        main(["vqa", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 1
