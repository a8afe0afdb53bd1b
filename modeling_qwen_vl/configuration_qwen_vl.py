"""Qwen-VL configuration: reads the official `config.json` (`model_type: "qwen"`) unchanged."""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

# Defaults of the official Qwen-VL vision tower (ViT-bigG/14 at 448px); `n_queries` is fixed to 256 in the
# official code and is a parameter of its `VisionTransformer`, so keeping it in this dict stays loadable there.
DEFAULT_VISUAL = {
    "image_size": 448,
    "patch_size": 14,
    "width": 1664,
    "layers": 48,
    "heads": 16,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "image_start_id": 151857,
    "n_queries": 256,
}
# The `visual` keys that fix the vision tower's weight shapes: a given `visual` dict must name them all (a missing one
# would silently take the official default and build another model). `image_start_id` and `n_queries` may default.
REQUIRED_VISUAL_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim")




@dataclass(frozen=True)
class QwenVLVisionSizes:
    """A typed, read-only view of `QwenVLConfig.visual` (see there for the fields), built on each access of
    `config.vision`, so it always shows the dict (which stays the serialised form, as in the official config.json)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    image_start_id: int
    n_queries: int

    @property
    def mlp_width(self) -> int:
        """Hidden width of the ViT MLP: `int(width * mlp_ratio)`, as the official model sizes `c_fc`."""
        return int(self.width * self.mlp_ratio)

    @property
    def query_grid(self) -> int:
        """Side of the adapter's square query grid (`n_queries` is a perfect square)."""
        return int(self.n_queries**0.5)


# Written into every saved config.json so a Hub repo of these files loads with `trust_remote_code=True`.
AUTO_MAP = {
    "AutoConfig": "configuration_qwen_vl.QwenVLConfig",
    "AutoModel": "modeling_qwen_vl.QwenVLModel",
    "AutoModelForCausalLM": "modeling_qwen_vl.QwenVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_qwen_vl.QwenVLForConditionalGeneration",
    "AutoTokenizer": ["tokenization_qwen_vl.QwenVLTokenizer", None],
    "AutoImageProcessor": "image_processing_qwen_vl.QwenVLImageProcessor",
    "AutoProcessor": "processing_qwen_vl.QwenVLProcessor",
}
# The official class name: serving engines (vLLM, ...) recognise Qwen-VL checkpoints by it.
OFFICIAL_ARCHITECTURE = "QWenLMHeadModel"


@strict
class QwenVLConfig(PreTrainedConfig):
    r"""
    Configuration of [`QwenVLForConditionalGeneration`]. Field names are those of the official checkpoints, so an
    official `config.json` loads as it is; the defaults describe Qwen-VL (9.6B).

    Language model: `vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `kv_channels` (head
    dimension), `intermediate_size` (the SwiGLU MLP uses two projections of half this size), `layer_norm_epsilon`
    (RMSNorm), `rotary_emb_base`, `rotary_pct`, `seq_length` (the trained context: dynamic NTK and log-n scaling start
    beyond it), `use_dynamic_ntk`, `use_logn_attn`, `no_bias` (no bias except the fused qkv projection).

    `visual` holds the vision tower: `image_size`, `patch_size`, `width`, `layers`, `heads`, `mlp_ratio`,
    `output_dim` (= `hidden_size`), `image_start_id` (id of `<img>`; `</img>` and `<imgpad>` follow it) and
    `n_queries` (image features per image: 256, a perfect square; the tokenizer's `image_span_length`
    must match it).

    Like transformers' own configs this is a `huggingface_hub` `@strict` dataclass: field types are checked and
    `validate_architecture` runs whenever a config is built or loaded (and before it is saved), so a `config.json`
    with impossible sizes or ids fails at load with a message naming the field, not later inside the model.

    ```python
    >>> from modeling_qwen_vl import QwenVLConfig
    >>> config = QwenVLConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32)
    ```
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["cache"]
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to config.json

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float | int = 1e-6
    initializer_range: float | int = 0.02
    rotary_emb_base: float | int = 10000.0
    rotary_pct: float | int = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    emb_dropout_prob: float | int = 0.0
    attn_dropout_prob: float | int = 0.0
    scale_attn_weights: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    visual: dict | None = None

    def __post_init__(self, **kwargs):
        if self.visual is not None:
            if not isinstance(self.visual, dict):
                raise TypeError(f"visual must be a dict of vision-tower sizes, got {type(self.visual).__name__}.")
            if missing := [key for key in REQUIRED_VISUAL_KEYS if key not in self.visual]:
                raise ValueError(
                    f"visual is missing {missing}: a vision tower needs all of {list(REQUIRED_VISUAL_KEYS)} (e.g. the "
                    "official Qwen-VL config.json's 'visual' block); add them to config.json."
                )
        self.visual = {**DEFAULT_VISUAL, **(self.visual or {})}
        # An official config.json points its auto_map at the official remote code; ours replaces it.
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.from_pretrained`; a config.json that fails validation raises a `ValueError` naming it."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (StrictDataclassError, TypeError, ValueError) as error:
            raise ValueError(
                f"Cannot load the config.json of {str(pretrained_model_name_or_path)!r}: {error}"
            ) from error

    def to_dict(self) -> dict:
        """Serialise with the official architecture name, so checkpoints we write stay recognisable as Qwen-VL."""
        output = super().to_dict()
        if output.get("architectures"):
            output["architectures"] = [OFFICIAL_ARCHITECTURE]
        return output

    def validate_architecture(self):
        """Reject shapes the model cannot be built with, naming the fields to fix."""
        sizes = {
            name: getattr(self, name)
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                         "intermediate_size", "seq_length")
        }
        sizes.update({f"visual['{key}']": self.visual[key] for key in ("image_size", "patch_size", "width", "layers",
                                                                       "heads", "output_dim", "n_queries")})
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        mlp_ratio, start = self.visual["mlp_ratio"], self.visual["image_start_id"]
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"visual['mlp_ratio'] must be a positive number, got {mlp_ratio!r}.")
        if self.visual["patch_size"] > self.visual["image_size"]:
            raise ValueError(
                f"visual['patch_size'] ({self.visual['patch_size']}) must not exceed visual['image_size'] "
                f"({self.visual['image_size']})."
            )
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= self.vocab_size - 3:
            raise ValueError(
                f"visual['image_start_id'] ({start!r}) must be an id with room for </img> and <imgpad> after it, "
                f"i.e. in [0, vocab_size - 3] = [0, {self.vocab_size - 3}]."
            )
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct!r}.")
        rotary_dim = int(self.kv_channels * self.rotary_pct)
        if rotary_dim % 2 or rotary_dim < 4:
            raise ValueError(
                f"kv_channels x rotary_pct ({rotary_dim}) rotary dimensions must be an even number of at least 4."
            )
        for name in ("emb_dropout_prob", "attn_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels ({self.kv_channels}) x num_attention_heads ({self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size})."
            )
        if self.visual["output_dim"] != self.hidden_size:
            raise ValueError(
                f"visual['output_dim'] ({self.visual['output_dim']}) must equal hidden_size ({self.hidden_size}): "
                "image features replace token embeddings."
            )
        if self.visual["width"] % self.visual["heads"] != 0:
            raise ValueError(f"visual['width'] ({self.visual['width']}) must be divisible by visual['heads'].")
        if self.visual["output_dim"] % 128 != 0:
            raise ValueError(
                f"visual['output_dim'] ({self.visual['output_dim']}) must be a multiple of 128: the adapter uses "
                "output_dim // 128 attention heads."
            )
        if int(self.visual["n_queries"] ** 0.5) ** 2 != self.visual["n_queries"]:
            raise ValueError(f"visual['n_queries'] ({self.visual['n_queries']}) must be a perfect square.")

    @property
    def vision(self) -> QwenVLVisionSizes:
        """The vision tower's sizes as a typed read-only view of `visual`."""
        return QwenVLVisionSizes(**{name: self.visual[name] for name in QwenVLVisionSizes.__dataclass_fields__})

    @property
    def image_start_id(self) -> int:
        return self.visual["image_start_id"]

    @property
    def image_end_id(self) -> int:
        return self.visual["image_start_id"] + 1

    @property
    def image_pad_id(self) -> int:
        return self.visual["image_start_id"] + 2


__all__ = ["QwenVLConfig"]
