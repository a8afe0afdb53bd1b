"""The phrase-carry objective: an auxiliary training loss that puts a grounding reply's phrase where its box is written.

In `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`, every position from `</ref>` through the last `</box>` of the
phrase's boxes has to know which object the phrase names, and the digit tokens there do not say. The objective pulls
what the first `layer` blocks add to the residual stream at those positions towards the sum of the input embeddings
of the phrase's tokens (mean squared error, relative to the targets' mean square; the targets carry no gradient).
It adds no weights: the checkpoint stays in the official format, and inference is unchanged.

Why: in the demo's binding probe (`benchmarks/demo_binding_probe.py`, `docs/demo_experiments.md`) the language model
learns to pick the named shape among several quickly when the phrase's word embeddings are added to the input of
every box position, and hardly at all without them, nor when they are added after the first block, nor when the
phrase is only made decodable there by a linear read-out. With this loss the first block learns to bring the phrase
itself there, and the blocks after it match it against the image.

Hand-written: neither transformers nor TRL has a loss on hidden states beyond the language-modelling loss.
"""

from dataclasses import dataclass

import torch

from modeling_qwen_vl.text_format import BOX_TAGS, REF_TAGS


@dataclass(frozen=True)
class GroundingTags:
    """Token ids of the grounding markup."""

    ref_start: int
    ref_end: int
    box_start: int
    box_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "GroundingTags":
        names = [*REF_TAGS, *BOX_TAGS]
        ids = tokenizer.convert_tokens_to_ids(names)
        if any(not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"The tokenizer lacks the grounding tokens {' '.join(names)} (ids {ids}).")
        return cls(*ids)


def phrase_spans(ids: list[int], tags: GroundingTags) -> list[tuple[int, int, int]]:
    """`(phrase start, phrase end, last box position)` for each `<ref>phrase</ref>` followed directly by one or more
    `<box>...</box>`: the phrase is `ids[start:end]`, and the positions `end` (its `</ref>`) through `last` are the
    ones that carry it. A ref without a box, a box without a ref, or an unclosed tag carries nothing."""
    spans = []
    i = 0
    while i < len(ids):
        if ids[i] != tags.ref_start:
            i += 1
            continue
        try:
            end = ids.index(tags.ref_end, i + 1)
        except ValueError:
            break
        if tags.ref_start in ids[i + 1 : end]:  # a nested or unclosed <ref>: start again at the inner one
            i = ids.index(tags.ref_start, i + 1)
            continue
        last, j = None, end + 1
        while j < len(ids) and ids[j] == tags.box_start:
            try:
                close = ids.index(tags.box_end, j + 1)
            except ValueError:
                break
            last, j = close, close + 1
        if last is not None and end > i + 1:
            spans.append((i + 1, end, last))
        i = end + 1
    return spans


def phrase_carry_loss(
    hidden_states: tuple[torch.Tensor, ...],
    input_ids: torch.Tensor,
    embeddings: torch.Tensor,
    tags: GroundingTags,
    layer: int = 1,
) -> torch.Tensor | None:
    """The objective on one batch, or None where it has no grounded phrase.

    hidden_states: the model's `output_hidden_states` (`[0]` the input of the first block, `[n]` the output of block
    n), each [batch, length, hidden]; input_ids: [batch, length]; embeddings: the input embedding matrix [vocab,
    hidden]."""
    if not 1 <= layer < len(hidden_states):
        raise ValueError(f"phrase_carry_layer must be between 1 and {len(hidden_states) - 1}, got {layer}.")
    rows, positions, phrases, lengths = [], [], [], []  # per carrying position; per span
    for row, ids in enumerate(input_ids.tolist()):
        for start, end, last in phrase_spans(ids, tags):
            rows += [row] * (last - end + 1)
            positions += range(end, last + 1)
            phrases.append(ids[start:end])
            lengths.append(last - end + 1)
    if not rows:
        return None
    weight = embeddings.detach()
    device = input_ids.device
    per_span = torch.stack([weight[phrase].sum(0) for phrase in phrases])
    targets = per_span.repeat_interleave(torch.tensor(lengths, device=device), dim=0)
    rows, positions = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
    added = hidden_states[layer][rows, positions] - hidden_states[0][rows, positions]
    return (added.float() - targets.float()).pow(2).mean() / targets.float().pow(2).mean().clamp_min(1e-12)
