"""Performance behaviour that can be checked without timing: work done once, memory while loading, compiled decoding.

Speed itself is measured by `benchmarks/run.py`, never here.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def two_prompts(tiny_inputs, config):
    """Two left-padded rows holding three images in all."""
    return tiny_inputs(config, lengths=[30, 21], images_per_row=[1, 2])


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_encodes_images_once(tiny_model_factory, tiny_inputs, cache_implementation):
    """Image features are computed at prefill only: one vision-tower call per `generate`, with every image in it."""
    model = tiny_model_factory().eval()
    batch = two_prompts(tiny_inputs, model.config)
    calls = []
    model.transformer.visual.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    model.generate(**batch, max_new_tokens=5, cache_implementation=cache_implementation, **GREEDY)
    assert calls == [3]


def test_static_cache_matches_dynamic_cache(tiny_model_factory, tiny_inputs):
    """StaticCache keeps the prefill's dynamic-NTK alpha: with a short trained context (alpha > 1, log-n active) the
    tokens equal those of the default dynamic cache."""
    model = tiny_model_factory(seq_length=64).eval()
    batch = two_prompts(tiny_inputs, model.config)
    common = dict(max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
    dynamic = model.generate(**batch, **common)
    static = model.generate(**batch, cache_implementation="static", disable_compile=True, **common)
    assert type(static.cache).__name__ == "StaticCache"
    scaling = model.transformer.context_scaling
    assert scaling.prefill_alpha(static.cache) == scaling.prefill_alpha(dynamic.cache) > 1
    assert static.sequences.tolist() == dynamic.sequences.tolist()


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_static_decoding_matches_eager(tiny_model_factory, tiny_inputs):
    """`generate` compiles the decoding step as one graph (`fullgraph=True` fails on any graph break) and gives the
    tokens of the uncompiled dynamic-cache path, dynamic NTK included, on every call: each call has a new cache, and
    the compiled step must neither break nor recompile when the previous call's cache is gone."""
    import gc

    model = tiny_model_factory(seq_length=64).eval()
    batch = two_prompts(tiny_inputs, model.config)
    eager = model.generate(**batch, max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
    expected = eager.sequences
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # generate only compiles on accelerators unless told
    generate = dict(max_new_tokens=6, cache_implementation="static", compile_config=compile_config, **GREEDY)
    try:
        first = model.generate(**batch, **generate)
        assert hasattr(model, "_compiled_call"), "generate did not take the compiled path"
        del eager  # the caches alive while the step compiled are gone before the next call checks its guards
        gc.collect()
        with torch._dynamo.config.patch(error_on_recompile=True):
            later = [model.generate(**batch, **generate) for _ in range(2)]
    finally:
        torch._dynamo.reset()
    assert [first.tolist(), *(tokens.tolist() for tokens in later)] == [expected.tolist()] * 3


@pytest.mark.parametrize(
    "search", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=5)], ids=["greedy", "beams", "sample"]
)
def test_default_cache_matches_concatenating_cache(tiny_model_factory, tiny_inputs, search):
    """`generate`'s default cache (`QwenVLCache`, preallocated) gives the tokens and scores of transformers'
    concatenating `DynamicCache`, on left-padded rows with images, with beams (cache reordering) and sampling."""
    from transformers import DynamicCache

    from modeling_qwen_vl.modeling_qwen_vl import QwenVLCache

    model = tiny_model_factory(seq_length=64).eval()  # short trained context: dynamic NTK and log-n active
    batch = two_prompts(tiny_inputs, model.config)
    common = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **{**GREEDY, **search})
    torch.manual_seed(0)
    default = model.generate(**batch, **common)
    torch.manual_seed(0)
    concatenating = model.generate(**batch, cache=DynamicCache(config=model.config), **common)
    assert isinstance(default.cache, QwenVLCache) and isinstance(default.cache, DynamicCache)
    assert default.sequences.tolist() == concatenating.sequences.tolist()
    torch.testing.assert_close(torch.stack(default.scores), torch.stack(concatenating.scores), rtol=1e-5, atol=1e-5)


def test_default_cache_writes_in_place_and_grows(tiny_model_factory):
    """Decoding steps write into the buffer the prefill allocated (no per-step copy of the cache); past its room the
    cache grows and keeps every earlier position, and a returned cache can be continued by a later call."""
    from modeling_qwen_vl.modeling_qwen_vl import QwenVLCache

    model = tiny_model_factory().eval()
    input_ids = torch.randint(3, 100, (2, 10))
    cache = QwenVLCache(model.config, capacity=12)
    with torch.no_grad():
        logits = model(input_ids=input_ids, cache=cache).logits
        buffer = cache.layers[0].keys.data_ptr()
        steps = []
        for i in range(6):  # positions 10..15: two fit in the room, then the cache grows
            out = model(input_ids=input_ids[:, i : i + 1], cache=cache)
            steps.append(out.logits[:, -1])
            if i < 2:
                assert cache.layers[0].keys.data_ptr() == buffer
        assert cache.get_seq_length() == 16
        full = model(input_ids=torch.cat([input_ids, input_ids[:, :6]], 1), use_cache=False).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 10:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, full[:, :10], rtol=1e-4, atol=1e-5)


def test_rotary_matches_the_official_formula():
    """The one-pass rotary equals the official `x * cos + rotate_half(x) * sin` on the repeated tables, bit for bit,
    with a partial rotary dimension too."""
    from modeling_qwen_vl.modeling_qwen_vl import apply_rotary_pos_emb

    def official(x, cos, sin):  # x [batch, heads, len, head_dim], tables [batch, len, rot_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)

    generator = torch.Generator().manual_seed(0)
    for head_dim, rot_dim in ((32, 32), (32, 16)):
        x = torch.randn(2, 3, 5, head_dim, generator=generator)  # [batch, heads, len, head_dim]
        freqs = torch.randn(2, 5, rot_dim // 2, generator=generator) * 10
        table = torch.cat((freqs, freqs), dim=-1)
        ours = apply_rotary_pos_emb(x.transpose(1, 2), freqs.cos(), freqs.sin()).transpose(1, 2)
        assert torch.equal(ours, official(x, table.cos(), table.sin()))


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_device_map_offload_generates_same_tokens(tiny_model_factory, tiny_inputs, tmp_path, tie_word_embeddings):
    """`device_map="auto"` with too little memory offloads blocks (vision tower included) to disk: no-split blocks stay
    whole, buffers and the adapter's attention weights are loaded by the offload hooks, and the tokens do not change."""
    model = tiny_model_factory(tie_word_embeddings=tie_word_embeddings).eval()
    batch = tiny_inputs(model.config, lengths=[20], images_per_row=[1])
    expected = model.generate(**batch, max_new_tokens=5, **GREEDY)
    model.save_pretrained(tmp_path / "model")
    budget = int(0.6 * sum(p.numel() * p.element_size() for p in model.parameters()))
    offloaded = QwenVLForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    ).eval()
    device_map = offloaded.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"} and device_map["transformer.visual"] == "disk"
    assert not [name for name in device_map if re.search(r"\.(h|resblocks)\.\d+\.", name)], device_map
    assert offloaded.generate(**batch, max_new_tokens=5, **GREEDY).tolist() == expected.tolist()


LOAD_SCRIPT = r"""
import gc, json, sys
import accelerate, torch
from modeling_qwen_vl import QwenVLForConditionalGeneration

def status(field):  # bytes of VmRSS (resident now) or VmHWM (peak resident), from one consistent source
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def load(path, kwargs):
    model = QwenVLForConditionalGeneration.from_pretrained(path, **kwargs)
    state = model.state_dict()
    for tensor in state.values():  # read every weight, so that lazily mapped pages count too
        tensor.sum()
    return state

kwargs = json.loads(sys.argv[2])
if "dtype" in kwargs:
    kwargs["dtype"] = kwargs["dtype"] if kwargs["dtype"] == "auto" else getattr(torch, kwargs["dtype"])
# Warm-up on a tiny checkpoint: the library code that loading runs is paged in before the baseline.
load(sys.argv[3], kwargs)
gc.collect()
baseline = status("VmRSS")
state = load(sys.argv[1], kwargs)
print(json.dumps({
    "growth": status("VmHWM") - baseline,
    "weights": sum(t.numel() * t.element_size() for t in state.values()),
    "dtypes": sorted({str(t.dtype) for t in state.values()}),
    "file_mapped": any("model.safetensors" in line for line in open("/proc/self/maps")),
}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ~330 MB float32 random checkpoint (84M parameters, real 448px vision geometry) and a tiny one to warm up
    with."""
    config = QwenVLConfig(
        vocab_size=16000,
        hidden_size=768,
        num_hidden_layers=6,
        num_attention_heads=12,
        kv_channels=64,
        intermediate_size=4096,
        visual=dict(image_size=448, patch_size=14, width=512, layers=4, heads=8, mlp_ratio=4.0, output_dim=768,
                    image_start_id=15000),
    )
    path, tiny = tmp_path_factory.mktemp("mid_size"), tmp_path_factory.mktemp("tiny")
    QwenVLForConditionalGeneration._from_config(config).save_pretrained(path)
    tiny_config = dict(
        num_hidden_layers=1, hidden_size=128, num_attention_heads=1, kv_channels=128, intermediate_size=64
    )
    tiny_visual = dict(config.visual, width=32, layers=1, heads=1, output_dim=128)
    QwenVLForConditionalGeneration._from_config(
        QwenVLConfig(**{**config.to_dict(), **tiny_config, "visual": tiny_visual})
    ).save_pretrained(tiny)
    return path, tiny


def load_in_subprocess(checkpoints: tuple[Path, Path], **kwargs) -> dict:
    """Load `checkpoints[0]` in a fresh Python process after a warm-up load of `checkpoints[1]`."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(checkpoints[0]), json.dumps(kwargs), str(checkpoints[1])],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss (Linux)")
@pytest.mark.parametrize(
    "kwargs", [{}, {"dtype": "auto"}, {"device_map": "auto"}], ids=["default", "dtype-auto", "device-map-auto"]
)
def test_loading_holds_the_weights_once(checkpoints, kwargs):
    """Peak RSS growth of a fresh process while loading (every weight read afterwards) stays under 1.3x the weights:
    parameters are created on the meta device and filled from the checkpoint, never allocated twice."""
    report = load_in_subprocess(checkpoints, **kwargs)
    assert report["dtypes"] == ["torch.float32"]
    assert report["growth"] < 1.3 * report["weights"], report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_bfloat16_loading_casts_every_weight(checkpoints):
    """`dtype=torch.bfloat16` casts parameters and persistent buffers alike, so no float32 view of the memory-mapped
    checkpoint survives loading."""
    report = load_in_subprocess(checkpoints, dtype="bfloat16")
    assert report["dtypes"] == ["torch.bfloat16"]
    assert not report["file_mapped"]


def test_bfloat16_model_runs(tiny_model_factory, tiny_inputs, tmp_path):
    tiny_model_factory().save_pretrained(tmp_path)
    model = QwenVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    batch = tiny_inputs(model.config, lengths=[20], images_per_row=[1])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
