"""Vision probe for the demo's stage 0: how fast does a small OpenCLIP ViT learn the shapes world's kinds and boxes?

Trains an OpenCLIP `VisionTransformer` with a per-colour head (presence, kind, box) on freshly drawn images (or a
fixed set) and prints held-out kind accuracy, IoU >= 0.5 share and presence accuracy, with seconds per step.

    python benchmarks/demo_vision_probe.py --image-size 112 --patch 14 --width 128 --layers 3 --steps 400
"""

import argparse
import random
import sys
import time

import torch

sys.path.insert(0, ".")
from qwen_vl.demo import stage0, world  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fixed", type=int, default=0, help="train on a fixed set of N images (0: fresh images)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a crowded machine)")
    parser.add_argument("--sizes", help="shape sides as fractions: small_lo,small_hi,large_lo,large_hi")
    args = parser.parse_args()
    if args.sizes:
        lo, hi, large_lo, large_hi = map(float, args.sizes.split(","))
        world.SIZES.update(small=(lo, hi), large=(large_lo, large_hi))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    S = args.image_size
    tower = stage0.VisionTower(S, args.patch, args.width, args.layers)
    rng = random.Random(0)
    test_x, test_y = stage0.draw_batch(random.Random(1), 300, S)
    fixed = stage0.draw_batch(rng, args.fixed, S) if args.fixed else None
    opt = torch.optim.AdamW(tower.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start = time.time()
    for step in range(1, args.steps + 1):
        if fixed is None:
            x, y = stage0.draw_batch(rng, args.batch, S)
        else:
            idx = torch.randint(0, args.fixed, (args.batch,))
            x, y = fixed[0][idx], fixed[1][idx]
        loss = stage0.shapes_loss(tower(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            tower.eval()
            with torch.no_grad():
                m = stage0.shapes_metrics(tower(test_x), test_y)
            tower.train()
            print(f"step {step} loss {loss.item():.3f} kind {m['kind']:.3f} iou50 {m['iou50']:.3f} "
                  f"colour {m['colour']:.3f} {(time.time() - start) / step:.2f}s/step", flush=True)


if __name__ == "__main__":
    main()
