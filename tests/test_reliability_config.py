"""Configs and weights at load: impossible sizes, incomplete `visual` dicts, inconsistent ids, broken files."""

import json
import shutil

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

from .conftest import TINY_CONFIG

ConfigError = (ValueError, TypeError, StrictDataclassError)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"num_hidden_layers": "2"}, "Field 'num_hidden_layers' expected int"),
        ({"vocab_size": 300}, r"visual\['image_start_id'\] \(478\) must be an id with room for </img> and <imgpad>"),
        ({"kv_channels": 16}, r"kv_channels \(16\) x num_attention_heads \(4\) must equal hidden_size \(128\)"),
        ({"rotary_pct": 0.0}, r"rotary_pct must be in \(0, 1\]"),
        ({"rotary_pct": 0.05}, "rotary dimensions must be an even number of at least 4"),
        ({"attn_dropout_prob": 1.5}, r"attn_dropout_prob must be in \[0, 1\)"),
        ({"visual": {**TINY_CONFIG["visual"], "layers": -2}}, r"visual\['layers'\] must be a positive integer"),
        ({"visual": {**TINY_CONFIG["visual"], "n_queries": 15}}, "must be a perfect square"),
        ({"visual": {**TINY_CONFIG["visual"], "mlp_ratio": 0}}, r"visual\['mlp_ratio'\] must be a positive number"),
        ({"visual": {**TINY_CONFIG["visual"], "patch_size": 100}}, "must not exceed"),
        (
            {"visual": {k: v for k, v in TINY_CONFIG["visual"].items() if k != "width"}},
            r"visual is missing \['width'\]",
        ),
        ({"visual": [1, 2]}, "Field 'visual'"),
    ],
)
def test_invalid_configs_fail_when_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        QwenVLConfig(**{**TINY_CONFIG, **overrides})


def test_official_config_and_defaults_still_load(fixtures_dir):
    official = json.loads((fixtures_dir / "fixture_a" / "config.json").read_text())
    assert "n_queries" not in official["visual"] and isinstance(official["rotary_emb_base"], int)
    config = QwenVLConfig(**official)
    assert config.visual["n_queries"] == 256 and config.visual["width"] == official["visual"]["width"]
    assert QwenVLConfig().visual["width"] == 1664  # no `visual` at all: the official tower


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        (
            lambda c: {**c, "visual": {k: v for k, v in c["visual"].items() if k != "heads"}},
            r"visual is missing \['heads'\]",
        ),
        (lambda c: {**c, "vocab_size": 100}, r"visual\['image_start_id'\] \(400\)"),
    ],
)
def test_invalid_config_json_fails_at_load_naming_the_file(fixtures_dir, tmp_path, edit, message):
    official = json.loads((fixtures_dir / "fixture_a" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(edit(official)))
    for load in (QwenVLConfig.from_pretrained, QwenVLForConditionalGeneration.from_pretrained):
        with pytest.raises(ValueError, match=message) as error:
            load(tmp_path)
        assert "config.json" in str(error.value) and str(tmp_path) in str(error.value)
    with pytest.raises(ConfigError, match=message):  # through the Auto class too (no file name there)
        AutoConfig.from_pretrained(tmp_path)


def test_truncated_config_json_names_the_file(fixtures_dir, tmp_path):
    text = (fixtures_dir / "fixture_a" / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(OSError, match="config.json' is not a valid JSON file") as error:
        QwenVLConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_safetensors_names_the_file(fixtures_dir, tmp_path, damage):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixtures_dir / "fixture_a" / name, tmp_path / name)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file", "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file .*truncated or corrupt"):
        QwenVLForConditionalGeneration.from_pretrained(tmp_path)
