"""Time the 61 weight matrices of one small-12L decoding step at batch 1 and 8, per float32 CPU kernel.

Kernels: `F.linear` (MKL), oneDNN on the plain weights (what `fast_linear` calls), and oneDNN on weights reordered
for the batch size (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's `freezing` packs; it needs a copy of
every weight in oneDNN's own layout). Prints the median milliseconds per step over `--rounds` rounds.

    python benchmarks/linear_batch_kernels.py --threads 2
"""

import argparse
import time

import torch
import torch.nn.functional as F

# (out_features, in_features) of one small-12L layer: c_attn, attention c_proj, w1, w2, mlp c_proj; then lm_head
LAYER = [(2304, 768), (768, 768), (2048, 768), (2048, 768), (768, 2048)]
STEP = LAYER * 12 + [(16384, 768)]


def onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def step_ms(kernel, weights: list[tuple[torch.Tensor, int]], batch: int, rounds: int) -> float:
    """Median wall time (ms) of calling `kernel` once per weight, with inputs of `batch` rows."""
    inputs = {width: torch.randn(batch, width) for width in {w for _, w in weights}}
    for _ in range(3):
        for weight, width in weights:
            kernel(inputs[width], weight)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for weight, width in weights:
            kernel(inputs[width], weight)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = [(torch.randn(n, k) * 0.02, k) for n, k in STEP]
    megabytes = sum(w.numel() for w, _ in plain) * 4 / 1e6
    print(f"{len(plain)} matrices, {megabytes:.0f} MB of float32 weights, {args.threads} threads")
    for batch in (1, 8):
        packed = [(torch.ops.mkldnn._reorder_linear_weight(w, batch), k) for w, k in plain]
        row = {
            "F.linear": step_ms(lambda x, w: F.linear(x, w), plain, batch, args.rounds),
            "oneDNN": step_ms(onednn, plain, batch, args.rounds),
            f"oneDNN, packed for batch {batch}": step_ms(onednn, packed, batch, args.rounds),
        }
        print(f"batch {batch}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in row.items()), flush=True)


if __name__ == "__main__":
    main()
