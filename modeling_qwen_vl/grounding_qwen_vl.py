"""
Grounding helpers: write boxes into Qwen-VL text, read them out of it, draw them.

The markup (`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`, `<quad>` with four points) and the 0-1000 grid are
defined in `text_format`, with the rule for coordinates off the grid: `box_to_text` is the one conversion from
geometric coordinates (pixels or reals on the 0-1000 scale) to grid values.
"""

import math
from collections.abc import Iterable, Sequence
from numbers import Real

import PIL.Image
from PIL import ImageDraw, ImageFont, features

from .text_format import BOX_BODY, BOX_SCALE, GROUNDING, MARKUP_TOKEN, QUAD_BODY, REF_TAGS, point_box_text

# Distinct, saturated colours; boxes cycle through them in order.
_COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (255, 225, 25),
]


def _check_image_size(image_size) -> tuple[float, float] | None:
    """Validate an optional `(width, height)` pair of positive numbers."""
    if image_size is None:
        return None
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in image_size)
    ):
        raise TypeError(f"image_size must be a (width, height) pair of numbers or None, got {image_size!r}.")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}.")
    return width, height


def _check_box(box) -> tuple[float, float, float, float]:
    """Validate a box given as four numbers `(x1, y1, x2, y2)` (any iterable, e.g. a tuple or a numpy array)."""
    values = None if isinstance(box, (str, bytes, dict)) or not isinstance(box, Iterable) else tuple(box)
    if values is None or len(values) != 4 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise TypeError(f"A box must be four numbers (x1, y1, x2, y2), got {box!r}.")
    return values


def _check_point(point, index: int) -> tuple[float, float]:
    """A polygon point `(x, y)` of two finite numbers."""
    values = None if isinstance(point, (str, bytes, dict)) or not isinstance(point, Iterable) else tuple(point)
    if values is None or len(values) != 2 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise TypeError(f"Polygon points of box {index} must be (x, y) pairs of numbers, got {point!r}.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"Polygon point {point!r} of box {index} is not finite.")
    return values


def check_phrase(phrase, name: str = "phrase") -> str:
    """A referring expression: a non-empty str holding no grounding or image tags (which would inject boxes)."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"`{name}` must be a non-empty string naming what to locate, e.g. 'the red car'.")
    if match := MARKUP_TOKEN.search(phrase):
        raise ValueError(
            f"`{name}` contains the tag {match.group()}: a phrase is plain text (tags in it would be read as the "
            "model's own boxes); remove the tag."
        )
    return phrase


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[dict]:
    """
    Extract the boxes of a Qwen-VL output, in order: `[{"phrase": str | None, "box": (x1, y1, x2, y2)}]`.

    A box gets the phrase of the `<ref>` it follows (directly or after other boxes of the same ref, whitespace
    allowed); other boxes get `None`. A `<quad>` gives an entry with `"polygon"` (its four points) and `"box"` (their
    bounding box). With `image_size=(width, height)` coordinates are pixels of that image (floats,
    `x * width / 1000`); otherwise they are the model's 0-1000 integers. Malformed boxes (including coordinates of
    more than 4 digits) are skipped.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    size = _check_image_size(image_size)

    def scale(points):
        if size is None:
            return points
        return tuple((x * size[0] / BOX_SCALE, y * size[1] / BOX_SCALE) for x, y in points)

    results = []
    phrase, last_end = None, 0
    for match in GROUNDING.finditer(text):
        if text[last_end : match.start()].strip():
            phrase = None  # other text separates this tag from the preceding ref
        last_end = match.end()
        if match["ref"] is not None:
            phrase = match["ref"].strip()
            continue
        body = (BOX_BODY if match["tag"] == "box" else QUAD_BODY).fullmatch(match["body"])
        if body is None:
            continue
        values = [int(v) for v in body.groups()]
        points = scale(tuple(zip(values[0::2], values[1::2])))
        if match["tag"] == "box":
            (x1, y1), (x2, y2) = points
            results.append({"phrase": phrase, "box": (x1, y1, x2, y2)})
        else:
            xs, ys = [x for x, _ in points], [y for _, y in points]
            results.append({"phrase": phrase, "box": (min(xs), min(ys), max(xs), max(ys)), "polygon": points})
    return results


def box_to_text(box: Iterable[float], image_size: tuple[int, int] | None = None) -> str:
    """
    `(x1, y1, x2, y2)` → `<box>(x1,y1),(x2,y2)</box>`: the one conversion of geometric coordinates to the grid (see
    `text_format`). With `image_size=(width, height)` the box is in pixels of that image; otherwise it is on the
    0-1000 scale already (reals allowed). Coordinates are rounded to the grid, one unit being 1/1000 of the image
    size; a box reaching past the image edges is clipped to them, and corners keep their order. A `ValueError` is
    raised for coordinates that are not finite and for boxes lying entirely outside the image (clipping would
    silently turn them into a box on its edge).
    """
    values = _check_box(box)
    width, height = _check_image_size(image_size) or (BOX_SCALE, BOX_SCALE)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"Box {box!r} has a coordinate that is not a finite number.")
    x1, y1, x2, y2 = values
    if max(x1, x2) < 0 or max(y1, y2) < 0 or min(x1, x2) >= width or min(y1, y2) >= height:
        scale = f"the image ({width}x{height} pixels)" if image_size is not None else f"the 0-{BOX_SCALE} scale"
        raise ValueError(
            f"Box {box!r} lies entirely outside {scale}: pass image_size=(width, height) for pixel boxes, or "
            f"coordinates in [0, {BOX_SCALE}) otherwise."
        )

    def to_grid(value, extent):
        return min(max(round(value * BOX_SCALE / extent), 0), BOX_SCALE - 1)

    return point_box_text(to_grid(x1, width), to_grid(y1, height), to_grid(x2, width), to_grid(y2, height))


def format_grounding(
    phrase: str | None, boxes: Iterable[float] | Iterable[Iterable[float]], image_size: tuple[int, int] | None = None
) -> str:
    """
    `<ref>phrase</ref>` followed by one `<box>` per box (see `box_to_text`); `boxes` is one box or a list of boxes,
    `phrase=None` writes the boxes alone and an empty list writes the ref alone (as in a grounding prompt).
    """
    if phrase is not None and not isinstance(phrase, str):
        raise TypeError(f"phrase must be a str or None, got {type(phrase).__name__}.")
    if phrase is not None and MARKUP_TOKEN.search(phrase):
        raise ValueError(f"phrase must not contain grounding tags, got {phrase!r}.")
    if isinstance(boxes, (str, bytes, dict)) or not isinstance(boxes, Iterable):
        raise TypeError(f"boxes must be a box or a list of boxes, got {boxes!r}.")
    boxes = list(boxes)
    if boxes and isinstance(boxes[0], Real):
        boxes = [boxes]
    ref = "" if phrase is None else REF_TAGS[0] + phrase + REF_TAGS[1]
    return ref + "".join(box_to_text(box, image_size) for box in boxes)


def draw_grounding(
    image: PIL.Image.Image,
    text_or_boxes: str | Iterable[dict] | Iterable[Iterable[float]],
    line_width: int | None = None,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None,
) -> PIL.Image.Image:
    """
    Draw boxes (distinct colours) with their phrases as labels on an RGB copy of `image`; `image` is not modified.

    `text_or_boxes` is Qwen-VL output text (parsed with `image.size`), the list returned by
    `parse_grounding(text, image.size)`, or plain `(x1, y1, x2, y2)` boxes, all in pixels. `line_width` defaults to
    about 1/250 of the longer side; `font` defaults to PIL's built-in font scaled to the image (pass a font with CJK
    glyphs to label such phrases). Coordinates are clipped to the image before drawing, so any box costs at most the
    image's size; a coordinate that is not finite raises a `ValueError`.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    if isinstance(text_or_boxes, str):
        entries = parse_grounding(text_or_boxes, image.size)
    elif isinstance(text_or_boxes, Iterable) and not isinstance(text_or_boxes, (bytes, dict)):
        entries = [entry if isinstance(entry, dict) else {"box": _check_box(entry)} for entry in text_or_boxes]
    else:
        raise TypeError(f"text_or_boxes must be a str or a list of boxes, got {type(text_or_boxes).__name__}.")

    canvas = image.convert("RGB")  # always a new image
    draw = ImageDraw.Draw(canvas)
    longer = max(canvas.size)
    if line_width is None:
        line_width = max(2, round(longer / 250))
    if font is None:
        font_size = max(10, round(longer / 40))
        font = ImageFont.load_default(font_size) if features.check_module("freetype2") else ImageFont.load_default()

    line_width = min(line_width, longer)
    # Everything is drawn clipped to just outside the image, so huge coordinates cost no more than the image's size.
    low, high_x, high_y = -line_width, canvas.width + line_width, canvas.height + line_width

    def clip(x, y):
        return min(max(x, low), high_x), min(max(y, low), high_y)

    for index, entry in enumerate(entries):
        color = _COLORS[index % len(_COLORS)]
        box = _check_box(entry.get("box"))
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"Box {index} ({box!r}) has a coordinate that is not a finite number.")
        x1, y1, x2, y2 = (*clip(*box[:2]), *clip(*box[2:]))
        left, top, right, bottom = min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)
        if entry.get("polygon") is not None:
            points = [_check_point(point, index) for point in entry["polygon"]]
            draw.polygon([clip(*point) for point in points], outline=color, width=line_width)
        else:
            draw.rectangle((left, top, right, bottom), outline=color, width=line_width)
        if entry.get("phrase"):
            # Label above the box's top-left corner, or just inside it when there is no room above.
            text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), entry["phrase"], font=font)
            label_width, label_height = (
                text_right - text_left + 2 * line_width,
                text_bottom - text_top + 2 * line_width,
            )
            label_top = top - label_height if top - label_height >= 0 else top
            label_left = min(max(left, 0), max(canvas.width - label_width, 0))
            draw.rectangle((label_left, label_top, label_left + label_width, label_top + label_height), fill=color)
            draw.text(
                (label_left + line_width - text_left, label_top + line_width - text_top),
                entry["phrase"],
                fill=(0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else (255, 255, 255),
                font=font,
            )
    return canvas


__all__ = ["box_to_text", "draw_grounding", "format_grounding", "parse_grounding"]
