"""`qwen_vl.hub_upload.push`: directory checks, dry runs, pushes to a local fake Hub, token hygiene, and a full round
trip (save -> push -> `from_pretrained(repo_id)` in a fresh process -> same logits)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from qwen_vl import cli
from qwen_vl.hub_upload.push import push_to_hub, verify_repo_dir
from tests.conftest import run_installed
from tests.fake_hub import FakeHub

TOKEN = "hf_FakeTokenForTests0123456789abcdef"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub that this process's huggingface_hub talks to (regular uploads: Xet off); no token in the env."""
    with FakeHub() as fake:
        monkeypatch.setattr(hf_constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        yield fake


@pytest.fixture
def model_dir(tmp_path, tiny_model_factory):
    """A tiny model saved with save_pretrained (config with auto_map + remote-code files + model.safetensors)."""
    path = tmp_path / "model"
    tiny_model_factory().save_pretrained(path)
    return path


def assert_refused(path, *fragments, **kwargs):
    with pytest.raises(ValueError) as error:
        verify_repo_dir(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)
    return str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# verify_repo_dir
# ---------------------------------------------------------------------------------------------------------------------


def test_verify_accepts_saved_model_and_skips_vcs_and_caches(model_dir):
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "config").write_text("[core]")
    (model_dir / ".cache" / "huggingface").mkdir(parents=True)
    (model_dir / ".cache" / "huggingface" / "upload.lock").write_text("")
    (model_dir / "__pycache__").mkdir()
    (model_dir / "__pycache__" / "modeling_qwen_vl.cpython-311.pyc").write_bytes(b"\0")
    (model_dir / "qwen.tiktoken").write_text("IQ== 0\n")  # the Qwen vocabulary is not a secret `*.token`

    files = verify_repo_dir(model_dir)

    assert files == sorted(files)
    assert {"config.json", "model.safetensors", "modeling_qwen_vl.py", "configuration_qwen_vl.py"} <= set(files)
    assert "qwen.tiktoken" in files
    assert not [f for f in files if f.startswith((".git", ".cache", "__pycache__"))]


def test_verify_refuses_secrets(model_dir):
    (model_dir / ".env").write_text("HF_TOKEN=hf_x")
    (model_dir / "x.pem").write_text("-----BEGIN PRIVATE KEY-----")
    (model_dir / "keys").mkdir()
    (model_dir / "keys" / "id_rsa").write_text("key")
    (model_dir / "credentials.json").write_text("{}")

    message = assert_refused(model_dir, ".env", "x.pem", "keys/id_rsa", "credentials.json", "credentials")
    assert "qwen.tiktoken" not in message


def test_verify_refuses_missing_auto_map_modules(model_dir):
    (model_dir / "modeling_qwen_vl.py").unlink()
    assert_refused(model_dir, "modeling_qwen_vl.py is missing", "config.json auto_map['AutoModel']")


def test_verify_follows_relative_imports_of_remote_code(model_dir):
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["custom_tok.Tok", None]}})
    )
    (model_dir / "custom_tok.py").write_text("from .tok_helpers import merge\n\nclass Tok: ...\n")
    assert_refused(model_dir, "tok_helpers.py is missing", "custom_tok.py imports it")

    (model_dir / "tok_helpers.py").write_text("def merge(): ...\n")
    assert "tok_helpers.py" in verify_repo_dir(model_dir)


def test_verify_checks_shard_index(tmp_path, tiny_model_factory):
    path = tmp_path / "sharded"
    tiny_model_factory().save_pretrained(path, max_shard_size="200KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    verify_repo_dir(path)

    shutil.copy(path / shards[0], path / "model-00009-of-00009.safetensors")
    (path / shards[-1]).unlink()
    assert_refused(path, f"names shards that are not in the directory: {shards[-1]}", "model-00009-of-00009")

    (path / "model.safetensors.index.json").unlink()
    assert_refused(path, "without model.safetensors.index.json")


def test_verify_refuses_pickles_unless_allowed_and_bad_safetensors(model_dir):
    torch.save({"w": torch.zeros(2)}, model_dir / "pytorch_model.bin")
    (model_dir / "training_args.pt").write_bytes(b"\x80\x04")
    assert_refused(model_dir, "pytorch_model.bin", "training_args.pt", "allow_pickle=True")
    assert "pytorch_model.bin" in verify_repo_dir(model_dir, allow_pickle=True)

    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(model_dir, "model.safetensors is truncated", allow_pickle=True)
    (model_dir / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert_refused(model_dir, "not a valid safetensors file", allow_pickle=True)


def test_verify_lists_every_problem(tmp_path):
    (tmp_path / ".netrc").write_text("machine huggingface.co")
    message = assert_refused(tmp_path, "config.json is missing", "no model weights found", ".netrc")
    assert message.count("\n  - ") == 3


# ---------------------------------------------------------------------------------------------------------------------
# push_to_hub against the fake Hub
# ---------------------------------------------------------------------------------------------------------------------


def test_dry_run_lists_files_and_sends_nothing(hub, model_dir, capsys):
    files = push_to_hub(model_dir, "me/tiny", token=TOKEN, dry_run=True)

    assert files == verify_repo_dir(model_dir)
    out = capsys.readouterr().out
    total = sum((model_dir / f).stat().st_size for f in files)
    assert f"would upload {len(files)} files, {total / 1e6:.1f} MB ({total:,} bytes)," in out
    assert all(f in out for f in files)
    assert hub.requests == []
    assert TOKEN not in out


def test_dry_run_refuses_bad_dir_before_anything(hub, model_dir):
    (model_dir / ".env").write_text("SECRET=1")
    with pytest.raises(ValueError, match=r"\.env"):
        push_to_hub(model_dir, "me/tiny", token=TOKEN)
    assert hub.requests == []


def test_push_creates_private_repo_on_branch(hub, model_dir):
    (model_dir / "notes").mkdir()
    (model_dir / "notes" / "run.txt").write_text("stage 1")

    url = push_to_hub(model_dir, "me/tiny", private=True, revision="stage1", commit_message="Stage 1", token=TOKEN)

    repo = hub.repos["me/tiny"]
    assert repo.private
    assert url == f"{hub.endpoint}/me/tiny/commit/{repo.branches['stage1']}"
    assert repo.files("main") == {}  # the branch got the commit, main did not
    uploaded = repo.files("stage1")
    assert sorted(uploaded) == verify_repo_dir(model_dir)
    assert uploaded["notes/run.txt"] == b"stage 1"
    assert uploaded["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert repo.messages[repo.branches["stage1"]] == "Stage 1"
    paths = [r.path for r in hub.requests]
    assert "/api/repos/create" in paths and "/api/models/me/tiny/branch/stage1" in paths
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if r.path != "/api/agent-harnesses")


def test_push_to_existing_repo_and_token_from_environment(hub, model_dir, monkeypatch):
    hub.create_repo("me/tiny", private=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    push_to_hub(model_dir, "me/tiny")
    push_to_hub(model_dir, "me/tiny", create_repo=False)  # unchanged files: no new commit needed

    repo = hub.repos["me/tiny"]
    assert not repo.private
    assert "config.json" in repo.files("main")
    assert len(repo.commits) == 2  # the initial commit and the first push
    assert {r.authorization for r in hub.requests if r.path.startswith("/api/models")} == {f"Bearer {TOKEN}"}


def test_push_without_any_token_says_how_to_log_in(hub, model_dir):
    with pytest.raises(ValueError, match="HF_TOKEN"):
        push_to_hub(model_dir, "me/tiny")
    assert hub.requests == []


@pytest.mark.parametrize(("status", "failing_path"), [(401, "/api/repos/create"), (500, "/commit/")])
def test_token_never_appears_in_errors_or_logs(hub, model_dir, monkeypatch, caplog, capfd, status, failing_path):
    """The server fails and, like a careless proxy, echoes the Authorization header in its error body and headers."""
    monkeypatch.setattr(hf_constants, "HF_DEBUG", True)  # huggingface_hub logs every request (as curl) in debug mode
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.fail_next(status, failing_path, echo_token=True)
    with pytest.raises(HfHubHTTPError) as error:
        push_to_hub(model_dir, "me/tiny", token=TOKEN)

    assert error.value.response.status_code == status
    rendered = "".join(traceback.format_exception(error.value)) + repr(error.value) + str(error.value.server_message)
    assert "Invalid credentials for Bearer ***" in rendered  # the echo was there, and was scrubbed
    assert "Request" in caplog.text  # debug logging was on
    captured = capfd.readouterr()
    for text in (rendered, caplog.text, captured.out, captured.err):
        assert TOKEN not in text


def test_cli_push_reports_hub_errors_without_token(hub, model_dir, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail_next(403, "/api/repos/create", echo_token=True)
    hub.fail_next(403, "/api/models/me/tiny")  # repo_info fallback after a 403 on create
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", str(model_dir), "me/tiny"])
    assert exit_info.value.code == 1
    captured = capfd.readouterr()
    assert "qwen-vl push: error:" in captured.err and "403" in captured.err
    assert TOKEN not in captured.out + captured.err


def test_cli_push_and_installed_console_script(hub, model_dir, monkeypatch, capsys, installed_wheel, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(model_dir), "me/tiny", "--private", "--revision", "dev", "--message", "m"]) == 0
    assert hub.repos["me/tiny"].private and "config.json" in hub.repos["me/tiny"].files("dev")
    assert "Uploaded to " in capsys.readouterr().out

    requests_before = len(hub.requests)
    result = run_installed(installed_wheel, "qwen-vl", "push", str(model_dir), "me/other", "--dry-run", cwd=tmp_path)
    assert "Dry run: would upload" in result.stdout and "model.safetensors" in result.stdout
    assert len(hub.requests) == requests_before


# ---------------------------------------------------------------------------------------------------------------------
# Round trip: the pushed repository loads by repo id in a fresh process and reproduces the logits
# ---------------------------------------------------------------------------------------------------------------------

LOAD_AND_COMPARE = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file
    from modeling_qwen_vl import QwenVLForConditionalGeneration

    repo_id, revision, expected_file = sys.argv[1:]
    expected = load_file(expected_file)
    model = QwenVLForConditionalGeneration.from_pretrained(repo_id, revision=revision).eval()
    inputs = {k: v for k, v in expected.items() if k != "logits"}
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    print("logits match")
    """
)


def test_round_trip_from_pretrained_reproduces_logits(hub, tmp_path, tiny_model_factory, tiny_inputs):
    model = tiny_model_factory().eval()
    model.save_pretrained(tmp_path / "model")
    batch = tiny_inputs(model.config, lengths=[5, 9], images_per_row=[1, 1])
    with torch.no_grad():
        logits = model(**batch).logits
    save_file({**batch, "logits": logits}, tmp_path / "expected.safetensors")

    url = push_to_hub(tmp_path / "model", "me/tiny-qwen-vl", private=True, revision="v1", token=TOKEN)
    assert url.startswith(f"{hub.endpoint}/me/tiny-qwen-vl/commit/")

    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,  # the repo is private: the fake Hub serves it to authenticated requests only
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_COMPARE, "me/tiny-qwen-vl", "v1", str(tmp_path / "expected.safetensors")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "logits match" in result.stdout
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert {"config.json", "model.safetensors"} <= downloaded


def test_cli_dispatcher(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "push" in usage and "convert" in usage
    assert cli.main(["convert"]) == 2
    assert "qwen-vl convert {openclip,official}" in capsys.readouterr().err
    assert cli.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err

    assert cli.dispatch({"later": "qwen_vl.hub_upload.not_written_yet:main"}, ["later"]) == 1
    assert "qwen_vl.hub_upload.not_written_yet is not part of this installation" in capsys.readouterr().err
