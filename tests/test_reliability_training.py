"""Training survives kills: resuming after SIGKILL, atomic checkpoint writes, a stop on NaN/inf losses."""

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import qwen_vl.recipes.train
from qwen_vl.recipes.trainer import STAGING_DIR, NonFiniteLossError, RecipeTrainer
from tests.conftest import ROOT, TINY_CONFIGS

CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def checkpoints(output_dir) -> list[str]:
    return sorted((p.name for p in output_dir.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def assert_same_weights(expected_file, actual_file):
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def count_steps(monkeypatch):
    """Counts the training steps run from now on, in this process."""
    steps = []
    original = RecipeTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RecipeTrainer, "training_step", counted)
    return steps


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(train_recipe, workspace, count_steps):
    """A `python -m qwen_vl.recipes.train` process killed after its first checkpoint resumes from its last complete one,
    runs
    only the missing steps and ends with the losses and weights of a run never killed (bit for bit on CPU, checked to
    1e-6). Restarting from scratch fails the step count; another data order or optimizer state fails the weights."""
    model, data, tmp_path = workspace
    flags = ("--max_steps", "10", "--save_strategy", "steps", "--save_steps", "3")  # checkpoint-3 is mid-epoch
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "qwen_vl.recipes.train", "sft", "--config", str(TINY_CONFIGS / "sft.yaml")]
    command += ["--model", str(model), "--data", str(data["sft"]), "--image_root", str(data["sft"].parent)]
    command += ["--output_dir", str(killed), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-3").is_dir():  # complete once it has its name
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    last = int(get_last_checkpoint(killed).rsplit("-", 1)[1])
    assert last in (3, 6, 9) and not (killed / "model.safetensors").exists()  # killed before the end

    full = train_recipe("sft", model, data["sft"], tmp_path / "full", *flags)
    del count_steps[:]
    resumed = train_recipe("sft", model, data["sft"], killed, *flags, "--resume_from_checkpoint", "true")
    assert count_steps == list(range(last + 1, 11))
    assert_same_weights(tmp_path / "full" / "model.safetensors", killed / "model.safetensors")
    assert not (killed / STAGING_DIR).exists()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (full, resumed)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=1e-6)


class Crash(Exception):
    """Stands for the process dying."""


def test_a_crash_while_saving_leaves_no_partial_checkpoint(train_recipe, workspace, monkeypatch, count_steps):
    """The save of checkpoint-4 dies after the weights and optimizer are written: no `checkpoint-4` exists, resuming
    picks the complete checkpoint-2, and the next save clears the leftover."""
    model, data, tmp_path = workspace
    output_dir = tmp_path / "out"
    flags = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    save_rng_state = Trainer._save_rng_state  # runs after the model, optimizer and scheduler are written

    def crash_at_step_4(self, checkpoint_dir):
        if self.state.global_step == 4:
            raise Crash
        save_rng_state(self, checkpoint_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(Crash):
        train_recipe("sft", model, data["sft"], output_dir, *flags)
    assert checkpoints(output_dir) == ["checkpoint-2"]
    assert get_last_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    assert CHECKPOINT_FILES <= set(os.listdir(output_dir / "checkpoint-2"))
    staged = output_dir / STAGING_DIR / "checkpoint-4"  # what the crash left: written in part
    assert {"model.safetensors", "optimizer.pt"} <= set(os.listdir(staged)) and not (staged / "rng_state.pth").exists()

    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    del count_steps[:]
    train_recipe("sft", model, data["sft"], output_dir, *flags, "--resume_from_checkpoint", "true")
    assert count_steps == [3, 4]
    assert checkpoints(output_dir) == ["checkpoint-2", "checkpoint-4"] and not (output_dir / STAGING_DIR).exists()
    assert CHECKPOINT_FILES <= set(os.listdir(output_dir / "checkpoint-4"))


def test_rotation_best_model_and_overwriting_keep_working(tmp_path, tiny_model_factory):
    """`save_total_limit` and `load_best_model_at_end` see only renamed checkpoints; the best one is recorded under
    its final name (in the state and in its `trainer_state.json`); saving a step again replaces its checkpoint."""
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 256, (8, 12), generator=generator)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest eval loss: usually an early step, which rotation must keep
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = RecipeTrainer(model=tiny_model_factory(), args=args, train_dataset=rows, eval_dataset=rows[:2])
    trainer.train()
    eval_losses = [(e["eval_loss"], e["step"]) for e in trainer.state.log_history if "eval_loss" in e]
    best = max(eval_losses)[1]
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    assert checkpoints(tmp_path) == [f"checkpoint-{step}" for step in sorted({best, 5} if best < 5 else {4, 5})]
    best_state = TrainerState.load_from_json(str(tmp_path / f"checkpoint-{best}" / "trainer_state.json"))
    assert best_state.best_model_checkpoint == trainer.state.best_model_checkpoint
    best_weights = load_file(tmp_path / f"checkpoint-{best}" / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[name], best_weights[name]) for name in best_weights)

    stale = tmp_path / "checkpoint-5" / "stale"
    stale.touch()
    trainer._save_checkpoint(trainer.model, trial=None)  # step 5 again, into the existing checkpoint-5
    assert not stale.exists() and not (tmp_path / STAGING_DIR).exists()
    assert CHECKPOINT_FILES <= set(os.listdir(tmp_path / "checkpoint-5"))


def test_non_finite_loss_stops_the_run_before_the_update(train_recipe, workspace, monkeypatch):
    """NaN logits at step 4: a `NonFiniteLossError` saying what to try, the weights still finite, and checkpoint-2
    (equal to a clean run's weights after 2 steps) the last checkpoint; nothing saved from the bad step."""
    model, data, tmp_path = workspace
    output_dir = tmp_path / "nan"
    load_model, loaded = qwen_vl.recipes.train.load_model, []

    def load_model_with_nan_at_step_4(model_args):
        model = load_model(model_args)
        calls = itertools.count(1)
        model.lm_head.register_forward_hook(
            lambda module, args, logits: logits * torch.nan if next(calls) == 4 else logits
        )
        loaded.append(model)
        return model

    monkeypatch.setattr(qwen_vl.recipes.train, "load_model", load_model_with_nan_at_step_4)
    flags = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2")
    with pytest.raises(NonFiniteLossError, match=r"loss nan at step 4: stopped before the optimizer step") as error:
        train_recipe("sft", model, data["sft"], output_dir, *flags)
    assert all(hint in str(error.value) for hint in ("--learning_rate", "bf16", "fp16", "check the data"))
    assert all(torch.isfinite(p).all() for p in loaded[0].parameters())
    assert checkpoints(output_dir) == ["checkpoint-2"]
    assert get_last_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    assert not (output_dir / STAGING_DIR).exists() and not (output_dir / "model.safetensors").exists()

    def load_model_with_identity_hook(model_args):  # a hooked layer runs `nn.Linear.forward`: same kernels as above
        model = load_model(model_args)
        model.lm_head.register_forward_hook(lambda module, args, logits: logits)
        return model

    monkeypatch.setattr(qwen_vl.recipes.train, "load_model", load_model_with_identity_hook)
    train_recipe("sft", model, data["sft"], tmp_path / "clean", "--max_steps", "2")
    assert_same_weights(tmp_path / "clean" / "model.safetensors", output_dir / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in load_file(output_dir / "checkpoint-2" / "model.safetensors").values())
