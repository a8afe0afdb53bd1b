"""OpenCLIP ViT -> Qwen-VL vision tower, and the stage-1 checkpoint built from it (tiny random models, no download).

OpenCLIP prepends a class token that every patch attends to, and Qwen-VL has none, so full-model outputs are not
comparable. The comparisons below are like for like: each block on the same patch-token hidden states, and the whole
stack (patch embedding, positions, ln_pre, blocks) with OpenCLIP's transformer run on the patch tokens only.
"""

import json

import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from safetensors.torch import load_file, save_file

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration
from modeling_qwen_vl.modeling_qwen_vl import QwenVLVisionTransformer, resize_grid_embedding
from qwen_vl import cli
from qwen_vl.hub_upload.convert_openclip import (
    ADAPTER_PREFIXES,
    build_stage1_checkpoint,
    interleave_qkv_per_head,
    vision_state_dict_from_open_clip,
)
from tests.conftest import TINY_CONFIG

WIDTH, LAYERS, HEADS, PATCH = 64, 2, 4, 14
# Qwen-VL's LayerNorms use eps 1e-6; build the OpenCLIP tower the same way so that only the weight mapping is tested.
VISION_CFG = dict(
    width=WIDTH,
    layers=LAYERS,
    head_width=WIDTH // HEADS,
    patch_size=PATCH,
    image_size=224,
    mlp_ratio=4.0,
    norm_kwargs={"eps": 1e-6},
)


def open_clip_visual(seed: int = 0, **overrides):
    """A tiny OpenCLIP ViT with every parameter random (biases and norms too, so no layout error can hide)."""
    torch.manual_seed(seed)
    visual = _build_vision_tower(128, CLIPVisionCfg(**{**VISION_CFG, **overrides})).eval()
    with torch.no_grad():
        for param in visual.parameters():
            param.normal_(0, 0.2)
    return visual


def qwen_vision_tower(state: dict, attn_implementation: str = "eager") -> QwenVLVisionTransformer:
    """Qwen-VL's vision tower at 224px with `state` loaded; only the adapter may be left out of it."""
    visual = dict(
        image_size=224, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS, mlp_ratio=4.0, output_dim=128,
        image_start_id=TINY_CONFIG["visual"]["image_start_id"],
    )
    config = QwenVLConfig(**{**TINY_CONFIG, "visual": visual})
    config._attn_implementation = attn_implementation
    tower = QwenVLVisionTransformer(config).eval()
    prefix = "transformer.visual."
    result = tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys
    assert {prefix + k for k in result.missing_keys} == {
        prefix + k for k in tower.state_dict() if (prefix + k).startswith(ADAPTER_PREFIXES)
    }
    return tower


def test_interleave_qkv_per_head_layout():
    heads, head_dim = 3, 2
    rows = torch.arange(3 * heads * head_dim)  # q rows 0..5, k rows 6..11, v rows 12..17 (stacked layout)
    out = interleave_qkv_per_head(rows, heads).view(heads, 3, head_dim)
    for h in range(heads):
        assert out[h, 0].tolist() == rows[h * head_dim : (h + 1) * head_dim].tolist()  # head h: its q rows
        assert out[h, 1].tolist() == (rows[heads * head_dim :][h * head_dim : (h + 1) * head_dim]).tolist()
        assert out[h, 2].tolist() == (rows[2 * heads * head_dim :][h * head_dim : (h + 1) * head_dim]).tolist()


def test_blocks_match_open_clip_on_same_hidden_states():
    visual = open_clip_visual()
    tower = qwen_vision_tower(vision_state_dict_from_open_clip(visual, WIDTH, HEADS))
    hidden = torch.randn(2, 256, WIDTH)
    with torch.no_grad():
        for clip_block, qwen_block in zip(visual.transformer.resblocks, tower.transformer.resblocks, strict=True):
            torch.testing.assert_close(qwen_block(hidden), clip_block(hidden), rtol=0, atol=1e-5)
            torch.testing.assert_close(
                qwen_block.attn(hidden), clip_block.attention(hidden), rtol=0, atol=1e-5
            )  # attention alone: the re-laid in_proj computes the same heads

        # negative control: without the per-head re-layout the attention differs (the test can see layout errors)
        block = tower.transformer.resblocks[0]
        block.attn.in_proj.weight.copy_(visual.transformer.resblocks[0].attn.in_proj_weight)
        block.attn.in_proj.bias.copy_(visual.transformer.resblocks[0].attn.in_proj_bias)
        assert (block.attn(hidden) - visual.transformer.resblocks[0].attention(hidden)).abs().max() > 1e-2


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_stack_matches_open_clip_without_class_token(attn_implementation):
    visual = open_clip_visual()
    tower = qwen_vision_tower(vision_state_dict_from_open_clip(visual, WIDTH, HEADS), attn_implementation)
    pixels = torch.randn(2, 3, 224, 224)
    captured = {}
    tower.transformer.register_forward_hook(lambda module, args, output: captured.update(ours=output))
    with torch.no_grad():
        tower(pixels)  # the real forward: conv1 -> + positions -> ln_pre -> blocks (-> adapter, unused here)
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
        reference = visual.transformer(visual.ln_pre(patches + visual.positional_embedding[1:]))
    assert captured["ours"].shape == (2, 256, WIDTH)
    torch.testing.assert_close(captured["ours"], reference, rtol=0, atol=1e-5)


def test_positional_table_drops_class_entry_and_keeps_16x16_exactly():
    visual = open_clip_visual()
    with torch.no_grad():
        visual.positional_embedding[0] = float("nan")  # the class entry must not reach the converted table
    state = vision_state_dict_from_open_clip(visual, WIDTH, HEADS)
    table = state["transformer.visual.positional_embedding"]
    assert table.shape == (256, WIDTH)
    assert torch.equal(table, visual.positional_embedding[1:].detach())
    assert "transformer.visual.class_embedding" not in state
    assert not [k for k in state if k.startswith(ADAPTER_PREFIXES)]  # OpenCLIP's ln_post/proj are not the adapter


def test_positional_table_from_other_grid_is_resized_to_16x16():
    visual = open_clip_visual(image_size=112)  # 8x8 patch grid
    with torch.no_grad():
        visual.positional_embedding[0] = float("nan")
    table = vision_state_dict_from_open_clip(visual, WIDTH, HEADS)["transformer.visual.positional_embedding"]
    assert table.shape == (256, WIDTH) and torch.isfinite(table).all()
    expected = resize_grid_embedding(visual.positional_embedding[1:].detach(), 256)
    torch.testing.assert_close(table, expected, rtol=0, atol=0)
    grid = table.view(16, 16, WIDTH)
    source = visual.positional_embedding[1:].detach().view(8, 8, WIDTH)
    assert (grid[0, 0] - source[0, 0]).abs().max() < (grid[0, 0] - source[7, 7]).abs().max()  # corners stay corners


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(ls_init_value=0.1), "unsupported"),  # layer scale has no place in Qwen-VL's block
        (dict(no_ln_pre=True), "missing"),
        (dict(act_kwargs={"approximate": "tanh"}), "exact GELU"),
    ],
)
def test_unsupported_towers_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        vision_state_dict_from_open_clip(open_clip_visual(**overrides), WIDTH, HEADS)


def test_quick_gelu_and_wrong_sizes_are_refused():
    torch.manual_seed(0)
    quick = _build_vision_tower(128, CLIPVisionCfg(**VISION_CFG), quick_gelu=True)
    with pytest.raises(ValueError, match="QuickGELU"):
        vision_state_dict_from_open_clip(quick, WIDTH, HEADS)
    with pytest.raises(ValueError, match="do not match"):
        vision_state_dict_from_open_clip(open_clip_visual(), WIDTH, HEADS * 2)
    with pytest.raises(TypeError, match="VisionTransformer"):
        vision_state_dict_from_open_clip(torch.nn.Linear(2, 2), WIDTH, HEADS)


# ---------------------------------------------------------------------------------------------------------------------
# Stage-1 checkpoint
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def qwen_lm_dir(tmp_path, tiny_model_factory):
    """A tiny "Qwen-7B" checkpoint: official LM key names, two safetensors shards + index, official config keys."""
    model = tiny_model_factory(seed=1)
    lm_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("transformer.visual.")}
    path = tmp_path / "qwen_lm"
    path.mkdir()
    names = sorted(lm_state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        save_file({k: lm_state[k] for k in keys}, path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {k: v for k, v in TINY_CONFIG.items() if k != "visual"}
    config["visual"] = {"image_start_id": TINY_CONFIG["visual"]["image_start_id"]}  # the tiny vocabulary's <img> id
    config.update(
        architectures=["QWenLMHeadModel"],
        model_type="qwen",
        auto_map={"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        seq_length=2048,
        bf16=False,
        fp32=True,
    )
    (path / "config.json").write_text(json.dumps(config))
    return path, lm_state


def test_build_stage1_checkpoint(tmp_path, qwen_lm_dir):
    lm_dir, lm_state = qwen_lm_dir
    visual = open_clip_visual()
    out = build_stage1_checkpoint(visual, lm_dir, None, tmp_path / "stage1")

    model, info = QwenVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.visual["image_size"] == 224  # stage 1 resolution
    assert (model.config.visual["width"], model.config.visual["layers"], model.config.visual["heads"]) == (
        WIDTH,
        LAYERS,
        HEADS,
    )
    assert model.config.visual["output_dim"] == model.config.hidden_size == TINY_CONFIG["hidden_size"]
    saved = load_file(out / "model.safetensors")
    for name, tensor in lm_state.items():
        assert torch.equal(saved[name], tensor), name
    for name, tensor in vision_state_dict_from_open_clip(visual, WIDTH, HEADS).items():
        assert torch.equal(saved[name], tensor), name
    adapter = [k for k in saved if k.startswith(ADAPTER_PREFIXES)]
    assert adapter and all(torch.isfinite(saved[k]).all() for k in adapter)


def test_grid_adapter_init_starts_each_query_on_its_own_patch(tmp_path, qwen_lm_dir):
    """`adapter_init="grid"` with one query per patch (16x16 at 224px): each query's attention falls on the 3x3
    patches around its own, where the random initialisation spreads it over the image; the checkpoint loads
    cleanly."""
    lm_dir, _ = qwen_lm_dir
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)

    def attention(adapter_init: str) -> torch.Tensor:
        out = build_stage1_checkpoint(
            open_clip_visual(), lm_dir, None, tmp_path / adapter_init, adapter_init=adapter_init,
            visual={"n_queries": 256},
        )
        model, info = QwenVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        visual, captured = model.transformer.visual, {}
        visual.attn_pool.register_forward_pre_hook(lambda module, args: captured.update(patches=args[0]))
        with torch.no_grad():
            visual(pixels)
            pool = visual.attn_pool
            keys = pool.ln_kv(pool.kv_proj(captured["patches"])) + resize_grid_embedding(pool.pos_embed, 256)
            query = pool.ln_q(pool.query) + pool.pos_embed
            w_q, w_k, _ = pool.attn.in_proj_weight.chunk(3)
            b_q, b_k, _ = pool.attn.in_proj_bias.chunk(3)
            scores = (query @ w_q.T + b_q) @ (keys @ w_k.T + b_k).transpose(1, 2) * pool.attn.scaling
        return scores.softmax(-1)  # [images, queries, patches] (one head: output_dim 128)

    grid, random_init = attention("grid"), attention("random")
    rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
    near = ((rows[:, None] - rows[None]).abs() <= 1) & ((cols[:, None] - cols[None]).abs() <= 1)  # 3x3 around
    assert near[torch.arange(256), grid.argmax(-1)].all()  # every query peaks next to its own patch
    assert (grid * near).sum(-1).min() > 0.95 and (random_init * near).sum(-1).mean() < 0.1  # uniform: 9/256
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        build_stage1_checkpoint(open_clip_visual(), lm_dir, None, tmp_path / "bad", adapter_init="local")


def test_build_stage1_checkpoint_refuses_mismatched_lm(tmp_path, qwen_lm_dir):
    lm_dir, lm_state = qwen_lm_dir
    config = json.loads((lm_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks"):
        build_stage1_checkpoint(open_clip_visual(), lm_state, {"hidden_size": 128}, tmp_path / "a")
    with pytest.raises(ValueError, match="unexpected"):
        extra = {**lm_state, "transformer.h.9.ln_1.weight": torch.ones(128)}
        build_stage1_checkpoint(open_clip_visual(), extra, config, tmp_path / "b")
    with pytest.raises(ValueError, match=r"missing: \['lm_head.weight'\]"):
        partial = {k: v for k, v in lm_state.items() if k != "lm_head.weight"}
        build_stage1_checkpoint(open_clip_visual(), partial, config, tmp_path / "c")
    with pytest.raises(ValueError, match="mismatched: .*lm_head.weight"):
        build_stage1_checkpoint(open_clip_visual(), lm_state, {**config, "vocab_size": 1024}, tmp_path / "d")
    with pytest.raises(ValueError, match="not a Qwen-VL checkpoint"):
        qwen_vl_state = {**lm_state, "transformer.visual.proj": torch.zeros(128, 128)}
        build_stage1_checkpoint(open_clip_visual(), qwen_vl_state, config, tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "bcde")


def test_cli_convert_openclip(tmp_path, qwen_lm_dir, capsys):
    lm_dir, lm_state = qwen_lm_dir
    model_config = tmp_path / "tiny-vit.json"
    vision_cfg = {k: v for k, v in VISION_CFG.items() if k != "norm_kwargs"}
    model_config.write_text(json.dumps({"embed_dim": 128, "vision_cfg": vision_cfg, "text_cfg": {"width": 32}}))
    visual = open_clip_visual(norm_kwargs=None)
    clip_checkpoint = tmp_path / "open_clip_model.safetensors"
    save_file(
        {f"visual.{k}": v for k, v in visual.state_dict().items()} | {"logit_scale": torch.ones([])}, clip_checkpoint
    )

    argv = [
        "convert",
        "openclip",
        "--open-clip-model",
        str(model_config),
        "--pretrained",
        str(clip_checkpoint),
        "--qwen-lm",
        str(lm_dir),
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0

    assert "Saved the stage-1 checkpoint" in capsys.readouterr().out
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(saved["transformer.visual.conv1.weight"], visual.conv1.weight.detach())
    assert torch.equal(saved["lm_head.weight"], lm_state["lm_head.weight"])
