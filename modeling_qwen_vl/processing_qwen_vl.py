"""Processor of Qwen-VL: the tokenizer's `<img>...</img>` spans paired with the image processor's `pixel_values`."""

import unicodedata

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs

from .grounding_qwen_vl import check_phrase, draw_grounding, parse_grounding
from .image_processing_qwen_vl import (
    REMOTE_IMAGE_MAX_BYTES,
    REMOTE_IMAGE_TIMEOUT,
    QwenVLImageProcessor,
    decode_image,
    load_image,
)
from .text_format import EMPTY_IMAGE_SPAN, IMAGE_SPAN, check_markup
from .tokenization_qwen_vl import QwenVLTokenizer

# Tokenizer keyword arguments applied when the rows are padded together (after truncation and the length check).
PADDING_KWARGS = ("padding", "pad_to_multiple_of", "padding_side", "return_attention_mask")


class QwenVLProcessorKwargs(ProcessingKwargs, total=False):
    """
    `allow_remote_images`: fetch http(s) images (off by default: no network access unless asked for), each within
    `remote_image_timeout` seconds (default 10) and `remote_image_max_bytes` bytes (default 20 MiB).
    """

    allow_remote_images: bool
    remote_image_timeout: float
    remote_image_max_bytes: int


class QwenVLProcessor(ProcessorMixin):
    r"""
    Qwen-VL processor: [`QwenVLImageProcessor`] and [`QwenVLTokenizer`] in one call.

    Text marks each image with an `<img>...</img>` span (`"Picture 1: <img>cat.png</img>\nWhat is it?"`). When
    `images` are given and no row has a span, each row gets `Picture 1: <img></img>\n`, `Picture 2: <img></img>\n`...
    (the chat template's layout) for its images in front, so `processor(images=image, text="A photo of")` works. Images
    are matched to the spans in order, row by row:
    - `images` given: one image (PIL image, array, local path) per span, as a flat list or as one list per row (rows
      without images get `[]`); the spans are emptied, so the model input holds `<img>`, the tokenizer's
      `image_span_length` (256) `<imgpad>`, `</img>` (the model overwrites those positions with image features);
    - `images=None`: every span must name a local file, which is loaded, and the ids keep the path bytes as the
      official tokenizer writes them.
    URLs are only fetched with `allow_remote_images=True`. Batches are padded on the left (for generation) unless
    `padding_side` says otherwise.

    Rows longer than `max_length` (default: the tokenizer's `model_max_length`, when set) raise a `ValueError` unless
    `truncation=True`, which cuts them to that length on the tokenizer's `truncation_side`; images whose spans are cut
    away are dropped with them, and a cut through an image span raises instead. Malformed input (empty rows, unclosed
    or nested `<img>`/`<ref>`/`<box>`/`<quad>` tags, image counts that do not match the spans, unreadable images)
    raises a `ValueError` naming the row or image.

    Args:
        image_processor ([`QwenVLImageProcessor`]): Image preprocessing.
        tokenizer ([`QwenVLTokenizer`]): Tokenizer.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's ChatML template.
    """

    _auto_class = "AutoProcessor"  # save_pretrained copies the remote-code files next to processor_config.json
    valid_processor_kwargs = QwenVLProcessorKwargs
    # Call defaults, overridable per call (see `ProcessorMixin._merge_kwargs`).
    text_kwargs = {"padding": True, "padding_side": "left"}
    allow_remote_images = False
    remote_image_timeout = REMOTE_IMAGE_TIMEOUT
    remote_image_max_bytes = REMOTE_IMAGE_MAX_BYTES

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def for_model(cls, config, tokenizer: QwenVLTokenizer) -> "QwenVLProcessor":
        """The processor of a model with `config`: square images of the model's `visual["image_size"]` (the size
        the model's `pixel_values` must have), text through `tokenizer`."""
        size = config.vision.image_size
        return cls(QwenVLImageProcessor(size={"height": size, "width": size}), tokenizer)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """
        Tokenize `text` (a str or a list of str) and preprocess the image of each `<img>...</img>` span; returns
        `input_ids`, `attention_mask` and, when there are images, `pixel_values` `[N, 3, S, S]`. With
        `return_offsets_mapping=True` also `offset_mapping` (the characters of the row behind each id, `(0, 0)` on
        padding) and with `return_text_replacement_offsets=True` the edits made to each row before tokenizing
        (image prefixes, emptied spans), as transformers uses them to build assistant masks.
        """
        output_kwargs = self._merge_kwargs(
            QwenVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        remote = {
            "allow_remote": output_kwargs["allow_remote_images"],
            "timeout": output_kwargs["remote_image_timeout"],
            "max_bytes": output_kwargs["remote_image_max_bytes"],
        }
        if text is None:
            if images is None:
                raise ValueError("Pass `text` (with one <img></img> span per image), `images`, or both.")
            named = [(f"images[{index}]", image) for index, image in enumerate(_flatten_images(images))]
            return self.image_processor(_load_images(named, remote), **output_kwargs["images_kwargs"])

        texts = _check_texts(text)
        row_spans = [IMAGE_SPAN.findall(sample) for sample in texts]
        edits = [[] for _ in texts]  # how the text was changed, as transformers' `text_replacement_offsets`
        if images is not None and not any(row_spans):
            texts, edits = _prefix_images(texts, images)
            row_spans = [IMAGE_SPAN.findall(sample) for sample in texts]
        if images is None:
            row_images = [[(path, path) for path in spans] for spans in row_spans]  # a path names itself
            empty = sum(not path for spans in row_spans for path in spans)
            if empty:
                raise ValueError(
                    f"Got 0 images for {sum(map(len, row_spans))} <img></img> spans, {empty} of them empty: pass "
                    "`images` (one per span, in order) or write a local image path inside each span."
                )
        else:
            row_images = _match_images(images, row_spans)
            emptied = [_empty_image_spans(sample) for sample in texts]
            texts, edits = [sample for sample, _ in emptied], [old + new for old, (_, new) in zip(edits, emptied)]

        text_kwargs = dict(output_kwargs["text_kwargs"])
        return_edits = text_kwargs.pop(
            "return_text_replacement_offsets", output_kwargs.get("return_text_replacement_offsets")
        )
        data, row_images = self._tokenize(texts, row_images, text_kwargs)
        if return_edits:
            data["text_replacement_offsets"] = edits
        named = [item for items in row_images for item in items]
        if named:
            data.update(self.image_processor(_load_images(named, remote), **output_kwargs["images_kwargs"]))
        return BatchFeature(
            data,
            tensor_type=output_kwargs["text_kwargs"].get("return_tensors"),
            skip_tensor_conversion=self.skip_tensor_conversion,
        )

    def _tokenize(self, texts: list[str], row_images: list[list], text_kwargs: dict) -> tuple[dict, list[list]]:
        """
        Tokenize the rows, check or truncate their lengths, keep the images whose spans survive truncation, then pad.
        """
        tokenizer = self.tokenizer
        text_kwargs.pop("return_tensors", None)
        padding_kwargs = {key: text_kwargs.pop(key) for key in PADDING_KWARGS if key in text_kwargs}
        truncation = text_kwargs.pop("truncation", None)
        truncate = truncation not in (None, False, "do_not_truncate")
        max_length = text_kwargs.pop("max_length", None)
        limit = max_length or tokenizer.model_max_length
        rows = []
        for row, sample in enumerate(texts):
            try:
                encoded = tokenizer(
                    sample,
                    padding=False,
                    truncation=truncation if truncate else False,
                    max_length=limit if truncate else None,
                    return_attention_mask=padding_kwargs.get("return_attention_mask"),
                    **text_kwargs,
                )
            except ValueError as error:
                raise ValueError(f"text[{row}]: {error}") from error
            rows.append(encoded)
        encoding = {key: [encoded[key] for encoded in rows] for key in rows[0]}
        offsets = encoding.pop("offset_mapping", None)  # padded below: the tokenizer's `pad` leaves it alone
        for row, ids in enumerate(encoding["input_ids"]):
            if len(ids) > limit:
                source = f"max_length={limit}" if max_length else f"the tokenizer's model_max_length ({limit})"
                raise ValueError(
                    f"text[{row}] is {len(ids)} tokens long, more than {source}: shorten it, or pass truncation=True "
                    "to cut it (image spans are kept whole or dropped with their images)."
                )
            images, kept = row_images[row], ids.count(tokenizer.img_start_id)
            if kept < len(images):  # truncation removed whole image spans: drop their images too
                right = tokenizer.truncation_side == "right"
                row_images[row] = images[:kept] if right else images[len(images) - kept :]
        if padding_kwargs.get("padding") == "max_length":
            padding_kwargs["max_length"] = max_length
        encoding = dict(tokenizer.pad(encoding, **padding_kwargs))
        if offsets is not None:
            left = padding_kwargs.get("padding_side", tokenizer.padding_side) == "left"
            width = max(map(len, encoding["input_ids"]))
            padding = [[(0, 0)] * (width - len(row)) for row in offsets]
            encoding["offset_mapping"] = [pad + row if left else row + pad for pad, row in zip(padding, offsets)]
        return encoding, row_images

    def apply_chat_template(self, conversation, *args, sanitize_control_tokens: bool | None = None, **kwargs):
        """
        transformers' `apply_chat_template`; when tokenizing, ChatML control tokens typed inside messages stay plain
        text by default, as in the official `make_context` (see [`QwenVLTokenizer.apply_chat_template`]). Pass
        `sanitize_control_tokens=False` for trusted input whose control tokens should act as such.

        `return_assistant_tokens_mask=True` (what TRL's `assistant_only_loss=True` asks for) returns
        `assistant_masks`: 1 on the tokens of each assistant reply and its `<|im_end|>` (the template's
        `{% generation %}` spans), 0 elsewhere, image spans included.
        """
        if sanitize_control_tokens is None:
            sanitize_control_tokens = bool(kwargs.get("tokenize"))
        return super().apply_chat_template(
            conversation, *args, sanitize_control_tokens=sanitize_control_tokens, **kwargs
        )

    def _multimodal_inputs_from_conversations(self, conversations, *args, **kwargs):
        """
        Check every message item before transformers collects (and, for audio and video, loads) the media of a
        conversation: only `text` and `image` items are accepted, so no audio or video file or URL is ever opened.
        Images are opened later by `__call__` (URLs only with `allow_remote_images=True`).
        """
        _check_conversations(conversations)
        return super()._multimodal_inputs_from_conversations(conversations, *args, **kwargs)

    def _prepare_processor_kwargs(
        self,
        chat_template: str,
        processor_kwargs: dict,
        kwargs: dict,
        add_generation_prompt: bool,
        continue_final_message: bool,
        return_assistant_tokens_mask: bool,
    ) -> dict:
        """
        transformers' preparation, without its requirement of a fast tokenizer for `return_assistant_tokens_mask`:
        this processor returns the `offset_mapping` (characters of the rendered chat behind each id, see
        [`QwenVLTokenizer._encode_plus`]) and `text_replacement_offsets` that transformers builds the mask from.
        """
        if return_assistant_tokens_mask and continue_final_message:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        processor_kwargs = super()._prepare_processor_kwargs(
            chat_template, processor_kwargs, kwargs, add_generation_prompt, continue_final_message, False
        )
        if return_assistant_tokens_mask:
            processor_kwargs = {
                **processor_kwargs,
                "return_offsets_mapping": True,
                "return_text_replacement_offsets": True,
            }
        return processor_kwargs

    def post_process_grounding(self, text: str, image_size: tuple[int, int] | None = None) -> list[dict]:
        """Boxes (and phrases) in the generated `text`, in pixels of an image of `image_size=(width, height)`."""
        return parse_grounding(text, image_size)

    def draw_grounding(self, image: PIL.Image.Image, text: str, **kwargs) -> PIL.Image.Image:
        """A copy of `image` with the boxes of the generated `text` drawn and labelled."""
        return draw_grounding(image, text, **kwargs)

    def ground(
        self,
        model,
        image,
        phrase: str,
        *,
        prompt: str | None = None,
        save_to: str | None = None,
        max_new_tokens: int = 48,
        **generate_kwargs,
    ) -> list[dict]:
        """Locate the referring expression `phrase` in `image` with `model`.

        Returns `[{"phrase": str, "box": (x1, y1, x2, y2)}]` in pixels of `image` (empty when the model writes no
        box), and with `save_to` also saves a copy of the image with the boxes drawn. A chat model (generation config
        `chat_format: chatml`) is asked `prompt` (default `"Where is {phrase}?"`) in ChatML; a pre-trained model
        continues the official referring-expression prompt `<img></img><ref>{phrase}</ref>`. Decoding is greedy
        unless `generate_kwargs` say otherwise.
        """
        check_phrase(phrase)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(
                f"`prompt` must be a str template using {{phrase}} (and {{ref}}), got {type(prompt).__name__}."
            )
        image = load_image(image) if isinstance(image, str) else image
        chat = getattr(model.generation_config, "chat_format", None) == "chatml"
        prefix = "" if chat else f"<ref>{phrase}</ref>"
        try:
            query = (prompt or ("Where is {phrase}?" if chat else "<img></img>{ref}")).format(ref=prefix, phrase=phrase)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"`prompt` {prompt!r} is not a template of {{phrase}} and {{ref}} ({error!r}); "
                "write braces as {{{{ }}}}."
            ) from error
        if chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}]
            text = self.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = query
        inputs = self(text=text, images=[image], return_tensors="pt").to(model.device)
        generate_kwargs.setdefault("do_sample", False)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        boxes = [
            {"phrase": found["phrase"] or phrase, "box": found["box"]}
            for found in parse_grounding(prefix + answer, getattr(image, "size", None))
        ]
        if save_to is not None:
            draw_grounding(image, boxes).save(save_to)
        return boxes

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors with their own classes, so no Auto-class registration is needed."""
        kwargs.pop("subfolder", None)
        return [
            QwenVLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            QwenVLTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]


def _check_texts(text) -> list[str]:
    """`text` as a list of non-empty rows whose multimodal tags are well formed."""
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
        raise TypeError(f"`text` must be a str or a list of str, got {type(text).__name__}")
    if not texts:
        raise ValueError("`text` is an empty list: pass at least one row of text.")
    for row, sample in enumerate(texts):
        if not sample:
            raise ValueError(f"text[{row}] is empty: give every row some text (e.g. a question), or drop the row.")
        # The tokenizer sees the NFC form, where a combining mark may have merged into a tag's '>'.
        check_markup(unicodedata.normalize("NFC", sample), f"text[{row}]")
    return list(texts)


def _check_conversations(conversations: list[list[dict]]) -> None:
    """
    Message items are dicts of type `text` (with a str `text`) or `image`. A typed text item may not name an image
    file in an `<img>path</img>` span: with typed content, images come only from image items, so user text cannot make
    the processor open a file. (Plain string content keeps the official convention: `<img>path</img>` opens `path`.)
    """
    for row, conversation in enumerate(conversations):
        for turn, message in enumerate(conversation):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, (list, tuple)):
                continue
            for index, item in enumerate(content):
                where = f"conversation {row}, message {turn}, content item {index}"
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in ("text", "image"):
                    raise ValueError(
                        f"{where} is of type {kind!r}: Qwen-VL takes only 'text' and 'image' items (nothing else is "
                        "loaded or fetched); remove it or describe it in text."
                    )
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise TypeError(f"{where} is a text item whose 'text' is not a str: {item!r}")
                    if any(IMAGE_SPAN.findall(item["text"])):
                        raise ValueError(
                            f"{where}: a text item holds an <img>path</img> span; pass the image as an "
                            "{'type': 'image', ...} item instead (paths in typed text items are never opened)."
                        )


def _prefix_images(texts: list[str], images) -> tuple[list[str], list[list[dict]]]:
    """
    Rows without image spans: `Picture k: <img></img>\n` in front of each row for each of its images; also the edit
    of each row, as transformers' `text_replacement_offsets`.
    """
    if len(texts) == 1:
        counts = [len(_flatten_images(images))]
    elif isinstance(images, (list, tuple)) and len(images) == len(texts):  # one image, or one list, per row
        counts = [len(_flatten_images(items)) for items in images]
    else:
        raise ValueError(
            f"Got {len(_flatten_images(images))} images for {len(texts)} rows of text without <img></img> spans: pass "
            "one image (or one list of images) per row, or mark where each image goes with <img></img>."
        )
    prefixes = ["".join(f"Picture {k}: {EMPTY_IMAGE_SPAN}\n" for k in range(1, count + 1)) for count in counts]
    edits = [[_edit((0, 0), 0, "", prefix)] if prefix else [] for prefix in prefixes]
    return [prefix + sample for prefix, sample in zip(prefixes, texts)], edits


def _empty_image_spans(sample: str) -> tuple[str, list[dict]]:
    """`sample` with every image span emptied (its image is given), and the edits (`text_replacement_offsets`)."""
    edits, shift = [], 0
    for match in IMAGE_SPAN.finditer(sample):
        if match.group(1):
            edits.append(_edit(match.span(), shift, match.group(), EMPTY_IMAGE_SPAN))
            shift += len(EMPTY_IMAGE_SPAN) - len(match.group())
    return IMAGE_SPAN.sub(EMPTY_IMAGE_SPAN, sample), edits


def _edit(span: tuple[int, int], shift: int, text: str, replacement: str) -> dict:
    """One entry of transformers' `text_replacement_offsets`: `span` of the old text became `replacement`."""
    start = span[0] + shift
    return {
        "type": "image",
        "span": span,
        "new_span": (start, start + len(replacement)),
        "text": text,
        "replacement": replacement,
    }


def _match_images(images, row_spans: list[list[str]]) -> list[list[tuple[str, object]]]:
    """Pair the images with the spans, row by row: one list of `(name, image)` per row."""
    flat = _flatten_images(images)
    num_spans = sum(map(len, row_spans))
    if len(flat) != num_spans:
        raise ValueError(
            f"Got {len(flat)} images for {num_spans} <img></img> spans in the text: pass exactly one image per span, "
            "in order of appearance (row by row)."
        )
    per_row = isinstance(images, (list, tuple)) and len(images) == len(row_spans)
    if per_row and all(isinstance(items, (list, tuple)) for items in images):  # one list per row: each must match
        for row, (items, spans) in enumerate(zip(images, row_spans)):
            if len(_flatten_images(items)) != len(spans):
                raise ValueError(
                    f"text[{row}] has {len(spans)} <img></img> spans but images[{row}] holds "
                    f"{len(_flatten_images(items))} images: give each row one image per span, in order."
                )
    named = iter((f"images[{index}]", image) for index, image in enumerate(flat))
    return [[next(named) for _ in spans] for spans in row_spans]


def _flatten_images(images) -> list:
    """Images in order from one image or (nested per-sample) lists of them."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim not in (2, 3):
        raise ValueError(f"An image array must be 2-D or 3-D, got shape {tuple(images.shape)}: pass a list of images")
    if not isinstance(images, (str, PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(f"Unsupported image type {type(images).__name__}: use a PIL image, an array or a local path")
    return [images]


def _load_images(named: list[tuple[str, object]], remote: dict) -> list:
    """Paths and URLs become RGB PIL images, lazily opened PIL images are decoded; arrays pass through."""
    loaded = []
    for name, image in named:
        if isinstance(image, str):
            image = load_image(image, **remote)
        elif isinstance(image, PIL.Image.Image):
            image = decode_image(image, name)
        loaded.append(image)
    return loaded


__all__ = ["QwenVLProcessor"]
