"""
The Qwen-VL text format, in one place: special tokens, image spans, grounding markup, the box grid, the official list
format, ChatML and its stop tokens. The tokenizer, processor, grounding helpers, training recipes, demo and server
all read these rules from here.

- **Special tokens** follow the BPE ranks in `SPECIAL_TOKENS` order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  205 `<|extra_N|>`, then `<ref>`, `</ref>`, `<box>`, `</box>`, `<quad>`, `</quad>`, `<img>`, `</img>`, `<imgpad>`.
- **Image spans** `<img>PATH</img>` occupy `IMAGE_SPAN_LENGTH` positions between the tags (256 in the official
  models): the path's UTF-8 bytes, then `<imgpad>`; the model overwrites them with the image's features.
- **Grounding**: `<ref>phrase</ref>` followed by one or more `<box>(x1,y1),(x2,y2)</box>` (top-left, bottom-right),
  or a `<box>` alone; `<quad>` holds four points. The paired tags (`MARKUP_TAGS`) close before another one opens:
  they never nest (`check_markup`).
- **Box grid**: coordinates are integers in [0, `BOX_SCALE`) = [0, 1000), relative to the image's width and height
  (pixel = value * side / 1000). The one rule for values off the grid: coordinates that are *already grid values*
  (list-format elements, training records' `box`) must be on it, with x1 <= x2 and y1 <= y2, or `grid_box_text`
  raises a `ValueError` that says so; *geometric* coordinates (pixels, or real numbers on the 0-1000 scale) enter the
  text only through `grounding_qwen_vl.box_to_text`, the one conversion, which rounds to the grid and clips a box
  that reaches past the image edges to them (a box wholly outside the image is a `ValueError`). Text the model wrote
  is parsed as written (`grounding_qwen_vl.parse_grounding` skips malformed boxes).
- **List format**: the official `from_list_format` / `to_list_format` elements `{"image": path}`, `{"text": t}`,
  `{"ref": r, "box": [[x1, y1, x2, y2], ...]}`.
- **ChatML** (`CHAT_TEMPLATE`): a reply ends at any of `CHAT_STOP_TOKENS`, as in the official `chat()`.

Only the standard library is imported here: this file goes into Hub repos with the rest of the remote code.
"""

import numbers
import re
import unicodedata

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
# (start, end) tag pairs of the multimodal markup, in vocabulary order; `<imgpad>` follows them.
REF_TAGS = ("<ref>", "</ref>")
BOX_TAGS = ("<box>", "</box>")
QUAD_TAGS = ("<quad>", "</quad>")
IMAGE_TAGS = ("<img>", "</img>")
IMAGE_PAD = "<imgpad>"
# Ids follow the BPE ranks in exactly this order.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRAS, *REF_TAGS, *BOX_TAGS, *QUAD_TAGS, *IMAGE_TAGS, IMAGE_PAD)
# ChatML control tokens: only the chat template writes them; typed inside a message they stay plain text.
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRAS)
# The official `IMAGE_ST`: the only special tokens the official `make_context` recognises inside message content.
IMAGE_ST = (*REF_TAGS, *BOX_TAGS, *QUAD_TAGS, *IMAGE_TAGS, IMAGE_PAD)
# A ChatML reply ends at the first of these (the official chat's stop words: `<|im_end|>`, `<|im_start|>`, and the
# end of the document).
CHAT_STOP_TOKENS = (IM_END, IM_START, ENDOFTEXT)

# Positions between `<img>` and `</img>`: the number of image features the model writes there (the official 256;
# a model with another `visual["n_queries"]` saves its own as the tokenizer's `image_span_length`).
IMAGE_SPAN_LENGTH = 256
EMPTY_IMAGE_SPAN = IMAGE_TAGS[0] + IMAGE_TAGS[1]
# Box coordinates are integers in [0, BOX_SCALE), relative to the image size.
BOX_SCALE = 1000

# The paired tags of the multimodal markup; they do not nest.
MARKUP_TAGS = (IMAGE_TAGS, REF_TAGS, BOX_TAGS, QUAD_TAGS)
CLOSING_TAGS = tuple(tags[1] for tags in MARKUP_TAGS)
# Any paired tag; any markup token (the paired tags and `<imgpad>`), which plain values (paths, phrases) may not hold.
MARKUP_TAG = re.compile("|".join(re.escape(tag) for tags in MARKUP_TAGS for tag in tags))
MARKUP_TOKEN = re.compile(f"{MARKUP_TAG.pattern}|{re.escape(IMAGE_PAD)}")
# An image span and its path; an opening tag closes at the first `</img>` after it (as the tokenizer pairs them).
IMAGE_SPAN = re.compile(re.escape(IMAGE_TAGS[0]) + "(.*?)" + re.escape(IMAGE_TAGS[1]), re.DOTALL)
IMAGE_TAG = re.compile("|".join(map(re.escape, IMAGE_TAGS)))
# Grounding in generated text. A point holds at most 4 digits per coordinate (longer numbers make the box malformed,
# so no digit string can make int() slow); tag contents may not hold another grounding tag, so an unclosed tag
# cannot swallow the ones after it.
_POINT = r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)"
BOX_BODY = re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*")
QUAD_BODY = re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*")
_GROUNDING_TAG = r"</?(?:ref|box|quad)>"
_CONTENT = rf"(?:(?!{_GROUNDING_TAG}).)*?"
GROUNDING = re.compile(
    rf"<ref>(?P<ref>{_CONTENT})</ref>|<(?P<tag>box|quad)>(?P<body>{_CONTENT})</(?P=tag)>", re.DOTALL
)


def check_markup(text: str, name: str = "text") -> None:
    """
    Raise a `ValueError` naming `name` and the position unless every `<img>`, `<ref>`, `<box>` and `<quad>` in
    `text` is closed by its own closing tag before any other tag opens.
    """
    opened = None  # (tag, position) of the open tag
    for match in MARKUP_TAG.finditer(text):
        tag, position = match.group(), match.start()
        if opened is None and tag in CLOSING_TAGS:
            raise ValueError(
                f"{name}: {tag} at character {position} closes nothing; remove it or add {'<' + tag[2:]} before it."
            )
        if opened is None:
            opened = (tag, position)
        elif tag == "</" + opened[0][1:]:
            opened = None
        else:
            raise ValueError(
                f"{name}: {tag} at character {position} is inside {opened[0]} (opened at character {opened[1]}); "
                f"tags do not nest: close {opened[0]} with {'</' + opened[0][1:]} first."
            )
    if opened is not None:
        raise ValueError(
            f"{name}: {opened[0]} at character {opened[1]} is never closed; add {'</' + opened[0][1:]} after its "
            "content."
        )


def check_plain(value: str, name: str) -> None:
    """A value placed between tags (a path, a phrase) holds no markup token, nor starts with a mark that NFC merges
    into the tag before it."""
    if match := MARKUP_TOKEN.search(value):
        raise ValueError(f"{name} contains the tag {match.group()}: remove it (tags cannot appear inside {name})")
    check_after_tag(value, name)


def check_after_tag(value: str, name: str) -> None:
    """`value` follows a tag's '>': NFC must not merge its first characters into that '>' (e.g. U+0338 gives U+226F)."""
    if value and unicodedata.normalize("NFC", ">" + value)[0] != ">":
        raise ValueError(
            f"{name} starts with {value[0]!r}, which Unicode normalisation (NFC) merges into the '>' of the tag before "
            "it, breaking the markup: start it with another character (e.g. a space)"
        )


def grid_box_text(box, name: str = "box") -> str:
    """`<box>(x1,y1),(x2,y2)</box>` for a box already on the grid: 4 integers in [0, 1000), x1 <= x2 and y1 <= y2;
    anything else raises a `ValueError` naming `name` (see the module docstring for the rule)."""
    is_box = (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box)
    )
    if not is_box:
        raise ValueError(f"{name} must be a box [x1, y1, x2, y2] of 4 integers in [0, {BOX_SCALE}), got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 <= x2 < BOX_SCALE and 0 <= y1 <= y2 < BOX_SCALE):
        raise ValueError(
            f"{name} {list(box)!r} must be the top-left then bottom-right corner, integers in [0, {BOX_SCALE}) with "
            "x1 <= x2 and y1 <= y2 (relative to the image size: grounding_qwen_vl.box_to_text converts pixels)"
        )
    return point_box_text(x1, y1, x2, y2)


def point_box_text(x1: int, y1: int, x2: int, y2: int) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` of grid integers, written as the official models write them."""
    return f"{BOX_TAGS[0]}({x1},{y1}),({x2},{y2}){BOX_TAGS[1]}"


def from_list_format(list_format: list[dict], image_span_length: int = IMAGE_SPAN_LENGTH) -> str:
    """
    Build a query from official list-format elements: `{"image": path}` -> `Picture N:<img>path</img>\\n` (N from 1),
    `{"text": t}` -> t, `{"ref": r, "box": [[x1, y1, x2, y2], ...]}` -> `<ref>r</ref><box>(x1,y1),(x2,y2)</box>` per
    box (`ref` and `box` may each appear alone).

    Raises a `ValueError` naming the element for: a path longer than `image_span_length` bytes, markup tags in a path
    or ref, unclosed or nested tags in a text, a box off the grid (`grid_box_text`), and a value starting with a
    combining mark that NFC would merge into the preceding tag.
    """
    if not isinstance(list_format, (list, tuple)):
        raise TypeError(f"list_format must be a list of dicts, got {type(list_format).__name__}")
    text = ""
    num_images = 0
    for index, element in enumerate(list_format):
        name = f"list_format[{index}]"
        if not isinstance(element, dict):
            raise TypeError(f"{name} must be a dict, got {type(element).__name__}: {element!r}")
        keys = set(element)
        if not all(isinstance(element[key], str) for key in keys & {"image", "text", "ref"}):
            raise TypeError(f"{name}: 'image', 'text' and 'ref' values must be str, got {element!r}")
        if keys == {"image"}:
            path = element["image"]
            check_plain(path, f"{name}['image']")
            if len(path.encode()) > image_span_length:
                raise ValueError(
                    f"{name}: image path {path[:60]!r}... is {len(path.encode())} bytes long, more than the "
                    f"{image_span_length} an image span holds: use a shorter path"
                )
            num_images += 1
            text += f"Picture {num_images}:{IMAGE_TAGS[0]}{path}{IMAGE_TAGS[1]}\n"
        elif keys == {"text"}:
            check_markup(unicodedata.normalize("NFC", element["text"]), f"{name}['text']")
            if text.endswith(CLOSING_TAGS):
                check_after_tag(element["text"], f"{name}['text']")
            text += element["text"]
        elif keys and keys <= {"ref", "box"}:
            if "ref" in element:
                check_plain(element["ref"], f"{name}['ref']")
                text += REF_TAGS[0] + element["ref"] + REF_TAGS[1]
            boxes = element.get("box", [])
            if not isinstance(boxes, (list, tuple)):
                raise ValueError(f"{name}: 'box' must be a list of boxes [x1, y1, x2, y2], got {boxes!r}")
            text += "".join(grid_box_text(box, f"{name}: box") for box in boxes)
        else:
            raise ValueError(
                f"Unsupported list_format element {name} = {element!r}: use {{'image': path}}, {{'text': text}} or "
                "{'ref': phrase, 'box': [[x1, y1, x2, y2], ...]}"
            )
    return text


def to_list_format(text: str) -> list[dict[str, str]]:
    """
    Split text at closed `<img>`, `<ref>`, `<box>`, `<quad>` pairs into `{"image"|"ref"|"box"|"quad": content}`
    elements, the text between them into `{"text": ...}` elements, as the official helper does (lenient: tags are not
    validated, box contents stay strings). It inverts `from_list_format` up to that helper's markup: an image comes
    back as `{"text": "Picture N:"}, {"image": path}, {"text": "\\n"}` (texts merged with their neighbours), a box as
    its string `"(x1,y1),(x2,y2)"`, and texts in NFC.
    """
    if not isinstance(text, str):
        raise TypeError(f"to_list_format expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    kinds = {IMAGE_TAGS: "image", REF_TAGS: "ref", BOX_TAGS: "box", QUAD_TAGS: "quad"}
    elements = []
    position = 0
    while True:
        found = [(text.find(tags[0], position), tags) for tags in kinds]
        found = [(start, tags) for start, tags in found if start != -1]
        if not found:
            break
        start, tags = min(found)
        end = text.find(tags[1], start + len(tags[0]))
        if end == -1:
            raise ValueError(f"Unclosed {tags[0]} at character {start}: close it with {tags[1]}")
        if start > position:
            elements.append({"text": text[position:start]})
        elements.append({kinds[tags]: text[start + len(tags[0]) : end]})
        position = end + len(tags[1])
    if position < len(text):
        elements.append({"text": text[position:]})
    return elements


# ChatML as used by Qwen-VL-Chat (default system message "You are a helpful assistant."). Image items become
# "Picture N: <img>PATH</img>\n" (N counts the images of the whole conversation). An image that is not a path or URL
# string (e.g. a PIL image, which transformers shows to templates as the placeholder "<Image>") leaves the span empty,
# and the tokenizer fills it with <imgpad>. Each assistant reply and its <|im_end|> form a `{% generation %}` span:
# the tokens that `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`) trains.
CHAT_TEMPLATE = r"""{%- set images = namespace(count=0) -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- set content -%}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'text' -%}
{{- item['text'] -}}
{%- elif item['type'] == 'image' -%}
{%- set images.count = images.count + 1 -%}
{%- set source = item['image'] if 'image' in item else (item['url'] if 'url' in item else item['path']) -%}
{%- set is_path = source is string and not (source.startswith('<') and source.endswith('>')) -%}
{{- 'Picture ' ~ images.count ~ ': <img>' ~ (source if is_path else '') ~ '</img>\n' -}}
{%- else -%}
{{- raise_exception("Unsupported content item type '" ~ item['type'] ~ "': use 'text' or 'image'.") -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endset -%}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}
{%- else -%}
{{- content + '<|im_end|>' -}}
{%- endif -%}
{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '\n<|im_start|>assistant\n' -}}
{%- endif -%}"""
