"""The recipes' `Trainer`: atomic checkpoints, a stop on a non-finite loss, an own learning rate for the ViT, and the
optional phrase-carry objective (`recipes.phrase_carry`).

Checkpoints are written under `<output_dir>/_tmp_checkpoints/checkpoint-N` and renamed to `<output_dir>/checkpoint-N`
once every process has written its files, so a run killed while saving never leaves a partial `checkpoint-N` for
`--resume_from_checkpoint true` (transformers' `get_last_checkpoint`) to pick. What a killed save leaves in
`_tmp_checkpoints` is ignored by resuming and deleted at the next save. Hand-written because transformers' `Trainer`
writes a checkpoint's files in place, one after another.
"""

import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .freezing import parameter_group
from .phrase_carry import GroundingTags, phrase_carry_loss

# Not matched by `checkpoint-*` (rotation) nor `checkpoint-N` (resuming); `_*` is also left out of Hub uploads.
STAGING_DIR = "_tmp_checkpoints"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer applies the step."""


class RecipeTrainer(Trainer):
    """[`Trainer`] with atomic checkpoint writes and a [`NonFiniteLossError`] when the training loss is NaN or inf.

    Checkpoint rotation (`save_total_limit`), `load_best_model_at_end` and Hub pushes work as in `Trainer`; with
    several processes, the processes that save (`args.should_save`) rename, the others wait.
    """

    _staging = False  # while True, `Trainer._save_checkpoint` writes into the staging directory

    def __init__(
        self,
        *args,
        vision_learning_rate: float | None = None,
        phrase_carry_weight: float = 0.0,
        phrase_carry_layer: int = 1,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.vision_learning_rate = vision_learning_rate
        if phrase_carry_weight < 0:
            raise ValueError(f"phrase_carry_weight must be >= 0, got {phrase_carry_weight}.")
        self.phrase_carry_weight, self.phrase_carry_layer = phrase_carry_weight, phrase_carry_layer
        self._grounding_tags = None
        if phrase_carry_weight:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self._grounding_tags = GroundingTags.from_tokenizer(tokenizer)
        self._phrase_carry_losses: list[torch.Tensor] = []  # detached, since the last log (read there: no sync a step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss`; with `phrase_carry_weight`, plus that weight times the phrase-carry objective of
        the batch (`recipes.phrase_carry`), scaled for gradient accumulation as the language-modelling loss is."""
        if not (self.phrase_carry_weight and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_hidden_states": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        carry = phrase_carry_loss(
            outputs.hidden_states,
            inputs["input_ids"],
            model.get_input_embeddings().weight,
            self._grounding_tags,
            self.phrase_carry_layer,
        )
        if carry is not None:
            self._phrase_carry_losses.append(carry.detach())
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # the LM loss is already a share of the accumulated batch's; this one is a mean over this batch
                carry = carry / self.current_gradient_accumulation_steps
            loss = loss + self.phrase_carry_weight * carry
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """`Trainer.log`, with the mean phrase-carry objective since the last log (`phrase_carry_loss`)."""
        if self._phrase_carry_losses and "loss" in logs:
            mean = torch.stack(self._phrase_carry_losses).mean().item()
            logs = {**logs, "phrase_carry_loss": round(mean, 4)}
            self._phrase_carry_losses.clear()
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`; with `vision_learning_rate`, the ViT's parameters (the `vit` group of
        `recipes.freezing`) get that learning rate in their own parameter groups (the scheduler scales every group).
        Hand-written: `TrainingArguments` has one learning rate for all parameters."""
        optimizer = super().create_optimizer(model)
        if self.vision_learning_rate is None:
            return optimizer
        model = self.model if model is None else model
        vit = {id(p) for name, p in model.named_parameters() if _is_vit(name)}
        groups = []
        for group in optimizer.param_groups:
            for in_vit in (False, True):
                params = [p for p in group["params"] if (id(p) in vit) == in_vit]
                if params:
                    groups.append({**group, "params": params, **({"lr": self.vision_learning_rate} if in_vit else {})})
        optimizer.param_groups.clear()  # regrouped before any step, so there is no optimizer state to move
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self._staging:  # the upload runs in the background: push the renamed checkpoint, not the staged one
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into `_tmp_checkpoints`, then rename it to `checkpoint-N`, push it and rotate."""
        run_dir = self._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, checkpoint = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.state.best_model_checkpoint == staged:  # a new best model: record it under its final name
            self.state.best_model_checkpoint = checkpoint
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)
        if self.args.should_save:
            _fsync_tree(staged)
            if os.path.isdir(checkpoint):  # saved by an earlier run into this output_dir: set aside, deleted below
                os.replace(checkpoint, os.path.join(staging_root, "replaced"))
            os.replace(staged, checkpoint)
            _fsync(run_dir)
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(checkpoint)
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step`, then stop every process if the loss of any is NaN or inf (before the optimizer
        step: the weights and the checkpoints saved so far stay finite)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        losses = self.accelerator.gather(loss)
        if not torch.isfinite(losses).all():
            raise NonFiniteLossError(
                f"Non-finite training loss {losses.tolist()} at step {self.state.global_step + 1}: stopped before "
                "the optimizer step, so no weight or checkpoint holds NaN/inf. Try a lower --learning_rate or more "
                "--warmup_steps, bf16 rather than fp16 (which overflows), and check the data of this step. The "
                "checkpoints saved so far are intact."
            )
        return loss


def _is_vit(name: str) -> bool:
    """Whether a parameter (official name, or under PEFT's `base_model.model.` prefix) is in the ViT group."""
    try:
        return parameter_group(name.removeprefix("base_model.model.")) == "vit"
    except ValueError:  # a parameter the freezing groups do not know (e.g. a LoRA matrix's own name)
        return False


def _fsync_tree(path: str):
    """Flush the files and directories under `path` to disk, so that the renamed checkpoint holds written data."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path: str):
    """Flush a file, or a directory's entries (POSIX only: Windows cannot open directories), to disk."""
    if os.name != "posix" and os.path.isdir(path):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
