"""A tiny saved chat repo for the serving tests, fine-tuned to answer grounding questions with one fixed box."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image

from modeling_qwen_vl import (
    QwenVLConfig,
    QwenVLForConditionalGeneration,
    QwenVLImageProcessor,
    QwenVLProcessor,
    QwenVLTokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Where is the red square?"
ANSWER = "<ref>the red square</ref><box>(250,250),(750,750)</box>"


def scene(size=(120, 80)) -> Image.Image:
    """A grey image with a red square in its middle half (where ANSWER puts the box)."""
    image = Image.new("RGB", size, (200, 200, 200))
    w, h = size
    image.paste((220, 20, 20), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return image


def build_repo(directory: Path, vocab_file: Path, steps: int = 100) -> Path:
    """Save a tiny Qwen-VL chat repo in `directory`: random weights fine-tuned (`steps` Adam steps, seeded) until
    greedy decoding answers `QUESTION` about an image with `ANSWER` and then `<|im_end|>` (other prompts get long
    nonsense). Trains on one thread: tiny matrix products are ~100x slower on a busy machine's thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_repo(directory, vocab_file, steps)
    finally:
        torch.set_num_threads(threads)


def _build_repo(directory: Path, vocab_file: Path, steps: int) -> Path:
    from tests.conftest import TINY_CONFIG, TINY_IMAGE_START_ID

    visual = {**TINY_CONFIG["visual"], "n_queries": 4}
    config = QwenVLConfig(**{**TINY_CONFIG, "visual": visual, "vocab_size": TINY_IMAGE_START_ID + 3})
    torch.manual_seed(0)
    model = QwenVLForConditionalGeneration(config)
    size = visual["image_size"]
    processor = QwenVLProcessor(
        QwenVLImageProcessor(size={"height": size, "width": size}),
        QwenVLTokenizer(str(vocab_file), image_span_length=4),
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": ANSWER},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=[scene()], return_tensors="pt")
    prompt_length = processor(text=prompt, images=[scene()], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tokenizer = processor.tokenizer
    model.generation_config.update(
        chat_format="chatml",
        eos_token_id=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id],
        pad_token_id=tokenizer.eod_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def cli_server(subcommand: str, repo: Path, *args: str, ready_path: str = "/", timeout: float = 120):
    """Run `qwen-vl <subcommand> repo --port P *args` on a free 127.0.0.1 port (one torch thread) until the block
    ends; yields its base URL once `ready_path` answers 200. Output goes to a file, so a full pipe cannot block it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "qwen_vl.cli", subcommand, str(repo), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(
                        f"qwen-vl {subcommand} did not answer within {timeout} s:\n{log.read()[-3000:]}"
                    )
                try:
                    with urllib.request.urlopen(url + ready_path, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
