"""Text-retrieval probe for the demo's stage-0 language model: can it answer "Where is the X?" from a scene's
grounded caption above the question, with no image at all?

It continues the stage-0 LM (`OUT/stages/stage0_lm`) on the same scene documents as stage 0
(`demo.stage0.world_texts`, blocks of 256 tokens, 8 a step, one-cycle AdamW) and reports, every 250 steps, the
share of held-out questions whose four hundreds digits it writes right after the caption (teacher-forced), by
number of shapes. `--save DIR` writes the continued LM, which `qwen-vl convert openclip --qwen-lm` (or a swap of
the LM weights into `OUT/stages/init`) turns into a checkpoint for `demo_binding_probe.py`.

    python benchmarks/demo_text_retrieval_probe.py demo_out --steps 3000 --save /tmp/lm_retrieval
"""

import argparse
import random
import sys

import numpy as np
import torch

sys.path.insert(0, ".")
from demo_binding_probe import hundreds_positions  # noqa: E402  (this script's own folder)

from modeling_qwen_vl import QwenVLForConditionalGeneration  # noqa: E402
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer  # noqa: E402
from qwen_vl.demo import stage0, world  # noqa: E402


def test_items(tokenizer, count: int, seed: int) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids: caption, question and `<ref>phrase</ref>`; reply ids from `<box>`; number of shapes)."""
    rng, items = random.Random(seed), []
    for _ in range(count):
        scene = world.draw_scene(rng, 112)[0]
        shape = rng.choice(scene.shapes)
        phrase = f"the {shape.colour} {shape.kind}"
        answer = scene.grounding(phrase, shape)
        cut = answer.index("<box>")
        context = f"{world.grounded_caption(scene)}\n{world.grounding_prompt(phrase)}\n{answer[:cut]}"
        items.append((tokenizer(context)["input_ids"], tokenizer(answer[cut:])["input_ids"], len(scene.shapes)))
    return items


def hundreds_right(model, tokenizer, items) -> dict[int, float]:
    """Share of items whose reply's four hundreds digits are all predicted right, by number of shapes."""
    model.eval()
    hits, counts = [], []
    with torch.no_grad():
        for first in range(0, len(items), 50):
            chunk = items[first : first + 50]
            width = max(len(p) + len(r) for p, r, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (prompt, reply, _) in enumerate(chunk):
                ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
                mask[row, : len(prompt) + len(reply)] = 1
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for row, (prompt, reply, count) in enumerate(chunk):
                right = (predicted[row, len(prompt) + j - 1] == reply[j] for j in hundreds_positions(tokenizer, reply))
                hits.append(all(right))
                counts.append(count)
    model.train()
    hits, counts = np.array(hits), np.array(counts)
    return {n: round(float(hits[counts == n].mean()), 3) for n in (1, 2, 3, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `qwen-vl demo --out` directory (its stages/stage0_lm and stages/init)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-scenes", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", help="write the continued LM here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = QwenVLTokenizer.from_pretrained(f"{args.run}/stages/init")
    model = QwenVLForConditionalGeneration.from_pretrained(f"{args.run}/stages/stage0_lm")
    rng = random.Random(123)
    scenes = [world.draw_scene(rng, 112)[0] for _ in range(args.train_scenes)]
    ids = [t for text in stage0.world_texts(scenes, 0) for t in tokenizer(text)["input_ids"] + [tokenizer.eod_id]]
    blocks = torch.tensor([ids[i : i + 256] for i in range(0, len(ids) - 255, 256)])
    items = test_items(tokenizer, 800, seed=7)
    print(f"step 0: {hundreds_right(model, tokenizer, items)}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.02)
    model.train()
    for step in range(1, args.steps + 1):
        batch = blocks[torch.randint(0, len(blocks), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}, {hundreds_right(model, tokenizer, items)}", flush=True)
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
