"""Training data: `datasets` loaders and the rendering of records into text with image spans.

A record is rendered to an [`Example`]: text with one empty `<img></img>` span per image, the image references (paths,
`{"bytes", "path"}` dicts or PIL images, opened later by the collator) and what to train on. Renderers raise
[`BadRecordError`] on records that cannot be trained on; the collator skips and counts them.

Record formats:
- pre-training (`render_caption_pair`): `{"image", "caption"}`, or WebDataset samples (`jpg`/`png`/... + `txt`);
- multi-task (`render_task`): `{"task", "image", ...}` with the fields of `formats.TASK_FORMATS[task]`;
- SFT (`render_dialogue`): the official Qwen-VL fine-tuning JSON
  (`{"conversations": [{"from": "user", "value": "Picture 1: <img>path</img>\\n..."}, ...]}`) or TRL's
  messages+images (`{"messages": [{"role", "content": [{"type": "image"}, {"type": "text", "text"}]}], "images"}`).
"""

import os
import string
from dataclasses import dataclass, field
from glob import glob

import datasets
import PIL.Image

from modeling_qwen_vl.image_processing_qwen_vl import load_image
from modeling_qwen_vl.text_format import (
    EMPTY_IMAGE_SPAN,
    IM_END,
    IM_START,
    IMAGE_SPAN,
    IMAGE_TAGS,
    check_markup,
    grid_box_text,
)

from .formats import EOS, TASK_FORMATS

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tar": "webdataset"}
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "txt", "text")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Special tokens that only the templates may write: in record text they would corrupt the format and the labels.
RESERVED_TOKENS = (IM_START, IM_END, EOS)


class BadRecordError(ValueError):
    """A record that cannot be trained on; `reason` is one of `malformed`, `missing_image`, `corrupt_image`,
    `outside_image_root`, `too_long`, `no_targets`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Example:
    """A rendered record.

    `text` holds one empty `<img></img>` span per entry of `images`, in order. With `completion` set, `text` is an
    untrained prompt followed by the trained `completion`; with `completion=None`, `text` is a ChatML dialogue whose
    assistant replies are trained. Packing only puts examples of the same `task` together.
    """

    text: str
    images: list = field(default_factory=list)
    completion: str | None = None
    task: str = "chat"


def _check_record_markup(text: str) -> None:
    """`text_format.check_markup`, failing as a `malformed` `BadRecordError`."""
    try:
        check_markup(text, repr(text[:120]))
    except ValueError as error:
        raise BadRecordError("malformed", str(error)) from None


def _check_text(value, what: str) -> str:
    """A record string: a str without reserved special tokens and with well-formed markup."""
    if not isinstance(value, str):
        raise BadRecordError("malformed", f"{what} must be a string, got {type(value).__name__}")
    reserved = [token for token in RESERVED_TOKENS if token in value]
    if reserved:
        raise BadRecordError("malformed", f"{what} contains the reserved token(s) {reserved}")
    _check_record_markup(value)
    return value


def _fill(template: str, record: dict, task: str) -> str:
    """`template` with its `{field}`s taken from `record`; `box` is a box on the 0-1000 grid, which must hold
    (`text_format.grid_box_text`), written as `<box>(x1,y1),(x2,y2)</box>`."""
    values = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if record.get(name) is None:
            raise BadRecordError("malformed", f"task {task!r} needs the field {name!r}")
        if name == "box":
            try:
                values[name] = grid_box_text(record[name])
            except ValueError as error:
                raise BadRecordError("malformed", f"bad box {record[name]!r}: {error}") from None
        else:
            values[name] = _check_text(record[name], f"field {name!r}")
            if IMAGE_TAGS[0] in values[name]:
                raise BadRecordError("malformed", f"field {name!r} contains an image span; images go in 'image'")
    return template.format(**values)


def _check_record(record) -> dict:
    """A record must be a mapping (a JSON object); anything else (None, a list, a number) is malformed."""
    if not isinstance(record, dict):
        raise BadRecordError(
            "malformed", f"a record must be a JSON object, got {type(record).__name__}: {record!r:.80}"
        )
    return record


def _check_list(value, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise BadRecordError("malformed", f"{what} must be a list, got {type(value).__name__}: {value!r:.80}")
    return list(value)


def render_task(record: dict, tokenizer=None) -> Example:
    """Multi-task pre-training: `record["task"]` names a format of `TASK_FORMATS`; its image is `record["image"]`."""
    task = _check_record(record).get("task")
    if not isinstance(task, str) or task not in TASK_FORMATS:
        raise BadRecordError("malformed", f"unknown task {task!r}; expected one of {sorted(TASK_FORMATS)}")
    prompt, completion = TASK_FORMATS[task]
    images = [record.get("image")] * prompt.count(IMAGE_TAGS[0])
    if None in images:
        raise BadRecordError("missing_image", f"task {task!r} needs the field 'image'")
    text = _fill(prompt, record, task)
    completion = _fill(completion, record, task) + EOS
    _check_record_markup(text + completion)
    return Example(text=text, images=images, completion=completion, task=task)


def render_caption_pair(record: dict, tokenizer=None) -> Example:
    """Stage-1 pre-training: an image-caption pair in the `caption` format (WebDataset keys accepted)."""
    _check_record(record)
    image = next((record[key] for key in IMAGE_KEYS if record.get(key) is not None), None)
    caption = next((record[key] for key in CAPTION_KEYS if record.get(key) is not None), None)
    if image is None:
        raise BadRecordError("missing_image", f"no image under any of {IMAGE_KEYS}")
    if caption is None:
        raise BadRecordError("malformed", f"no caption under any of {CAPTION_KEYS}")
    return render_task({"task": "caption", "image": image, "caption": caption})


def _official_messages(conversations) -> tuple[list[dict], list]:
    """Official fine-tuning turns -> (messages, image paths); each `<img>path</img>` becomes an empty span."""
    messages, images = [], []
    for turn in _check_list(conversations, "'conversations'"):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) and isinstance(turn.get("from"), str) else None
        if role is None:
            raise BadRecordError("malformed", f"turn {turn!r} needs 'from' in {sorted(ROLES)} and a 'value'")
        content = _check_text(turn.get("value"), f"{role} turn")
        images += IMAGE_SPAN.findall(content)
        messages.append({"role": role, "content": IMAGE_SPAN.sub(EMPTY_IMAGE_SPAN, content)})
    return messages, images


def _trl_messages(messages, images) -> tuple[list[dict], list]:
    """TRL messages (string content, or lists of `{"type": "image"}` / `{"type": "text", "text"}` items)."""
    rendered, placeholders = [], 0
    for message in _check_list(messages, "'messages'"):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise BadRecordError("malformed", f"message {message!r} needs a role among system/user/assistant")
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "image":
                    placeholders += 1
                    items.append({"type": "image"})
                elif kind == "text":
                    items.append({"type": "text", "text": _check_text(item.get("text"), f"{role} text")})
                else:
                    raise BadRecordError("malformed", f"content item {item!r} is neither text nor image")
            content = items
        else:
            content = _check_text(content, f"{role} message")
        rendered.append({"role": role, "content": content})
    images = [] if images is None else _check_list(images, "'images'")
    if placeholders != len(images):
        raise BadRecordError("malformed", f"{placeholders} image placeholders but {len(images)} images")
    return rendered, images


def render_dialogue(record: dict, tokenizer) -> Example:
    """SFT: a dialogue rendered with the tokenizer's ChatML template (default system message when none is given)."""
    if _check_record(record).get("conversations") is not None:
        messages, images = _official_messages(record["conversations"])
    elif record.get("messages") is not None:
        messages, images = _trl_messages(record["messages"], record.get("images"))
    else:
        raise BadRecordError("malformed", "a dialogue needs 'conversations' (official format) or 'messages' (TRL)")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles or "system" in roles[1:]:
        raise BadRecordError("malformed", f"roles {roles}: need an assistant reply and at most a leading system")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    _check_record_markup(text)
    if (spans := text.count(IMAGE_TAGS[0])) != len(images):
        raise BadRecordError("malformed", f"{spans} image spans but {len(images)} images")
    return Example(text=text, images=images)


def load_record_image(
    reference, image_root: str | None = None, allow_outside_image_root: bool = False
) -> PIL.Image.Image:
    """Open a record's image reference (path, `{"bytes", "path"}` dict, PIL image) as RGB, fully decoded, with
    `image_processing_qwen_vl.load_image`; what this adds is the record policy: where paths may point, and which
    `BadRecordError` reason each failure is.

    Relative paths are resolved against `image_root`. With an `image_root`, only files inside it are opened: a path
    that leaves it (`../`, an absolute path elsewhere, a symlink pointing out) is refused as `outside_image_root`
    unless `allow_outside_image_root=True`. Raises `BadRecordError` (`missing_image`, `corrupt_image`,
    `outside_image_root`).
    """
    if isinstance(reference, PIL.Image.Image):
        return reference.convert("RGB")
    if isinstance(reference, dict) and reference.get("bytes"):
        if not isinstance(reference["bytes"], (bytes, bytearray)):
            raise BadRecordError("malformed", f"image 'bytes' must be bytes, got {type(reference['bytes']).__name__}")
        source = bytes(reference["bytes"])
    else:
        source = reference.get("path") if isinstance(reference, dict) else reference
        if not isinstance(source, str) or not source:
            raise BadRecordError("missing_image", f"no image in {reference!r}")
        if source.startswith(("http://", "https://")):
            raise BadRecordError("missing_image", f"remote image {source!r}: download the images first")
        if image_root:
            source = _inside_root(source, image_root, allow_outside_image_root)
        if not os.path.isfile(source):
            raise BadRecordError("missing_image", f"no image file {source!r}")
    try:
        return load_image(source)  # decodes every pixel: truncated files fail here, not in the model
    except ValueError as error:
        raise BadRecordError("corrupt_image", str(error)) from None


def _inside_root(source: str, image_root: str, allow_outside: bool) -> str:
    """`source` (relative to `image_root`, or absolute) resolved through symlinks; it must stay inside the root."""
    root = os.path.realpath(image_root)
    try:
        resolved = os.path.realpath(os.path.join(root, source))
    except (OSError, ValueError) as error:  # e.g. a NUL byte in the path
        raise BadRecordError("missing_image", f"unusable image path {source!r}: {error}") from None
    if not allow_outside and os.path.commonpath([root, resolved]) != root:
        raise BadRecordError(
            "outside_image_root",
            f"image {source!r} resolves to {resolved!r}, outside image_root {image_root!r} (pass "
            "allow_outside_image_root / --allow_images_outside_root true to read it anyway)",
        )
    return resolved


def _local_files(entry: str) -> list[str]:
    """The files an entry names: a file, a glob, or a directory's files with a known extension."""
    if os.path.isdir(entry):
        return sorted(os.path.join(entry, name) for name in os.listdir(entry) if _builder(name))
    return sorted(glob(entry))


def _builder(path: str) -> str | None:
    return next((builder for suffix, builder in LOCAL_BUILDERS.items() if path.endswith(suffix)), None)


def load_records(
    data: list[str] | str, split: str = "train", name: str | None = None, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Load training records with `datasets`, images left undecoded (the collator opens them).

    `data`: local JSON/JSONL/Parquet files, WebDataset `.tar` shards (globs and directories accepted; all of one
    format), or a single Hub dataset name (`name` = its configuration). `streaming=True` reads lazily, for
    pre-training-scale corpora.
    """
    entries = [data] if isinstance(data, str) else list(data)
    if not entries:
        raise ValueError("No training data: pass --data with files, shard globs, directories or a Hub dataset name.")
    local = {entry: _local_files(entry) for entry in entries}
    if len(entries) == 1 and not local[entries[0]] and not os.path.exists(entries[0]):
        dataset = datasets.load_dataset(entries[0], name, split=split, streaming=streaming)
    else:
        missing = [entry for entry, files in local.items() if not files]
        if missing:
            raise ValueError(f"No data files found for {missing} (a Hub dataset must be the only --data entry).")
        files = [path for entry in entries for path in local[entry]]
        builders = {_builder(path) for path in files}
        if None in builders or len(builders) != 1:
            raise ValueError(
                f"Data files must all be one of {sorted(LOCAL_BUILDERS)} (JSON/JSONL, Parquet or WebDataset shards), "
                f"got {files[:5]}{'...' if len(files) > 5 else ''}."
            )
        dataset = datasets.load_dataset(builders.pop(), data_files={split: files}, split=split, streaming=streaming)
    return _without_image_decoding(dataset)


def text_length(value) -> int:
    """Characters of text in a record (its strings, nested lists and dicts included; image bytes left out).

    What `train_sampling_strategy: group_by_length` sorts records by: batches of records of similar length pad
    less. Characters stand in for tokens, which would mean tokenizing every record before training starts."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_length(item) for key, item in value.items() if key != "bytes")
    if isinstance(value, (list, tuple)):
        return sum(text_length(item) for item in value)
    return 0


def with_text_lengths(dataset: datasets.Dataset, column: str = "length") -> datasets.Dataset:
    """`dataset` with a `column` of each record's `text_length` (kept if it is there), for `LengthGroupedSampler`."""
    if column in dataset.column_names:
        return dataset
    text_columns = [name for name, feature in dataset.features.items() if not _is_image_feature(feature)]
    return dataset.add_column(column, [text_length(record) for record in dataset.select_columns(text_columns)])


def _is_image_feature(feature) -> bool:
    """Whether a column holds an image or a list of images."""
    return isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image)
    )


def _without_image_decoding(dataset):
    """Keep images as `{"bytes", "path"}` so they are opened (and bad ones caught) in the collator."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.decode(False)
    features = dataset.features.copy()
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            features[column] = datasets.Image(decode=False)
        elif _is_image_feature(feature):
            features[column] = datasets.List(datasets.Image(decode=False), length=feature.length)
    return dataset if features == dataset.features else dataset.cast(features)
