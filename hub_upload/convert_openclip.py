"""Stage-1 initial checkpoint (the paper's starting point): the Qwen-7B language model plus an OpenCLIP ViT.

`vision_state_dict_from_open_clip` maps an OpenCLIP `VisionTransformer` to the `transformer.visual.*` names of
Qwen-VL; `build_stage1_checkpoint` puts it together with a Qwen-7B LM checkpoint (official `QWenLMHeadModel` layout,
whose names are ours) into a `QwenVLForConditionalGeneration` whose adapter (`attn_pool`, `ln_post`, `proj`) is freshly
initialised, and saves it. `main` is `qwen-vl convert openclip`.

What changes between the two layouts:
- OpenCLIP's positional table has a class entry first and a `grid x grid` table after it; Qwen-VL has no class token
  and a 16x16 table, so the class entry is dropped and other grids are resized (bicubic, as the model does at run
  time). `class_embedding` and OpenCLIP's `ln_post`/`proj` (pooled-embedding head, other shapes) are dropped.
- `attn.in_proj` is stacked `[q; k; v]` in OpenCLIP (`nn.MultiheadAttention`) and interleaved per head in Qwen-VL
  (`[heads, q|k|v]`): rows are re-laid, the function is unchanged.
- OpenCLIP's LayerNorms default to eps 1e-5 (ViT-bigG included); Qwen-VL's use 1e-6, so the converted tower differs
  from OpenCLIP by that eps alone (the official Qwen-VL ViT, initialised from ViT-bigG, made the same choice).
"""

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration
from modeling_qwen_vl.modeling_qwen_vl import resize_grid_embedding

from .shards import safetensors_files

logger = logging.getLogger(__name__)

VISUAL_PREFIX = "transformer.visual."
# Freshly initialised by the model (not in OpenCLIP): the position-aware adapter and the output projection.
ADAPTER_PREFIXES = (f"{VISUAL_PREFIX}attn_pool.", f"{VISUAL_PREFIX}ln_post.", f"{VISUAL_PREFIX}proj")
POSITIONAL_GRID = 16  # Qwen-VL's positional table is always 16x16 (resized to the patch grid at run time)
# Language-model fields of the official Qwen-7B config.json that QwenVLConfig takes over.
LM_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_channels",
    "intermediate_size",
    "layer_norm_epsilon",
    "initializer_range",
    "rotary_emb_base",
    "rotary_pct",
    "seq_length",
    "max_position_embeddings",
    "use_dynamic_ntk",
    "use_logn_attn",
    "no_bias",
    "emb_dropout_prob",
    "attn_dropout_prob",
    "scale_attn_weights",
    "tie_word_embeddings",
)
REQUIRED_LM_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Per-block tensors with the same name and layout on both sides.
_BLOCK_COPIED = tuple(
    f"{module}.{param}"
    for module in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    for param in ("weight", "bias")
)
_DROPPED = ("class_embedding", "ln_post.weight", "ln_post.bias", "proj")
_BLOCK_INDEX = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def interleave_qkv_per_head(stacked: torch.Tensor, heads: int) -> torch.Tensor:
    """Re-lay the rows of a fused qkv projection (weight [3*width, width] or bias [3*width]) from
    `nn.MultiheadAttention`'s `[q of all heads; k of all heads; v of all heads]` to Qwen-VL's per-head
    `[head 0: q|k|v; head 1: q|k|v; ...]`."""
    head_dim = stacked.shape[0] // (3 * heads)
    return stacked.reshape(3, heads, head_dim, *stacked.shape[1:]).transpose(0, 1).reshape(stacked.shape)


def _vision_blocks(visual: nn.Module) -> nn.ModuleList:
    """The resblocks of an OpenCLIP `VisionTransformer`; `TypeError` for anything else."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if not (hasattr(visual, "conv1") and hasattr(visual, "positional_embedding") and blocks is not None):
        raise TypeError(
            f"expected an open_clip VisionTransformer (a ViT CLIP model or its `.visual`), got "
            f"{type(visual).__name__}; timm and ResNet towers cannot be converted."
        )
    return blocks


def _check_open_clip_visual(visual: nn.Module, width: int, heads: int) -> None:
    """Refuse towers whose computation Qwen-VL's ViT cannot reproduce (other architectures, QuickGELU, ...)."""
    blocks = _vision_blocks(visual)
    if visual.conv1.out_channels != width or blocks[0].attn.num_heads != heads:
        raise ValueError(
            f"width={width}, heads={heads} do not match the tower (width {visual.conv1.out_channels}, "
            f"{blocks[0].attn.num_heads} heads)."
        )
    for j, block in enumerate(blocks):
        activation = getattr(getattr(block, "mlp", None), "gelu", None)
        if type(activation) is not nn.GELU or activation.approximate != "none":
            raise ValueError(
                f"resblock {j} uses {type(activation).__name__}, but Qwen-VL's ViT uses exact GELU: towers built with "
                "quick_gelu (OpenAI-pretrained CLIP) or approximate GELU cannot be converted exactly."
            )


def vision_state_dict_from_open_clip(
    clip_visual: nn.Module | Mapping[str, torch.Tensor], width: int, heads: int
) -> dict[str, torch.Tensor]:
    """
    Map an OpenCLIP `VisionTransformer` (`model.visual`, or its state dict) to Qwen-VL's `transformer.visual.*` names.

    Returns `conv1.weight`, `positional_embedding` [256, width] (class entry dropped, 16x16 grid, bicubic-resized
    from other grids), `ln_pre.*` and every `transformer.resblocks.{j}.*` with `attn.in_proj` re-laid per head. The
    adapter (`attn_pool.*`, `ln_post.*`, `proj`) is not produced: the model initialises it.
    """
    if isinstance(clip_visual, nn.Module):
        _check_open_clip_visual(clip_visual, width, heads)
        clip_visual = clip_visual.state_dict()
    state = {k: v for k, v in clip_visual.items() if v is not None}
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads}).")

    layers = 1 + max((int(m[1]) for k in state if (m := _BLOCK_INDEX.match(k))), default=-1)
    block_keys = [f"transformer.resblocks.{j}.{name}" for j in range(layers) for name in _BLOCK_COPIED]
    block_keys += [f"transformer.resblocks.{j}.attn.in_proj_{p}" for j in range(layers) for p in ("weight", "bias")]
    required = ["conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias", *block_keys]
    missing = [k for k in required if k not in state]
    unexpected = sorted(set(state) - set(required) - set(_DROPPED))
    if layers == 0 or missing or unexpected:
        raise ValueError(
            "not a plain OpenCLIP ViT state dict (pre-norm blocks with nn.MultiheadAttention, no layer scale, "
            f"ln_pre present): missing {missing or 'nothing'}; unsupported {unexpected or 'nothing'}."
        )
    if state["conv1.weight"].shape[0] != width:
        raise ValueError(f"conv1 has {state['conv1.weight'].shape[0]} output channels but width={width}.")

    table = state["positional_embedding"][1:]  # drop the class-token entry
    grid = round(table.shape[0] ** 0.5)
    if grid * grid != table.shape[0] or table.shape[1] != width:
        raise ValueError(
            f"positional_embedding {tuple(state['positional_embedding'].shape)} is not 1 + a square grid of "
            f"width-{width} entries: only square patch grids convert to Qwen-VL's 16x16 table."
        )
    converted = {
        "conv1.weight": state["conv1.weight"],
        "positional_embedding": resize_grid_embedding(table, POSITIONAL_GRID**2).contiguous(),
        "ln_pre.weight": state["ln_pre.weight"],
        "ln_pre.bias": state["ln_pre.bias"],
    }
    for j in tqdm(range(layers), desc="Converting ViT blocks", unit="block", leave=False):
        prefix = f"transformer.resblocks.{j}."
        for name in _BLOCK_COPIED:
            converted[prefix + name] = state[prefix + name]
        for param in ("weight", "bias"):
            converted[f"{prefix}attn.in_proj.{param}"] = interleave_qkv_per_head(
                state[f"{prefix}attn.in_proj_{param}"], heads
            )
    return {VISUAL_PREFIX + name: tensor for name, tensor in converted.items()}


def _mlp_ratio(width: int, mlp_width: int) -> float:
    """A ratio with `int(width * ratio) == mlp_width` (how the model sizes `c_fc`), rounded like the official 4.9231"""
    ratio = round(mlp_width / width, 4)
    return ratio if int(width * ratio) == mlp_width else (mlp_width + 0.5) / width


def _lm_config_kwargs(lm_config: Mapping) -> dict:
    if missing := [k for k in REQUIRED_LM_KEYS if k not in lm_config]:
        raise ValueError(f"the Qwen LM config lacks {missing}: pass the config.json of a Qwen-7B checkpoint.")
    kwargs = {k: lm_config[k] for k in LM_CONFIG_KEYS if k in lm_config}
    kwargs.setdefault("kv_channels", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return kwargs


def load_qwen_lm_state_dict(lm_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Qwen-7B checkpoint directory's safetensors (`model.safetensors`, or the shards its index names)."""
    from safetensors.torch import load_file

    lm_dir = Path(lm_dir)
    shards = safetensors_files(lm_dir)
    if not shards:
        raise ValueError(
            f"no safetensors weights in {lm_dir} (expected model.safetensors or model.safetensors.index.json); "
            "pickled checkpoints are not read: convert them to safetensors first."
        )
    state = {}
    for shard in tqdm(shards, desc="Loading Qwen LM shards", unit="shard"):
        state.update(load_file(lm_dir / shard))
    return state


ADAPTER_INITS = ("random", "grid")


@torch.no_grad()
def init_adapter_on_grid(model: QwenVLForConditionalGeneration, sharpness: float = 30.0, content_scale: float = 0.3):
    """Start each adapter query attending to the patches at its own place on the image, instead of (nearly) uniformly
    over all of them as a random initialisation does.

    The adapter's attention scores are `(ln_q(query) + pos) W_q . (ln_kv(x) + pos_k) W_k`: with `ln_q` zeroed the
    queries are their 2-D sin-cos positions alone; `W_q = W_k = sqrt(sharpness) I` makes a query's scores highest
    around its position; `ln_kv` scaled by `content_scale` keeps the patch content from outweighing the position in
    the keys (the values shrink with it, and `ln_post` after the adapter undoes that). Everything stays trainable.
    With as many queries as patches, each image token starts as the features of the 3x3 patches around one patch
    (over 95% of its attention in the tests), so shapes that the ViT keeps apart stay apart; a random adapter
    averages them (attention entropy 4.08 of at most 4.16 over 64 patches in the demo)."""
    adapter = model.transformer.visual.attn_pool
    dim = adapter.query.shape[1]
    scale = sharpness**0.5
    adapter.ln_q.weight.zero_()
    adapter.ln_q.bias.zero_()
    adapter.ln_kv.weight.mul_(content_scale)
    adapter.attn.in_proj_weight[: 2 * dim] = scale * torch.eye(dim).repeat(2, 1)
    adapter.attn.in_proj_bias[: 2 * dim] = 0.0


def build_stage1_checkpoint(
    open_clip_model_or_visual: nn.Module,
    qwen_lm_dir_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    qwen_lm_config: str | os.PathLike | Mapping | None,
    out_dir: str | os.PathLike,
    image_size: int = 224,
    *,
    dtype: torch.dtype | None = None,
    adapter_init: str = "random",
    **config_overrides,
) -> Path:
    """
    Build the stage-1 initial Qwen-VL checkpoint and save it to `out_dir` (as the paper's stage 1 starts: LM from
    Qwen-7B, ViT from OpenCLIP, 224x224 images, adapter freshly initialised).

    Args:
        open_clip_model_or_visual: an OpenCLIP CLIP model or its `.visual` ViT.
        qwen_lm_dir_or_state_dict: a Qwen-7B checkpoint directory (safetensors) or its state dict (official names
            `transformer.wte/h/ln_f`, `lm_head`).
        qwen_lm_config: that checkpoint's `config.json` (path or dict); `None` reads it from the directory.
        out_dir: where `save_pretrained` writes the result.
        image_size: input resolution of the ViT (224 in stage 1; stage 2 continues at 448).
        dtype: weight dtype; defaults to the LM checkpoint's.
        adapter_init: "random" (the model's initialisation, as the paper) or "grid" (`init_adapter_on_grid`).
        config_overrides: other `QwenVLConfig` fields (e.g. `seq_length=2048`).

    Raises `ValueError` if any weight is missing or unexpected, besides the adapter the model initialises.
    """
    if adapter_init not in ADAPTER_INITS:
        raise ValueError(f"adapter_init must be one of {ADAPTER_INITS}, got {adapter_init!r}.")
    visual = getattr(open_clip_model_or_visual, "visual", open_clip_model_or_visual)
    if qwen_lm_config is None:
        if isinstance(qwen_lm_dir_or_state_dict, Mapping):
            raise ValueError("pass qwen_lm_config (the LM's config.json) along with an LM state dict.")
        qwen_lm_config = Path(qwen_lm_dir_or_state_dict) / "config.json"
    if not isinstance(qwen_lm_config, Mapping):
        qwen_lm_config = json.loads(Path(qwen_lm_config).read_text())
    lm_kwargs = _lm_config_kwargs(qwen_lm_config)

    blocks = _vision_blocks(visual)
    width, heads = visual.conv1.out_channels, blocks[0].attn.num_heads
    visual_config = {
        "image_size": image_size,
        "patch_size": visual.conv1.kernel_size[0],
        "width": width,
        "layers": len(blocks),
        "heads": heads,
        "mlp_ratio": _mlp_ratio(width, blocks[0].mlp.c_fc.out_features),
        "output_dim": lm_kwargs["hidden_size"],
    }
    # Qwen-7B's vocabulary has `<img>` at the official id (the default); an LM config may name another one.
    if isinstance(qwen_lm_config.get("visual"), Mapping) and "image_start_id" in qwen_lm_config["visual"]:
        visual_config["image_start_id"] = qwen_lm_config["visual"]["image_start_id"]
    if image_size % visual_config["patch_size"]:
        raise ValueError(
            f"image_size ({image_size}) must be a multiple of the patch size ({visual_config['patch_size']})."
        )
    config = QwenVLConfig(
        **{**lm_kwargs, **config_overrides, "visual": {**visual_config, **config_overrides.get("visual", {})}}
    )

    if isinstance(qwen_lm_dir_or_state_dict, Mapping):
        lm_state = dict(qwen_lm_dir_or_state_dict)
    else:
        lm_state = load_qwen_lm_state_dict(qwen_lm_dir_or_state_dict)
    if visual_keys := [k for k in lm_state if k.startswith(VISUAL_PREFIX)]:
        raise ValueError(
            f"the LM checkpoint already has vision weights ({visual_keys[0]}, ...): pass the Qwen-7B language model, "
            "not a Qwen-VL checkpoint."
        )
    dtype = dtype or lm_state["transformer.wte.weight"].dtype
    state = {k: v.to(dtype) for k, v in {**lm_state, **vision_state_dict_from_open_clip(visual, width, heads)}.items()}
    del lm_state

    logger.info("Loading %d tensors into a %s Qwen-VL model", len(state), dtype)
    model, info = QwenVLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problems = {
        "missing": sorted(k for k in info["missing_keys"] if not k.startswith(ADAPTER_PREFIXES)),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
    }
    if any(problems.values()):
        raise ValueError(
            "the LM and vision weights do not fit the Qwen-VL model built from their configs: "
            + "; ".join(f"{kind}: {keys}" for kind, keys in problems.items() if keys)
        )
    logger.info("LM and ViT weights loaded; the adapter (attn_pool, ln_post, proj) is freshly initialised.")
    if adapter_init == "grid":
        init_adapter_on_grid(model)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def _open_clip_visual(model: str, pretrained: str | None) -> nn.Module:
    """Build the vision tower of an OpenCLIP model config (built-in name or JSON file) and load local weights."""
    import open_clip
    from open_clip.model import _build_vision_tower

    if Path(model).is_file():
        model_config = json.loads(Path(model).read_text())
    elif model in open_clip.list_models():
        model_config = open_clip.get_model_config(model)
    else:
        raise ValueError(
            f"--open-clip-model {model!r} is neither a JSON model config nor a built-in OpenCLIP model name "
            "(see open_clip.list_models())."
        )
    if "vision_cfg" not in model_config or "embed_dim" not in model_config:
        raise ValueError(
            "an OpenCLIP model config needs 'embed_dim' and 'vision_cfg' (as in open_clip/model_configs)."
        )
    visual = _build_vision_tower(
        model_config["embed_dim"], model_config["vision_cfg"], quick_gelu=model_config.get("quick_gelu", False)
    )
    if pretrained is None:
        logger.warning("no --pretrained checkpoint: the vision tower is randomly initialised.")
        return visual
    state = open_clip.factory.load_state_dict(pretrained)
    visual_state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    try:
        visual.load_state_dict(visual_state or state)
    except RuntimeError as error:
        raise ValueError(f"--pretrained {pretrained} does not fit --open-clip-model {model}: {error}") from error
    return visual


def main(argv: list[str] | None = None) -> int:
    """`qwen-vl convert openclip --open-clip-model NAME_OR_CONFIG_JSON [--pretrained PATH] --qwen-lm DIR --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="qwen-vl convert openclip",
        description="Build the stage-1 Qwen-VL checkpoint: Qwen-7B LM + OpenCLIP ViT, adapter freshly initialised.",
    )
    parser.add_argument(
        "--open-clip-model", required=True, help="OpenCLIP model name (e.g. ViT-bigG-14) or config JSON"
    )
    parser.add_argument("--pretrained", help="local OpenCLIP checkpoint (.safetensors, or .bin/.pt)")
    parser.add_argument("--qwen-lm", required=True, help="Qwen-7B checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-size", type=int, default=224, help="ViT input resolution (stage 1: 224)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: the LM's)")
    parser.add_argument("--n-queries", type=int, help="adapter queries per image (default: Qwen-VL's 256)")
    parser.add_argument("--image-start-id", type=int, help="id of <img> in the tokenizer (default: Qwen-VL's 151857)")
    parser.add_argument(
        "--adapter-init",
        choices=ADAPTER_INITS,
        default="random",
        help="random (as the paper) or grid: each query starts attending to the patches at its own place",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        visual = _open_clip_visual(args.open_clip_model, args.pretrained)
        overrides = {"n_queries": args.n_queries, "image_start_id": args.image_start_id}
        build_stage1_checkpoint(
            visual, args.qwen_lm, None, args.out, args.image_size, dtype=args.dtype and getattr(torch, args.dtype),
            adapter_init=args.adapter_init,
            visual={key: value for key, value in overrides.items() if value is not None},
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(1, f"qwen-vl convert openclip: error: {error}\n")
    print(f"Saved the stage-1 checkpoint to {args.out}")
    return 0
