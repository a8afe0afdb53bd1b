"""Property-based checks: lossless text round trips, list-format round trips, and only ValueError/TypeError on junk
(processor text and images, model input batches)."""

import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_qwen_vl.text_format import SPECIAL_TOKENS
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer

from .conftest import TINY_CONFIG

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


# Property: any malformed batch gives ValueError/TypeError, never another exception type (IndexError, RuntimeError,
# AttributeError, ...). Batches are built from pieces that are individually often right and often wrong.
def tensor_like(draw, shape_options, dtypes):
    shape = draw(st.sampled_from(shape_options))
    dtype = draw(st.sampled_from(dtypes))
    if dtype in (torch.float32, torch.float16):
        return torch.randn(shape).to(dtype)
    return torch.randint(-3, 600, shape).to(dtype)


@st.composite
def malformed_batches(draw):
    batch = draw(st.integers(0, 3))
    length = draw(st.integers(0, 300))
    start = TINY_CONFIG["visual"]["image_start_id"]
    pieces = st.sampled_from([[5], [start], [start + 1], [start + 2] * 8, [start + 2] * 256, [600], [-1], [0]])
    rows = [sum(draw(st.lists(pieces, max_size=6)), [])[:length] or [5] for _ in range(max(batch, 1))]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    inputs = {}
    kind = draw(st.sampled_from(["ok", "1d", "float", "list", "empty"]))
    variants = {"ok": ids, "1d": ids[0], "float": ids.float(), "list": ids.tolist(), "empty": ids[:, :0]}
    inputs["input_ids"] = variants[kind]
    if draw(st.booleans()):
        shapes = [(len(rows), width), (len(rows), width + 1), (width,), (len(rows), 1, width, width), (1, 1, width, 1)]
        inputs["attention_mask"] = tensor_like(draw, shapes, [torch.long, torch.float32]).clamp(0, 1)
    if draw(st.booleans()):
        inputs["position_ids"] = tensor_like(
            draw, [(1, width), (len(rows), width - 1), (width,)], [torch.long, torch.float32]
        )
    if draw(st.booleans()):
        images = draw(st.integers(0, 3))
        shape = draw(
            st.sampled_from([(images, 3, 56, 56), (images, 56, 56, 3), (images, 3, 42, 56), (images, 1, 56, 56)])
        )
        pixel_values = torch.randn(shape).to(draw(st.sampled_from([torch.float32, torch.uint8])))
        inputs["pixel_values"] = list(pixel_values) if draw(st.booleans()) and images else pixel_values
    if draw(st.booleans()):
        inputs["labels"] = tensor_like(draw, [(len(rows), width), (len(rows), width - 1)], [torch.long, torch.float32])
    return inputs


@pytest.fixture(scope="module")
def tiny_model():
    from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

    torch.manual_seed(0)
    return QwenVLForConditionalGeneration._from_config(QwenVLConfig(**TINY_CONFIG), attn_implementation="sdpa").eval()


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(inputs=malformed_batches())
def test_model_raises_only_value_or_type_errors_on_malformed_batches(tiny_model, inputs):
    try:
        with torch.no_grad():
            output = tiny_model(**inputs)
    except (ValueError, TypeError):
        return
    assert torch.isfinite(output.logits).all()
