"""The wheel is the whole project: installed (not editable) into a fresh environment, its `qwen-vl` runs the demo
(the `demo_out` fixture), converts an official checkpoint and verifies the result for upload, from a directory outside
the checkout, with the checkout not importable."""

import json
from pathlib import Path

from tests.conftest import run_installed

WHERE = """
import importlib.metadata, json
import modeling_qwen_vl, qwen_vl, qwen_vl.hub_upload.model_card as card, qwen_vl.recipes.train as train
files = importlib.metadata.files("qwen-vl-hf")
print(json.dumps({
    "modules": [modeling_qwen_vl.__file__, qwen_vl.__file__, *qwen_vl.__path__, train.__file__, str(card.TEMPLATE),
                str(train.shipped_config("tiny/sft"))],
    "top_level": sorted({f.parts[0] for f in files if not f.parts[0].endswith(".dist-info") and f.parts[0] != ".."}),
}))
"""


def test_the_wheel_installs_two_packages_and_their_data(installed_wheel, tmp_path):
    result = run_installed(installed_wheel, "python", "-c", WHERE, cwd=tmp_path)
    where = json.loads(result.stdout.splitlines()[-1])
    site_packages = (installed_wheel.parent / "lib").resolve()
    for path in where["modules"]:
        assert Path(path).resolve().is_relative_to(site_packages), path
    assert where["top_level"] == ["modeling_qwen_vl", "qwen_vl"]
    usage = run_installed(installed_wheel, "qwen-vl", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: qwen-vl {push,train,eval,demo,serve,web,convert}")


def test_the_demo_ran_from_the_wheel_with_its_model_card_template(demo_out):
    card = (demo_out / "checkpoint" / "README.md").read_text()
    assert "## Intended uses and limits" in card and "${" not in card  # the template, filled in
    assert (demo_out / "checkpoint" / "modeling_qwen_vl.py").is_file()


def test_convert_official_then_push_dry_run_from_elsewhere(installed_wheel, official_checkpoint, tmp_path):
    official = official_checkpoint(tmp_path / "official")
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_installed(
        installed_wheel, "qwen-vl", "convert", "official", str(official), "repo", "--repo-id", "me/tiny", cwd=work
    )
    assert json.loads((work / "repo" / "config.json").read_text())["architectures"] == ["QWenLMHeadModel"]
    result = run_installed(installed_wheel, "qwen-vl", "push", "repo", "me/tiny", "--dry-run", cwd=work)
    assert "Dry run: would upload" in result.stdout
    for name in ("README.md", "config.json", "model.safetensors", "modeling_qwen_vl.py", "qwen.tiktoken"):
        assert f"  {name} " in result.stdout, name
