"""Speed and memory of Qwen-VL on ~100M-parameter configs with the real 448px / 1024-patch / 256-query geometry.

Every variant (attention implementation, KV cache, torch.compile, int8) runs in the same process, interleaved round by
round, and is reported as a ratio to eager, so comparisons survive a noisy machine. Times are medians after warm-up.
The machine's own limits are measured in the same run (weight-streaming bandwidth, fp32 matmul peak, before and after
the benchmarks) and every decode and prefill figure is also given as a fraction of the bound they imply.
Prints one table and writes it, with the machine it ran on, to `benchmarks/RESULTS.md` (one section per config,
device, dtype and `--quick` setting; the other sections are kept).

    python benchmarks/run.py [--config small-12L|small] [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]
                             [--no-compile | --compile] [--no-int8] [--training]
"""

import argparse
import copy
import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.utils import is_flash_attn_2_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration  # noqa: E402
from modeling_qwen_vl.modeling_qwen_vl import fast_linear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# Qwen-VL's image geometry (448px, patch 14 -> 1024 patches, 256 queries) with narrow towers.
CONFIGS = {
    # ~100M LM + 22M ViT parameters: the checkpoint the official implementation was compared on (issue 13)
    "small-12L": dict(
        vocab_size=16384,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        kv_channels=64,
        intermediate_size=4096,
        visual=dict(image_size=448, patch_size=14, width=384, layers=12, heads=6, mlp_ratio=4.0, output_dim=768, image_start_id=16000),
    ),
    # ~1.2B parameters (LM 2048 x 16 layers, ViT-L-sized tower): the GPU checks of benchmarks/gpu_check.sh
    "1B": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        kv_channels=128,
        intermediate_size=11008,
        visual=dict(image_size=448, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0, output_dim=2048, image_start_id=31000),
    ),
    # ~100M parameters, few layers
    "small": dict(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=4,
        num_attention_heads=12,
        kv_channels=64,
        intermediate_size=4096,
        visual=dict(image_size=448, patch_size=14, width=512, layers=6, heads=8, mlp_ratio=4.0, output_dim=768, image_start_id=31000),
    ),
}
PROMPT_TEXT_TOKENS = 32
BATCH_TEXT_TOKENS = [32, 29, 26, 23, 20, 17, 14, 11]  # the 8 prompts of batched decoding (left-padded)

# Dense bf16 tensor-core peak (FLOP/s) by GPU name, for model FLOPs utilisation; the first matching key wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
MFU_TARGET = 0.35


@dataclass
class Settings:
    warmup: int  # untimed calls per variant before timing (compilation happens here)
    rounds: int  # timed rounds; each round runs every variant once, in turn
    vision_batch: int
    new_tokens: int
    train_batch: int
    train_seq_len: int
    train_images: int  # images per packed training sequence
    compile: bool
    memory_seq_len: int = 0  # CPU only: also profile training memory at this packed length (0: skip)
    memory_images: int = 0
    training: bool = True
    int8: bool = True  # CPU float32 only: the int8 variants


def settings_for(device: str, quick: bool, use_compile: bool) -> Settings:
    if device == "cuda":
        return Settings(2, 3 if quick else 10, 16, 16 if quick else 64, 8, 2048, 4, use_compile)
    if quick:
        return Settings(1, 3, 2, 8, 1, 320, 1, False)
    return Settings(1, 3, 4, 24, 1, 512, 1, use_compile, memory_seq_len=2048, memory_images=4)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def image_span(config: QwenVLConfig) -> list[int]:
    return [config.image_start_id] + [config.image_pad_id] * config.visual["n_queries"] + [config.image_end_id]


def random_text(n: int, generator: torch.Generator, config: QwenVLConfig) -> list[int]:
    """Random ordinary token ids (below the image and special ids of the small configs)."""
    return torch.randint(10, config.image_start_id - 100, (n,), generator=generator).tolist()


def prompts(config: QwenVLConfig, text_lengths: list[int], generator: torch.Generator, images: bool = True) -> dict:
    """Left-padded rows, each an image span followed by random text; with `images=False` random text fills the span's
    positions instead (same lengths, no vision work)."""
    span = len(image_span(config))
    rows = [image_span(config) + random_text(n, generator, config) if images else random_text(span + n, generator, config) for n in text_lengths]
    width = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }
    if images:
        size = config.visual["image_size"]
        batch["pixel_values"] = torch.randn(len(rows), 3, size, size, generator=generator)
    return batch


def training_batch(config: QwenVLConfig, settings: Settings, generator: torch.Generator) -> dict:
    """Multitask-stage packed sequences: image spans and text interleaved up to `train_seq_len` tokens per row; labels
    ignore the image slots and `</img>`, as the official data pipeline does."""
    span, images = image_span(config), settings.train_images
    chunk = settings.train_seq_len // images
    rows = []
    for _ in range(settings.train_batch):
        row = []
        for _ in range(images):
            row += span + random_text(chunk - len(span), generator, config)
        rows.append(row + random_text(settings.train_seq_len - len(row), generator, config))
    input_ids = torch.tensor(rows)
    inside = (input_ids == config.image_start_id).cumsum(-1) > (input_ids == config.image_end_id).cumsum(-1)
    size = config.visual["image_size"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.masked_fill(inside | (input_ids == config.image_end_id), -100),
        "pixel_values": torch.randn(settings.train_batch * images, 3, size, size, generator=generator),
    }


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Timing, memory, FLOPs
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(calls: dict[str, Callable], warmup: int, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of every variant: `warmup` untimed calls each, then `rounds` rounds that run each
    variant once in turn. A call may return its own duration (a float) instead of being timed whole."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            result = call()
            synchronize(device)
            times[name].append(result if isinstance(result, float) else time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_step_peak_bytes(step: Callable) -> int:
    """Peak bytes of CPU tensors alive during `step` above those alive before it.

    Replays the allocations and frees that `torch.profiler` records, in time order (operator granularity: memory that
    one operator allocates and frees internally is not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def vision_forward_flops(config: QwenVLConfig) -> float:
    """Forward FLOPs of the vision tower and adapter for one image (matmuls, 2 per multiply-add)."""
    v = config.visual
    patches, width, dim, queries = (v["image_size"] // v["patch_size"]) ** 2, v["width"], v["output_dim"], v["n_queries"]
    mlp = int(width * v["mlp_ratio"])
    per_layer = 2 * patches * (4 * width * width + 2 * width * mlp) + 4 * patches * patches * width
    vit = 2 * patches * 3 * v["patch_size"] ** 2 * width + v["layers"] * per_layer
    adapter = (
        2 * patches * width * dim  # kv_proj
        + 2 * queries * dim * dim * 3  # query and output projections, final `proj`
        + 2 * patches * dim * dim * 2  # key and value projections
        + 4 * queries * patches * dim  # attention
    )
    return vit + adapter


def lm_forward_flops(config: QwenVLConfig, tokens: int) -> float:
    """Forward FLOPs of the language model on one causal sequence (attention counted for its causal half)."""
    d = config.hidden_size
    per_token = 2 * (4 * d * d + 3 * d * config.intermediate_size // 2) * config.num_hidden_layers
    attention = 2 * tokens * tokens * d * config.num_hidden_layers
    return tokens * (per_token + 2 * d * config.vocab_size) + attention


def training_step_flops(config: QwenVLConfig, settings: Settings) -> float:
    """Model FLOPs of one training step: 3 x forward (backward = 2 x forward); checkpointing's recomputation is not
    counted (model FLOPs, not hardware FLOPs)."""
    per_row = settings.train_images * vision_forward_flops(config) + lm_forward_flops(config, settings.train_seq_len)
    return 3 * settings.train_batch * per_row


def prefill_flops(config: QwenVLConfig, tokens: int, images: int) -> float:
    """Forward FLOPs of a prefill: the images through the vision tower, `tokens` positions through the LM and the LM
    head on the last position only (`logits_to_keep=1`, as `generate` does)."""
    head = 2 * config.hidden_size * config.vocab_size
    return images * vision_forward_flops(config) + lm_forward_flops(config, tokens) - (tokens - 1) * head


def decode_step_bytes(model: QwenVLForConditionalGeneration, batch: int, cache_length: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decoding step must read: every LM weight but the embedding table (one row per
    sequence is gathered from it), and the keys and values of `cache_length` positions in every layer."""
    config, lm = model.config, model.transformer
    weights = tensor_bytes(p for name, p in lm.named_parameters() if not name.startswith(("visual.", "wte.")))
    weights += tensor_bytes([model.lm_head.weight])  # read whole, tied to the embedding or not
    element = next(lm.parameters()).element_size()
    kv = 2 * config.num_hidden_layers * batch * cache_length * config.num_attention_heads * config.kv_channels * element
    return weights, kv


@dataclass
class Limits:
    bandwidth: float  # bytes/s that `x @ W` streams from weights larger than every cache (best of MKL and oneDNN)
    copy_bandwidth: float  # bytes/s of a plain copy (bytes copied)
    matmul: float  # FLOP/s of a large square matmul (best of MKL and oneDNN)

    @property
    def streaming(self) -> float:
        """The bandwidth bound used for decoding: the better of gemv and copy."""
        return max(self.bandwidth, self.copy_bandwidth)


def measure_limits(device: str, dtype: torch.dtype, repeats: int = 5) -> Limits:
    """This machine's weight-streaming bandwidth and matmul peak, medians of `repeats` timed runs after one warm-up."""

    def median_time(call: Callable) -> float:
        call()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    generator = torch.Generator().manual_seed(0)
    # 8 x 48 MiB (float32) of weights: ~400 MB, as much as a small-12L decoding step reads, far beyond the caches
    weights = [torch.randn(4096, 3072, generator=generator).to(device, dtype) for _ in range(8)]
    x = torch.randn(1, 4096, generator=generator).to(device, dtype)
    streamed = tensor_bytes(weights)
    gemv = median_time(lambda: [x @ w for w in weights])
    if device == "cpu":  # the model's own kernel (oneDNN on x86, see `fast_linear`), on [out, in] weights as stored
        weights_out_in = [w.t().contiguous() for w in weights]
        gemv = min(gemv, median_time(lambda: [fast_linear(x, w) for w in weights_out_in]))
        weights_out_in = None
    source = torch.cat([w.flatten() for w in weights])
    target = torch.empty_like(source)
    copy = median_time(lambda: target.copy_(source))
    weights = source = target = None  # free ~800 MB before the matmul
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    matmul = median_time(lambda: a @ b)
    if device == "cpu":
        matmul = min(matmul, median_time(lambda: fast_linear(a, b)))
    return Limits(streamed / gemv, streamed / copy, 2 * n**3 / matmul)


def peak_flops(device: str, dtype: torch.dtype) -> float | None:
    if device != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    benchmark: str
    variant: str
    value: float
    unit: str
    higher_is_better: bool
    note: str = ""
    mfu: float | None = None  # training rows on a GPU of known peak
    step_peak: float | None = None  # memory rows: MiB above weights+optimizer state
    of_bound: float | None = None  # decode and prefill rows: measured speed / the machine's bound for this work


class FirstLogitsClock(LogitsProcessor):
    """Notes when the prefill's logits reach the sampler: decoding runs from there to the end of `generate`."""

    def __init__(self, device: str):
        self.device, self.start = device, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            synchronize(self.device)
            self.start = time.perf_counter()
        return scores


def compiled_copy(model: QwenVLForConditionalGeneration) -> QwenVLForConditionalGeneration:
    """A copy with every ViT and LM block compiled (outside the blocks, image splicing is data-dependent)."""
    model = copy.deepcopy(model)
    for block in list(model.transformer.visual.transformer.resblocks) + list(model.transformer.h):
        block.compile()
    return model


def using(model: QwenVLForConditionalGeneration, implementation: str, call: Callable) -> Callable:
    """`call` run with `model` switched to an attention implementation."""

    def run():
        model.set_attn_implementation(implementation)
        return call()

    return run


def int8_models(model: QwenVLForConditionalGeneration) -> dict[str, QwenVLForConditionalGeneration]:
    """The opt-in int8 CPU routes, each loading the unmodified float32 checkpoint of `model` (saved to a temporary
    directory): transformers' `TorchAoConfig` with torchao's int8 weight-only config, and PyTorch's dynamic int8
    quantization of every `nn.Linear` (int8 weights, activations quantized per call; fbgemm kernels)."""
    import tempfile

    from torch.ao.quantization import quantize_dynamic

    models = {}
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            models["int8 torchao"] = QwenVLForConditionalGeneration.from_pretrained(
                directory, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), attn_implementation="sdpa"
            ).eval()
        except ImportError:
            print("torchao not installed: skipping the TorchAoConfig int8 variant", file=sys.stderr)
        loaded = QwenVLForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa").eval()
        models["int8 dynamic"] = quantize_dynamic(loaded, {torch.nn.Linear}, dtype=torch.qint8)
    return models


class Benchmark:
    def __init__(self, args, settings: Settings):
        self.device, self.dtype, self.settings = args.device, getattr(torch, args.dtype), settings
        self.config_name = args.config
        self.config = QwenVLConfig(**CONFIGS[args.config])
        torch.manual_seed(0)
        self.model = QwenVLForConditionalGeneration._from_config(
            self.config, attn_implementation="sdpa", dtype=self.dtype
        ).to(self.device)
        self.model.eval()
        self.implementations = ["eager", "sdpa"]
        if self.device == "cuda" and self.dtype != torch.float32 and is_flash_attn_2_available():
            self.implementations.append("flash_attention_2")
        # Block-compiled copy for prefill and vision: on CPU it gained ~4% (RESULTS.md, "small" config) for minutes of
        # compilation, so only GPUs measure it; decoding is compiled by `generate` (static cache) everywhere.
        self.compiled = compiled_copy(self.model) if settings.compile and self.device == "cuda" else None
        cpu_float32 = self.device == "cpu" and self.dtype == torch.float32
        self.int8 = int8_models(self.model) if cpu_float32 and settings.int8 else {}
        self.generator = torch.Generator().manual_seed(0)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.limits: list[Limits] = []

    def measure_limits(self):
        self.limits.append(measure_limits(self.device, self.dtype))

    @property
    def bounds(self) -> Limits:
        """The best limits seen in this run (measured before and after the benchmarks): the conservative bound."""
        return Limits(*(max(getattr(lim, f) for lim in self.limits) for f in ("bandwidth", "copy_bandwidth", "matmul")))

    def inference_variants(self, call: Callable, int8: bool = False) -> dict[str, Callable]:
        variants = {name: using(self.model, name, lambda: call(self.model)) for name in self.implementations}
        if self.compiled is not None:
            variants["sdpa+compile"] = using(self.compiled, "sdpa", lambda: call(self.compiled))
        for name, model in self.int8.items() if int8 else ():
            variants[f"sdpa+{name}"] = lambda model=model: call(model)
        return variants

    def prefill(self):
        batch = to_device(prompts(self.config, [PROMPT_TEXT_TOKENS], self.generator), self.device, self.dtype)

        def call(model):
            with torch.inference_mode():
                model(**batch, use_cache=True, logits_to_keep=1)

        s = self.settings
        times = interleaved(self.inference_variants(call, int8=True), s.warmup, s.rounds + 2, self.device)
        label = f"prefill latency, 1 image + {PROMPT_TEXT_TOKENS} text tokens, batch 1"
        self.prefill_flops = prefill_flops(self.config, batch["input_ids"].shape[1], 1)
        self.rows += [Row(label, name, 1e3 * t, "ms", False) for name, t in times.items()]

    def vision(self):
        size, n = self.config.visual["image_size"], self.settings.vision_batch
        pixel_values = torch.randn(n, 3, size, size, generator=self.generator).to(self.device, self.dtype)

        def call(model):
            with torch.inference_mode():
                model.get_image_features(pixel_values)

        s = self.settings
        times = interleaved(self.inference_variants(call), s.warmup, s.rounds, self.device)
        label = f"vision encoder + adapter, batch {n}"
        self.rows += [Row(label, name, n / t, "images/s", True) for name, t in times.items()]

    def decode(self):
        s = self.settings
        common = dict(max_new_tokens=s.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        # variant -> (model, attention implementation, extra `generate` arguments made per call)
        variants = {name: (self.model, name, dict) for name in self.implementations}
        variants["sdpa, concat cache"] = (self.model, "sdpa", lambda: dict(cache=DynamicCache(config=self.config)))
        variants["sdpa+static"] = (self.model, "sdpa", lambda: dict(cache_implementation="static", disable_compile=True))
        if s.compile:
            compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if self.device == "cuda" else "default")
            compile_config._compile_all_devices = True  # generate compiles on cuda-like devices only, unless told
            static_compiled = dict(cache_implementation="static", compile_config=compile_config)
            variants["sdpa+static+compile"] = (self.model, "sdpa", lambda: static_compiled)
        for name, model in self.int8.items():
            variants[f"sdpa+{name}"] = (model, "sdpa", dict)
        self.decode_lengths = {}
        for batch_size in (1, 8):
            lengths = BATCH_TEXT_TOKENS if batch_size == 8 else [PROMPT_TEXT_TOKENS]
            batch = to_device(prompts(self.config, lengths, self.generator, images=False), self.device, self.dtype)

            def call(model, extra: Callable, batch: dict = batch) -> float:
                clock = FirstLogitsClock(self.device)
                model.generate(**batch, **common, **extra(), logits_processor=LogitsProcessorList([clock]))
                synchronize(self.device)
                return time.perf_counter() - clock.start

            calls = {
                name: using(model, impl, lambda model=model, extra=extra: call(model, extra))
                for name, (model, impl, extra) in variants.items()
            }
            times = interleaved(calls, s.warmup, s.rounds * (2 if batch_size == 1 else 1), self.device)
            prompt = batch["input_ids"].shape[1]
            self.decode_lengths[batch_size] = prompt + s.new_tokens / 2  # mean cache length read per step
            label = f"decode, batch {batch_size}, {s.new_tokens} new tokens after {prompt}-position prompts"
            tokens = batch_size * (s.new_tokens - 1)
            self.rows += [Row(label, name, tokens / t, "tokens/s", True) for name, t in times.items()]

    def profile_decode(self, steps: int = 8):
        """Where a default-path decoding step's time goes: `torch.profiler` over `steps` forward calls after a prefill
        (batch 1 and 8, the benchmark's prompts), as ms per step for the costliest operators."""
        from torch.profiler import ProfilerActivity, profile

        from modeling_qwen_vl.modeling_qwen_vl import QwenVLCache

        self.model.set_attn_implementation("sdpa")
        lines = []
        for batch_size in (1, 8):
            lengths = BATCH_TEXT_TOKENS if batch_size == 8 else [PROMPT_TEXT_TOKENS]
            batch = to_device(prompts(self.config, lengths, self.generator, images=False), self.device, self.dtype)
            width = batch["input_ids"].shape[1]
            with torch.inference_mode():
                cache = QwenVLCache(self.config, capacity=width + 2 * steps)
                position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                out = self.model(**batch, position_ids=position_ids, cache=cache, logits_to_keep=1)
                mask, token, position = batch["attention_mask"], out.logits.argmax(-1), position_ids[:, -1:]

                def step():
                    nonlocal mask, token, position
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                    position = position + 1
                    out = self.model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, logits_to_keep=1)
                    token = out.logits.argmax(-1)

                step()  # warm-up
                synchronize(self.device)
                start = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(steps):
                        step()
                    synchronize(self.device)
                wall = (time.perf_counter() - start) / steps
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
            top = ", ".join(f"`{e.key}` {e.self_cpu_time_total / steps / 1e3:.2f}" for e in events[:8])
            calls = sum(e.count for e in events) / steps
            lines.append(
                f"- batch {batch_size}: {1e3 * wall:.1f} ms per step under the profiler ({total:.1f} ms of operator "
                f"self time, {calls:.0f} operator calls per step); ms per step: {top}"
            )
        self.profile_lines = lines

    def bound_fractions(self):
        """Fill `of_bound` for prefill (matmul peak) and decode (weight + KV streaming) rows from this run's limits."""
        limits = self.bounds
        for row in self.rows:
            if row.benchmark.startswith("prefill"):
                row.of_bound = self.prefill_flops / limits.matmul / (row.value / 1e3)
            elif row.benchmark.startswith("decode") and "int8" not in row.variant:
                batch = int(row.benchmark.split("batch ")[1].split(",")[0])
                weights, kv = decode_step_bytes(self.model, batch, self.decode_lengths[batch])
                row.of_bound = row.value / (batch * limits.streaming / (weights + kv))

    def training(self):
        s, cuda = self.settings, self.device == "cuda"
        model = copy.deepcopy(self.model).train()
        models = {name: model for name in self.implementations}
        if s.compile and cuda:  # compiling the training step on CPU takes minutes and hides allocations from the profiler
            models["sdpa+compile"] = compiled_copy(model)
        optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in models.values()}
        peaks: dict[str, tuple[int, int]] = {}  # variant -> (bytes resident before the step, peak above them)

        def step(name: str, checkpointing: bool, batch: dict):
            m, optimizer = models[name], optimizers[id(models[name])]
            m.set_attn_implementation(name.split("+")[0])
            m.activation_checkpointing_enable() if checkpointing else m.activation_checkpointing_disable()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            m(**batch, use_cache=False).loss.backward()  # as trainers do: no KV cache while training
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                peaks[name + ("+ckpt" if checkpointing else "")] = (resident, torch.cuda.max_memory_allocated() - resident)

        def calls(batch: dict) -> dict[str, Callable]:
            return {
                name + ("+ckpt" if checkpointing else ""): (lambda name=name, c=checkpointing: step(name, c, batch))
                for name in models
                for checkpointing in (False, True)
            }

        def profile_cpu_memory(batch: dict) -> dict[str, tuple[int, int]]:
            resident = tensor_bytes(model.parameters()) + tensor_bytes(
                t for state in optimizers[id(model)].state.values() for t in state.values() if torch.is_tensor(t)
            )
            return {name: (resident, cpu_step_peak_bytes(call)) for name, call in calls(batch).items()}

        batch = to_device(training_batch(self.config, s, self.generator), self.device, self.dtype)
        if cuda:  # compiled variants build their graphs during warm-up
            times = interleaved(calls(batch), s.warmup, s.rounds, self.device)
        else:  # the variants share one model and optimizer: one warm-up step creates the optimizer state for all
            step(self.implementations[0], False, batch)
            times = interleaved(calls(batch), 0, s.rounds, self.device)
        flops, peak = training_step_flops(self.config, s), peak_flops(self.device, self.dtype)
        shape = f"batch {s.train_batch} x {s.train_seq_len} tokens, {s.train_images} image(s) per row"
        for name, t in times.items():
            mfu = flops / t / peak if peak else None
            note = f"{flops / t / 1e12:.3g} model TFLOP/s" + (f", MFU {mfu:.1%}" if mfu else "")
            self.rows.append(Row(f"training step (AdamW), {shape}", name, s.train_batch / t, "samples/s", True, note, mfu))
        self.memory_rows(shape, peaks if cuda else profile_cpu_memory(batch))
        if s.memory_seq_len and not cuda:  # the multitask stage's packed length, where activations dominate
            big = replace(s, train_batch=1, train_seq_len=s.memory_seq_len, train_images=s.memory_images)
            batch = to_device(training_batch(self.config, big, self.generator), self.device, self.dtype)
            self.memory_rows(f"batch 1 x {big.train_seq_len} tokens, {big.train_images} images", profile_cpu_memory(batch))
        self.notes.append(
            "Training memory: "
            + (
                "`torch.cuda.max_memory_allocated()` over one step; weights+optimizer state is what was allocated before it."
                if cuda
                else "weights+optimizer state is the exact size of those tensors; the step's peak is replayed from "
                "`torch.profiler` allocation events (CPU tensors, operator granularity) and total = both summed "
                "(allocator overhead and non-tensor memory not included)."
            )
        )
        self.notes.append(f"Model FLOPs per training step: {flops / 1e12:.3g} TFLOP (6 x params x tokens plus attention).")

    def memory_rows(self, shape: str, peaks: dict[str, tuple[int, int]]):
        mib = 2**20
        for name, (resident, step_peak) in peaks.items():
            note = f"{resident / mib:.0f} MiB weights+optimizer state + {step_peak / mib:.0f} MiB step peak above them"
            total = (resident + step_peak) / mib
            self.rows.append(Row(f"training peak memory, {shape}", name, total, "MiB", False, note, step_peak=step_peak / mib))


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def eager_of(rows: list[Row], row: Row) -> Row | None:
    base = row.variant.replace("sdpa", "eager").replace("flash_attention_2", "eager").split("+")[0]
    if row.benchmark.startswith("training"):
        base = "eager"
    return next((r for r in rows if r.benchmark == row.benchmark and r.variant == base), None)


def ratio_text(rows: list[Row], row: Row) -> str:
    base = eager_of(rows, row)
    if base is None or base.value == 0:
        return ""
    if row.unit == "MiB":
        return f"{row.value / base.value:.2f}x memory"
    speedup = row.value / base.value if row.higher_is_better else base.value / row.value
    return f"{speedup:.2f}x"


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | variant | median | vs eager | of bound | notes |", "|---|---|---|---|---|---|"]
    previous = None
    for row in rows:
        value = f"{row.value:.1f}" if row.value >= 10 else f"{row.value:.3g}"
        label = row.benchmark if row.benchmark != previous else ""
        bound = f"{row.of_bound:.0%}" if row.of_bound is not None else ""
        lines.append(f"| {label} | {row.variant} | {value} {row.unit} | {ratio_text(rows, row)} | {bound} | {row.note} |")
        previous = row.benchmark
    return "\n".join(lines)


def find(rows: list[Row], prefix: str, variant: str) -> Row | None:
    return next((r for r in rows if r.benchmark.startswith(prefix) and r.variant == variant), None)


def targets(rows: list[Row], batch8_ceiling: float | None = None) -> str:
    """The targets of the issues these benchmarks were written for, met or MISSED, with the figures behind them.
    `batch8_ceiling`: the largest batch-8 / batch-1 tokens/s ratio the streaming bounds allow (KV reads grow with batch)."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def best(prefix: str, exclude: str = "int8") -> Row | None:
        candidates = [r for r in rows if r.benchmark.startswith(prefix) and r.of_bound is not None and exclude not in r.variant]
        return max(candidates, key=lambda r: r.of_bound, default=None)

    lines = []
    eager, sdpa = find(rows, "prefill", "eager"), find(rows, "prefill", "sdpa")
    speedup = eager.value / sdpa.value
    lines.append(f"- sdpa >= 1.3x eager on prefill: {verdict(speedup >= 1.3)} ({speedup:.2f}x: {sdpa.value:.0f} vs {eager.value:.0f} ms)")
    for prefix, goal, what in (
        ("decode, batch 1", 0.8, "batch-1 decode >= 80% of the weight+KV streaming bound"),
        ("prefill", 0.7, "prefill >= 70% of the matmul-peak bound"),
    ):
        default, top = find(rows, prefix, "sdpa"), best(prefix)
        if default and default.of_bound is not None:
            lines.append(
                f"- {what} (default sdpa): {verdict(default.of_bound >= goal)} ({default.of_bound:.0%}: "
                f"{default.value:.1f} {default.unit}); best variant {top.variant}: {top.of_bound:.0%} ({top.value:.1f} {top.unit})"
            )
    for variant in ("sdpa", "sdpa+static+compile", "sdpa+int8 dynamic"):
        one, eight = find(rows, "decode, batch 1", variant), find(rows, "decode, batch 8", variant)
        if one and eight:
            gain = eight.value / one.value
            ceiling = f"; the streaming bounds allow at most {batch8_ceiling:.2f}x" if batch8_ceiling else ""
            lines.append(
                f"- batch-8 decode >= 6x the tokens/s of batch 1 ({variant}): {verdict(gain >= 6)} "
                f"({gain:.2f}x: {eight.value:.1f} vs {one.value:.1f} tokens/s{ceiling})"
            )
    for batch in (1, 8):
        base = find(rows, f"decode, batch {batch}", "sdpa")
        for row in rows:
            if row.benchmark.startswith(f"decode, batch {batch}") and "int8" in row.variant and base:
                lines.append(
                    f"- {row.variant}, batch-{batch} decode speed-up over float32 sdpa: {row.value / base.value:.2f}x "
                    f"({row.value:.1f} vs {base.value:.1f} tokens/s); deviation from float32: `benchmarks/int8_deviation.py`"
                )
    for benchmark in dict.fromkeys(r.benchmark for r in rows if r.benchmark.startswith("training peak memory")):
        shape = benchmark.removeprefix("training peak memory, ")
        for variant in ("eager", "sdpa"):
            plain, ckpt = find(rows, benchmark, variant), find(rows, benchmark, variant + "+ckpt")
            if plain and ckpt:
                cut = 1 - ckpt.value / plain.value
                step_cut = 1 - ckpt.step_peak / plain.step_peak
                lines.append(
                    f"- gradient checkpointing cuts training peak memory >= 40% ({variant}, {shape}): {verdict(cut >= 0.4)} "
                    f"(total -{cut:.0%}: {ckpt.value:.0f} vs {plain.value:.0f} MiB; step peak above weights+optimizer "
                    f"state -{step_cut:.0%}: {ckpt.step_peak:.0f} vs {plain.step_peak:.0f} MiB)"
                )
    mfus = [r for r in rows if r.mfu is not None]
    if mfus:
        best = max(mfus, key=lambda r: r.mfu)
        lines.append(f"- bf16 training step at >= {MFU_TARGET:.0%} MFU: {verdict(best.mfu >= MFU_TARGET)} (best {best.mfu:.1%} with {best.variant})")
    else:
        lines.append(f"- bf16 training step at >= {MFU_TARGET:.0%} MFU: not measured (needs `--device cuda --dtype bfloat16` on a GPU in the peak table)")
    lines.append("- image features computed once per `generate`: checked by `tests/test_performance.py` (vision-tower call count)")
    return "\n".join(lines)


def write_results(key: str, section: str):
    """Replace this setting's section of RESULTS.md, keeping the others."""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{section}\n{end}"
    header = (
        "# Benchmark results\n\nWritten by `python benchmarks/run.py`; every run replaces its own section "
        "(device, dtype, quick or full) and keeps the others.\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else header
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def limits_text(bench: Benchmark) -> str:
    runs = "; ".join(
        f"{lim.bandwidth / 1e9:.1f} GB/s gemv, {lim.copy_bandwidth / 1e9:.1f} GB/s copy, {lim.matmul / 1e9:.0f} GFLOP/s matmul"
        for lim in bench.limits
    )
    lines = [f"- machine limits, measured before and after the benchmarks: {runs}; the bounds use the best of each"]
    bounds = bench.bounds
    if bench.prefill_flops:
        lines.append(
            f"- prefill bound: {bench.prefill_flops / 1e9:.1f} GFLOP at {bounds.matmul / 1e9:.0f} GFLOP/s = "
            f"{1e3 * bench.prefill_flops / bounds.matmul:.0f} ms"
        )
    for batch, length in bench.decode_lengths.items():
        weights, kv = decode_step_bytes(bench.model, batch, length)
        lines.append(
            f"- decode bound, batch {batch}: {weights / 1e6:.0f} MB of weights + {kv / 1e6:.0f} MB of KV cache (mean length "
            f"{length:.0f}) per step at {bounds.streaming / 1e9:.1f} GB/s = {batch * bounds.streaming / (weights + kv):.1f} "
            f"tokens/s ({batch * bounds.streaming / weights:.1f} counting weights only)"
        )
    return "\n".join(lines)


def batch8_ceiling(bench: Benchmark) -> float | None:
    if set(bench.decode_lengths) != {1, 8}:
        return None
    one, eight = (sum(decode_step_bytes(bench.model, b, bench.decode_lengths[b])) for b in (1, 8))
    return 8 * one / eight


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small-12L")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter inputs, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument(
        "--compile", action="store_true", help="on CPU, also the compiled decoding variant (off by default: minutes)"
    )
    parser.add_argument("--training", action="store_true", help="also the training step and memory benchmarks (minutes)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variants (CPU float32)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    settings = replace(
        settings_for(args.device, args.quick, not args.no_compile and (args.device == "cuda" or args.compile)),
        training=args.training,
        int8=not args.no_int8,
    )

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    bench = Benchmark(args, settings)
    bench.prefill_flops, bench.decode_lengths, bench.profile_lines = 0.0, {}, []
    params = sum(p.numel() for p in bench.model.parameters())
    parts = [bench.measure_limits, bench.prefill, bench.vision, bench.decode, bench.profile_decode, bench.measure_limits]
    if settings.training:
        parts.append(bench.training)
    for part in parts:
        part_start = time.perf_counter()
        part()
        print(f"[{part.__name__}: {time.perf_counter() - part_start:.0f} s]", file=sys.stderr, flush=True)
    bench.bound_fractions()
    elapsed = time.perf_counter() - started

    key = f"{args.config}-{args.device}-{args.dtype}" + ("-quick" if args.quick else "")
    lm_params = sum(p.numel() for name, p in bench.model.named_parameters() if ".visual." not in f".{name}")
    section = "\n".join(
        [
            f"## {args.config}, {args.device}, {args.dtype}{', quick' if args.quick else ''}",
            "",
            f"- machine: {machine(args.device)}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; run took {elapsed:.0f} s",
            (
                f"- model: \"{args.config}\" config, {params / 1e6:.1f}M parameters ({lm_params / 1e6:.1f}M LM: hidden "
                f"{bench.config.hidden_size} x {bench.config.num_hidden_layers} layers, vocab {bench.config.vocab_size}; "
                f"ViT width {bench.config.visual['width']} x {bench.config.visual['layers']} layers, 448px -> 1024 "
                "patches -> 256 queries)"
            ),
            f"- settings: {settings}",
            limits_text(bench),
            "",
            table(bench.rows),
            "",
            (
                "Medians of interleaved rounds after warm-up; `vs eager` is the speed-up (or memory ratio) against "
                "eager attention in the same run; `of bound` is the measured speed over the machine's bound for that "
                "work (prefill: FLOPs at the matmul peak; decode: weight and KV-cache bytes at the streaming "
                "bandwidth); `+ckpt` = gradient checkpointing; decode tokens/s count the tokens "
                "after the first (prefill excluded); decode prompts are text of the length of 1 image + 11-32 text "
                "tokens (left-padded in batch 8): what filled the cache does not change decoding work, and leaving the "
                "vision tower out keeps the run short. `sdpa` decodes with the package's default cache "
                "(`QwenVLCache`, preallocated); `sdpa, concat cache` with transformers' `DynamicCache` (one `torch.cat` "
                "per layer and step); `int8 torchao` loads the checkpoint with `TorchAoConfig(Int8WeightOnlyConfig())`, "
                "`int8 dynamic` quantizes it with `torch.ao.quantization.quantize_dynamic` (int8 weights and "
                "per-call int8 activations). " + " ".join(bench.notes)
            ),
            "",
            "### Targets",
            "",
            targets(bench.rows, batch8_ceiling(bench)),
            "",
            "### Profile of a decoding step (default path: sdpa, `QwenVLCache`)",
            "",
            *bench.profile_lines,
        ]
    )
    print(section)
    write_results(key, section)
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
