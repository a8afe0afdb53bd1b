"""`return_assistant_tokens_mask` without a fast tokenizer, and the official segment-wise chat encoding it rests on."""

import pytest
from PIL import Image

from modeling_qwen_vl import QwenVLImageProcessor, QwenVLProcessor, QwenVLTokenizer
from modeling_qwen_vl.text_format import IMAGE_ST
from qwen_vl.recipes.collator import IGNORE_INDEX, assistant_labels


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return QwenVLTokenizer(str(vocab_file))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return QwenVLProcessor(QwenVLImageProcessor(size={"height": 56, "width": 56}), tokenizer)


def test_chat_encodes_role_newline_and_content_apart_like_make_context(tokenizer):
    """The official `make_context` encodes role, "\\n" and content separately: a reply starting with a newline or
    spaces does not merge into the header's newline (it would as one string), so replies start on a token boundary."""
    messages = [{"role": "user", "content": "  \n hi"}, {"role": "assistant", "content": "\n\nYes <|im_end|>"}]
    ids = tokenizer.apply_chat_template(messages)["input_ids"]

    def part(role, content):
        encode = tokenizer.encode
        return [tokenizer.im_start_id, *encode(role), *encode("\n"), *encode(content, allowed_special=set(IMAGE_ST)),
                tokenizer.im_end_id]

    newline = tokenizer.encode("\n")
    expected = [*part("system", "You are a helpful assistant."), *newline, *part("user", "  \n hi"), *newline,
                *part("assistant", "\n\nYes <|im_end|>")]
    assert ids == expected
    assert ids != tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), allowed_special=set())


def test_offsets_mapping_points_at_each_tokens_characters(tokenizer):
    text = "Hello wörld 😀, <ref>a cat</ref> Picture 1: <img>x/é.png</img>\nok<|im_end|>"
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    assert len(ids) == len(offsets)
    start, end = ids.index(tokenizer.img_start_id), ids.index(tokenizer.img_end_id)
    outside = [(i, span) for i, span in enumerate(offsets) if not start < i < end]
    assert "".join(text[a:b] for _, (a, b) in outside) == text.replace("x/é.png", "")
    for i, (a, b) in outside:
        assert text[a:b] == tokenizer.decode([ids[i]]), i
    path = text.index("x/é.png")
    inner = offsets[start + 1 : end]
    assert inner[:8] == [(path, path + 7)] * 8 and set(inner[8:]) == {(path + 7, path + 7)}  # 8 path bytes, padding
    truncated = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=4)
    assert truncated["offset_mapping"] == offsets[:4]


def test_tokenizer_points_to_the_processor_for_assistant_masks(tokenizer):
    with pytest.raises(ValueError, match="processor"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], return_assistant_tokens_mask=True)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_processor_assistant_masks_equal_the_recipes_labels(processor, tmp_path, padding_side):
    """Images as PIL objects and as paths (whose spans the processor empties), typed control tokens, two rows."""
    path = tmp_path / "sub dir" / "ça.png"
    path.parent.mkdir()
    Image.new("RGB", (30, 20), (0, 90, 200)).save(path)
    first = [
        {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A blue <|im_end|> box."},
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.new("RGB", (8, 8))}, {"type": "text", "text": "Or?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "  Black."}]},
    ]
    second = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = processor.apply_chat_template(
        [first, second],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": padding_side},
    )
    assert out["pixel_values"].shape[0] == 2 and "offset_mapping" not in out
    tokenizer = processor.tokenizer
    replies = [["A blue <|im_end|> box.", "  Black."], ["hello"]]
    for row in range(2):
        ids = out["input_ids"][row][out["attention_mask"][row].bool()].tolist()
        mask = out["assistant_masks"][row][out["attention_mask"][row].bool()].tolist()
        assert [label != IGNORE_INDEX for label in assistant_labels(ids, tokenizer)] == [bool(m) for m in mask]
        trained = [token for token, m in zip(ids, mask) if m]
        ends = [i for i, token in enumerate(trained) if token == tokenizer.im_end_id]  # typed ones are text
        assert ends[-1] == len(trained) - 1
        assert [tokenizer.decode(trained[a + 1 : b]) for a, b in zip([-1, *ends], ends)] == replies[row]
        assert out["assistant_masks"][row][~out["attention_mask"][row].bool()].sum() == 0
