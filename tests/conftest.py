"""Shared test fixtures: where the reference material lives and how its absence is reported."""

import os
from pathlib import Path

import pytest

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
