"""Qwen-VL (arXiv 2308.12966): a ViT with a cross-attention adapter feeding 256 features per image into Qwen-7B.

Module and parameter names follow the official checkpoints (`transformer.wte`, `transformer.h.{i}.attn.c_attn`,
`transformer.visual.attn_pool.*`, `lm_head`, ...), so official safetensors load without missing or unexpected keys
and the checkpoints this code writes stay loadable by the official code and by serving engines.
"""

import json
import math
import os
import platform
import struct
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.configuration_utils import GenerationMode
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_qwen_vl import QwenVLConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention. q, k, v: [batch, heads, len, head_dim]; returns ([batch, len, heads, head_dim], weights)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# ----------------------------------------------------------------------------------------------------------------------
# Float32 linear layers on CPU
# ----------------------------------------------------------------------------------------------------------------------

# oneDNN's `_linear_pointwise` is the op PyTorch's own compiler (inductor) emits for CPU linear layers.
_ONEDNN_LINEAR = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T (+ bias) on oneDNN (weight may be a strided view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _compilable_onednn_linear():
    """oneDNN's float32 linear as the custom op `qwen_vl::onednn_linear`, which `torch.compile` keeps as one opaque
    kernel call. Inductor lowers `_linear_pointwise` only for weights that are graph constants (`freezing`, which
    packs a second copy of every weight), so a compiled decoding step would otherwise fall back to its own, slower
    matmuls. Registered once per process: the remote code can be imported under several module names."""
    namespace = torch.ops.qwen_vl
    if hasattr(namespace, "onednn_linear"):
        return namespace.onednn_linear

    @torch.library.custom_op("qwen_vl::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn_linear(x, weight, bias)

    @onednn_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return namespace.onednn_linear


_COMPILED_ONEDNN_LINEAR = _compilable_onednn_linear() if _ONEDNN_LINEAR else None




class OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` with the forward and both backward matmuls on oneDNN's float32 kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_linear(grad.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed by oneDNN for float32 on x86 CPUs; the same math, rounded differently.

    Why hand-written: PyTorch sends float32 CPU matmuls to MKL, whose code path on AMD CPUs uses AVX2 even where the
    CPU has AVX-512, while oneDNN (bundled with PyTorch) dispatches on the instruction set. Measured on a 2-core AMD
    EPYC (AVX-512): a decoding step's linear layers 21.4 -> 12.6 ms at batch 1 and 31.6 -> 14.8 ms at batch 8, and a
    290-row prefill projection 9.0 -> 4.2 ms (1 thread). PyTorch has no switch for it (`torch.backends.mkldnn` only
    routes reduced-precision matmuls to oneDNN), so this picks the kernel per call. Anything else keeps `F.linear`:
    other devices and dtypes, autocast, tensor subclasses (torchao, DTensor), quantized tensors, compiled training
    (inductor differentiates `F.linear` itself) and `torch.backends.mkldnn.flags(enabled=False)`. Compiled inference
    calls the kernel through the custom op `qwen_vl::onednn_linear` (`_compilable_onednn_linear`).
    """
    if (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)
        and type(x) in (torch.Tensor, nn.Parameter)
        and (bias is None or type(bias) in (torch.Tensor, nn.Parameter))
        and x.numel() > 0
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    ):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        if is_torchdynamo_compiling():
            # compiled inference (e.g. `generate`'s compiled decoding step) keeps the oneDNN kernel as a custom op
            return F.linear(x, weight, bias) if needs_grad else _COMPILED_ONEDNN_LINEAR(x, weight, bias)
        if needs_grad:
            return OneDNNLinearFunction.apply(x, weight, bias)
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its class's `forward`: its own or global hooks (torch keeps the global
    ones in `torch.nn.modules.module`), or an instance-level `forward`."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__  # accelerate's offloading and device hooks replace the bound `forward`
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through `fast_linear` when `module` is a plain `nn.Linear` that nothing hooks or wraps.

    Wrapped or replaced layers (PEFT's LoRA layers, `quantize_dynamic`'s int8 layers, layers with hooks) are called
    as modules, so they behave exactly as they would anywhere else."""
    if type(module) is nn.Linear and not _has_hooks(module):
        return fast_linear(x, module.weight, module.bias)
    return module(x)


def _attention_interface(config: QwenVLConfig) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def resize_grid_embedding(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square positional table [src*src, dim] to [num_positions, dim] (bicubic, float32), as official."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(num_positions))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d_table(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [grid_size**2, dim]: first half encodes the column, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def official_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [batch, 1, len, len] with the official arithmetic: causal part + padding part, each 0 or `min`.

    At a padded query position every key then scores exactly `min` (or -inf where both parts apply), so padding
    positions average uniformly over earlier padding and all real tokens, and gradients flow as in the official model.
    This matters in one place: the logit at the last left-padding position predicts the first real token, so training
    losses and gradients on left-padded batches equal the official ones. Real positions get the usual causal mask.
    """
    length = attention_mask.shape[-1]
    min_value = torch.finfo(dtype).min
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    causal_part = torch.zeros(length, length, dtype=dtype, device=attention_mask.device).masked_fill(~causal, min_value)
    return causal_part + (1.0 - attention_mask[:, None, None, :].to(dtype)) * min_value


def official_padding_attention(
    attention_mask: torch.Tensor, dtype: torch.dtype, training: bool
) -> tuple[torch.Tensor, Callable | None]:
    """The exactness policy for a left-padded prefill: `official_padding_mask` and the attention function it needs.

    Returns `(mask, attention_function)`. In training that function is `eager_attention_forward`: sdpa kernels lose
    precision in the backward pass on rows of `min` scores, which would change the gradients; otherwise it is None
    (the configured implementation, which gives the official outputs with this mask). The blocks receive the function
    as the `attention_function` keyword, which `QwenVLAttention` consumes.
    """
    return official_padding_mask(attention_mask, dtype), eager_attention_forward if training else None


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower (`transformer.visual`): ViT + position-aware cross-attention adapter
# ----------------------------------------------------------------------------------------------------------------------


class QwenVLVisionAttention(nn.Module):
    """ViT self-attention. `in_proj` output is laid out per head as [heads, 3 * head_dim] (q|k|v inside each head)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width, self.num_heads = config.vision.width, config.vision.heads
        self.head_dim = width // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.config = config
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: [images, patches, width] -> [images, patches, width]."""
        batch, length, _ = hidden_states.shape
        qkv = apply_linear(self.in_proj, hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        attn_output, _ = _attention_interface(self.config)(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False
        )
        return apply_linear(self.out_proj, attn_output.reshape(batch, length, -1))


class QwenVLVisionMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        vision = config.vision
        self.c_fc = nn.Linear(vision.width, vision.mlp_width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(vision.mlp_width, vision.width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.c_proj, self.gelu(apply_linear(self.c_fc, hidden_states)))


class QwenVLVisionBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.vision.width
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = QwenVLVisionAttention(config)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = QwenVLVisionMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class QwenVLVisionEncoder(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(QwenVLVisionBlock(config) for _ in range(config.vision.layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            hidden_states = block(hidden_states)
        return hidden_states


class QwenVLAdapterAttention(nn.Module):
    """The adapter's cross-attention, with the official weight names (those of `nn.MultiheadAttention`, which the
    official module is): a stacked `in_proj_weight`/`in_proj_bias` [3 * dim, ...] for q | k | v and `out_proj`. It is
    computed with the configured attention implementation, `output_dim // 128` heads."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.vision.output_dim
        self.num_heads = self.embed_dim // 128
        self.head_dim = 128
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * self.embed_dim, self.embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * self.embed_dim))
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)
        # What `nn.MultiheadAttention`'s constructor draws, in its order: a seeded model gets the same weights as when
        # this module subclassed it (`_init_weights` then sets the final values, also as before).
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [batch, q_len, dim], key/value [batch, kv_len, dim] -> [batch, q_len, dim]."""
        batch = query.shape[0]
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)

        def project(x: torch.Tensor, index: int) -> torch.Tensor:
            x = fast_linear(x, weights[index], biases[index])
            return x.view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        attn_output, _ = _attention_interface(self.config)(
            self, project(query, 0), project(key, 1), project(value, 2), None, scaling=self.scaling, dropout=0.0
        )
        return apply_linear(self.out_proj, attn_output.reshape(batch, query.shape[1], self.embed_dim))


class QwenVLVisionAdapter(nn.Module):
    """Position-aware adapter: `n_queries` learned queries cross-attend to the patch features.

    `pos_embed` is the fixed 2-D sin-cos table of the query grid; it is stored in checkpoints but never trained.
    """

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        vision = config.vision
        embed_dim = vision.output_dim
        self.query = nn.Parameter(torch.empty(vision.n_queries, embed_dim))
        # In the model's dtype, like the other weights: loading in bfloat16 then casts it instead of keeping a view of
        # the float32 checkpoint (which would pin the whole memory-mapped file) and mixing dtypes in `attn`.
        table = sincos_2d_table(embed_dim, vision.query_grid).to(torch.get_default_dtype())
        self.register_buffer("pos_embed", table, persistent=True)
        # As in the official module: no projection (and no `kv_proj.weight` in the checkpoint) when the widths match.
        width = vision.width
        self.kv_proj = nn.Identity() if width == embed_dim else nn.Linear(width, embed_dim, bias=False)
        self.attn = QwenVLAdapterAttention(config)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """patch_features: [images, patches, width] -> [images, n_queries, output_dim]."""
        key_pos = resize_grid_embedding(self.pos_embed, patch_features.shape[1])
        value = self.ln_kv(apply_linear(self.kv_proj, patch_features))
        query = (self.ln_q(self.query) + self.pos_embed).expand(patch_features.shape[0], -1, -1)
        return self.attn(query, value + key_pos, value)


class QwenVLVisionTransformer(nn.Module):
    """Images [N, 3, S, S] -> features [N, n_queries, output_dim] ready to replace `<img>` span embeddings."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        vision = config.vision
        self.conv1 = nn.Conv2d(3, vision.width, vision.patch_size, stride=vision.patch_size, bias=False)
        # A 16x16 grid (official size whatever the image size); resized to the patch grid in `forward`.
        self.positional_embedding = nn.Parameter(torch.empty(256, vision.width))
        self.ln_pre = nn.LayerNorm(vision.width, eps=1e-6)
        self.transformer = QwenVLVisionEncoder(config)
        self.attn_pool = QwenVLVisionAdapter(config)
        self.ln_post = nn.LayerNorm(vision.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(vision.output_dim, vision.output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        hidden_states = patches + resize_grid_embedding(self.positional_embedding, patches.shape[1])
        hidden_states = self.transformer(self.ln_pre(hidden_states))
        return self.ln_post(self.attn_pool(hidden_states)) @ self.proj


# ----------------------------------------------------------------------------------------------------------------------
# Language model (`transformer.*`)
# ----------------------------------------------------------------------------------------------------------------------


class QwenVLRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, cast back, then scale (the official order). `F.rms_norm` computes the official
        `x * rsqrt(mean(x^2) + eps)` in one call (same results, fewer operator launches per decoding step)."""
        x = F.rms_norm(hidden_states.float(), hidden_states.shape[-1:], eps=self.eps)
        return x.type_as(hidden_states) * self.weight


class QwenVLRotaryEmbedding(nn.Module):
    """Rotary tables for `rotary_pct * kv_channels` dims, with Qwen's dynamic-NTK base `base * alpha^(d/(d-2))`."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.dim = int(config.kv_channels * config.rotary_pct)
        self.base = config.rotary_emb_base
        self.register_buffer("inv_freq", self.inverse_frequencies(1.0), persistent=False)
        # Past the trained context every decoding step reuses the prefill's alpha: build its frequencies once.
        self._inv_freq_by_alpha: dict[tuple[float, torch.device], torch.Tensor] = {}

    def inverse_frequencies(self, ntk_alpha: float) -> torch.Tensor:
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def _inverse_frequencies_for(self, ntk_alpha: float) -> torch.Tensor:
        if ntk_alpha == 1.0:
            return self.inv_freq
        key = (ntk_alpha, self.inv_freq.device)
        if key not in self._inv_freq_by_alpha:
            self._inv_freq_by_alpha[key] = self.inverse_frequencies(ntk_alpha).to(self.inv_freq.device)
        return self._inv_freq_by_alpha[key]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, ntk_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [batch, len] -> float32 (cos, sin) of shape [batch, len, dim // 2].

        Only one half is returned: the official tables repeat it (`cat((freqs, freqs))`), and `apply_rotary_pos_emb`
        uses each half once, so the duplicate is never built.
        """
        freqs = position_ids[..., None].float() * self._inverse_frequencies_for(ntk_alpha)
        return freqs.cos(), freqs.sin()


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` dims of x [batch, len, ..., head_dim] in float32; the rest pass through.

    cos, sin: [batch, len, rot_dim // 2] (one half of the official repeated tables). Written out per half, which is the
    official `x * cos + rotate_half(x) * sin` term by term (same products and sums), without building `rotate_half(x)`.
    """
    shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
    cos, sin = cos.view(shape), sin.view(shape)
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
    return rotated if 2 * half == x.shape[-1] else torch.cat((rotated, x[..., 2 * half :]), dim=-1)


def dynamic_ntk_alpha(seq_len: int, trained_len: int) -> float:
    """Qwen's dynamic NTK factor for a prefill of `seq_len` positions (1 while within the trained context)."""
    context_value = math.log(seq_len / trained_len, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_attention_scale(position_ids: torch.Tensor, trained_len: int) -> torch.Tensor:
    """Per-query factor log(p+1)/log(trained_len) beyond the trained context, else 1; [batch, 1, len, 1]."""
    positions = position_ids.float() + 1
    scale = torch.where(
        positions > trained_len, torch.log(positions) / math.log(trained_len), torch.ones_like(positions)
    )
    return scale[:, None, :, None]


class QwenVLContextScaling:
    """The exactness policy for contexts past the trained length (`config.seq_length`), as in the official model:
    dynamic NTK (the rotary base grows by `dynamic_ntk_alpha` of the prefill's length; every decoding step of that
    conversation keeps the prefill's alpha) and log-n scaling of the queries (`logn_attention_scale`). Inference only:
    training uses alpha 1 and no scaling.

    The alpha of each conversation is kept on its cache, as the attribute `ALPHA_ATTRIBUTE`: it goes with the cache
    and its copies, and tells a prefill from a decoding step inside `torch.compile`, where the cache's length is on
    the device (`has_prefilled`). A compiled step then guards on that one float of the cache it is given; a map of
    all live caches would be guarded as a whole and recompile (or fail its guards) whenever an earlier cache is freed.
    Hand-written: transformers' rotary "dynamic" scaling recomputes the factor at every step from the current length,
    which is not the official behaviour.
    """

    ALPHA_ATTRIBUTE = "qwen_vl_prefill_ntk_alpha"

    def __init__(self, config: QwenVLConfig):
        self.config = config

    def has_prefilled(self, cache: Cache) -> bool:
        """Whether a prefill of this model has gone through `cache`."""
        return self.prefill_alpha(cache) is not None

    def prefill_alpha(self, cache: Cache) -> float | None:
        """The dynamic-NTK alpha chosen at the prefill that filled `cache` (None if none did)."""
        return getattr(cache, self.ALPHA_ATTRIBUTE, None)

    def __call__(
        self, position_ids: torch.Tensor, cache: Cache | None, is_prefill: bool, training: bool
    ) -> tuple[float, torch.Tensor | None]:
        """`(ntk_alpha, logn_scale)` for a forward over `position_ids` [batch, len] (`logn_scale` [batch, 1, len, 1]
        or None)."""
        use_ntk = self.config.use_dynamic_ntk and not training
        if is_prefill:
            ntk_alpha = dynamic_ntk_alpha(position_ids.shape[-1], self.config.seq_length) if use_ntk else 1.0
            if cache is not None:
                setattr(cache, self.ALPHA_ATTRIBUTE, ntk_alpha)
        elif not use_ntk:
            ntk_alpha = 1.0
        elif (ntk_alpha := self.prefill_alpha(cache)) is None:
            # A filled cache no prefill of this model went through (e.g. built by hand from saved keys and values):
            # its current length stands for the prefill's.
            ntk_alpha = dynamic_ntk_alpha(int(cache.get_seq_length()), self.config.seq_length)
            setattr(cache, self.ALPHA_ATTRIBUTE, ntk_alpha)
        use_logn = self.config.use_logn_attn and not training
        return ntk_alpha, logn_attention_scale(position_ids, self.config.seq_length) if use_logn else None


class QwenVLCacheLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys/values into preallocated room instead of `torch.cat`-ing every step.

    `keys`/`values` are views `[batch, heads, len, head_dim]` of a buffer with room for `capacity` positions, so a
    decoding step copies one position per layer instead of the whole cache (at batch 8 and 300 positions the copies
    cost as much as reading the weights). Everything else is `DynamicLayer`'s: attention sees exactly the filled
    length (same results as `DynamicCache`), and crop, beam reordering and batch selection keep working (they replace
    `keys`; the next update then copies them into a new buffer). Hand-written because transformers' `StaticCache`
    cannot grow, masks its whole length on every step, and fixes the length of a cache reused across `generate` calls.
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self._key_buffer = self._value_buffer = None

    def _holds(self, tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
        return tensor is not None and buffer is not None and tensor.data_ptr() == buffer.data_ptr()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return super().update(key_states, value_states)  # in-place writes would break autograd: plain concatenation
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        buffer = self._key_buffer
        fits = (
            self._holds(self.keys, buffer)
            and self._holds(self.values, self._value_buffer)
            and buffer.shape[:2] == key_states.shape[:2]
            and buffer.dtype == key_states.dtype
            and total <= buffer.shape[-2]
            and (torch.is_inference_mode_enabled() or not buffer.is_inference())
        )
        if not fits:  # first update, growth, or keys replaced by crop/reorder/select: copy them into a new buffer
            room = max(total, self.capacity, past + past // 2, 256 * math.ceil(total / 256))
            self._key_buffer = key_states.new_empty(key_states.shape[:2] + (room, key_states.shape[-1]))
            self._value_buffer = value_states.new_empty(value_states.shape[:2] + (room, value_states.shape[-1]))
            if past:
                self._key_buffer[:, :, :past].copy_(self.keys)
                self._value_buffer[:, :, :past].copy_(self.values)
        self._key_buffer[:, :, past:total].copy_(key_states)
        self._value_buffer[:, :, past:total].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :total], self._value_buffer[:, :, :total]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


class QwenVLCache(DynamicCache):
    """`DynamicCache` of [`QwenVLCacheLayer`]s: the default cache of this model's forward and `generate`.

    `capacity` (positions) presizes every layer; `generate` passes its maximal length. Without it, layers grow in
    steps of at least 256 positions or half their length.
    """

    def __init__(self, config: QwenVLConfig, capacity: int = 0):
        super().__init__()
        self.layers = [QwenVLCacheLayer(capacity) for _ in range(config.num_hidden_layers)]
        self.layer_class_to_replicate = None


class QwenVLAttention(nn.Module):
    """Causal self-attention with a fused `c_attn` (q | k | v contiguous) and rotary embeddings on q and k."""

    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logn_scale: torch.Tensor | None = None,
        attention_function: Callable | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [batch, len, hidden] -> (output [batch, len, hidden], attention weights or None).
        `attention_function` replaces the configured implementation (see `official_padding_attention`)."""
        batch, length, _ = hidden_states.shape
        qkv = apply_linear(self.c_attn, hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query_key = apply_rotary_pos_emb(qkv[:, :, :2], *position_embeddings)  # q and k in one pass
        # [batch, heads, len, head_dim] views
        query, key, value = (
            query_key[:, :, 0].transpose(1, 2),
            query_key[:, :, 1].transpose(1, 2),
            qkv[:, :, 2].transpose(1, 2),
        )
        if logn_scale is not None:
            query = query * logn_scale.to(query.dtype)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_function = attention_function or _attention_interface(self.config)
        attn_output, attn_weights = attention_function(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            **kwargs,
        )
        return apply_linear(self.c_proj, attn_output.reshape(batch, length, -1)), attn_weights


class QwenVLMLP(nn.Module):
    """SwiGLU: `c_proj(w1(x) * silu(w2(x)))`, each inner projection of size intermediate_size // 2."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return apply_linear(
            self.c_proj, apply_linear(self.w1, hidden_states) * F.silu(apply_linear(self.w2, hidden_states))
        )


class QwenVLBlock(GradientCheckpointingLayer):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QwenVLAttention(config, layer_idx)
        self.ln_2 = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QwenVLMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logn_scale: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            logn_scale=logn_scale,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


def _broken_safetensors(path: str) -> bool:
    """Whether `path` is a `.safetensors` file whose header is unreadable or describes more bytes than it holds.

    Read by hand (8-byte length, JSON header, data offsets) rather than with `safetensors.safe_open` because this file
    is remote code, which imports only torch, transformers, tiktoken, PIL and numpy (see the README's security notes);
    `qwen-vl push` checks the same with `safe_open`."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8 or (header_length := struct.unpack("<Q", prefix)[0]) > size - 8:
            return True
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return True
    return 8 + header_length + end > size


# ----------------------------------------------------------------------------------------------------------------------
# Input validation at the model's public boundary
# ----------------------------------------------------------------------------------------------------------------------


def _first_row(rows: torch.Tensor) -> int:
    """Index of the first True entry of a [batch] bool tensor (only called on the error path)."""
    return int(rows.nonzero()[0, 0])


def validate_model_inputs(
    config: QwenVLConfig,
    input_ids,
    attention_mask,
    position_ids,
    cache,
    inputs_embeds,
    pixel_values,
    is_prefill_fn: Callable[[Cache | None], bool],
) -> tuple[torch.Tensor | None, Cache | None]:
    """
    Check the inputs of `QwenVLModel.forward` once, raising a `TypeError`/`ValueError` that names the argument, says
    what was expected and how to fix it, instead of a torch error deep inside the model (or a CUDA device assert).

    Cheap input forms are accepted and returned normalised: `pixel_values` as a list of `[3, S, S]` images, one
    `[3, S, S]` image, or channels-last `[N, S, S, 3]`; a legacy tuple `past_key_values` (`((key, value), ...)` per
    layer) becomes a `DynamicCache`. Returns `(pixel_values, cache)`.

    Cost: shape and type checks only (no device synchronisation) on single-token decoding steps; the data checks (ids
    within the vocabulary, every row's `<img>...</img>` spans closed, unnested and `n_queries` long) are vectorised
    and run on the prompt (any call with more than one new token). Nothing is checked inside `torch.compile` graphs.
    """
    if is_torchdynamo_compiling():
        return pixel_values, cache
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"input_ids must be a torch.LongTensor of shape [batch, length], got {type(input_ids).__name__}: "
                "use the processor/tokenizer with return_tensors='pt'."
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}: use .long().")
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}"
                + (": add the batch dimension with input_ids[None]." if input_ids.ndim == 1 else ".")
            )
        batch, length = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be a float tensor, got {type(inputs_embeds).__name__}.")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, hidden_size={config.hidden_size}], got "
                f"{tuple(inputs_embeds.shape)}."
            )
        batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(
            f"{'input_ids' if input_ids is not None else 'inputs_embeds'} is empty (shape "
            f"{tuple((input_ids if input_ids is not None else inputs_embeds).shape)}): pass at least one token per row."
        )

    cache = _validate_cache(config, cache, batch)
    past_length = cache.get_seq_length() if cache is not None else 0
    if isinstance(past_length, torch.Tensor):  # compilable caches count on device; reading it would synchronise
        past_length = None

    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}.")
        if attention_mask.ndim == 2:
            expected = None if past_length is None else past_length + length
            if attention_mask.shape[0] != batch or (expected is not None and attention_mask.shape[1] != expected):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but must be [batch={batch}, "
                    f"{'cached + new tokens=' if past_length else 'length='}{expected or length}]: one entry per "
                    "token of input_ids (and of the cache); pass the mask the processor returned with these ids."
                )
        elif attention_mask.ndim == 4:
            if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
                raise TypeError(
                    f"A 4-D attention_mask must be bool (True = attend) or additive floats, got {attention_mask.dtype}."
                )
            too_short = past_length is not None and attention_mask.shape[-1] < past_length + length
            if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[-2] != length or too_short:
                raise ValueError(
                    f"A 4-D attention_mask must have shape [batch={batch}, 1, length={length}, key length], got "
                    f"{tuple(attention_mask.shape)}."
                )
        else:
            raise ValueError(
                f"attention_mask must have shape [batch, length] (or a 4-D additive mask), got "
                f"{tuple(attention_mask.shape)}."
            )

    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise TypeError("position_ids must be an integer torch.Tensor of shape [batch, length].")
        if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
            raise ValueError(
                f"position_ids must have shape [batch={batch}, length={length}] (one position per new token), got "
                f"{tuple(position_ids.shape)}; omit them to count positions from the cache."
            )

    if pixel_values is not None:
        pixel_values = _validate_pixel_values(config, pixel_values)

    if input_ids is not None and (length > 1 or is_prefill_fn(cache)):
        _validate_ids(config, input_ids)
    return pixel_values, cache


def _validate_cache(config: QwenVLConfig, cache, batch: int) -> Cache | None:
    """A `Cache` of this model's shapes; a legacy tuple of per-layer `(key, value)` becomes a `DynamicCache`."""
    if cache is None or isinstance(cache, Cache):
        pass
    elif isinstance(cache, (tuple, list)) and all(
        isinstance(layer, (tuple, list)) and len(layer) >= 2 and all(isinstance(t, torch.Tensor) for t in layer[:2])
        for layer in cache
    ):
        cache = DynamicCache(cache, config=config) if len(cache) == config.num_hidden_layers else cache
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(
            f"cache/past_key_values must be a transformers Cache (e.g. DynamicCache) or a legacy tuple of "
            f"{config.num_hidden_layers} (key, value) pairs, got {type(cache).__name__}"
            + (f" of length {len(cache)}" if isinstance(cache, (tuple, list)) else "")
            + ": pass the `cache` of this model's previous output."
        )
    heads, head_dim = config.num_attention_heads, config.kv_channels
    layers = getattr(cache, "layers", None) or []
    if (
        layers
        and len(layers) != config.num_hidden_layers
        and (getattr(cache, "layer_class_to_replicate", None) is None or cache.get_seq_length() != 0)
    ):
        raise ValueError(
            f"The cache holds {len(layers)} layers but this model has {config.num_hidden_layers}: it belongs to "
            "another model; start a new one (omit `cache`) or pass the cache this model returned."
        )
    keys = getattr(layers[0], "keys", None) if layers and getattr(layers[0], "is_initialized", False) else None
    if isinstance(keys, torch.Tensor) and keys.ndim == 4 and keys.numel():
        if keys.shape[1] != heads or keys.shape[3] != head_dim or keys.shape[0] != batch:
            raise ValueError(
                f"The cache holds keys of shape {tuple(keys.shape)} but this model and batch need [batch={batch}, "
                f"heads={heads}, length, head_dim={head_dim}]: it belongs to another model or batch; start a new one "
                "(omit `cache`)."
            )
    return cache


def _validate_pixel_values(config: QwenVLConfig, pixel_values) -> torch.Tensor:
    """`pixel_values` as [N, 3, S, S] float: lists of images and channels-last layouts are converted."""
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values or not all(isinstance(image, torch.Tensor) for image in pixel_values):
            raise TypeError("pixel_values given as a list must be a non-empty list of image tensors [3, S, S].")
        images = [image[None] if image.ndim == 3 else image for image in pixel_values]
        if any(image.ndim != 4 or image.shape[1:] != images[0].shape[1:] for image in images):
            raise ValueError(
                f"pixel_values given as a list must hold images of one shape [3, S, S], got "
                f"{[tuple(image.shape) for image in pixel_values]}."
            )
        pixel_values = torch.cat(images)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a float torch.Tensor [images, 3, S, S], got {type(pixel_values).__name__}: use "
            "the processor's output (return_tensors='pt')."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be normalised floats, got dtype {pixel_values.dtype}: preprocess raw images with "
            "QwenVLImageProcessor (or the processor) first."
        )
    if pixel_values.ndim == 3:
        pixel_values = pixel_values[None]
    if pixel_values.ndim == 4 and pixel_values.shape[1] != 3 and pixel_values.shape[-1] == 3:
        pixel_values = pixel_values.permute(0, 3, 1, 2)  # channels-last
    size, patch = config.vision.image_size, config.vision.patch_size
    if (
        pixel_values.ndim != 4
        or pixel_values.shape[1] != 3
        or pixel_values.shape[2] < patch
        or pixel_values.shape[2] // patch != pixel_values.shape[3] // patch
    ):
        raise ValueError(
            f"pixel_values must have shape [images, 3, {size}, {size}] (square images of the model's "
            f"visual['image_size']), got {tuple(pixel_values.shape)}: preprocess the images with the processor."
        )
    return pixel_values


def _validate_ids(config: QwenVLConfig, input_ids: torch.Tensor) -> None:
    """Vectorised: ids within the vocabulary; in every row, closed, unnested `<img>` spans of `n_queries` slots."""
    out_of_range = ((input_ids < 0) | (input_ids >= config.vocab_size)).any(-1)
    starts, ends = input_ids == config.image_start_id, input_ids == config.image_end_id
    depth = starts.long().cumsum(-1) - ends.long().cumsum(-1)
    unbalanced = (depth < 0).any(-1) | (depth > 1).any(-1) | (depth[:, -1] != 0)
    slots = ((depth > 0) & ~starts).sum(-1)
    wrong_length = slots != starts.sum(-1) * config.vision.n_queries
    if not bool((out_of_range | unbalanced | wrong_length).any()):
        return
    if bool(out_of_range.any()):
        row = _first_row(out_of_range)
        bad = input_ids[row][(input_ids[row] < 0) | (input_ids[row] >= config.vocab_size)][0]
        raise ValueError(
            f"input_ids[{row}] holds the id {int(bad)}, outside the model's vocabulary [0, {config.vocab_size}): use "
            "the tokenizer that belongs to this model."
        )
    if bool(unbalanced.any()):
        raise ValueError(
            f"input_ids[{_first_row(unbalanced)}] has an unclosed, unopened or nested <img>...</img> span "
            f"(ids {config.image_start_id}/{config.image_end_id}): every row must close each image span it opens."
        )
    raise ValueError(
        f"input_ids[{_first_row(wrong_length)}]: every <img>...</img> span must hold exactly "
        f"{config.vision.n_queries} tokens between the tags (the model's visual['n_queries']): use a tokenizer "
        "whose image_span_length is the same."
    )


def validate_labels(labels, input_ids, inputs_embeds, vocab_size: int) -> None:
    """`labels` of `QwenVLForConditionalGeneration.forward`: integer ids [batch, length] in the vocabulary, or -100."""
    if labels is None or is_torchdynamo_compiling():
        return
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor of shape [batch, length] (-100 for ignored positions).")
    reference = input_ids if input_ids is not None else inputs_embeds
    shape = tuple(reference.shape[:2]) if isinstance(reference, torch.Tensor) else None
    if shape is not None and tuple(labels.shape) != shape:
        raise ValueError(
            f"labels must have the shape of input_ids {shape} (they are shifted inside the model), got "
            f"{tuple(labels.shape)}."
        )
    if bool((((labels < 0) & (labels != -100)) | (labels >= vocab_size)).any()):
        raise ValueError(f"labels must be token ids in [0, {vocab_size}) or -100 (ignored), got other values.")


class QwenVLPreTrainedModel(PreTrainedModel):
    config: QwenVLConfig
    config_class = QwenVLConfig
    base_model_prefix = "transformer"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenVLBlock", "QwenVLVisionBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # transformers' output capturing (`capture_outputs`): the input of the first block and every block's output are the
    # hidden states (the last one replaced by the final norm's output); attention weights come from each attention.
    _can_record_outputs = {"hidden_states": QwenVLBlock, "attentions": OutputRecorder(QwenVLAttention, index=1)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; in a local directory, an unreadable or truncated safetensors file raises
        a `ValueError` that names it, instead of safetensors' bare "Error while deserializing header"."""
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            broken = sorted(name for name in os.listdir(folder) if _broken_safetensors(os.path.join(folder, name)))
            if broken:
                raise ValueError(
                    f"Cannot load the weights of {str(pretrained_model_name_or_path)!r}: {', '.join(broken)} is not a "
                    "valid safetensors file (its header is unreadable or promises more bytes than the file holds); it "
                    "is truncated or corrupt (or a Git LFS pointer): download or save it "
                    "again."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, QwenVLVisionTransformer):
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[-1] ** -0.5)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)
        elif isinstance(module, QwenVLAdapterAttention):
            # `nn.MultiheadAttention`'s own initialisation (after `out_proj`, a child, got the Linear one), as before
            # this module stopped subclassing it: freshly initialised adapters keep their values for a given seed.
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, QwenVLVisionAdapter):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(
                module.pos_embed, sincos_2d_table(module.pos_embed.shape[1], int(math.sqrt(module.pos_embed.shape[0])))
            )
        elif isinstance(module, QwenVLRotaryEmbedding):
            init.copy_(module.inv_freq, module.inverse_frequencies(1.0))


class QwenVLModel(QwenVLPreTrainedModel):
    """The language model with the vision tower: embeddings, image splicing, blocks and final norm (no LM head)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QwenVLBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = QwenVLRotaryEmbedding(config)
        self.context_scaling = QwenVLContextScaling(config)
        self.visual = QwenVLVisionTransformer(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding):
        self.wte = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image features [N, n_queries, hidden_size]."""
        return self.visual(pixel_values)

    def get_image_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """True at the positions strictly between each `<img>` and its `</img>` (the image feature slots)."""
        starts = input_ids == self.config.image_start_id
        ends = input_ids == self.config.image_end_id
        depth = starts.long().cumsum(-1) - ends.long().cumsum(-1)
        return (depth > 0) & ~starts

    @staticmethod
    def _image_count_error(num_spans: int, num_images: int) -> ValueError:
        return ValueError(
            f"input_ids contain {num_spans} <img>...</img> spans but {num_images} images were given in pixel_values; "
            "pass one preprocessed image per span, row by row (QwenVLProcessor does this). With a cache, input_ids "
            "are the new, uncached tokens: pass only the images whose spans are among them."
        )

    def _splice_images(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Replace the embeddings inside every `<img>...</img>` span of `input_ids` by that image's features, in order.

        `input_ids` are the positions this call computes (with a cache, only the new ones), so `pixel_values` hold
        exactly the images whose spans lie in them: a later turn of a cached conversation brings only its new images.
        """
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("pixel_values need input_ids to locate the <img>...</img> spans; pass input_ids.")
            return inputs_embeds
        num_spans = int((input_ids == self.config.image_start_id).sum())
        num_ends = int((input_ids == self.config.image_end_id).sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_spans != num_ends:
            raise ValueError(
                f"input_ids have {num_spans} <img> tokens but {num_ends} </img> tokens; every span must be closed."
            )
        if num_spans != num_images:
            raise self._image_count_error(num_spans, num_images)
        if num_images == 0:
            return inputs_embeds
        mask = self.get_image_mask(input_ids)
        n_queries = self.config.vision.n_queries
        if int(mask.sum()) != num_images * n_queries:
            raise ValueError(
                f"Every <img>...</img> span must hold exactly {n_queries} tokens between the tags (the model's "
                "visual['n_queries']): use a tokenizer whose image_span_length is the same."
            )
        features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def _is_prefill(self, cache: Cache | None) -> bool:
        """True without a cache or with an empty one: only then is the dynamic-NTK alpha chosen.

        Compilable caches (`StaticCache`) count their tokens on device. Reading that count inside `torch.compile`
        would break the graph, so a compiled call takes such a cache as empty until a prefill of this model went
        through it (`generate` builds a new cache per call and compiles decoding steps only, never the prefill).
        """
        if cache is None:
            return True
        past_length = cache.get_seq_length()
        if not isinstance(past_length, torch.Tensor):
            return past_length == 0
        if is_torchdynamo_compiling():
            return not self.context_scaling.has_prefilled(cache)
        return not bool(past_length)

    def _is_left_padded_prefill(self, attention_mask: torch.Tensor | None, is_prefill: bool, query_length: int) -> bool:
        """A left-padded uncached batch under eager/sdpa: use `official_padding_attention` so every position, padding
        included, gets the official output. Otherwise the standard causal mask already gives the official results."""
        return (
            is_prefill
            and attention_mask is not None
            and attention_mask.ndim == 2
            and attention_mask.shape[-1] == query_length
            and self.config._attn_implementation in ("eager", "sdpa")
            and not bool(attention_mask[:, 0].all())
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids [batch, len] (or inputs_embeds [batch, len, hidden]) -> last_hidden_state [batch, len, hidden].
        `pixel_values` [images, 3, S, S] are the images of the `<img>` spans among `input_ids`, in order (see
        `QwenVLForConditionalGeneration.forward`). `output_hidden_states` / `output_attentions` are recorded by
        transformers' output capturing (`_can_record_outputs`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        pixel_values, cache = validate_model_inputs(
            self.config, input_ids, attention_mask, position_ids, cache, inputs_embeds, pixel_values, self._is_prefill
        )
        if use_cache and cache is None:
            cache = QwenVLCache(self.config)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)

        # Decoding steps skip everything data-dependent (image splicing, alpha choice), so they compile as one graph.
        # Images are encoded at prefill, and also with a filled cache when a new turn brings images of its own.
        is_prefill = self._is_prefill(cache)
        if is_prefill or pixel_values is not None:
            inputs_embeds = self._splice_images(input_ids, inputs_embeds, pixel_values)

        query_length = inputs_embeds.shape[1]
        if position_ids is None:  # official: positions count padding too (`generate` passes padding-aware ones)
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(query_length, device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)
        ntk_alpha, logn_scale = self.context_scaling(position_ids, cache, is_prefill, self.training)

        if self._is_left_padded_prefill(attention_mask, is_prefill, query_length):
            causal_mask, kwargs["attention_function"] = official_padding_attention(
                attention_mask, inputs_embeds.dtype, self.training
            )
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        position_embeddings = self.rotary_emb(position_ids, ntk_alpha)

        hidden_states = self.drop(inputs_embeds)
        for block in self.h:
            hidden_states = block(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                logn_scale=logn_scale,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache)


class QwenVLForConditionalGeneration(QwenVLPreTrainedModel, GenerationMixin):
    """Qwen-VL with its LM head. Loads `QWenLMHeadModel` checkpoints (Qwen-VL, Qwen-VL-Chat) as they are."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the remote-code files next to the weights

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode: GenerationMode,
        batch_size: int,
        max_cache_length: int,
    ):
        """`generate`'s default cache (`cache_implementation` unset or "dynamic") is a [`QwenVLCache`] presized to the
        call's maximal length: no per-step concatenation, and still a `DynamicCache` for every other purpose."""
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["cache"] = QwenVLCache(self.config, capacity=max_cache_length)
            if generation_config.is_assistant:
                model_kwargs["cache"].activate_past_recording()
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image features [N, n_queries, hidden_size]."""
        return self.transformer.get_image_features(pixel_values)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids [batch, len] hold `<img>` + 256 slot ids + `</img>` per image; `pixel_values` [images, 3, S, S] are
        the images of the spans in `input_ids`, in order of appearance (row by row); with a filled `cache` that means
        only the images of the new tokens (a later turn's own images). `labels` use -100 for ignored positions and are
        shifted inside (next-token loss, mean over kept targets).
        """
        validate_labels(labels, input_ids, inputs_embeds, self.config.vocab_size)
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            use_cache=use_cache,
            **kwargs,
        )
        logits = apply_linear(self.lm_head, slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            if input_ids is not None and labels.shape == input_ids.shape:
                # Image slots are never targets, also when the labels copy input_ids (as TRL's collators do).
                labels = labels.masked_fill(self.transformer.get_image_mask(input_ids), -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor | None, dict]:
        """Expand the batch for beams / `num_return_sequences`, handing every copy of a row that row's own images.

        `pixel_values` are flat over the batch (row by row, as `forward` fills the spans), so the default
        `repeat_interleave` on dim 0 would turn rows [a1 a2 | b] into images [a1 a1 a2 a2 b b] and give copies the
        wrong images. Each row's group of images is repeated instead: [a1 a2 a1 a2 | b b]. Rows are told apart by their
        `<img>` tokens among the positions still to be encoded (after a given cache), like the library's own
        `_expand_multimodal_outputs` does for pre-encoded features.
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        if expand_size > 1 and pixel_values is not None:
            if input_ids is None or input_ids.numel() == 0:
                raise ValueError("pixel_values need input_ids to locate the <img>...</img> spans; pass input_ids.")
            new_ids = input_ids
            cache, attention_mask = model_kwargs.get("cache"), model_kwargs.get("attention_mask")
            if cache is not None and (attention_mask is None or attention_mask.shape[-1] == input_ids.shape[-1]):
                new_ids = input_ids[:, cache.get_seq_length() :]  # `generate` encodes only the uncached positions
            images_per_row = (new_ids == self.config.image_start_id).sum(-1).tolist()
            if sum(images_per_row) != pixel_values.shape[0]:
                raise self.transformer._image_count_error(sum(images_per_row), pixel_values.shape[0])
            groups = pixel_values.split(images_per_row)
            pixel_values = torch.cat([group.repeat(expand_size, *([1] * (group.ndim - 1))) for group in groups])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = "You are a helpful assistant.",
        append_history: bool = True,
        stream: bool = False,
        stop_words_ids: list[list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """The official Qwen-VL-Chat `chat`: answer `query` after `history` ([(query, response), ...]) in ChatML.

        `tokenizer` may be a [`QwenVLTokenizer`] (as in the official code) or a [`QwenVLProcessor`]. Images are
        written in the text as `<img>path</img>` (`tokenizer.from_list_format` builds such queries) and are opened
        by the processor. Older turns are dropped first when the context exceeds `max_window_size` (generation
        config, default 6144 tokens). Extra keyword arguments go to `generate` (e.g. `streamer=` for streaming).
        Returns `(response, history)`, the history extended by this turn when `append_history`.
        """
        if stream:
            raise ValueError("chat(stream=True) is not supported: pass streamer=TextIteratorStreamer(...) instead.")
        from .processing_qwen_vl import QwenVLProcessor  # the processing stack loads only for chat()

        if isinstance(tokenizer, QwenVLProcessor):
            processor = tokenizer
        else:
            processor = QwenVLProcessor.for_model(self.config, tokenizer)
        tok = processor.tokenizer
        generation_config = generation_config or self.generation_config
        history = list(history or [])

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        # Keep the most recent turns that fit in the window, like the official `make_context`.
        budget = getattr(generation_config, "max_window_size", 6144) - count(f"<|im_start|>system\n{system}<|im_end|>")
        kept: list[tuple[str, str]] = []
        for turn_query, turn_response in reversed(history):
            budget -= count(
                f"\n<|im_start|>user\n{turn_query}<|im_end|>\n<|im_start|>assistant\n{turn_response}<|im_end|>"
            )
            if budget <= 0:
                break
            kept.insert(0, (turn_query, turn_response))
        messages = [{"role": "system", "content": system}]
        for turn_query, turn_response in kept:
            messages += [{"role": "user", "content": turn_query}, {"role": "assistant", "content": turn_response}]
        messages.append({"role": "user", "content": query})
        # Tokenized by the template, so control tokens typed in the messages stay text (official `make_context`).
        inputs = processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.device)

        stop_ids = tok.chat_stop_ids
        stop_strings = []
        for words in stop_words_ids or []:
            if len(words) == 1:
                stop_ids.append(words[0])
            else:
                stop_strings.append(tok.decode(words))
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=tok)
        output = self.generate(
            **inputs, generation_config=generation_config, eos_token_id=stop_ids, pad_token_id=tok.eod_id, **kwargs
        )
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        end = next((i for i, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
        response = tok.decode(new_tokens[:end])
        for stop in stop_strings:
            response = response.split(stop)[0]
        response = response.strip()
        if append_history:
            history.append((query, response))
        return response, history


__all__ = ["QwenVLForConditionalGeneration", "QwenVLModel", "QwenVLPreTrainedModel"]
