"""`push`/`verify_repo_dir` upload nothing from outside the directory and no credential, and say what they refused."""

import builtins
import json
import os
import shutil

import pytest

from qwen_vl.hub_upload.push import push_to_hub, verify_repo_dir


@pytest.fixture
def model_dir(tmp_path, tiny_model_factory):
    path = tmp_path / "model"
    tiny_model_factory().save_pretrained(path)
    return path


def refused(path) -> str:
    with pytest.raises(ValueError) as error:
        verify_repo_dir(path)
    return str(error.value)


@pytest.mark.parametrize(
    "name",
    ["hf_token", ".pypirc", "secrets.json", ".netrc", "_netrc", "server.pem", "id_rsa", "id_ed25519.pub", ".env",
     ".env.local", "prod.env", "api_key.txt", "aws-credentials", "my.token", "password.txt", ".git-credentials",
     ".ssh/config", ".aws/config", "deploy/.npmrc"],
)
def test_credential_like_names_are_refused(model_dir, name):
    (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / name).write_text("x")
    assert f"look like credentials must never be published: {name} (" in refused(model_dir)


def test_real_repo_files_are_not_mistaken_for_credentials(model_dir, vocab_file):
    shutil.copy(vocab_file, model_dir / "qwen.tiktoken")  # 151k base64 lines: no token pattern may match by chance
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        (model_dir / name).write_text("{}")
    files = verify_repo_dir(model_dir)
    assert {"qwen.tiktoken", "special_tokens_map.json", "added_tokens.json"} <= set(files)


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("README.md", "login with hf_" + "a1B2c3D4" * 5, "a token starting 'hf_'"),
        ("notes/train.sh", "export GH=ghp_" + "Z" * 36, "a token starting 'ghp'"),
        ("deploy.txt", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc", "a PEM private key"),
        ("generation_config.json", json.dumps({"note": "AKIA" + "ABCDEFGHIJ234567"}), "a token starting 'AKI'"),
    ],
)
def test_tokens_in_file_contents_are_refused_without_being_printed(model_dir, name, content, kind):
    (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / name).write_text(content)
    message = refused(model_dir)
    assert f"access token or private key: {name} ({kind})" in message
    assert "a1B2c3D4" not in message and "Z" * 10 not in message


def test_token_split_across_scan_chunks_is_found(model_dir):
    from qwen_vl.hub_upload import push

    (model_dir / "big.txt").write_bytes(b"x" * (push._SCAN_CHUNK - 10) + b"hf_" + b"q" * 40)
    assert "big.txt (a token starting 'hf_')" in refused(model_dir)


def test_symlinks_out_of_the_directory_are_refused_and_never_read(model_dir, tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_text("private notes")
    os.symlink(outside, model_dir / "notes.txt")
    os.symlink("/etc/passwd", model_dir / "passwd")
    os.symlink(tmp_path, model_dir / "everything")
    os.symlink(model_dir / "config.json", model_dir / "config_link.json")  # inside: fine
    os.mkfifo(model_dir / "pipe")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(
        builtins, "open", lambda f, *a, **k: opened.append(os.path.realpath(f)) or real_open(f, *a, **k)
    )
    message = refused(model_dir)
    assert f"notes.txt is a symbolic link to {outside}, outside the directory" in message
    assert "passwd is a symbolic link to /etc/passwd, outside the directory" in message
    assert "everything is a symbolic link to" in message
    assert "pipe is not a regular file" in message
    assert "config_link.json" not in message
    assert str(outside) not in opened and "/etc/passwd" not in opened


def test_auto_map_paths_cannot_leave_the_directory(model_dir, tmp_path, monkeypatch):
    evil = tmp_path / "evil.py"
    evil.write_text("from .x import y\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "..tmp.x.evil"
    config["auto_map"]["AutoConfig"] = "sub/../../evil.Config"
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "custom.py").write_text("from ..outside import thing\n")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["custom.Tok", None]}}))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(
        builtins, "open", lambda f, *a, **k: opened.append(os.path.realpath(f)) or real_open(f, *a, **k)
    )
    message = refused(model_dir)
    assert "auto_map['AutoModel'] = '..tmp.x.evil' is not a 'module.Class' reference" in message
    assert "auto_map['AutoConfig'] = 'sub/../../evil.Config' is not a 'module.Class' reference" in message
    assert "custom.py imports ..outside, which is not a module of this directory" in message
    assert not [path for path in opened if not path.startswith(str(model_dir))]


def test_push_refuses_before_contacting_anything(model_dir, monkeypatch):
    (model_dir / "hf_token").write_text("hf_" + "k" * 34)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("the Hub was contacted"))
    with pytest.raises(ValueError, match="hf_token"):
        push_to_hub(model_dir, "user/repo", token="hf_" + "t" * 34)
