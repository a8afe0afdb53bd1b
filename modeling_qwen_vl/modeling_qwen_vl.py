"""Qwen-VL (arXiv 2308.12966): a ViT with a cross-attention adapter feeding 256 features per image into Qwen-7B.

Module and parameter names follow the official checkpoints (`transformer.wte`, `transformer.h.{i}.attn.c_attn`,
`transformer.visual.attn_pool.*`, `lm_head`, ...), so official safetensors load without missing or unexpected keys
and the checkpoints this code writes stay loadable by the official code and by serving engines.
"""

import math
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_qwen_vl import QwenVLConfig
from .image_processing_qwen_vl import QwenVLImageProcessor
from .processing_qwen_vl import QwenVLProcessor


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
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij")

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


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower (`transformer.visual`): ViT + position-aware cross-attention adapter
# ----------------------------------------------------------------------------------------------------------------------


class QwenVLVisionAttention(nn.Module):
    """ViT self-attention. `in_proj` output is laid out per head as [heads, 3 * head_dim] (q|k|v inside each head)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width, self.num_heads = config.visual["width"], config.visual["heads"]
        self.head_dim = width // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.config = config
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: [images, patches, width] -> [images, patches, width]."""
        batch, length, _ = hidden_states.shape
        qkv = self.in_proj(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        attn_output, _ = _attention_interface(self.config)(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False
        )
        return self.out_proj(attn_output.reshape(batch, length, -1))


class QwenVLVisionMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.visual["width"]
        self.c_fc = nn.Linear(width, int(width * config.visual["mlp_ratio"]))
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(int(width * config.visual["mlp_ratio"]), width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(hidden_states)))


class QwenVLVisionBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.visual["width"]
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
        self.resblocks = nn.ModuleList(QwenVLVisionBlock(config) for _ in range(config.visual["layers"]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            hidden_states = block(hidden_states)
        return hidden_states


class QwenVLAdapterAttention(nn.MultiheadAttention):
    """The adapter's cross-attention: `nn.MultiheadAttention` weights (stacked `in_proj`, `out_proj`), computed with
    the configured attention implementation.

    `out_proj` is called as a module, so accelerate's offloading hooks (`device_map` with cpu/disk offload) load its
    weights; plain `nn.MultiheadAttention` reads `out_proj.weight` directly and would find it on the meta device.
    """

    def __init__(self, config: QwenVLConfig):
        embed_dim = config.visual["output_dim"]
        super().__init__(embed_dim, embed_dim // 128, batch_first=True)
        self.config = config
        self.is_causal = False
        self.scaling = self.head_dim**-0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [batch, q_len, dim], key/value [batch, kv_len, dim] -> [batch, q_len, dim]."""
        batch = query.shape[0]

        def project(x: torch.Tensor, index: int) -> torch.Tensor:
            rows = slice(index * self.embed_dim, (index + 1) * self.embed_dim)
            x = F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])
            return x.view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        attn_output, _ = _attention_interface(self.config)(
            self, project(query, 0), project(key, 1), project(value, 2), None, scaling=self.scaling, dropout=0.0
        )
        return self.out_proj(attn_output.reshape(batch, query.shape[1], self.embed_dim))


class QwenVLVisionAdapter(nn.Module):
    """Position-aware adapter: `n_queries` learned queries cross-attend to the patch features.

    `pos_embed` is the fixed 2-D sin-cos table of the query grid; it is stored in checkpoints but never trained.
    """

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        embed_dim, n_queries = config.visual["output_dim"], config.visual["n_queries"]
        self.query = nn.Parameter(torch.empty(n_queries, embed_dim))
        # In the model's dtype, like the other weights: loading in bfloat16 then casts it instead of keeping a view of
        # the float32 checkpoint (which would pin the whole memory-mapped file) and mixing dtypes in `attn`.
        table = sincos_2d_table(embed_dim, int(math.sqrt(n_queries))).to(torch.get_default_dtype())
        self.register_buffer("pos_embed", table, persistent=True)
        # As in the official module: no projection (and no `kv_proj.weight` in the checkpoint) when the widths match.
        width = config.visual["width"]
        self.kv_proj = nn.Identity() if width == embed_dim else nn.Linear(width, embed_dim, bias=False)
        self.attn = QwenVLAdapterAttention(config)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """patch_features: [images, patches, width] -> [images, n_queries, output_dim]."""
        key_pos = resize_grid_embedding(self.pos_embed, patch_features.shape[1])
        value = self.ln_kv(self.kv_proj(patch_features))
        query = (self.ln_q(self.query) + self.pos_embed).expand(patch_features.shape[0], -1, -1)
        return self.attn(query, value + key_pos, value)


class QwenVLVisionTransformer(nn.Module):
    """Images [N, 3, S, S] -> features [N, n_queries, output_dim] ready to replace `<img>` span embeddings."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        visual = config.visual
        self.conv1 = nn.Conv2d(3, visual["width"], visual["patch_size"], stride=visual["patch_size"], bias=False)
        # A 16x16 grid (official size whatever the image size); resized to the patch grid in `forward`.
        self.positional_embedding = nn.Parameter(torch.empty(256, visual["width"]))
        self.ln_pre = nn.LayerNorm(visual["width"], eps=1e-6)
        self.transformer = QwenVLVisionEncoder(config)
        self.attn_pool = QwenVLVisionAdapter(config)
        self.ln_post = nn.LayerNorm(visual["output_dim"], eps=1e-6)
        self.proj = nn.Parameter(torch.empty(visual["output_dim"], visual["output_dim"]))

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
    scale = torch.where(positions > trained_len, torch.log(positions) / math.log(trained_len), torch.ones_like(positions))
    return scale[:, None, :, None]


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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
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
        force_eager_attention: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query_key = apply_rotary_pos_emb(qkv[:, :, :2], *position_embeddings)  # q and k in one pass
        # [batch, heads, len, head_dim] views
        query, key, value = query_key[:, :, 0].transpose(1, 2), query_key[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if logn_scale is not None:
            query = query * logn_scale.to(query.dtype)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_fn = eager_attention_forward if force_eager_attention else _attention_interface(self.config)
        attn_output, attn_weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            **kwargs,
        )
        return self.c_proj(attn_output.reshape(batch, length, -1)), attn_weights


class QwenVLMLP(nn.Module):
    """SwiGLU: `c_proj(w1(x) * silu(w2(x)))`, each inner projection of size intermediate_size // 2."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


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
        force_eager_attention: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            logn_scale=logn_scale,
            force_eager_attention=force_eager_attention,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


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

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, QwenVLVisionTransformer):
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[-1] ** -0.5)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)
        elif isinstance(module, QwenVLVisionAdapter):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, sincos_2d_table(module.pos_embed.shape[1], int(math.sqrt(module.pos_embed.shape[0]))))
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

    def _splice_images(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Replace the embeddings inside every `<img>...</img>` span by that image's features, in order."""
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("pixel_values need input_ids to locate the <img>...</img> spans; pass input_ids.")
            return inputs_embeds
        num_spans = int((input_ids == self.config.image_start_id).sum())
        num_ends = int((input_ids == self.config.image_end_id).sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_spans != num_ends:
            raise ValueError(f"input_ids have {num_spans} <img> tokens but {num_ends} </img> tokens; every span must be closed.")
        if num_spans != num_images:
            raise ValueError(
                f"input_ids contain {num_spans} <img>...</img> spans but {num_images} images were given in "
                "pixel_values; pass one preprocessed image per span (QwenVLProcessor does this)."
            )
        if num_images == 0:
            return inputs_embeds
        mask = self.get_image_mask(input_ids)
        n_queries = self.config.visual["n_queries"]
        if int(mask.sum()) != num_images * n_queries:
            raise ValueError(
                f"Every <img>...</img> span must hold exactly {n_queries} tokens between the tags (the model's "
                "visual['n_queries']): use a tokenizer whose image_span_length is the same."
            )
        features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    @staticmethod
    def _is_prefill(cache: Cache | None) -> bool:
        """True without a cache or with an empty one: only then are images encoded and the dynamic-NTK alpha chosen.

        Compilable caches (`StaticCache`) count their tokens on device. Reading that count inside `torch.compile`
        would break the graph, so a compiled call takes such a cache as empty until this model has stored its alpha on
        it (`generate` builds a new cache per call and compiles decoding steps only, never the prefill).
        """
        if cache is None:
            return True
        past_length = cache.get_seq_length()
        if not isinstance(past_length, torch.Tensor):
            return past_length == 0
        if is_torchdynamo_compiling():
            return not hasattr(cache, "qwen_ntk_alpha")
        return not bool(past_length)

    def _is_left_padded_prefill(self, attention_mask: torch.Tensor | None, is_prefill: bool, query_length: int) -> bool:
        """A left-padded uncached batch under eager/sdpa: use `official_padding_mask` so every position, padding
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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = QwenVLCache(self.config)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)

        # Decoding steps skip everything data-dependent (image splicing, alpha choice), so they compile as one graph.
        is_prefill = self._is_prefill(cache)
        if is_prefill:  # images are encoded only here
            inputs_embeds = self._splice_images(input_ids, inputs_embeds, pixel_values)

        query_length = inputs_embeds.shape[1]
        if position_ids is None:  # official: positions count padding too (`generate` passes padding-aware ones)
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(query_length, device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)

        # Dynamic NTK and log-n scaling extend the context at inference only; decoding reuses the prefill's alpha,
        # which every prefill stores on the cache (it also marks the cache as filled, see `_is_prefill`).
        ntk_alpha, logn_scale = 1.0, None
        use_ntk = self.config.use_dynamic_ntk and not self.training
        if is_prefill:
            if use_ntk:
                ntk_alpha = dynamic_ntk_alpha(query_length, self.config.seq_length)
            if cache is not None:
                cache.qwen_ntk_alpha = ntk_alpha
        elif use_ntk:
            ntk_alpha = getattr(cache, "qwen_ntk_alpha", 1.0)
        if self.config.use_logn_attn and not self.training:
            logn_scale = logn_attention_scale(position_ids, self.config.seq_length)

        official_padding = self._is_left_padded_prefill(attention_mask, is_prefill, query_length)
        # sdpa kernels lose precision in the backward pass on rows of `min` scores: train such batches with eager math.
        force_eager_attention = official_padding and self.training
        if official_padding:
            causal_mask = official_padding_mask(attention_mask, inputs_embeds.dtype)
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
        all_hidden_states = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                logn_scale=logn_scale,
                force_eager_attention=force_eager_attention,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


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
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids [batch, len] hold `<img>` + 256 slot ids + `</img>` per image; `pixel_values` [images, 3, S, S] are
        the images in order of appearance (row by row) and are encoded on prefill only. `labels` use -100 for ignored
        positions and are shifted inside (next-token loss, mean over kept targets).
        """
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

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
        if isinstance(tokenizer, QwenVLProcessor):
            processor = tokenizer
        else:
            size = self.config.visual["image_size"]
            processor = QwenVLProcessor(QwenVLImageProcessor(size={"height": size, "width": size}), tokenizer)
        tok = processor.tokenizer
        generation_config = generation_config or self.generation_config
        history = list(history or [])

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        # Keep the most recent turns that fit in the window, like the official `make_context`.
        budget = getattr(generation_config, "max_window_size", 6144) - count(
            f"<|im_start|>system\n{system}<|im_end|>"
        )
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

        stop_ids = [tok.im_end_id, tok.im_start_id, tok.eod_id]
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
