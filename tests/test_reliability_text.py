"""Bad text and markup: unclosed or nested tags, image counts, boxes, lengths and empty rows give clear ValueErrors."""

import math

import pytest
import torch
from PIL import Image

from modeling_qwen_vl.grounding_qwen_vl import box_to_text, format_grounding, parse_grounding
from modeling_qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor
from modeling_qwen_vl.processing_qwen_vl import QwenVLProcessor
from modeling_qwen_vl.text_format import IMAGE_SPAN_LENGTH
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer

RED, BLUE = Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("RGB", (4, 6), (0, 0, 255))


@pytest.fixture
def processor(tiny_vocab_file):
    """A fresh tiny processor, for tests that change tokenizer settings."""
    return QwenVLProcessor(QwenVLImageProcessor(size=56), QwenVLTokenizer(str(tiny_vocab_file)))


@pytest.mark.parametrize(
    "text, message",
    [
        ("Picture 1: <img>", r"text\[1\]: <img> at character 11 is never closed; add </img>"),
        ("the <ref>cat", r"text\[1\]: <ref> at character 4 is never closed; add </ref>"),
        ("<ref>cat</ref><box>(1,2),(3,4)", r"<box> at character 14 is never closed; add </box>"),
        ("<ref>a cat<box>(1,2),(3,4)</box></ref>", r"<box> at character 10 is inside <ref> \(opened at character 0\)"),
        ("<img><img></img></img>", r"<img> at character 5 is inside <img>"),
        ("<img>a.png<ref>x</ref></img>", r"<ref> at character 10 is inside <img>"),
        ("a cat</ref>", r"</ref> at character 5 closes nothing; remove it or add <ref>"),
        ("<ref>a cat</box>", r"</box> at character 10 is inside <ref>"),
        ("<ref>a</ref>\u0338 NFC merges the mark into '>'", r"<ref> at character 0 is never closed"),
    ],
)
def test_malformed_markup_names_the_row_and_tag(tiny_processor, text, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=["A fine first row.", text])


def test_tokenizer_rejects_broken_image_spans(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    with pytest.raises(ValueError, match="Unclosed <img>"):
        tokenizer("look: <img>a.png")
    with pytest.raises(ValueError, match="</img> without <img>.*split_special_tokens=True"):
        tokenizer("a stray </img> tag")
    with pytest.raises(ValueError, match="contains <img>: an image span holds only a path"):
        tokenizer("<img>a<img>b</img>")
    assert tokenizer.decode(tokenizer("a stray </img> tag", split_special_tokens=True)["input_ids"]) == (
        "a stray </img> tag"
    )
    # Generated text may be malformed: decoding and parsing stay lenient.
    assert tokenizer.decode([tokenizer.img_end_id, tokenizer.ref_start_id]) == "</img><ref>"
    assert parse_grounding("<ref>a<box>(1,2),(3,4)</box>") == [{"phrase": None, "box": (1, 2, 3, 4)}]


def test_image_path_over_256_bytes(tiny_processor):
    path = "é" * 129  # 258 bytes
    with pytest.raises(
        ValueError, match=r"text\[0\]: Image path .* is 258 bytes long; an image span holds at most 256"
    ):
        tiny_processor(text=f"<img>{path}</img>")
    with pytest.raises(ValueError, match=r"list_format\[1\]: image path .* is 258 bytes long"):
        tiny_processor.tokenizer.from_list_format([{"text": "hi"}, {"image": path}])
    # The processor empties the spans of the images it is given, so only the image itself matters then.
    assert len(tiny_processor(images=RED, text=f"<img>{path}</img>")["input_ids"][0]) == IMAGE_SPAN_LENGTH + 2


def test_image_counts_must_match_the_spans(tiny_processor):
    with pytest.raises(ValueError, match="Got 2 images for 1 <img></img> spans"):
        tiny_processor(images=[RED, BLUE], text="<img></img> one image")
    with pytest.raises(ValueError, match="Got 1 images for 2 <img></img> spans"):
        tiny_processor(images=[RED], text="<img></img><img></img> two images")
    with pytest.raises(ValueError, match="Got 0 images for 1 <img></img> spans, 1 of them empty"):
        tiny_processor(text="<img></img> no image given")
    with pytest.raises(ValueError, match=r"text\[0\] has 0 <img></img> spans but images\[0\] holds 1 images"):
        tiny_processor(images=[[RED], []], text=["no image here", "<img></img> but one here"])


def test_batch_mixing_rows_with_and_without_images(tiny_processor):
    rows = ["no image in this row", "Picture 1: <img></img>\nwhat is it?", "hello", "<img></img><img></img> two"]
    expected_ids = [tiny_processor.tokenizer.encode(row) for row in rows]
    expected_pixels = tiny_processor.image_processor([RED, BLUE, RED], return_tensors="pt")["pixel_values"]
    for images in ([RED, BLUE, RED], [[], [RED], [], [BLUE, RED]]):
        batch = tiny_processor(images=images, text=rows, return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"], expected_pixels, rtol=0, atol=0)
        for ids, mask, expected in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), expected_ids):
            assert ids[len(ids) - sum(mask) :] == expected and set(mask[: len(ids) - sum(mask)]) <= {0}


@pytest.mark.parametrize("text, message", [("", r"text\[0\] is empty"), ([], "`text` is an empty list")])
def test_empty_text(tiny_processor, text, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=text)
    with pytest.raises(ValueError, match=r"text\[1\] is empty: give every row some text"):
        tiny_processor(text=["fine", ""])


def test_too_long_input_needs_truncation(processor):
    text = "hello world " * 20
    length = len(processor.tokenizer.encode(text))
    with pytest.raises(
        ValueError, match=rf"text\[0\] is {length} tokens long, more than max_length=16.*truncation=True"
    ):
        processor(text=text, max_length=16)
    processor.tokenizer.model_max_length = 32
    with pytest.raises(ValueError, match=r"more than the tokenizer's model_max_length \(32\).*truncation=True"):
        processor(text=["short", text])
    batch = processor(text=["short", text], truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 32)
    assert batch["input_ids"][1].tolist() == processor.tokenizer.encode(text)[:32]
    assert processor(text=text, max_length=16, truncation=True)["input_ids"][0] == processor.tokenizer.encode(text)[:16]


def test_truncation_keeps_image_spans_whole(processor):
    tokenizer = processor.tokenizer
    rows = ["ab<img></img>cd<img></img>ef", "hello"]  # row 0: 2 + 258 + 2 + 258 + 2 = 522 ids
    span = IMAGE_SPAN_LENGTH + 2
    with pytest.raises(ValueError, match=r"text\[0\]: Truncation to max_length would cut through an image span"):
        processor(images=[RED, BLUE], text=rows, max_length=100, truncation=True)
    # Whole spans cut away take their images with them.
    batch = processor(images=[RED, BLUE], text=rows, max_length=2 + span, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 2 + span)
    torch.testing.assert_close(
        batch["pixel_values"], processor.image_processor(RED, return_tensors="pt")["pixel_values"]
    )
    assert "pixel_values" not in processor(images=[RED, BLUE], text=rows, max_length=2, truncation=True)
    tokenizer.truncation_side = "left"
    batch = processor(images=[RED, BLUE], text=rows, max_length=span + 4, truncation=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == tokenizer.encode(rows[0])[-(span + 4) :]
    torch.testing.assert_close(
        batch["pixel_values"], processor.image_processor(BLUE, return_tensors="pt")["pixel_values"]
    )
    with pytest.raises(ValueError, match="cut through an image span"):
        tokenizer(rows[0], max_length=span + 5, truncation=True)


@pytest.mark.parametrize(
    "box, message",
    [
        ([1, 2, 3], "4 integers"),
        ([1.5, 2, 3, 4], "4 integers"),
        ([-1, 0, 10, 10], r"box \[-1, 0, 10, 10\] must be .* in \[0, 1000\)"),
        ([0, 0, 1000, 10], r"in \[0, 1000\)"),
        ([500, 0, 100, 10], "x1 <= x2 and y1 <= y2"),
        ([0, 600, 10, 500], "x1 <= x2 and y1 <= y2"),
    ],
)
def test_from_list_format_rejects_bad_boxes(tiny_processor, box, message):
    elements = [{"text": "Where is it?"}, {"ref": "the cat", "box": [[0, 0, 999, 999], box]}]
    with pytest.raises(ValueError, match=r"list_format\[1\].*" + message):
        tiny_processor.tokenizer.from_list_format(elements)


@pytest.mark.parametrize(
    "elements, message",
    [
        ([{"image": "a<ref>.png"}], r"list_format\[0\]\['image'\] contains the tag <ref>"),
        ([{"ref": "a </ref> b"}], r"list_format\[0\]\['ref'\] contains the tag </ref>"),
        ([{"text": "x"}, {"text": "an <img>unclosed"}], r"list_format\[1\]\['text'\]: <img> at character 3 is never"),
        ([{"ref": "cat"}, {"text": "\u0338 after the tag"}], r"list_format\[1\]\['text'\] starts with '\u0338'.*NFC"),
        ([{"image": "\u0338.png"}], r"list_format\[0\]\['image'\] starts with"),
        ([{"image": "a.png", "text": "b"}], r"Unsupported list_format element list_format\[0\]"),
    ],
)
def test_from_list_format_rejects_broken_markup(tiny_processor, elements, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor.tokenizer.from_list_format(elements)


def test_box_helpers_reject_nonsense_boxes():
    with pytest.raises(ValueError, match="lies entirely outside the 0-1000 scale"):
        box_to_text((1200, 0, 1300, 10))
    with pytest.raises(ValueError, match=r"lies entirely outside the image \(640x480 pixels\)"):
        box_to_text((-50, -40, -1, -1), image_size=(640, 480))
    with pytest.raises(ValueError, match="not a finite number"):
        format_grounding("cat", [(0, 0, 10, 10), (0, math.nan, 10, 10)])
    with pytest.raises(ValueError, match="must not contain grounding tags"):
        format_grounding("a <img>", (1, 2, 3, 4))
    # Partly outside: clipped to the image edges (as before).
    assert box_to_text((-5, 0, 1200, 999.6)) == "<box>(0,0),(999,999)</box>"
    # Generated boxes are parsed as written, even when malformed.
    assert parse_grounding("<box>(900,900),(100,100)</box>") == [{"phrase": None, "box": (900, 900, 100, 100)}]
