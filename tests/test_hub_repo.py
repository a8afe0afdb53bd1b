"""A converted official checkpoint is a complete Hub repo that loads, from its own files only, in a fresh process."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from modeling_qwen_vl import QwenVLForConditionalGeneration
from qwen_vl.hub_upload.convert_official import convert_official

AUTO_CLASSES = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoTokenizer",
    "AutoImageProcessor",
    "AutoProcessor",
]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, official_checkpoint):
    return official_checkpoint(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def repo_dir(official_dir, tmp_path_factory):
    return convert_official(official_dir, tmp_path_factory.mktemp("converted") / "repo", repo_id="me/tiny-qwen-vl-chat")


def test_conversion_keeps_weights_and_writes_a_complete_repo(official_dir, repo_dir):
    assert sha256(repo_dir / "model.safetensors") == sha256(official_dir / "model.safetensors")
    config = json.loads((repo_dir / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert set(AUTO_CLASSES) <= set(config["auto_map"])
    for target in config["auto_map"].values():
        module = (target[0] if isinstance(target, list) else target).split(".")[0]
        assert (repo_dir / f"{module}.py").is_file(), module
    for name in (
        "qwen.tiktoken",
        "tokenizer_config.json",
        "processor_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert (repo_dir / name).is_file(), name
    generation = json.loads((repo_dir / "generation_config.json").read_text())
    assert (
        generation["top_p"] == 0.5 and generation["max_window_size"] == 6144 and generation["chat_format"] == "chatml"
    )
    card = (repo_dir / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "me/tiny-qwen-vl-chat" in card


def test_conversion_of_an_adapter_without_kv_proj(tmp_path, official_checkpoint):
    """ViT width == output_dim: the official adapter has `kv_proj = nn.Identity()`, so no `kv_proj.weight`."""
    source = official_checkpoint(tmp_path / "official", width=128)
    with safe_open(source / "model.safetensors", "pt") as official:
        names = set(official.keys())
    assert "transformer.visual.attn_pool.ln_kv.weight" in names
    assert not any("kv_proj" in name for name in names)
    repo = convert_official(source, tmp_path / "repo")
    model, info = QwenVLForConditionalGeneration.from_pretrained(repo, output_loading_info=True)
    assert not any(info.values()), info
    assert isinstance(model.transformer.visual.attn_pool.kv_proj, torch.nn.Identity)


def test_conversion_refuses_a_foreign_tokenizer(official_dir, tmp_path, vocab_file):
    source = tmp_path / "mismatch"
    shutil.copytree(official_dir, source)
    shutil.copy(vocab_file, source / "qwen.tiktoken")  # the full vocabulary puts <img> elsewhere
    with pytest.raises(ValueError, match="image_start_id"):
        convert_official(source, tmp_path / "out")


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_qwen_vl"] = None  # the package is not importable: only the repo's own files exist
    import torch
    from PIL import Image
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline)

    repo = sys.argv[1]
    for auto in (AutoConfig, AutoTokenizer, AutoImageProcessor, AutoModel):
        auto.from_pretrained(repo, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    inputs = processor(text="Picture 1: <img></img>\\nhello world", images=[image], return_tensors="pt")
    result = {}
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(repo, trust_remote_code=True).eval()
        with torch.no_grad():
            result[auto.__name__] = model(**inputs).logits[0, -3:].tolist()
    result["generated"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist()
    pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    result["pipeline_text"] = pipe(
        images=image, text="Picture 1: <img></img>\\nhello", max_new_tokens=3, do_sample=False
    )
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hello"}]}]
    result["pipeline_chat"] = pipe(text=messages, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]["role"]
    print(json.dumps(result, default=str))
    """
)


def test_fresh_process_loads_repo_with_every_auto_class(repo_dir, tiny_processor):
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(repo_dir)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    from PIL import Image

    model = QwenVLForConditionalGeneration.from_pretrained(repo_dir).eval()
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    inputs = tiny_processor(text="Picture 1: <img></img>\nhello world", images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits[0, -3:]
    for name in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        torch.testing.assert_close(torch.tensor(result[name]), expected, rtol=1e-5, atol=1e-5)
    assert result["generated"] == model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist()
    assert result["pipeline_chat"] == "assistant"
