"""Recipes end to end on a tiny model: frozen groups per stage, stage chaining, overfitting, LoRA, resume, configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_vl import cli
from qwen_vl.recipes.freezing import STAGE_TRAINABLE_GROUPS, parameter_group
from qwen_vl.recipes.train import ModelArguments, load_model
from tests.conftest import ROOT, TINY_CONFIGS


def changed_groups(before: dict, after: dict) -> dict[str, set[bool]]:
    """For each parameter group, whether each of its tensors changed (buffers such as pos_embed excluded)."""
    assert before.keys() == after.keys()
    result = {}
    for name, tensor in before.items():
        if name.endswith("pos_embed"):
            assert torch.equal(tensor, after[name])  # a fixed buffer, never trained
            continue
        result.setdefault(parameter_group(name), set()).add(not torch.equal(tensor, after[name]))
    return result


def test_stages_train_exactly_their_groups_and_chain(train_recipe, workspace):
    """pretrain -> multitask -> sft, each starting from the previous output directory."""
    model, data, tmp_path = workspace
    for stage in ("pretrain", "multitask", "sft"):
        output_dir = tmp_path / stage
        trainer = train_recipe(stage, model, data[stage], output_dir, "--max_steps", "2")
        groups = changed_groups(load_file(model / "model.safetensors"), load_file(output_dir / "model.safetensors"))
        expected = {group: {group in STAGE_TRAINABLE_GROUPS[stage]} for group in ("vit", "adapter", "llm")}
        assert groups == expected, stage
        config = json.loads((output_dir / "config.json").read_text())
        processor_config = json.loads((output_dir / "processor_config.json").read_text())
        size = 28 if stage == "pretrain" else 56
        assert config["visual"]["image_size"] == size and config["use_cache"] is True
        assert processor_config["image_processor"]["size"] == {"height": size, "width": size}
        assert "AutoModelForCausalLM" in config["auto_map"] and (output_dir / "modeling_qwen_vl.py").is_file()
        assert (output_dir / "qwen.tiktoken").is_file()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        model = output_dir
    results = json.loads((tmp_path / "sft" / "train_results.json").read_text())
    assert results["skipped_records"] >= 0 and trainer.data_collator.skipped.keys() <= {"missing_image"}


def test_vision_learning_rate_applies_to_the_vit_only(train_recipe, workspace):
    """--vision_learning_rate gives the ViT's parameters their own learning rate (scheduled like the others); 0
    leaves the ViT unchanged while the adapter and the LM train."""
    model, data, tmp_path = workspace
    trainer = train_recipe(
        "multitask", model, data["multitask"], tmp_path / "out", "--max_steps", "2", "--vision_learning_rate", "0"
    )
    vit = {id(p) for name, p in trainer.model.named_parameters() if parameter_group(name) == "vit"}
    for group in trainer.optimizer.param_groups:
        in_vit = {id(p) in vit for p in group["params"]}
        assert len(in_vit) == 1 and (group["initial_lr"] == 0) == in_vit.pop()
    groups = changed_groups(load_file(model / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors"))
    assert groups == {"vit": {False}, "adapter": {True}, "llm": {True}}


def test_completion_only_loss_flag_reaches_the_collator(train_recipe, workspace):
    """`--completion_only_loss false` trains task records' prompt text too: more labelled tokens in the same batch."""
    model, data, tmp_path = workspace
    trainer = train_recipe(
        "multitask", model, data["multitask"], tmp_path / "out", "--max_steps", "1", "--completion_only_loss", "false"
    )
    collator = trainer.data_collator
    assert collator.completion_only_loss is False
    records = [json.loads(line) for line in data["multitask"].read_text().splitlines()]
    trained = (collator(records)["labels"] != -100).sum()
    collator.completion_only_loss = True
    assert trained > (collator(records)["labels"] != -100).sum()


def test_loss_falls_when_overfitting(train_recipe, workspace):
    model, data, tmp_path = workspace
    subset = data["sft"].with_name("two.json")
    subset.write_text(json.dumps(json.loads(data["sft"].read_text())[:2]))
    trainer = train_recipe("sft", model, subset, tmp_path / "out", "--max_steps", "8", "--learning_rate", "3e-3")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses


def test_lora_trains_only_adapter_weights_and_merges_to_official_names(train_recipe, workspace):
    model, data, tmp_path = workspace
    output_dir = tmp_path / "lora"
    trainer = train_recipe(
        "sft",
        model,
        data["sft"],
        output_dir,
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_dropout",
        "0",
        "--merge_lora",
    )
    peft_model = trainer.model
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("transformer.h.0.mlp.c_proj.lora_A" in name for name in trainable)
    assert not any("visual" in name for name in trainable)  # the ViT's mlp.c_proj is not a target
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "model.safetensors").exists()

    initial = load_file(model / "model.safetensors")
    merged = load_file(output_dir / "merged" / "model.safetensors")
    assert merged.keys() == initial.keys()  # official names: no base_model./lora_ prefixes
    targets = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.w1.weight", ".mlp.w2.weight", ".mlp.c_proj.weight")
    for name in initial:
        is_target = name.startswith("transformer.h.") and name.endswith(targets)
        assert torch.equal(initial[name], merged[name]) != is_target, name

    reloaded = load_model(ModelArguments(model_name_or_path=str(output_dir)))  # an adapter dir loads merged
    assert all(torch.equal(reloaded.state_dict()[name], merged[name]) for name in merged)
    inputs = {"input_ids": torch.tensor([[104, 101, 108, 108, 111, 32, 119]])}
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, peft_model(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_needs_a_gpu(train_recipe, workspace):
    model, data, tmp_path = workspace
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train_recipe("sft", model, data["sft"], tmp_path / "q", "--use_peft", "--load_in_4bit")


def test_resume_gives_identical_weights(train_recipe, workspace):
    model, data, tmp_path = workspace
    flags = ("--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2")
    full = train_recipe("sft", model, data["sft"], tmp_path / "full", *flags)
    resumed = train_recipe(
        "sft",
        model,
        data["sft"],
        tmp_path / "resumed",
        *flags,
        "--resume_from_checkpoint",
        str(tmp_path / "full" / "checkpoint-2"),
    )
    expected, actual = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (full, resumed)]
    assert losses[1] == losses[0]  # steps 1-2 restored from the checkpoint's state, 3 recomputed


def test_a_dataloader_worker_gives_the_same_training(train_recipe, workspace):
    """Collating in a DataLoader worker process (what `qwen-vl demo` does, to overlap it with the model's step) gives
    the same batches: the same losses and weights, and the worker's skipped records are counted."""
    model, data, tmp_path = workspace
    trainers, weights = [], []
    for workers in ("0", "1"):
        output_dir = tmp_path / f"workers{workers}"
        flags = ("--max_steps", "4", "--dataloader_num_workers", workers, "--dataloader_persistent_workers", workers)
        trainers.append(train_recipe("sft", model, data["sft"], output_dir, *flags))
        weights.append(load_file(output_dir / "model.safetensors"))
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in trainers]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    skipped = [json.loads((tmp_path / f"workers{w}" / "train_results.json").read_text()) for w in "01"]
    assert skipped[0]["skipped_records"] > 0 and skipped[1]["skipped_records"] == skipped[0]["skipped_records"]


def test_group_by_length_batches_records_of_similar_length(train_recipe, workspace):
    """`--train_sampling_strategy group_by_length` works on raw records: the recipe adds a `length` column (characters
    of text), which Trainer's `LengthGroupedSampler` groups the batches by, longest record first."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    model, data, tmp_path = workspace
    flags = ("--max_steps", "2", "--per_device_train_batch_size", "2", "--train_sampling_strategy", "group_by_length")
    trainer = train_recipe("sft", model, data["sft"], tmp_path / "out", *flags)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    records = json.loads(data["sft"].read_text())
    expected = [
        sum(len(turn["value"]) + len(turn["from"]) for turn in r["conversations"]) + len(r["id"]) for r in records
    ]
    assert trainer.train_dataset["length"] == expected
    order = list(sampler)
    assert sampler.lengths == expected and sorted(order) == list(range(len(records)))
    assert expected[order[0]] == max(expected)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_cli_registration_and_configs():
    assert cli.main(["train", "--help"]) == 0
    from transformers import TrainingArguments
    from trl import TrlParser

    from qwen_vl.recipes.train import RecipeArguments

    for path in sorted((ROOT / "recipes" / "configs").rglob("*.yaml")):  # every key is a known option
        parser = TrlParser((ModelArguments, RecipeArguments, TrainingArguments))
        flags = ["--model", "m", "--output_dir", "o", "--bf16", "false"]  # flags override the file
        model_args, _, training = parser.parse_args_and_config(["--config", str(path), *flags])
        assert model_args.model_name_or_path == "m" and training.output_dir == "o" and not training.bf16
    from accelerate.commands.config.config_args import load_config_from_file

    shipped = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"ddp", "fsdp", "zero2", "zero3"}
    for path in shipped:
        assert load_config_from_file(str(path)).distributed_type is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_config_names_a_shipped_config_unless_it_is_a_file(tmp_path, monkeypatch):
    from contextlib import ExitStack

    from qwen_vl.recipes.train import _with_shipped_config, shipped_config

    assert shipped_config("tiny/sft").read_text() == (TINY_CONFIGS / "sft.yaml").read_text()
    assert shipped_config("sft.yaml").read_text() == (ROOT / "recipes" / "configs" / "sft.yaml").read_text()
    assert shipped_config("nope") is None
    with ExitStack() as stack:
        (resolved,) = _with_shipped_config(["--config", "tiny/sft"], stack)[1:]
        assert Path(resolved).read_text() == (TINY_CONFIGS / "sft.yaml").read_text()
        monkeypatch.chdir(tmp_path)
        (tmp_path / "sft").write_text("learning_rate: 1.0\n")  # a file of that name wins
        assert _with_shipped_config(["--config", "sft", "--seed", "1"], stack) == ["--config", "sft", "--seed", "1"]
        assert _with_shipped_config(["--config", "missing.yaml"], stack) == ["--config", "missing.yaml"]


def test_two_processes_match_one_process(train_recipe, workspace):
    """`accelerate launch` with the shipped DDP config, 2 CPU processes (gloo) x 2 examples = 1 process x 4."""
    model, data, tmp_path = workspace
    records = [r for r in json.loads(data["sft"].read_text()) if r["id"] != "bad"]
    dataset = data["sft"].with_name("eight.json")
    dataset.write_text(json.dumps(records + records[: 8 - len(records)]))  # 2 global batches per epoch
    flags = ("--max_steps", "3")  # crosses an epoch boundary: both runs reshuffle alike
    single = train_recipe("sft", model, dataset, tmp_path / "single", *flags, "--per_device_train_batch_size", "4")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "-m",
        "qwen_vl.recipes.train",
        "sft",
        "--config",
        str(TINY_CONFIGS / "sft.yaml"),
        "--model",
        str(model),
        "--data",
        str(dataset),
        "--image_root",
        str(dataset.parent),
        "--output_dir",
        str(tmp_path / "ddp"),
        "--per_device_train_batch_size",
        "2",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]

    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["log_history"][0]["epoch"] == 0.5  # global batch 4: 2 processes
    losses = [
        [e["loss"] for e in history if "loss" in e] for history in (single.state.log_history, state["log_history"])
    ]
    assert len(losses[1]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=1e-5)
    expected, actual = (
        load_file(tmp_path / "single" / "model.safetensors"),
        load_file(tmp_path / "ddp" / "model.safetensors"),
    )
    # The two runs split the batch differently, so their matmuls round differently (oneDNN's float32 kernels, see
    # `fast_linear`): after 3 steps the weights differ by up to ~1.1e-5 on one CPU and 6.1e-5 on another. A wrong
    # gradient average would move weights by about the learning rate (1e-3) a step, far beyond this bound.
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=2e-4)
