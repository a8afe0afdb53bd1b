"""A small byte-level BPE vocabulary in the official `qwen.tiktoken` format, trained on the demo's corpus.

The file lists the 256 single bytes first (rank = byte value), then the merges in the order they were learnt, one
`base64(token) rank` line each; `QwenVLTokenizer` appends its special tokens after the last rank. Text is split with the
official pre-tokenisation regex (`PAT_STR`) before merging, exactly as tiktoken does when encoding.
"""

import base64
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from modeling_qwen_vl import QwenVLTokenizer
from modeling_qwen_vl.text_format import SPECIAL_TOKENS
from modeling_qwen_vl.tokenization_qwen_vl import PAT_STR

_PRETOKENIZE = regex.compile(PAT_STR)
_SPECIAL = regex.compile("|".join(regex.escape(token) for token in SPECIAL_TOKENS))


def train_bpe(texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[bytes]:
    """
    Learn up to `num_merges` byte-pair merges from `texts` (special-token markup is ignored). Returns the vocabulary
    in rank order: the 256 single bytes, then one token per merge. Ties go to the smallest byte pair, so the result
    depends only on the corpus.
    """
    words = Counter()
    for text in texts:
        for chunk in _SPECIAL.split(text):
            words.update(piece.encode("utf-8") for piece in _PRETOKENIZE.findall(chunk))
    segmented = {tuple(bytes([b]) for b in word): count for word, count in words.items()}
    vocabulary = [bytes([b]) for b in range(256)]
    for _ in range(num_merges):
        pairs = Counter()
        for parts, count in segmented.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, frequency = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if frequency < min_frequency:
            break
        merged = best[0] + best[1]
        vocabulary.append(merged)
        segmented = {_merge(parts, best, merged): count for parts, count in segmented.items()}
    return vocabulary


def _merge(parts: tuple[bytes, ...], pair: tuple[bytes, bytes], merged: bytes) -> tuple[bytes, ...]:
    output, index = [], 0
    while index < len(parts):
        if index + 1 < len(parts) and (parts[index], parts[index + 1]) == pair:
            output.append(merged)
            index += 2
        else:
            output.append(parts[index])
            index += 1
    return tuple(output)


def write_tiktoken(vocabulary: list[bytes], path: Path) -> Path:
    """Write `vocabulary` (rank order) as `base64(token) rank` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(vocabulary)))
    return path


def build_tokenizer(texts: Iterable[str], directory: Path, num_merges: int, image_span_length: int) -> QwenVLTokenizer:
    """Train the BPE vocabulary on `texts`, write `directory/qwen.tiktoken` and load it with `QwenVLTokenizer`
    (image spans of `image_span_length` positions, the model's `n_queries`)."""
    path = write_tiktoken(train_bpe(texts, num_merges), Path(directory) / "qwen.tiktoken")
    return QwenVLTokenizer(str(path), image_span_length=image_span_length)
