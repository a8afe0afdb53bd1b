"""transformers' `pipeline("image-text-to-text")` on a saved repo, in a fresh process where the package is not
importable: batched chat inputs equal one-by-one (left padding), and plain text gets its image prefix."""

import json
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from qwen_vl.hub_upload.convert_official import convert_official

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_qwen_vl"] = None  # only the repo's own files exist
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
    red, blue = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (20, 40, 220))


    def chat(image, question):
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


    chats = [chat(red, "hello"), chat(blue, "hello world, hello world, hello world"), chat(red, "world")]
    options = {"max_new_tokens": 5, "generate_kwargs": {"do_sample": False}}
    result = {
        "padding_side": pipe.tokenizer.padding_side,
        "alone": [pipe(text=c, **options)[0]["generated_text"][-1]["content"] for c in chats],
        "batched": [out[0]["generated_text"][-1]["content"] for out in pipe(text=chats, batch_size=2, **options)],
        "plain": pipe(images=red, text="hello", **options)[0]["generated_text"],
        "marked": pipe(images=red, text="Picture 1: <img></img>\\nhello", **options)[0]["generated_text"],
        "plain_two": pipe(images=[red, blue], text="hello", **options)[0]["generated_text"],
        "marked_two": pipe(
            images=[red, blue], text="Picture 1: <img></img>\\nPicture 2: <img></img>\\nhello", **options
        )[0]["generated_text"],
    }
    pipe.tokenizer.padding_side = "right"  # the tokenizer's old default
    result["batched_right"] = [
        out[0]["generated_text"][-1]["content"] for out in pipe(text=chats, batch_size=2, **options)
    ]
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory, official_checkpoint):
    """A converted tiny repo whose LM weights are scaled up, so that its greedy output depends on the context (the
    default initialisation repeats one token whatever the input, which would hide wrong padding)."""
    official = official_checkpoint(tmp_path_factory.mktemp("official"))
    weights = official / "model.safetensors"
    state = load_file(weights)
    lm_matrices = [
        name
        for name in state
        if name.startswith(("transformer.wte", "transformer.h.")) and name.endswith("weight") and "ln_" not in name
    ]
    save_file({**state, **{name: state[name] * 5 for name in lm_matrices}}, weights, metadata={"format": "pt"})
    return convert_official(official, tmp_path_factory.mktemp("converted") / "repo")


def run_pipeline(repo_dir) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(repo_dir)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pipeline_batches_chats_like_one_by_one_and_prefixes_plain_text(repo_dir):
    assert json.loads((repo_dir / "tokenizer_config.json").read_text())["padding_side"] == "left"
    result = run_pipeline(repo_dir)
    assert result["padding_side"] == "left"
    assert all(result["alone"])  # the random model writes something for every row
    assert result["batched"] == result["alone"]
    # Right padding puts the generation after the padding and changes the padded row: the check can fail.
    assert result["batched_right"] != result["alone"]
    # Text without <img></img> gets "Picture k: <img></img>\n" per image in front: the same generation as writing it.
    assert (
        len(result["plain"]) > len("hello")
        and result["plain"].startswith("hello")
        and result["marked"].startswith("Picture 1: <img></img>\nhello")
    )
    assert result["plain"].removeprefix("hello") == result["marked"].removeprefix("Picture 1: <img></img>\nhello")
    prefix = "Picture 1: <img></img>\nPicture 2: <img></img>\nhello"
    assert result["plain_two"].removeprefix("hello") == result["marked_two"].removeprefix(prefix)
