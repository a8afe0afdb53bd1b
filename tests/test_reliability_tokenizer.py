"""Tokenizer inputs that tiktoken's regex engine gives up on: encoded, with the ids tiktoken gives wherever it works."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return QwenVLTokenizer(str(vocab_file))


class RegexLimit:
    """Stands in for the tiktoken encoding and fails like its regex engine does on very long whitespace runs."""

    def encode(self, *args, **kwargs):
        raise ValueError(
            "Regex error while tokenizing: Error executing regex: Max stack size exceeded for backtracking"
        )


def test_a_million_spaces_encode_and_round_trip(tokenizer):
    text = "Look:" + " " * 1_000_000 + "done<|im_end|>"
    with pytest.raises(ValueError, match="backtracking"):  # what tiktoken alone does with this text
        tokenizer.encoding.encode(text, allowed_special="all")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.im_end_id and len(ids) < 10_000


# Text made of the characters where pre-tokenization is subtle: whitespace of every kind (including characters Python
# and tiktoken's engine classify differently), contractions, digits, letters of several scripts, special tokens.
ALPHABET = [
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\u00a0",
    "\u2028",
    "\u3000",
    "\x1c",
    "\x85",
    "\u200b",
    "\ufeff",
    "a",
    "Bc",
    "'s",
    "'LL",
    "'",
    "é",
    "猫",
    "٣",
    "1",
    "42",
    "!",
    "?!",
    "_",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<|extra_3|>",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(ALPHABET) | st.text(max_size=4), max_size=24).map("".join), split=st.booleans())
def test_fallback_pieces_give_tiktokens_ids(tokenizer, monkeypatch, text, split):
    allowed = set() if split else "all"
    expected = tokenizer.encoding.encode(text, allowed_special=allowed, disallowed_special=())
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "encoding", RegexLimit())
        assert tokenizer._bpe_encode(text, allowed) == expected
