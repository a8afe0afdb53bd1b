"""Parameter groups of Qwen-VL and the groups each training stage updates (paper §3), in one place.

Groups are defined by official parameter-name prefixes, checked in order (the first match wins):
- `adapter`: the position-aware cross-attention adapter (`transformer.visual.attn_pool.*`, `ln_post`, `proj`);
- `vit`: the rest of the vision tower (`transformer.visual.*`: patch embedding, positional table, blocks);
- `llm`: the language model (`transformer.wte`, `transformer.h.*`, `transformer.ln_f`, `lm_head`).
"""

from collections import Counter

from torch import nn

PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    "adapter": ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj"),
    "vit": ("transformer.visual.",),
    "llm": ("transformer.", "lm_head."),
}

STAGE_TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "pretrain": ("vit", "adapter"),  # stage 1: the language model is frozen, embeddings and lm_head included
    "multitask": ("vit", "adapter", "llm"),  # stage 2: everything
    "sft": ("adapter", "llm"),  # stage 3: the ViT is frozen
}


def parameter_group(name: str) -> str:
    """The group of an official parameter name (e.g. `transformer.visual.attn_pool.query` -> `adapter`)."""
    for group, prefixes in PARAMETER_GROUPS.items():
        if name.startswith(prefixes):
            return group
    raise ValueError(f"Parameter {name!r} is in no group of {sorted(PARAMETER_GROUPS)}; is this a Qwen-VL model?")


def set_trainable_groups(model: nn.Module, groups: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Train exactly the parameters of `groups` (`requires_grad_`), freeze the others; returns trainable counts."""
    unknown = set(groups) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"Unknown parameter group(s) {sorted(unknown)}; expected some of {sorted(PARAMETER_GROUPS)}")
    trainable = Counter()
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        parameter.requires_grad_(group in groups)
        if group in groups:
            trainable[group] += parameter.numel()
    return dict(trainable)


def freeze_for_stage(model: nn.Module, stage: str) -> dict[str, int]:
    """Apply a stage's trainable groups (`STAGE_TRAINABLE_GROUPS`); returns the trainable parameter counts."""
    if stage not in STAGE_TRAINABLE_GROUPS:
        raise ValueError(f"Unknown stage {stage!r}; expected one of {sorted(STAGE_TRAINABLE_GROUPS)}")
    return set_trainable_groups(model, STAGE_TRAINABLE_GROUPS[stage])
