"""Binding probe for the demo: can a reader pick the named shape out of 64 image tokens and write its box?

Image tokens come from a demo checkpoint's (frozen) vision tower and adapter, or are "symbolic": per grid cell, the
sum of learned embeddings of the cell's true colour, kind and box digits (what a perfect vision tower could give), or
"slots": one such token per shape (4 positions, absent shapes marked empty), which leaves the LM nothing to do but
pick the named one. `--word-embeddings` makes the slots' colour and kind the LM's own embeddings of those words.
Referring phrases are "the {colour} {kind}" on freshly drawn scenes with 1-4 shapes. Two readers:

- `--reader lm`: the checkpoint's language model, trained on `<img>...</img><ref>phrase</ref>` -> `<box>...</box>`
  (the multitask `ref` format), loss on the box. Reported: the share of held-out boxes whose four hundreds digits
  are all right (teacher-forced), by number of shapes. `--query-hint` adds a learned colour + kind embedding of the
  named shape to the input of every answer position: the LM is then given the phrase where it writes the box.
  `--phrase-first` asks "Where is {phrase}?" before the image; `--batch-size` sets the scenes a step (32).
  `--phrase-loss` trains the phrase's tokens too (the kind after the colour then has to come from the image); the
  share of phrases whose kind the LM predicts right after their colour is reported with it.
  `--hint-words` makes the hint the LM's own embeddings of the colour and kind words, `--hint-layer N` adds it
  after block N instead of to the input. `--carry-loss LAYER WEIGHT` trains the LM to bring the phrase to the
  answer positions itself: linear read-outs of the named colour and kind from `hidden_states[LAYER]`, or with
  `--carry-lens` the model's own final norm and LM head, or with `--carry-embed` what the blocks up to LAYER add
  pulled towards the phrase's word embeddings (the objective `recipes/phrase_carry.py` implements; its
  `--carry-target` and `--carry-center` variants).
- `--reader cross-attention`: one attention layer whose query is a learned colour + kind embedding, regressing the
  box (L1). Reported: the share with IoU >= 0.5, by number of shapes.

    python benchmarks/demo_binding_probe.py demo_out/stages/init --reader lm --tokens symbolic --steps 800
    python benchmarks/demo_binding_probe.py demo_out/stages/init --tokens slots --word-embeddings --lr 1e-3 --steps 1500
    python benchmarks/demo_binding_probe.py demo_out/stages/init --tokens slots --carry-loss 1 1 --carry-embed --lr 1e-3
"""

import argparse
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

sys.path.insert(0, ".")
from modeling_qwen_vl import QwenVLForConditionalGeneration  # noqa: E402
from modeling_qwen_vl.modeling_qwen_vl import resize_grid_embedding  # noqa: E402
from qwen_vl.demo import stage0, world  # noqa: E402


def vit_patches(visual, pixel_values: torch.Tensor) -> torch.Tensor:
    """The ViT trunk's patch features [N, patches, width], before the adapter."""
    patches = visual.conv1(pixel_values).flatten(2).transpose(1, 2)
    hidden = patches + resize_grid_embedding(visual.positional_embedding, patches.shape[1])
    return visual.transformer(visual.ln_pre(hidden))


def adapter_tokens(visual, patches: torch.Tensor) -> torch.Tensor:
    """The adapter's image tokens [N, n_queries, hidden] from the trunk's patch features."""
    return visual.ln_post(visual.attn_pool(patches)) @ visual.proj


def draw(model, count: int, seed: int, patches: bool = False):
    """`count` scenes: image tokens [count, n_queries, hidden] (with `patches`, the ViT trunk's patch features
    instead), shape targets [count, 4, 6], the named shape's (colour, kind) [count, 2], its grounding text and the
    number of shapes."""
    rng = random.Random(seed)
    size = model.config.visual["image_size"]
    tokens, targets, named, texts, counts = [], [], [], [], []
    for _ in range(0, count, 100):
        pixels = []
        for _ in range(100):
            image, scene = world.render_scene(rng, size)
            pixels.append(stage0.to_pixels(image))
            shape = rng.choice(scene.shapes)
            targets.append(stage0.shape_targets(scene))
            named.append((stage0.COLOURS.index(shape.colour), stage0.KINDS.index(shape.kind)))
            texts.append(scene.grounding(f"the {shape.colour} {shape.kind}", shape))
            counts.append(len(scene.shapes))
        with torch.no_grad():
            pixels = torch.stack(pixels)
            visual = model.transformer.visual
            tokens.append(vit_patches(visual, pixels) if patches else model.get_image_features(pixels))
    return torch.cat(tokens), torch.stack(targets), torch.tensor(named), texts, torch.tensor(counts)


class SlotTokens(nn.Module):
    """One token per shape slot (`MAX_SHAPES` of them, in the scene's order): embedding(kind) + embedding(colour) +
    the embeddings of its 8 box digits; an absent shape is kind and colour 0 with class-10 digits. With `words` (the
    LM's input embeddings and tokenizer), kind and colour are the sums of the LM's embeddings of the words'
    tokens instead of tables of their own."""

    def __init__(self, hidden: int, words: tuple[nn.Embedding, object] | None = None):
        super().__init__()
        # the kind and colour tables are drawn even where `words` replaces them, so both variants start the digit
        # table (and everything after it) from the same random stream
        self.kind, self.colour, self.digits = nn.Embedding(6, hidden), nn.Embedding(7, hidden), nn.Embedding(88, hidden)
        for table in (self.kind, self.colour, self.digits):
            nn.init.normal_(table.weight, std=0.02)
        self.words = None
        if words is not None:
            embeddings, tokenizer = words
            ids = [tokenizer(" " + word)["input_ids"] for word in (*stage0.KINDS, *stage0.COLOURS)]
            self.words = (embeddings, ids[: len(stage0.KINDS)], ids[len(stage0.KINDS) :])

    def _word_rows(self, ids: list[list[int]], index: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([self.words[0].weight[word].sum(0) for word in ids])
        return torch.cat([torch.zeros_like(rows[:1]), rows])[index]  # row 0: no shape

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        present = targets[..., 0] >= 0
        kind = torch.where(present, targets[..., 0].long() + 1, 0)
        colour = torch.where(present, targets[..., 1].long() + 1, 0)
        digits = torch.where(present[..., None, None], stage0.box_digits(targets[..., 2:].clamp(0, 1)), 10)
        slots = self.digits(digits + 11 * torch.arange(8).view(4, 2)).sum((-2, -3))
        if self.words is None:
            return self.kind(kind) + self.colour(colour) + slots
        return self._word_rows(self.words[1], kind) + self._word_rows(self.words[2], colour) + slots


class SymbolicTokens(nn.Module):
    """Per cell of the 8x8 grid: embedding(kind) + embedding(colour) + the embeddings of the 8 box digits of the shape
    holding the cell centre (background: class 0 / class 10 digits)."""

    def __init__(self, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.kind, self.colour, self.digits = nn.Embedding(6, hidden), nn.Embedding(7, hidden), nn.Embedding(88, hidden)
        for table in (self.kind, self.colour, self.digits):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        kind, colour, boxes = stage0.patch_labels(targets, self.grid)
        digits = torch.where((kind > 0)[..., None, None], stage0.box_digits(boxes), 10)
        slots = digits + 11 * torch.arange(8).view(4, 2)
        return self.kind(kind) + self.colour(colour) + self.digits(slots).sum((-2, -3))


def named_boxes(targets: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """The box [N, 4] (fractions) of the shape with the named (colour, kind)."""
    match = (targets[..., 1] == named[:, None, 0]) & (targets[..., 0] == named[:, None, 1])
    return targets[torch.arange(len(targets)), match.float().argmax(1), 2:]


def cross_attention_probe(train, test, steps: int, lr: float):
    tokens, targets, named, _, _ = train
    hidden = tokens.shape[-1]

    class Reader(nn.Module):
        def __init__(self, width: int = 64):
            super().__init__()
            self.norm, self.colour, self.kind = nn.LayerNorm(hidden), nn.Embedding(6, width), nn.Embedding(5, width)
            self.key, self.value = nn.Linear(hidden, width), nn.Linear(hidden, 128)
            self.out = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))

        def forward(self, x, q):
            x = self.norm(x)
            query = self.colour(q[:, 0]) + self.kind(q[:, 1])
            weights = (torch.einsum("bd,bnd->bn", query, self.key(x)) / 8).softmax(-1)
            return self.out(torch.einsum("bn,bnd->bd", weights, self.value(x))).sigmoid()

    reader = Reader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    boxes = named_boxes(targets, named)
    test_boxes = named_boxes(test[1], test[2])
    for step in range(1, steps + 1):
        index = torch.randint(0, len(tokens), (64,))
        loss = F.l1_loss(reader(tokens[index], named[index]), boxes[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                hits = stage0.box_iou(reader(test[0], test[2]), test_boxes) >= 0.5
            by_count = {n: round(hits[test[4] == n].float().mean().item(), 3) for n in (1, 2, 3, 4)}
            print(f"step {step}: IoU >= 0.5 by number of shapes {by_count}", flush=True)


def hundreds_positions(tokenizer, reply: list[int]) -> list[int]:
    """Indices of the hundreds digits in a `<box>(x1,y1),(x2,y2)</box>` reply's ids: the digits after "(" or ","."""
    pieces = [tokenizer.decode([t]) for t in reply]
    return [j for j in range(1, len(reply)) if pieces[j - 1].endswith(("(", ","))]


def lm_probe(
    model,
    tokenizer,
    train,
    test,
    steps: int,
    lr: float,
    tokens: str,
    query_hint: bool,
    word_embeddings: bool,
    batch_size: int = 32,
    phrase_first: bool = False,
    phrase_loss: bool = False,
    carry_loss: tuple[int, float] | None = None,
    carry_lens: bool = False,
    hint_words: bool = False,
    hint_layer: int = 0,
    carry_embed: bool = False,
    hint_scale: float = 1.0,
    carry_target: str = "colour-kind",
    carry_center: bool = False,
    align: float = 0.0,
    align_temperature: float = 0.1,
):
    hidden, n_queries, start = model.config.hidden_size, model.config.visual["n_queries"], model.config.image_start_id
    symbols = SymbolicTokens(hidden, int(n_queries**0.5)) if tokens == "symbolic" else None
    if tokens == "slots":
        symbols = SlotTokens(hidden, (model.transformer.wte, tokenizer) if word_embeddings else None)
        n_queries = model.config.visual["n_queries"] = stage0.MAX_SHAPES  # image spans of one position per slot
    symbolic = symbols is not None
    hint_colour, hint_kind = nn.Embedding(6, hidden), nn.Embedding(5, hidden)
    for table in (hint_colour, hint_kind):
        nn.init.normal_(table.weight, std=0.02)
    # --carry-loss: linear read-outs of the named colour and kind from one layer's output at every answer position
    carry_colour, carry_kind = nn.Linear(hidden, 6), nn.Linear(hidden, 5)
    # --carry-lens: no read-outs of its own; the model's final norm and LM head on that layer must give the phrase's
    # word tokens (a soft target spread evenly over them)
    vocab = model.config.vocab_size
    word_rows, phrase_ids = [], []  # per (colour, kind), at colour * len(KINDS) + kind
    for colour in stage0.COLOURS:
        for kind in stage0.KINDS:
            row = torch.zeros(vocab)
            ids = tokenizer(f" {colour}")["input_ids"] + tokenizer(f" {kind}")["input_ids"]
            row[ids] = 1.0 / len(ids)
            word_rows.append(row)
            phrase_ids.append(ids if carry_target == "colour-kind" else tokenizer(f"the {colour} {kind}")["input_ids"])
    word_targets = torch.stack(word_rows)  # [colour * 5 + kind, vocab]
    state = {}
    # the probe feeds its own image tokens (frozen features or symbols) and, with --query-hint, adds the hint
    model.transformer.get_image_features = lambda pixel_values: state["image_tokens"]
    if query_hint and hint_layer == 0:
        model.transformer.wte.register_forward_hook(lambda module, args, output: output + state["hint"])
    elif query_hint:  # added to the output of block `hint_layer` instead of the input embeddings
        block = model.transformer.h[hint_layer - 1]
        block.register_forward_hook(lambda module, args, output: output + state["hint"])

    def encode(text):
        """(prompt ids, reply ids, how many of the prompt's last ids are trained on as well)"""
        cut, ref = text.index("<box>"), text.index("<ref>") + len("<ref>")
        prompt = [start] + [start + 2] * n_queries + [start + 1] + tokenizer(text[:ref])["input_ids"]
        phrase = tokenizer(text[ref:cut])["input_ids"]
        if phrase_first:  # the question before the image: image positions can attend to the phrase
            prompt = tokenizer(f"Where is {text[ref : text.index('</ref>')]}? ")["input_ids"] + prompt
        return prompt + phrase, tokenizer(text[cut:])["input_ids"], len(phrase) if phrase_loss else 0

    def kind_length(text):
        """How many tokens the named kind takes (they end the phrase, before `</ref>`)."""
        kind = text[: text.index("</ref>")].rsplit(" ", 1)[1]
        return len(tokenizer(" " + kind)["input_ids"])

    def batch(split, encoded, index):
        tokens, targets, named, _, _ = split
        rows = [encoded[i][0] + encoded[i][1] for i in index]
        width = max(map(len, rows))
        ids = torch.zeros(len(index), width, dtype=torch.long)
        labels = torch.full((len(index), width), -100)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        answer = torch.zeros(len(index), width, 1)
        for row, i in enumerate(index):
            prompt, reply, trained = encoded[i]
            ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[row, : len(prompt) + len(reply)] = 1
            labels[row, len(prompt) - trained : len(prompt) + len(reply)] = torch.tensor(
                prompt[len(prompt) - trained :] + reply
            )
            answer[row, len(prompt) - 1 : len(prompt) + len(reply)] = 1
        if symbolic:
            image = symbols(targets[index])
        elif align:  # the adapter is trained: its tokens are computed from the frozen trunk's patch features
            image = adapter_tokens(model.transformer.visual, tokens[index])
            state["align_cells"] = stage0.patch_labels(targets[index], int(n_queries**0.5))[:2]
        else:
            image = tokens[index]
        state["image_tokens"] = image.flatten(0, 1)
        state["answer"] = answer[..., 0]
        if hint_words:  # the LM's own (trained) embeddings of the phrase's words, nothing learnt for the probe
            words = torch.stack([model.transformer.wte.weight[ids].sum(0) for ids in phrase_ids])
            phrase = words[named[index, 0] * len(stage0.KINDS) + named[index, 1]]
            state["hint"] = hint_scale * answer * phrase[:, None]
        else:
            state["hint"] = answer * (hint_colour(named[index, 0]) + hint_kind(named[index, 1]))[:, None]
        size = model.config.visual["image_size"]
        pixels = torch.zeros(len(index), 3, size, size)  # stands in for the images: `get_image_features` ignores it
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), labels

    encoded_train = [encode(text) for text in train[3]]
    encoded_test = [encode(text) for text in test[3]]
    test_kind_lengths = [kind_length(text) for text in test[3]]
    for parameter in model.transformer.visual.parameters():
        parameter.requires_grad_(False)
    if align:  # --align: the adapter learns too, its tokens pulled towards their shape's colour and kind words
        for module in (model.transformer.visual.attn_pool, model.transformer.visual.ln_post):
            module.requires_grad_(True)
        model.transformer.visual.proj.requires_grad_(True)
    extra = [*hint_colour.parameters(), *hint_kind.parameters(), *(symbols.parameters() if symbolic else [])]
    extra += [*carry_colour.parameters(), *carry_kind.parameters()] if carry_loss and not carry_lens else []
    parameters = [p for p in model.parameters() if p.requires_grad] + extra
    optimizer = torch.optim.AdamW(parameters, lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(encoded_train), (batch_size,)).tolist()
        inputs, labels = batch(train, encoded_train, index)
        outputs = model(**inputs, labels=labels, output_hidden_states=carry_loss is not None)
        loss = outputs.loss
        if carry_loss:
            layer, weight = carry_loss
            at_answer = state["answer"].bool()
            states = outputs.hidden_states[layer][at_answer]  # [answer positions, hidden]
            colour, kind = (train[2][index][:, None].expand(-1, at_answer.shape[1], -1))[at_answer].unbind(-1)
            if carry_embed:  # what the blocks up to LAYER add there must be the sum of the phrase's word embeddings
                pool = "mean" if carry_target == "phrase-mean" else "sum"
                words = torch.stack(
                    [getattr(model.transformer.wte.weight[ids], pool)(0) for ids in phrase_ids]
                ).detach()
                added = outputs.hidden_states[layer][at_answer] - outputs.hidden_states[0][at_answer]
                target = words[colour * len(stage0.KINDS) + kind]
                if carry_center:  # only what tells the batch's phrases apart counts
                    added, target = added - added.mean(0), target - target.mean(0)
                carry = F.mse_loss(added, target) / target.pow(2).mean()
            elif carry_lens:
                logits = model.lm_head(model.transformer.ln_f(states))
                carry = F.cross_entropy(logits, word_targets[colour * 5 + kind])
            else:
                carry = F.cross_entropy(carry_colour(states), colour) + F.cross_entropy(carry_kind(states), kind)
            loss = loss + weight * carry
        if align:  # contrastive: each image token inside a shape against the 30 colour-kind word sums
            kind, colour = state["align_cells"]
            inside = kind > 0
            words = torch.stack([model.transformer.wte.weight[ids].sum(0) for ids in phrase_ids]).detach()
            image = state["image_tokens"].view(*kind.shape, -1)[inside]
            logits = F.normalize(image, dim=-1) @ F.normalize(words, dim=-1).T / align_temperature
            aligned = F.cross_entropy(logits, (colour[inside] - 1) * len(stage0.KINDS) + kind[inside] - 1)
            loss = loss + align * aligned
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            model.eval()
            hits, kinds = [], []
            with torch.no_grad():
                for first in range(0, len(encoded_test), 50):
                    index = list(range(first, min(first + 50, len(encoded_test))))
                    inputs, labels = batch(test, encoded_test, index)
                    predicted = model(**inputs).logits.argmax(-1)
                    for row, i in enumerate(index):
                        prompt, reply, _ = encoded_test[i]
                        hundreds = hundreds_positions(tokenizer, reply)
                        hits.append(all(predicted[row, len(prompt) + j - 1] == reply[j] for j in hundreds))
                        end = len(prompt) - 1  # the `</ref>` position; the kind's tokens come just before it
                        span = range(end - test_kind_lengths[i], end)
                        kinds.append(all(predicted[row, p - 1] == prompt[p] for p in span))
            model.train()
            hits = np.array(hits)
            by_count = {n: round(float(hits[test[4].numpy() == n].mean()), 3) for n in (1, 2, 3, 4)}
            kinds = np.array(kinds)
            kind_by_count = {n: round(float(kinds[test[4].numpy() == n].mean()), 3) for n in (1, 2, 3, 4)}
            print(
                f"step {step}: loss {loss.item():.3f}, four hundreds digits right by number of shapes {by_count}, "
                f"the kind after the colour {kind_by_count}"
                + (f", carry {carry.item():.3f}" if carry_loss else "")
                + (f", align {aligned.item():.3f}" if align else ""),
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", help="a demo checkpoint with vision tower and LM, e.g. demo_out/stages/init")
    parser.add_argument("--reader", choices=["lm", "cross-attention"], default="lm")
    parser.add_argument("--tokens", choices=["image", "symbolic", "slots"], default="image")
    parser.add_argument(
        "--word-embeddings", action="store_true", help="slots: colour and kind are the LM's embeddings of the words"
    )
    parser.add_argument("--train-scenes", type=int, default=6000)
    parser.add_argument("--query-hint", action="store_true", help="give the LM the phrase at every answer position")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order (the scenes stay)")
    parser.add_argument("--batch-size", type=int, default=32, help="LM reader: scenes a step")
    parser.add_argument("--phrase-first", action="store_true", help="LM reader: ask the question before the image")
    parser.add_argument(
        "--phrase-loss",
        action="store_true",
        help="LM reader: train on the phrase's tokens too (its kind follows from the image)",
    )
    parser.add_argument(
        "--carry-loss",
        nargs=2,
        metavar=("LAYER", "WEIGHT"),
        help="LM reader: also train linear read-outs of the named colour and kind from hidden_states[LAYER] at every "
        "answer position (weight WEIGHT): supervises carrying the phrase to where the box is written",
    )
    parser.add_argument(
        "--carry-lens", action="store_true", help="--carry-loss through the model's own final norm and LM head"
    )
    parser.add_argument(
        "--hint-words",
        action="store_true",
        help="--query-hint made of the LM's own embeddings of the phrase's words instead of tables of its own",
    )
    parser.add_argument(
        "--carry-embed",
        action="store_true",
        help="--carry-loss as the distance of what the blocks up to LAYER add from the phrase's word embeddings",
    )
    parser.add_argument(
        "--carry-target",
        choices=["colour-kind", "phrase-sum", "phrase-mean"],
        default="colour-kind",
        help="--carry-embed: the sum of the colour's and kind's embeddings, or the sum or mean over all the "
        "phrase's tokens ('the' too)",
    )
    parser.add_argument(
        "--carry-center", action="store_true", help="--carry-embed: subtract the batch's mean from both sides"
    )
    parser.add_argument("--hint-scale", type=float, default=1.0, help="--hint-words: multiply the hint by this")
    parser.add_argument("--hint-layer", type=int, default=0, help="--query-hint: add it after this block (0: input)")
    parser.add_argument(
        "--align",
        type=float,
        default=0.0,
        help="--tokens image: train the adapter too, with this weight on a contrastive loss that pulls each image "
        "token inside a shape towards the LM's embeddings of its colour and kind words (against the other 29 pairs)",
    )
    parser.add_argument("--align-temperature", type=float, default=0.1, help="--align: the softmax temperature")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = QwenVLForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    patches = bool(args.align)
    train, test = draw(model, args.train_scenes, 1, patches), draw(model, 400, 2, patches)
    if args.reader == "cross-attention":
        cross_attention_probe(train, test, args.steps, args.lr)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
        lm_probe(
            model,
            tokenizer,
            train,
            test,
            args.steps,
            args.lr,
            args.tokens,
            args.query_hint,
            args.word_embeddings,
            args.batch_size,
            args.phrase_first,
            args.phrase_loss,
            (int(args.carry_loss[0]), float(args.carry_loss[1])) if args.carry_loss else None,
            args.carry_lens,
            args.hint_words,
            args.hint_layer,
            args.carry_embed,
            args.hint_scale,
            args.carry_target,
            args.carry_center,
            args.align,
            args.align_temperature,
        )


if __name__ == "__main__":
    main()
