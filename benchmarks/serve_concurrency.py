"""Throughput of `qwen-vl serve` at 1, 4 and 8 concurrent `openai` clients: batched serving against sequential.

Saves a random-weight Qwen-VL repo (LM hidden 512 x 4 layers; ViT width 256 x 2 layers at 224px, 64 queries; a
byte-level vocabulary), starts `qwen-vl serve` on it twice as a subprocess on 127.0.0.1 (`--max-batch-size 8`, and
`--max-batch-size 1` = sequential serving), and lets C client threads each send R greedy requests (one image as a
data: URL plus a question, `max_tokens` T). Completion tokens are counted from the responses' `usage`; both servers
see the same requests, so they do the same work. Both servers run at once and are measured in interleaved rounds
(medians reported), so a change in the machine's load hits both alike. Writes its section of `benchmarks/RESULTS.md`.

    python benchmarks/serve_concurrency.py [--requests-per-client 2] [--max-tokens 48] [--threads 1] [--rounds 3]
"""

import argparse
import base64
import datetime
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from run import machine, write_results  # noqa: E402

from modeling_qwen_vl import (  # noqa: E402
    QwenVLConfig,
    QwenVLForConditionalGeneration,
    QwenVLImageProcessor,
    QwenVLProcessor,
    QwenVLTokenizer,
)

CONCURRENCY = (1, 4, 8)


def build_repo(directory: Path) -> Path:
    """A random-weight chat repo with a 256-byte vocabulary (all special tokens after it)."""
    vocab = directory / "qwen.tiktoken"
    directory.mkdir(parents=True, exist_ok=True)
    vocab.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    tokenizer = QwenVLTokenizer(str(vocab), image_span_length=64)
    config = QwenVLConfig(
        vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=4, num_attention_heads=8, kv_channels=64,
        intermediate_size=2048,
        visual=dict(image_size=224, patch_size=14, width=256, layers=2, heads=4, mlp_ratio=4.0, output_dim=512,
                    n_queries=64, image_start_id=tokenizer.img_start_id),
    )
    torch.manual_seed(0)
    model = QwenVLForConditionalGeneration(config).eval()
    model.generation_config.update(do_sample=False, max_new_tokens=64, chat_format="chatml")
    model.save_pretrained(directory)
    QwenVLProcessor(QwenVLImageProcessor(size={"height": 224, "width": 224}), tokenizer).save_pretrained(directory)
    return directory


def request_messages(index: int) -> list[dict]:
    image = Image.new("RGB", (160 + 8 * index, 120), ((37 * index) % 256, 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    question = "What is in this picture? " + "Describe it. " * (index % 5)
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


class Server:
    """`qwen-vl serve` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, repo: Path, max_batch_size: int, threads: int):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        command = [
            sys.executable,
            "-m",
            "qwen_vl.cli",
            "serve",
            str(repo),
            "--port",
            str(self.port),
            "--max-batch-size",
            str(max_batch_size),
            "--served-model-name",
            "bench",
        ]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", timeout=600, max_retries=0
        )
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qwen-vl serve did not start")
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                time.sleep(0.3)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def run_clients(server: Server, clients: int, per_client: int, max_tokens: int) -> dict:
    """C threads, each sending its requests one after another; returns throughput and latency."""

    def client(c: int):
        results = []
        for r in range(per_client):
            start = time.perf_counter()
            completion = server.client.chat.completions.create(
                model="bench", messages=request_messages(c * per_client + r), temperature=0, max_tokens=max_tokens
            )
            results.append((time.perf_counter() - start, completion.usage.completion_tokens))
        return results

    client(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(client, range(clients)) for item in items]
    elapsed = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {
        "requests/s": len(results) / elapsed,
        "tokens/s": tokens / elapsed,
        "tokens": tokens,
        "latency": statistics.median(latency for latency, _ in results),
        "elapsed": elapsed,
    }


def generate_ceiling(repo: Path, max_tokens: int, threads: int) -> dict[int, float]:
    """Tokens/s of plain `model.generate` (no server) on 1 and 8 of the requests as one batch, exactly `max_tokens`
    new tokens each: what batching can gain at best on this model and machine."""
    from modeling_qwen_vl import QwenVLProcessor

    torch.set_num_threads(threads)
    model = QwenVLForConditionalGeneration.from_pretrained(repo).eval()
    processor = QwenVLProcessor.from_pretrained(repo)
    results = {}
    for batch in (1, 8):
        texts, images = [], []
        for index in range(batch):
            content = request_messages(index)[0]["content"]
            question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": content[1]["text"]}]}]
            texts.append(processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True))
            url = content[0]["image_url"]["url"]
            images.append(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB"))
        inputs = processor(text=texts, images=images, return_tensors="pt")
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            timings.append(time.perf_counter() - start)
        results[batch] = batch * max_tokens / statistics.median(timings)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    modes = {"batched (--max-batch-size 8)": 8, "sequential (--max-batch-size 1)": 1}
    samples = {(mode, clients): [] for mode in modes for clients in CONCURRENCY}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp) / "bench-repo")
        params = sum(p.numel() for p in QwenVLForConditionalGeneration.from_pretrained(repo).parameters())
        servers = {}
        try:
            for mode, batch in modes.items():
                servers[mode] = Server(repo, batch, args.threads)
            # Interleaved rounds (an idle server costs nothing), so a change in the machine's load hits both alike.
            for round_index in range(args.rounds):
                for clients in CONCURRENCY:
                    for mode, server in servers.items():
                        result = run_clients(server, clients, args.requests_per_client, args.max_tokens)
                        samples[mode, clients].append(result)
                        print(
                            round_index,
                            mode,
                            clients,
                            {k: round(v, 3) for k, v in result.items()},
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.close()
        ceiling = generate_ceiling(repo, args.max_tokens, args.threads)
    rows = []
    for (mode, clients), results in samples.items():
        rows.append((mode, clients, {key: statistics.median(r[key] for r in results) for key in results[0]}))
    elapsed = time.perf_counter() - started

    sequential = {clients: result for mode, clients, result in rows if mode.startswith("sequential")}
    table = [
        "| server | clients | requests/s | completion tokens/s | median latency | vs sequential |",
        "|---|---|---|---|---|---|",
    ]
    for mode, clients, result in rows:
        gain = result["tokens/s"] / sequential[clients]["tokens/s"]
        table.append(
            f"| {mode} | {clients} | {result['requests/s']:.2f} | {result['tokens/s']:.1f} | {result['latency']:.2f} s | "
            f"{gain:.2f}x |"
        )
    section = "\n".join(
        [
            "## serving concurrency (`qwen-vl serve`, cpu, float32)",
            "",
            f"- machine: {machine('cpu')}; server on {args.threads} torch thread(s); load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after (the machine is shared with other engineers' jobs)",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; run took {elapsed:.0f} s",
            f"- model: random weights, {params / 1e6:.1f}M parameters (LM hidden 512 x 4 layers, vocab 473; ViT width 256 "
            "x 2 layers, 224px -> 256 patches -> 64 queries)",
            f"- each client sends {args.requests_per_client} greedy requests in turn (1 image + a question, max_tokens "
            f"{args.max_tokens}); random weights may end a reply early, so throughput counts the completion tokens of the "
            "responses' usage",
            "",
            *table,
            "",
            f"For reference, plain `generate` without a server on the same model and thread count: {ceiling[1]:.1f} "
            f"tokens/s for one request, {ceiling[8]:.1f} tokens/s for 8 as one batch ({ceiling[8] / ceiling[1]:.2f}x, "
            "the most batching can gain here: the vision tower's prefill of 8 images costs 8 times one, only decoding "
            "gets cheaper per row).",
            "",
            f"Medians of {args.rounds} interleaved rounds. `vs sequential` compares completion tokens/s with the "
            "`--max-batch-size 1` server at the same number of clients. Written by `python benchmarks/serve_concurrency.py`.",
        ]
    )
    print(section)
    write_results("serve-concurrency", section)


if __name__ == "__main__":
    main()
