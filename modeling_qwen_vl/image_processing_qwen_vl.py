"""Image processor for Qwen-VL: the CLIP PIL-backend processor with the official Qwen-VL preprocessing defaults."""

import io
import os
import stat
import time
import warnings

import numpy as np
import PIL.Image
import PIL.ImageFile
from transformers import CLIPImageProcessorPil
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

# Limits of `fetch_remote_image` (used only when remote images are explicitly allowed).
REMOTE_IMAGE_TIMEOUT = 10.0
REMOTE_IMAGE_MAX_BYTES = 20 * 1024 * 1024
# Formats PIL could open but that are never decoded here: EPS decoding runs the external Ghostscript program.
REFUSED_FORMATS = ("EPS",)


def fetch_remote_image(
    url: str, timeout: float = REMOTE_IMAGE_TIMEOUT, max_bytes: int = REMOTE_IMAGE_MAX_BYTES
) -> bytes:
    """
    Download the body of an http(s) `url`: the only network access of this package, reached only with
    `allow_remote_images=True`. Gives up with a `ValueError` once the download has taken `timeout` seconds (each
    network wait is also bounded by `timeout`; name resolution is not) or exceeds `max_bytes`. Redirects are followed
    to http(s) URLs only; proxies come from the environment as usual. Hand-written on `urllib` because transformers'
    `load_image` fetches with `httpx` without a size limit, and the remote code imports no HTTP client library.
    """
    import http.client
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Cannot fetch {url!r}: only http:// and https:// URLs are fetched.")
    # `build_opener()` without its file:, ftp: and data: handlers, so a redirect cannot reach them.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    too_large = (
        f"Cannot use image URL {url!r}: it is larger than remote_image_max_bytes={max_bytes}; download it yourself or "
        "raise the limit."
    )
    deadline = time.monotonic() + timeout
    body = bytearray()
    try:
        with opener.open(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(too_large)
            while chunk := response.read1(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(too_large)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"download not finished after {timeout} s")
    except (OSError, http.client.HTTPException) as error:  # HTTP errors, refused connections, timeouts, bad replies
        raise ValueError(
            f"Cannot fetch image URL {url!r} ({type(error).__name__}: {error}): check the URL, raise "
            "remote_image_timeout, or download the image and pass it (or its local path) instead."
        ) from error
    return bytes(body)


def load_image(
    source: str | bytes,
    allow_remote: bool = False,
    timeout: float = REMOTE_IMAGE_TIMEOUT,
    max_bytes: int = REMOTE_IMAGE_MAX_BYTES,
) -> PIL.Image.Image:
    """
    Open what an image span's path names, a local image file (first frame of an animation), as an RGB image, like the
    official `Image.open(path).convert("RGB")`; `bytes` are an encoded image file's content. An http(s) URL is fetched
    only with `allow_remote=True` (see `fetch_remote_image`). Anything that is not a readable, decodable regular file
    within `PIL.Image.MAX_IMAGE_PIXELS` raises a `ValueError` naming `source`. The processor, the training recipes
    and the server all open images with this function.
    """
    if isinstance(source, (bytes, bytearray)):
        return _open_rgb(io.BytesIO(source), "image bytes")
    if source.startswith(("http://", "https://")):
        if not allow_remote:
            raise ValueError(
                f"Image {source!r} is a URL: remote images are not fetched unless allowed. Download it and pass the "
                "image or a local path, or pass allow_remote_images=True to the processor."
            )
        return _open_rgb(io.BytesIO(fetch_remote_image(source, timeout, max_bytes)), f"image URL {source!r}")
    name = f"image {source!r}"
    try:
        mode = os.stat(source).st_mode
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot use {name}: {error}; pass the path of an existing image file.") from error
    if not stat.S_ISREG(mode):
        # Directories, FIFOs and devices (e.g. /dev/stdin) are refused before opening, so nothing can block.
        raise ValueError(f"Cannot use {name}: it is not a regular file; pass the path of an image file.")
    return _open_rgb(source, name)


def decode_image(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """
    Decode a lazily opened PIL image (`Image.open` reads only the header) after the decompression-bomb check, so a
    truncated, corrupt or oversized file raises a `ValueError` naming `name` (e.g. "image 0") up front.
    """
    if not (isinstance(image, PIL.ImageFile.ImageFile) and image.tile):
        return image  # already decoded, or created in memory
    if image.format in REFUSED_FORMATS:
        raise ValueError(
            f"Cannot use {name}: {image.format} images are not decoded (that would run an external program); convert "
            "it to PNG first."
        )
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(
            f"Cannot use {name}: it is {image.width}x{image.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
            f"({limit}), a possible decompression bomb. Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
            "trust it."
        )
    try:
        image.load()
    except Exception as error:  # PIL decoders raise OSError, ValueError, EOFError, struct.error, ...
        raise ValueError(_undecodable(name, error)) from error
    return image


def _open_rgb(file, name: str) -> PIL.Image.Image:
    """`Image.open(file).convert("RGB")` with every failure turned into a `ValueError` naming `name`."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those images too.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            PIL.Image.init()  # registers every plugin, so that `formats` lists them all
            formats = [image_format for image_format in PIL.Image.ID if image_format not in REFUSED_FORMATS]
            with PIL.Image.open(file, formats=formats) as image:
                return image.convert("RGB")
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:
        raise ValueError(
            f"Cannot use {name}: {error} Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(
            f"Cannot use {name}: it is not an image PIL can read (empty, corrupt or another kind of file; EPS is "
            "refused); pass a PNG, JPEG, GIF, WebP, BMP or other PIL-readable image."
        ) from error
    except Exception as error:  # truncated data and decoder errors
        raise ValueError(_undecodable(name, error)) from error


def _float_image_to_uint8(image, name: str) -> np.ndarray:
    """
    A float image as the uint8 image it stands for: values in [0, 1] are scaled by 255, values in [0, 255] are taken
    as they are. Converting first makes float input give exactly the pixels of the same uint8 image (the official
    pipeline works on uint8), instead of being rescaled by 1/255 a second time.
    """
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"Cannot use {name}: it holds NaN or infinite values.")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise ValueError(
            f"Cannot use {name}: float pixel values must lie in [0, 1] (or [0, 255]), got [{low:g}, {high:g}]; pass "
            "the original uint8 image or a PIL image (already normalised values cannot be preprocessed again)."
        )
    return np.round(array * 255 if high <= 1 else array).astype(np.uint8)


def _undecodable(name: str, error: Exception) -> str:
    """Message for an image whose data PIL failed to decode."""
    return (
        f"Cannot use {name}: decoding failed ({type(error).__name__}: {error}), the file is truncated or corrupt; "
        "re-download or re-encode it."
    )


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

    Accepts PIL images of any mode (16-bit and float modes are converted as `convert("RGB")` does, i.e. values above 255
    saturate, like the official pipeline; animations give their current frame), uint8 `np.ndarray`/`torch.Tensor` images
    (HWC or CHW; 1, 3 or 4 channels; float images with values in [0, 1] or [0, 255] are first converted to the uint8
    image they stand for, so they are never rescaled twice), local file paths (never URLs: the processor fetches those
    when allowed) and (nested) lists of them. An image that cannot be used (corrupt or truncated file, EPS, whose
    decoding runs Ghostscript, more pixels than `PIL.Image.MAX_IMAGE_PIXELS` still to decode, an empty array, an array
    whose channel axis is ambiguous without `input_data_format`, ...) raises a `ValueError` naming its index or path.

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

    def fetch_images(self, image_url_or_urls):
        """Open local image paths with `load_image`; URLs are refused (the processor fetches them when allowed)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return load_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        """Flatten, decode and convert each image; a failure becomes a `ValueError` naming the image's index."""
        images = self._prepare_images_structure(images, expected_ndims=expected_ndims)
        if not images:
            raise ValueError("No images to process: pass at least one image.")
        prepared = []
        for index, image in enumerate(images):
            name = f"image {index}"
            if isinstance(image, PIL.Image.Image):
                if 0 in image.size:
                    raise ValueError(f"Cannot use {name}: it is empty ({image.width}x{image.height} pixels).")
                image = decode_image(image, name)
            elif 0 in image.shape:
                raise ValueError(f"Cannot use {name}: it is empty (shape {tuple(image.shape)}).")
            elif kwargs.get("input_data_format") is None and image.ndim == 3 and {*image.shape[::2]} <= {1, 3, 4}:
                raise ValueError(
                    f"Cannot use {name}: its shape {tuple(image.shape)} could hold the channels first or last; pass "
                    "input_data_format='channels_last' (HWC) or 'channels_first' (CHW)."
                )
            elif "float" in str(image.dtype):  # numpy and torch float dtypes
                image = _float_image_to_uint8(image, name)
            try:
                prepared.append(self.process_image(image, *args, **kwargs))
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"Cannot use {name}: {error}") from error
        return prepared

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
