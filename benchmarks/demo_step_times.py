"""Seconds per training step of each stage of `qwen-vl demo`'s FULL configuration, as the demo runs it.

Needs a demo output directory with `data/`, `tokenizer/` and `stages/init` (start `qwen-vl demo --out OUT` and stop it
once `stages/init` exists). Runs one stage for `--steps` steps in this process and prints one JSON line: the median
and mean time between the starts of consecutive training steps (the first 3 left out: the DataLoader starting), the
share spent in the recipes' collator of this process (0 where a worker collates), the logged losses (to compare
runs: the same seed gives the same losses) and the load average. Stage 0's ViT trains on the first
`--clip-images` images (default 640, 10 steps an epoch at batch 64), so a run of 30 steps goes through its data three
times, as the demo's 1500 steps go through 30000 images.

    python benchmarks/demo_step_times.py OUT sft --steps 30
    python benchmarks/demo_step_times.py OUT stage0_vision --set dataloader_num_workers=0 --set \
        dataloader_persistent_workers=false

Run it from the checkout to measure (`PYTHONPATH=<checkout>`); compare two checkouts interleaved, with the same
`OMP_NUM_THREADS`, and say how loaded the machine was.
"""

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
from qwen_vl.demo import run as demo  # noqa: E402

# isort: split
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from qwen_vl.demo import stage0, world  # noqa: E402
from qwen_vl.recipes import collator as recipe_collator  # noqa: E402

STAMPS: list[float] = []
COLLATE_SECONDS = [0.0]


def _timed_training_step(original):
    def training_step(self, *args, **kwargs):
        STAMPS.append(time.perf_counter())
        return original(self, *args, **kwargs)

    return training_step


def _timed_collate(original):
    def collate(self, records):
        start = time.perf_counter()
        batch = original(self, records)
        COLLATE_SECONDS[0] += time.perf_counter() - start
        return batch

    return collate


def _value(text: str):
    return yaml.safe_load(text)  # numbers, booleans, null as YAML reads them


def _clip_subset(out: Path, work: Path, count: int) -> tuple[Path, list[world.Scene]]:
    """The first `count` rows of the demo's OpenCLIP CSV and their scenes, drawn again in the demo's order (the
    images are the demo's files)."""
    rng = random.Random("0-train")
    scenes = []
    for index in range(count):
        _, scene = world.render_scene(rng, demo.FULL.image_size)
        scene.image = f"images/train_{index:05d}.png"
        scenes.append(scene)
    with open(out / "data" / "clip_train.csv", newline="") as file:
        rows = list(csv.reader(file))[: count + 1]
    path = out / "data" / f"clip_train_first{count}.csv"  # next to the images, which the CSV names relatively
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return path, scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="demo output directory (data/, tokenizer/, stages/init)")
    parser.add_argument("stage", choices=(*demo.STAGE0, *demo.STAGES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--clip-images", type=int, default=640)
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_step_times"), help="where runs write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainingArguments override")
    args = parser.parse_args()
    overrides = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    transformers.Trainer.training_step = _timed_training_step(transformers.Trainer.training_step)
    collator_class = recipe_collator.QwenVLDataCollator
    collator_class.__call__ = _timed_collate(collator_class.__call__)
    size, out, work = demo.FULL, args.out.resolve(), args.work / args.stage
    common = {**size.common, "disable_tqdm": True, "max_steps": args.steps, **overrides}
    start = time.perf_counter()
    if args.stage == "stage0_vision":
        csv_path, scenes = _clip_subset(out, work, args.clip_images)
        config = stage0.register_clip_config(work, "shapes-clip", size.image_size, size.model["visual"], 48)
        stage0.train_clip(config.stem, csv_path, scenes, work, {**size.clip, **common}, size.shapes_weight, 0)
        history = json.loads((work / "trainer_state.json").read_text())["log_history"]
    elif args.stage == "stage0_lm":
        from modeling_qwen_vl import QwenVLConfig, QwenVLTokenizer

        tokenizer = QwenVLTokenizer.from_pretrained(out / "tokenizer")
        rng = random.Random("0-train")
        scenes = [world.render_scene(rng, size.image_size)[1] for _ in range(2000)]
        config = QwenVLConfig.from_pretrained(out / "stages" / "stage0_lm")
        lm = {**size.lm, **common}
        stage0.pretrain_lm(stage0.world_texts(scenes, 0), tokenizer, config, work, lm, size.lm_block_size, 0)
        history = json.loads((work / "trainer_state.json").read_text())["log_history"]
    else:
        from qwen_vl.recipes.train import run

        settings = {**size.common, **size.stages[args.stage], **common, "image_size": size.image_size, "seed": 0}
        work.mkdir(parents=True, exist_ok=True)
        config = work / f"{args.stage}.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        data = {"pretrain": "pretrain.jsonl", "multitask": "multitask.jsonl", "sft": "sft.json"}[args.stage]
        argv = [args.stage, "--config", str(config), "--model", str(out / "stages" / "init")]
        argv += ["--data", str(out / "data" / data), "--image_root", str(out / "data"), "--output_dir", str(work)]
        history = run(argv).state.log_history
    total = time.perf_counter() - start
    intervals = [b - a for a, b in zip(STAMPS, STAMPS[1:])][3:]
    result = {
        "stage": args.stage,
        "steps": len(STAMPS),
        "median_s_per_step": round(statistics.median(intervals), 4),
        "mean_s_per_step": round(statistics.mean(intervals), 4),
        "collate_s_per_step_in_main_process": round(COLLATE_SECONDS[0] / max(len(STAMPS), 1), 4),
        "total_s": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "overrides": overrides,
        "load_average": os.getloadavg(),
        "losses": [entry["loss"] for entry in history if "loss" in entry],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
