"""Property-based checks: lossless text round trips, list-format round trips, and only ValueError/TypeError on junk."""

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_qwen_vl.tokenization_qwen_vl import SPECIAL_TOKENS, QwenVLTokenizer


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TAGS = ["<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<imgpad>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return QwenVLTokenizer(str(vocab_file))


def no_special_tokens(text: str) -> bool:
    return not any(token in unicodedata.normalize("NFC", text) for token in SPECIAL_TOKENS)


# Arbitrary Unicode (surrogates excluded: they are not text), with tag-like fragments mixed in to probe near misses.
unicode_text = st.lists(
    st.one_of(st.text(max_size=20), st.sampled_from(["<", ">", "<|", "|>", "<im", "img", "\r\n", " \u0301", "\u0338"])),
    max_size=8,
).map("".join)


@SETTINGS
@given(text=unicode_text.filter(no_special_tokens))
def test_decode_encode_is_nfc(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


# List format. Texts, paths and refs hold no markup tag (from_list_format refuses those) and start with no
# combining mark (which NFC would merge into a tag's '>': also refused).
plain = st.text(max_size=12).filter(
    lambda s: no_special_tokens(s) and unicodedata.normalize("NFC", ">" + s).startswith(">")
)
path = plain.filter(lambda s: len(s.encode()) <= 256)
box = st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)).map(
    lambda v: [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]
)
element = st.one_of(
    st.builds(lambda t: {"text": t}, plain),
    st.builds(lambda p: {"image": p}, path),
    st.builds(lambda r, b: {"ref": r, "box": b}, plain, st.lists(box, max_size=3)),
    st.builds(lambda b: {"box": b}, st.lists(box, min_size=1, max_size=3)),
)


def expected_list_format(elements: list[dict]) -> list[dict]:
    """
    What `to_list_format(from_list_format(elements))` gives, as the official helpers define it: an image reads back as
    `{"text": "Picture N:"}, {"image": path}, {"text": "\\n"}`, a ref+box element as `{"ref": r}` then one
    `{"box": "(x1,y1),(x2,y2)"}` string per box; adjacent texts merge, empty texts vanish, texts are NFC.
    """
    pieces, images = [], 0
    for item in elements:
        if "image" in item:
            images += 1
            pieces += [{"text": f"Picture {images}:"}, {"image": item["image"]}, {"text": "\n"}]
        elif "text" in item:
            pieces.append(item)
        else:
            pieces += [{"ref": item["ref"]}] if "ref" in item else []
            pieces += [{"box": "({},{}),({},{})".format(*b)} for b in item["box"]]
    merged = []
    for piece in pieces:
        if "text" in piece and merged and "text" in merged[-1]:
            merged[-1] = {"text": merged[-1]["text"] + piece["text"]}
        else:
            merged.append(dict(piece))
    nfc = [{key: unicodedata.normalize("NFC", value) for key, value in piece.items()} for piece in merged]
    return [piece for piece in nfc if piece != {"text": ""}]


@SETTINGS
@given(elements=st.lists(element, max_size=6))
def test_list_format_round_trip(tiny_processor, elements):
    tokenizer = tiny_processor.tokenizer
    text = tokenizer.from_list_format(elements)
    assert tokenizer.to_list_format(text) == expected_list_format(elements)
    # Text and image elements alone round-trip exactly once the "Picture N:" / "\n" wrapping is accounted for.
    if all(set(item) <= {"text", "image"} for item in elements):
        assert [item for item in tokenizer.to_list_format(text) if "image" in item] == [
            {"image": unicodedata.normalize("NFC", item["image"])} for item in elements if "image" in item
        ]


# Text with random tags, and some well-formed spans so that image matching and loading are reached too.
SPANS = ["<img></img>", "<img>missing.png</img>", "<img>.</img>", "<ref>a</ref><box>(1,2),(3,4)</box>"]
junk = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(SPANS), st.sampled_from(TAGS)), max_size=6).map("".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(junk, min_size=1, max_size=3), surplus=st.integers(-1, 1), pass_images=st.booleans())
def test_processor_raises_only_value_or_type_errors_on_junk(tiny_processor, rows, surplus, pass_images):
    num_images = max(0, sum(row.count("<img>") for row in rows) + surplus)  # often, but not always, the right count
    images = [Image.new("RGB", (3 + i, 5), (i, 0, 0)) for i in range(num_images)] if pass_images else None
    try:
        tiny_processor(images=images, text=rows)
    except (ValueError, TypeError):
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(element, min_size=1, max_size=4), min_size=1, max_size=3))
def test_processor_accepts_well_formed_input(tiny_processor, rows):
    tokenizer = tiny_processor.tokenizer
    texts = [tokenizer.from_list_format(elements) for elements in rows]
    texts = [text or "empty row" for text in texts]
    images = [[Image.new("RGB", (4, 4)) for item in elements if "image" in item] for elements in rows]
    batch = tiny_processor(images=images, text=texts, return_tensors="pt")
    num_images = sum(map(len, images))
    assert (batch["input_ids"] == tokenizer.img_start_id).sum() == num_images
    assert len(batch.get("pixel_values", [])) == num_images
