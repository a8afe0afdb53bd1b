"""Processor of Qwen-VL: the tokenizer's `<img>...</img>` spans paired with the image processor's `pixel_values`."""

import re

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessingKwargs

from .grounding_qwen_vl import draw_grounding, parse_grounding
from .image_processing_qwen_vl import QwenVLImageProcessor
from .tokenization_qwen_vl import IMAGE_TAGS, QwenVLTokenizer


# Same pairing as the tokenizer: an opening tag closes at the first `</img>` after it.
IMAGE_SPAN = re.compile(re.escape(IMAGE_TAGS[0]) + "(.*?)" + re.escape(IMAGE_TAGS[1]), re.DOTALL)
EMPTY_IMAGE_SPAN = IMAGE_TAGS[0] + IMAGE_TAGS[1]


class QwenVLProcessorKwargs(ProcessingKwargs, total=False):
    """`allow_remote_images`: fetch http(s) images (off by default: no network access unless asked for)."""

    allow_remote_images: bool


class QwenVLProcessor(ProcessorMixin):
    r"""
    Qwen-VL processor: [`QwenVLImageProcessor`] and [`QwenVLTokenizer`] in one call.

    Text marks each image with an `<img>...</img>` span (`"Picture 1: <img>cat.png</img>\nWhat is it?"`). Images are
    matched to the spans in order, row by row:
    - `images` given: one image (PIL image, array, local path) per span; the spans are emptied, so the model input
      holds `<img>`, 256 `<imgpad>`, `</img>` (the model overwrites those positions with image features anyway);
    - `images=None`: every span must name a local file, which is loaded, and the ids keep the path bytes as the
      official tokenizer writes them.
    URLs are only fetched with `allow_remote_images=True`. Batches are padded on the left (for generation) unless
    `padding_side` says otherwise.

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

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """
        Tokenize `text` (a str or a list of str) and preprocess the image of each `<img>...</img>` span; returns
        `input_ids`, `attention_mask` and, when there are images, `pixel_values` `[N, 3, S, S]`.
        """
        output_kwargs = self._merge_kwargs(
            QwenVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        allow_remote = output_kwargs["allow_remote_images"]
        if text is None:
            if images is None:
                raise ValueError("Pass `text` (with one <img></img> span per image), `images`, or both.")
            loaded = [_load(image, allow_remote) for image in _flatten_images(images)]
            return self.image_processor(loaded, **output_kwargs["images_kwargs"])

        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
            raise TypeError(f"`text` must be a str or a list of str, got {type(text).__name__}")
        spans = [content for sample in texts for content in IMAGE_SPAN.findall(sample)]
        if images is None:
            if not all(spans):
                raise ValueError(
                    f"Got 0 images for {len(spans)} <img></img> spans, {spans.count('')} of them empty: pass `images` "
                    "(one per span, in order) or write a local image path inside each span."
                )
            images = spans
        else:
            images = _flatten_images(images)
            if len(images) != len(spans):
                raise ValueError(
                    f"Got {len(images)} images for {len(spans)} <img></img> spans in the text: pass exactly one image "
                    "per span, in order of appearance (row by row)."
                )
            texts = [IMAGE_SPAN.sub(EMPTY_IMAGE_SPAN, sample) for sample in texts]

        data = dict(self.tokenizer(list(texts), **output_kwargs["text_kwargs"]))
        if images:
            loaded = [_load(image, allow_remote) for image in images]
            data.update(self.image_processor(loaded, **output_kwargs["images_kwargs"]))
        return BatchFeature(data, tensor_type=output_kwargs["text_kwargs"].get("return_tensors"))

    def post_process_grounding(self, text: str, image_size: tuple[int, int] | None = None) -> list[dict]:
        """Boxes (and phrases) in the generated `text`, in pixels of an image of `image_size=(width, height)`."""
        return parse_grounding(text, image_size)

    def draw_grounding(self, image: PIL.Image.Image, text: str, **kwargs) -> PIL.Image.Image:
        """A copy of `image` with the boxes of the generated `text` drawn and labelled."""
        return draw_grounding(image, text, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors with their own classes, so no Auto-class registration is needed."""
        kwargs.pop("subfolder", None)
        return [
            QwenVLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            QwenVLTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]


def _flatten_images(images) -> list:
    """Images in order from one image or (nested per-sample) lists of them."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim not in (2, 3):
        raise ValueError(f"An image array must be 2-D or 3-D, got shape {tuple(images.shape)}: pass a list of images")
    if not isinstance(images, (str, PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(f"Unsupported image type {type(images).__name__}: use a PIL image, an array or a local path")
    return [images]


def _load(image, allow_remote: bool):
    """A path or URL becomes an RGB PIL image; other images pass through."""
    if not isinstance(image, str):
        return image
    if image.startswith(("http://", "https://")):
        if not allow_remote:
            raise ValueError(
                f"Image {image!r} is a URL: remote images are not fetched unless allowed. Download it and pass the "
                "image or a local path, or pass allow_remote_images=True."
            )
        return load_image(image).convert("RGB")
    with PIL.Image.open(image) as opened:
        return opened.convert("RGB")


__all__ = ["QwenVLProcessor"]
