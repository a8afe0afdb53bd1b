"""Shared test fixtures: where the reference material lives and how its absence is reported."""

import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(os.environ.get("QWEN_VL_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def _require(path: Path) -> Path:
    """Return `path` if it exists; otherwise fail under CI and skip (with the reason) elsewhere."""
    if path.exists():
        return path
    message = f"reference material not found at {path} (expected ../shared/reference beside the checkout)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE_DIR)


@pytest.fixture(scope="session")
def fixtures_dir(reference_dir) -> Path:
    return _require(reference_dir / "fixtures")


@pytest.fixture(scope="session")
def vocab_file(reference_dir) -> Path:
    """The official qwen.tiktoken (test data only; never copied into the repo)."""
    return _require(reference_dir / "qwen.tiktoken")


@pytest.fixture(scope="session")
def tokenizer_golden(fixtures_dir) -> dict:
    import json

    return json.loads(_require(fixtures_dir / "tokenizer_golden.json").read_text())


TINY_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world"]
TINY_IMAGE_START_ID = 256 + len(TINY_MERGES) + 214  # `<img>` follows the ranks and 214 other special tokens


@pytest.fixture(scope="session")
def tiny_vocab_file(tmp_path_factory):
    """256 single bytes plus a few merges, in the qwen.tiktoken format."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    path = tmp_path_factory.mktemp("tiny_vocab") / "qwen.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="session")
def tiny_processor(tiny_vocab_file):
    """A processor matching TINY_CONFIG: tiny vocabulary, 56px images."""
    from modeling_qwen_vl import QwenVLImageProcessor, QwenVLProcessor, QwenVLTokenizer

    size = TINY_CONFIG["visual"]["image_size"]
    return QwenVLProcessor(QwenVLImageProcessor(size={"height": size, "width": size}), QwenVLTokenizer(str(tiny_vocab_file)))


TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_channels=32,
    intermediate_size=256,
    visual=dict(image_size=56, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=128, image_start_id=TINY_IMAGE_START_ID),
)


@pytest.fixture
def tiny_model_factory():
    """Build a seeded tiny random model; keyword arguments override config fields."""
    from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

    def build(attn_implementation: str = "sdpa", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = QwenVLConfig(**{**TINY_CONFIG, **overrides})
        return QwenVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)

    return build


@pytest.fixture
def tiny_inputs():
    """Left-padded random batches: `lengths[i]` text tokens plus `images_per_row[i]` image spans in row i."""

    def build(config, lengths, images_per_row, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        start, n_queries = config.image_start_id, config.visual["n_queries"]
        rows = []
        for length, images in zip(lengths, images_per_row):
            text = torch.randint(start + 3, config.vocab_size, (length,), generator=generator).tolist()
            span = [start] + [start + 2] * n_queries + [start + 1]
            rows.append(text[:2] + span * images + text[2:])
        width = max(map(len, rows))
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        size = config.visual["image_size"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if sum(images_per_row):
            batch["pixel_values"] = torch.randn(sum(images_per_row), 3, size, size, generator=generator)
        return batch

    return build
