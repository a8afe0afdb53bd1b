"""The code runs with `trust_remote_code=True`: it touches no network and no file beyond what it is handed."""

import ast
import builtins
import io
import os
import socket
from pathlib import Path

import PIL.Image
import pytest
from PIL import Image

import modeling_qwen_vl
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer

PACKAGE_DIR = Path(modeling_qwen_vl.__file__).parent


class Recorder:
    """Files opened and connections attempted while active; connections fail."""

    def __init__(self, monkeypatch):
        self.files, self.connections = [], []
        real_open, real_os_open, real_image_open = builtins.open, os.open, PIL.Image.open

        def record_open(file, *args, **kwargs):
            self.files.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
            return real_open(file, *args, **kwargs)

        def record_os_open(path, *args, **kwargs):
            self.files.append(os.fspath(path))
            return real_os_open(path, *args, **kwargs)

        def record_image_open(fp, *args, **kwargs):
            self.files.append(os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else "<file object>")
            return real_image_open(fp, *args, **kwargs)

        def refuse_connection(*args, **kwargs):
            self.connections.append(args)
            raise ConnectionRefusedError("network access is blocked in this test")

        monkeypatch.setattr(builtins, "open", record_open)
        monkeypatch.setattr(io, "open", record_open)
        monkeypatch.setattr(os, "open", record_os_open)
        monkeypatch.setattr(PIL.Image, "open", record_image_open)
        monkeypatch.setattr(socket.socket, "connect", refuse_connection)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse_connection)
        monkeypatch.setattr(socket, "create_connection", refuse_connection)


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return QwenVLTokenizer(str(vocab_file))


def exercise_tokenizer(tokenizer):
    text = "Picture 1: <img>https://example.com/a.png</img>\n<ref>猫</ref><box>(1,2),(3,4)</box> done<|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    batch = tokenizer([text, "hi"], padding=True, return_tensors="pt")
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)[1] == "hi"
    tokenizer.convert_tokens_to_string(tokenizer.tokenize(text))
    tokenizer.to_list_format(tokenizer.from_list_format([{"image": "/etc/passwd"}, {"text": "what is it?"}]))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "url": "https://example.com/a.png"}, {"type": "text", "text": "hi"}],
        }
    ]
    tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_tokenizer_opens_no_file_and_no_socket(tokenizer, monkeypatch):
    exercise_tokenizer(tokenizer)  # warm up lazy imports and caches first
    recorder = Recorder(monkeypatch)
    exercise_tokenizer(tokenizer)
    assert recorder.files == [] and recorder.connections == []


def test_processor_opens_only_the_images_it_is_handed(tiny_processor, tmp_path, monkeypatch):
    paths = []
    for name, color in [("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))]:
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    (tmp_path / "unrelated.png").write_bytes(b"")
    in_memory = Image.new("RGB", (8, 8))
    text = f"Picture 1: <img>{paths[0]}</img>\nPicture 2: <img>{paths[1]}</img>\nCompare."
    tiny_processor(text=text)  # warm up
    recorder = Recorder(monkeypatch)

    tiny_processor(text=text, return_tensors="pt")
    assert set(recorder.files) == set(paths)
    recorder.files.clear()
    tiny_processor(images=[in_memory, paths[1]], text=["<img></img>one", "<img></img>two"], return_tensors="pt")
    assert set(recorder.files) == {paths[1]}
    recorder.files.clear()
    tiny_processor(images=in_memory, text="<img>/etc/passwd</img> ignored: the image is given", return_tensors="pt")
    assert recorder.files == [] and recorder.connections == []


def test_processor_opens_no_socket_unless_remote_images_are_allowed(tiny_processor, monkeypatch):
    recorder = Recorder(monkeypatch)
    text = "Picture 1: <img>http://127.0.0.1:9/a.png</img>\nWhat is it?"
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        tiny_processor(text=text)
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        tiny_processor(images=["https://example.com/a.png"], text="<img></img>hi")
    assert recorder.connections == [] and recorder.files == []
    with pytest.raises(ValueError, match="Cannot fetch image URL 'http://127.0.0.1:9/a.png'"):
        tiny_processor(text=text, allow_remote_images=True)
    assert len(recorder.connections) == 1  # the one allowed attempt, refused by the test


# Static check of the remote-code files.

FORBIDDEN_MODULES = {
    "subprocess", "socket", "urllib", "http", "requests", "httpx", "aiohttp", "ftplib", "pickle", "marshal", "shelve",
}  # fmt: skip
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {"os.system", "os.popen", "os.execv", "os.execve", "os.spawnv", "torch.load", "torch.hub"}
# (file, function) -> modules it may use: the opt-in image download only.
ALLOWED = {("image_processing_qwen_vl.py", "fetch_remote_image"): {"urllib", "http"}}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def forbidden_uses(source: str, file_name: str) -> list[str]:
    """`"line: what (in function)"` for each forbidden import, builtin or attribute in `source`."""
    found = []

    def visit(node, function: str):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = f"{function}.{node.name}" if function else node.name
        allowed = ALLOWED.get((file_name, function), set())
        uses = []
        if isinstance(node, ast.Import):
            uses = [(alias.name.split(".")[0], f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            uses = [(root, f"from {node.module} import ...")]
            uses += [(None, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            uses = [(node.id, node.id)] if node.id in FORBIDDEN_MODULES | FORBIDDEN_BUILTINS else []
        elif isinstance(node, ast.Attribute):
            uses = [(None, _dotted(node))]
        for module, what in uses:
            bad = module in FORBIDDEN_MODULES | FORBIDDEN_BUILTINS or what in FORBIDDEN_ATTRIBUTES
            if bad and module not in allowed:
                found.append(f"{node.lineno}: {what} (in {function or 'module'})")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "")
    return found


def test_scanner_catches_forbidden_code():
    source = (
        "import re, os\n"
        "from torch import load\n"
        "import pickle\n"
        "pattern = re.compile('x')\n"
        "def helper():\n"
        "    import urllib.request\n"
        "    return eval('1'), os.system('ls'), torch.load('f'), compile('1', 'f', 'eval')\n"
        "def fetch_remote_image():\n"
        "    import urllib.request, http.client\n"
        "    return urllib.request.urlopen, http.client.HTTPException\n"
    )
    assert forbidden_uses(source, "image_processing_qwen_vl.py") == [
        "2: torch.load (in module)",
        "3: import pickle (in module)",
        "6: import urllib.request (in helper)",
        "7: eval (in helper)",
        "7: os.system (in helper)",
        "7: torch.load (in helper)",
        "7: compile (in helper)",
    ]
    assert "9: import urllib.request (in fetch_remote_image)" in forbidden_uses(source, "other.py")


def test_remote_code_has_no_network_exec_or_unpickling():
    files = sorted(PACKAGE_DIR.glob("*.py"))
    assert {path.name for path in files} >= {"modeling_qwen_vl.py", "processing_qwen_vl.py", "tokenization_qwen_vl.py"}
    found = {path.name: forbidden_uses(path.read_text(), path.name) for path in files}
    assert {name: uses for name, uses in found.items() if uses} == {}
    # The allow-list is exact: each allowed function exists and still needs its exemption.
    for file_name, function in ALLOWED:
        source = (PACKAGE_DIR / file_name).read_text()
        tree = ast.parse(source)
        assert any(isinstance(node, ast.FunctionDef) and node.name == function for node in ast.walk(tree))
        assert forbidden_uses(source, "unlisted.py"), (file_name, function)


# What the remote code may import beyond the standard library: what a Hub repo's users already have with transformers.
# huggingface_hub gives configs their `@strict` validation (as transformers' own configs use it) and `regex` is
# tiktoken's own pre-tokenizer dependency, used only for inputs tiktoken's engine gives up on.
THIRD_PARTY_IMPORTS = {"torch", "transformers", "tiktoken", "PIL", "numpy", "huggingface_hub", "regex"}


def test_remote_code_imports_only_what_transformers_and_tiktoken_bring():
    """Read with transformers' own `get_imports`: the packages that `check_imports` requires installed when a Hub repo
    with these files is loaded."""
    import sys

    from transformers.dynamic_module_utils import get_imports

    found = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if extra := sorted(set(get_imports(path)) - sys.stdlib_module_names - THIRD_PARTY_IMPORTS):
            found[path.name] = extra
    assert found == {}
