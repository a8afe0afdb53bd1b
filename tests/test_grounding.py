"""Grounding helpers: parsing `<ref>`/`<box>`/`<quad>` text, formatting boxes back, drawing them."""

import numpy as np
import pytest
from PIL import Image

from modeling_qwen_vl.grounding_qwen_vl import box_to_text, draw_grounding, format_grounding, parse_grounding


def test_parse_single_ref_and_box():
    assert parse_grounding("<ref>the red car</ref><box>(10,20),(300,400)</box>") == [
        {"phrase": "the red car", "box": (10, 20, 300, 400)}
    ]


def test_parse_multiple_refs_in_chat_answer():
    text = (
        "Picture 1: <img>street.jpg</img>\nThere is <ref> a man</ref><box>(1,2),(3,4)</box> next to "
        "<ref>a dog</ref><box>(5, 6), (7, 8)</box>.<|im_end|>"
    )
    assert parse_grounding(text) == [
        {"phrase": "a man", "box": (1, 2, 3, 4)},
        {"phrase": "a dog", "box": (5, 6, 7, 8)},
    ]


def test_parse_box_without_ref_and_box_separated_from_ref():
    text = "<box>(0,0),(999,999)</box> and <ref>cat</ref> sits here <box>(1,1),(2,2)</box>"
    assert parse_grounding(text) == [
        {"phrase": None, "box": (0, 0, 999, 999)},
        {"phrase": None, "box": (1, 1, 2, 2)},
    ]


def test_parse_several_boxes_per_ref():
    text = "<ref>two dogs</ref><box>(10,10),(20,20)</box> <box>(30,30),(40,40)</box> play; <box>(5,5),(6,6)</box>"
    assert parse_grounding(text) == [
        {"phrase": "two dogs", "box": (10, 10, 20, 20)},
        {"phrase": "two dogs", "box": (30, 30, 40, 40)},
        {"phrase": None, "box": (5, 5, 6, 6)},
    ]


def test_parse_quad_as_polygon():
    (entry,) = parse_grounding("<ref>STOP</ref><quad>(100,50),(300,80),(290,200),(90,170)</quad>")
    assert entry == {
        "phrase": "STOP",
        "box": (90, 50, 300, 200),
        "polygon": ((100, 50), (300, 80), (290, 200), (90, 170)),
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no grounding here",
        "<ref>a</ref><box>(1,2)</box>",
        "<ref>a</ref><box>(1,2),(3,4),(5,6)</box>",
        "<ref>a</ref><box>(1.5,2),(3,4)</box>",
        "<ref>a</ref><box>(-1,2),(3,4)</box>",
        "<ref>a</ref><box>(x,2),(3,4)</box>",
        "<ref>a</ref><box>(1,2),(3,4)",
        "<ref>a</ref><box>(1,2),(3,4)</quad>",
        "<quad>(1,2),(3,4)</quad>",
        "<box><ref>a</ref>(1,2),(3,4)</box>",
    ],
)
def test_parse_ignores_malformed_boxes(text):
    assert parse_grounding(text) == []


def test_parse_malformed_box_does_not_hide_later_ones():
    text = "<ref>a</ref><box>(1,2</box><box>(1,2),(3,4)</box><ref>b<box>(5,6),(7,8)</box>"
    assert parse_grounding(text) == [{"phrase": "a", "box": (1, 2, 3, 4)}, {"phrase": None, "box": (5, 6, 7, 8)}]


def test_parse_scales_to_pixels():
    (entry,) = parse_grounding("<ref>x</ref><box>(100,250),(500,1000)</box>", image_size=(640, 480))
    assert entry["box"] == pytest.approx((64.0, 120.0, 320.0, 480.0))
    assert all(isinstance(v, float) for v in entry["box"])


@pytest.mark.parametrize(
    "args", [(None,), (b"<box>(1,2),(3,4)</box>",), ("text", 640), ("text", (640,)), ("text", ("640", 480))]
)
def test_parse_rejects_wrong_argument_types(args):
    with pytest.raises(TypeError):
        parse_grounding(*args)


def test_parse_rejects_non_positive_image_size():
    with pytest.raises(ValueError):
        parse_grounding("", image_size=(0, 10))


def test_box_to_text_quantizes_and_clamps():
    assert box_to_text((64, 120, 320, 480), (640, 480)) == "<box>(100,250),(500,999)</box>"
    assert box_to_text((-5, 0.4, 1200, 999.6)) == "<box>(0,0),(999,999)</box>"
    with pytest.raises(TypeError):
        box_to_text((1, 2, 3), (10, 10))


def test_format_grounding():
    assert format_grounding("a cat", (10, 20, 30, 40)) == "<ref>a cat</ref><box>(10,20),(30,40)</box>"
    assert format_grounding("dogs", [(0, 0, 10, 10), np.array([20, 20, 40, 40])], image_size=(100, 100)) == (
        "<ref>dogs</ref><box>(0,0),(100,100)</box><box>(200,200),(400,400)</box>"
    )
    assert format_grounding(None, [(1, 2, 3, 4)]) == "<box>(1,2),(3,4)</box>"
    assert format_grounding("the sign", []) == "<ref>the sign</ref>"
    with pytest.raises(TypeError):
        format_grounding(3, [(1, 2, 3, 4)])
    with pytest.raises(TypeError):
        format_grounding("x", "(1,2),(3,4)")
    with pytest.raises(ValueError):
        format_grounding("a <box>", [(1, 2, 3, 4)])


@pytest.mark.parametrize("image_size", [(640, 480), (1000, 1000), (999, 37)])
def test_format_then_parse_round_trip_within_one_pixel(image_size):
    """One model unit is size/1000 pixels, so sizes up to 1000 pixels round-trip within 1 pixel (edges included)."""
    rng = np.random.default_rng(0)
    width, height = image_size
    boxes = [tuple(rng.uniform(0, [width, height, width, height])) for _ in range(18)]
    boxes += [(0, 0, width, height), (0.4, 0.6, width - 0.5, height - 0.2)]
    text = "".join(format_grounding(f"object {i}", box, image_size) for i, box in enumerate(boxes))
    parsed = parse_grounding(text, image_size)
    assert [entry["phrase"] for entry in parsed] == [f"object {i}" for i in range(20)]
    for entry, box in zip(parsed, boxes):
        assert np.abs(np.array(entry["box"]) - np.array(box)).max() <= 1.0


def test_draw_returns_new_image_with_boxes():
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    original = image.copy()
    text = "<ref>a box</ref><box>(250,300),(750,700)</box>"  # pixels (100, 90)-(300, 210)
    drawn = draw_grounding(image, text)

    assert drawn is not image and drawn.size == image.size
    assert np.array_equal(np.asarray(image), np.asarray(original))
    pixels, before = np.asarray(drawn).astype(int), np.asarray(original).astype(int)
    # The outline is drawn along every edge ...
    for x, y in [(100, 150), (300, 150), (200, 90), (200, 210)]:
        assert (pixels[y, x] != before[y, x]).any(), (x, y)
    # ... the label sits just above the top-left corner, and the inside and far-away regions are untouched.
    assert (pixels[80:90, 100:130] != before[80:90, 100:130]).any()
    assert np.array_equal(pixels[110:190, 120:280], before[110:190, 120:280])
    assert np.array_equal(pixels[250:, :], before[250:, :])
    assert np.array_equal(pixels[:, 350:], before[:, 350:])


def test_draw_accepts_parsed_entries_and_plain_boxes_in_distinct_colours():
    image = Image.new("L", (200, 200), 0)
    entries = parse_grounding("<box>(100,100),(400,400)</box><box>(600,600),(900,900)</box>", image.size)
    for boxes in (entries, [(20, 20, 80, 80), (120, 120, 180, 180)]):
        drawn = np.asarray(draw_grounding(image, boxes, line_width=3))
        assert drawn.shape == (200, 200, 3)
        first, second = drawn[50, 20], drawn[150, 120]
        assert first.any() and second.any() and not np.array_equal(first, second)


def test_draw_rejects_wrong_types():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(TypeError):
        draw_grounding(np.zeros((10, 10, 3)), "<box>(1,2),(3,4)</box>")
    with pytest.raises(TypeError):
        draw_grounding(image, 5)
    with pytest.raises(TypeError):
        draw_grounding(image, [(1, 2, 3)])
