"""Image processor for Qwen-VL: the CLIP PIL-backend processor with the official Qwen-VL preprocessing defaults."""

import numpy as np
import PIL.Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format


class QwenVLImageProcessor(CLIPImageProcessorPil):
    r"""
    Image processor of Qwen-VL. Reproduces the official pipeline exactly (bit for bit on the reference fixtures):
    image → `PIL.Image.convert("RGB")` → PIL bicubic resize to `size` (aspect ratio not kept, no crop) → /255 →
    normalise with the OpenAI CLIP mean and std. Returns `pixel_values` of shape `[N, 3, height, width]` (float32 with
    `return_tensors="pt"`).

    It is [`CLIPImageProcessorPil`] with Qwen-VL defaults: `size={"height": 448, "width": 448}` (224 for stage-1
    pre-training) and no center crop. The torchvision-backend `CLIPImageProcessor` is not used because its bicubic
    resize rounds differently from PIL's (up to 2 uint8 levels, i.e. ~0.03 after normalisation). One more deviation
    from transformers' default: alpha (RGBA, LA, PA, P with transparency) is dropped like the official
    `convert("RGB")` instead of being composited onto white.

    Accepts PIL images of any mode, uint8 `np.ndarray`/`torch.Tensor` images (HWC or CHW; 1, 3 or 4 channels) and
    (nested) lists of them.

    ```python
    >>> processor = QwenVLImageProcessor()  # 448px; QwenVLImageProcessor(size={"height": 224, "width": 224})
    >>> processor(images, return_tensors="pt")["pixel_values"].shape
    torch.Size([N, 3, 448, 448])
    ```
    """

    _auto_class = "AutoImageProcessor"  # save_pretrained copies this file next to preprocessor_config.json
    size = {"height": 448, "width": 448}
    default_to_square = True
    do_center_crop = False
    crop_size = None

    def convert_to_rgb(
        self, image: PIL.Image.Image | np.ndarray, input_data_format: str | ChannelDimension | None = None
    ) -> np.ndarray:
        """
        Convert one image to 3 channels as `PIL.Image.convert("RGB")` does (alpha dropped, not blended). A PIL image
        becomes a uint8 `[H, W, 3]` array; an array (1, 3 or 4 channels) keeps its channel layout.
        """
        if isinstance(image, PIL.Image.Image):
            return np.array(image.convert("RGB"))
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        channel_axis = -1 if ChannelDimension(input_data_format) == ChannelDimension.LAST else 0
        num_channels = image.shape[channel_axis]
        if num_channels == 1:
            return np.repeat(image, 3, axis=channel_axis)
        if num_channels == 4:
            return np.take(image, [0, 1, 2], axis=channel_axis)
        if num_channels == 3:
            return image
        raise ValueError(f"Expected an image with 1, 3 or 4 channels, got shape {image.shape}.")


__all__ = ["QwenVLImageProcessor"]
