"""Shared test fixtures: the reference material (and how its absence is reported), tiny configs, vocabularies,
models, checkpoints in the official and the saved layout, training data, and the project installed from its wheel."""

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = ROOT / "recipes" / "configs" / "tiny"
REFERENCE_DIR = Path(
    os.environ.get("QWEN_VL_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


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
    return json.loads(_require(fixtures_dir / "tokenizer_golden.json").read_text())


TINY_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world"]
TINY_IMAGE_START_ID = 256 + len(TINY_MERGES) + 214  # `<img>` follows the ranks and 214 other special tokens


def _write_vocab(path: Path, tokens: list[bytes] | None = None) -> int:
    """Write `tokens` (default: 256 single bytes in byte order plus `TINY_MERGES`, reachable by BPE) in the
    qwen.tiktoken format (`base64(token) rank` per line); returns the number of ranks."""
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES if tokens is None else tokens
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return len(tokens)


@pytest.fixture(scope="session")
def write_vocab():
    """`write_vocab(path, tokens=None) -> number of ranks`: a vocabulary file (the tiny one by default)."""
    return _write_vocab


@pytest.fixture(scope="session")
def tiny_vocab_file(tmp_path_factory):
    """256 single bytes plus a few merges, in the qwen.tiktoken format."""
    path = tmp_path_factory.mktemp("tiny_vocab") / "qwen.tiktoken"
    _write_vocab(path)
    return path


@pytest.fixture(scope="session")
def tiny_processor(tiny_vocab_file):
    """A processor matching TINY_CONFIG: tiny vocabulary, 56px images."""
    from modeling_qwen_vl import QwenVLImageProcessor, QwenVLProcessor, QwenVLTokenizer

    size = TINY_CONFIG["visual"]["image_size"]
    return QwenVLProcessor(
        QwenVLImageProcessor(size={"height": size, "width": size}), QwenVLTokenizer(str(tiny_vocab_file))
    )


TINY_CONFIG = dict(
    vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32, intermediate_size=256,
    visual=dict(image_size=56, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=128,
                image_start_id=TINY_IMAGE_START_ID),
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


@pytest.fixture(scope="session")
def official_checkpoint(tiny_vocab_file):
    """Write a tiny checkpoint in the official layout (official config keys and auto_map, safetensors, qwen.tiktoken)
    into a directory: `official_checkpoint(path, **visual_overrides) -> path`."""
    from safetensors.torch import save_file

    from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

    def write(source: Path, **visual) -> Path:
        # The vocabulary ends at `<imgpad>`: a random model then only generates ids the tokenizer can decode.
        tiny = {**TINY_CONFIG, "vocab_size": TINY_IMAGE_START_ID + 3, "visual": {**TINY_CONFIG["visual"], **visual}}
        torch.manual_seed(0)
        model = QwenVLForConditionalGeneration(QwenVLConfig(**tiny))
        source.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, source / "model.safetensors", metadata={"format": "pt"})
        config = dict(tiny)
        config.update(
            model_type="qwen",
            architectures=["QWenLMHeadModel"],
            auto_map={
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
            tokenizer_type="QWenTokenizer",
            use_flash_attn="auto",
        )
        (source / "config.json").write_text(json.dumps(config))
        generation = {
            "chat_format": "chatml",
            "eos_token_id": 151643,
            "pad_token_id": 151643,
            "max_window_size": 6144,
            "max_new_tokens": 512,
            "do_sample": True,
            "top_k": 0,
            "top_p": 0.5,
        }
        (source / "generation_config.json").write_text(json.dumps(generation))
        shutil.copy(tiny_vocab_file, source / "qwen.tiktoken")
        return source

    return write


def _write_tiny_data(root: Path) -> dict[str, Path]:
    """Images plus one data file per stage; every SFT dialogue but one (text only) shows an image."""
    (root / "images").mkdir(parents=True)
    for i in range(6):
        PIL.Image.new("RGB", (40, 32), (40 * i, 200 - 30 * i, 90)).save(root / "images" / f"{i}.png")
    captions = [
        {"image": f"images/{i}.png", "caption": ["hello world", "hell or", "world or hello"][i % 3]} for i in range(6)
    ]
    multitask = [
        {"task": "caption", "image": "images/0.png", "caption": "hello world"},
        {"task": "vqa", "image": "images/1.png", "question": "what?", "answer": "hello"},
        {"task": "grounding", "image": "images/2.png", "caption": "<ref>hello</ref><box>(1,2),(300,400)</box> world"},
        {"task": "ref", "image": "images/3.png", "phrase": "the world", "box": [10, 20, 500, 600]},
        {"task": "grounded_caption", "image": "images/4.png", "phrase": "hello", "box": [0, 0, 999, 999]},
        {"task": "ocr", "image": "images/5.png", "text": "HELLO"},
        {"task": "text", "text": "hello world, hello world"},
        {"task": "caption", "image": "images/5.png", "caption": "world"},
    ]
    sft = [
        {
            "id": str(i),
            "conversations": [
                {"from": "user", "value": f"Picture 1: <img>images/{i}.png</img>\nwhat is {i}?"},
                {"from": "assistant", "value": ["hello world", "world hello", "hell or"][i % 3]},
            ],
        }
        for i in range(5)
    ]
    sft.append(
        {
            "id": "two",
            "conversations": [
                {
                    "from": "user",
                    "value": "Picture 1: <img>images/0.png</img>\nPicture 2: <img>images/1.png</img>\nsame?",
                },
                {"from": "assistant", "value": "no"},
                {"from": "user", "value": "sure?"},
                {"from": "assistant", "value": "hello"},
            ],
        }
    )
    sft.append(
        {"id": "text", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    )
    sft.append(
        {
            "id": "bad",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>images/missing.png</img>\nhi"},
                {"from": "assistant", "value": "x"},
            ],
        }
    )
    files = {"pretrain": root / "captions.jsonl", "multitask": root / "multitask.jsonl", "sft": root / "sft.json"}
    files["pretrain"].write_text("\n".join(json.dumps(r) for r in captions))
    files["multitask"].write_text("\n".join(json.dumps(r) for r in multitask))
    files["sft"].write_text(json.dumps(sft))
    return files


@pytest.fixture
def workspace(tmp_path, tiny_model_factory, tiny_processor):
    """(a saved tiny checkpoint with its processor, the `_write_tiny_data` files, the test's tmp_path)."""
    model = tmp_path / "init"
    tiny_model_factory().save_pretrained(model)
    tiny_processor.save_pretrained(model)
    return model, _write_tiny_data(tmp_path / "data"), tmp_path


@pytest.fixture
def train_recipe():
    """Run a recipe stage in this process with its tiny config: `train_recipe(stage, model, data, output_dir,
    *flags) -> RecipeTrainer`."""
    from qwen_vl.recipes.train import run

    def train(stage: str, model: Path, data: Path, output_dir: Path, *flags: str):
        return run(
            [
                stage,
                "--config",
                str(TINY_CONFIGS / f"{stage}.yaml"),
                "--model",
                str(model),
                "--data",
                str(data),
                "--image_root",
                str(data.parent),
                "--output_dir",
                str(output_dir),
                *flags,
            ]
        )

    return train


# What a wheel is built from: the package folders, the files pyproject.toml names, the model card template.
WHEEL_SOURCES = (
    "pyproject.toml",
    "README.md",
    "MODEL_CARD.md",
    "modeling_qwen_vl",
    "qwen_vl",
    "recipes",
    "hub_upload",
    "demo",
    "serving",
)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the project's wheel, installed normally (not editable); returns its `bin/`.

    The wheel is built from a copy of the sources (so the checkout gets no `build/` folder) without build isolation,
    and installed without dependencies: the environment sees the system's site-packages for torch, transformers and
    the rest, and nothing is downloaded. Run its `qwen-vl` with `run_installed`, from outside the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "src").mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                root / "src" / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(ROOT / name, root / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(root / "dist"),
            str(root / "src"),
        ],
        check=True,
        cwd=root,
        env=_outside_env(),
        timeout=300,
    )
    (wheel,) = (root / "dist").glob("qwen_vl_hf-*.whl")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")],
        check=True,
        timeout=120,
    )
    subprocess.run(
        [
            *pip,
            "--python",
            str(root / "venv" / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        cwd=root,
        env=_outside_env(),
        timeout=300,
    )
    return root / "venv" / "bin"


def _outside_env() -> dict[str, str]:
    """This process's environment without the `PYTHONPATH` that makes the checkout importable."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_installed(bin_dir: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `bin_dir/<args[0]> args[1:]` in `cwd` with the checkout not importable; fails the test on a non-zero exit."""
    result = subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=_outside_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def demo_out(installed_wheel, tmp_path_factory) -> Path:
    """The output of `qwen-vl demo --fast`, run by the installed wheel's console script from outside the checkout."""
    work = tmp_path_factory.mktemp("demo_cwd")
    run_installed(installed_wheel, "qwen-vl", "demo", "--out", "demo_out", "--fast", cwd=work)
    return work / "demo_out"
