"""Bad, odd and remote images: correct pixel values or a ValueError naming the image, never a hang."""

import http.server
import io
import os
import struct
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor

SIZE = 56  # tiny_processor's image size


def reference_pixels(image: Image.Image) -> torch.Tensor:
    """The official preprocessing written out: convert("RGB"), PIL bicubic resize, /255, CLIP mean/std."""
    processor = QwenVLImageProcessor()
    array = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    normalised = (array - np.array(processor.image_mean)) / np.array(processor.image_std)
    return torch.from_numpy(normalised.transpose(2, 0, 1)).float()[None]


def uniform_pixels(color) -> torch.Tensor:
    return reference_pixels(Image.new("RGB", (4, 4), color))


def encode(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring `width` x `height` pixels, with almost no data: a few dozen bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def pixel_values(processor, **kwargs) -> torch.Tensor:
    return processor(return_tensors="pt", **kwargs)["pixel_values"]


PNG = encode(Image.new("RGB", (40, 30), (200, 100, 50)), "PNG")
BAD_FILES = {
    "truncated.png": (PNG[: len(PNG) // 2], "truncated"),
    "empty.png": (b"", "not an image PIL can read"),
    "notes.txt": (b"just some text, not an image\n", "not an image PIL can read"),
    "garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "truncated or corrupt|not an image"),
}


@pytest.mark.parametrize("file_name", sorted(BAD_FILES))
def test_bad_image_files_raise_value_error_naming_the_path(tiny_processor, tmp_path, file_name):
    data, problem = BAD_FILES[file_name]
    path = tmp_path / file_name
    path.write_bytes(data)
    calls = {
        "path in text": lambda: tiny_processor(text=f"<img>{path}</img>What is it?"),
        "path as image": lambda: tiny_processor(images=[str(path)], text="<img></img>What is it?"),
        "image processor": lambda: tiny_processor.image_processor(str(path)),
    }
    for how, call in calls.items():
        with pytest.raises(ValueError, match=problem) as error:
            call()
        assert str(path) in str(error.value), how
        assert error.value.__cause__ is not None, how  # PIL's error stays chained


def test_truncated_file_opened_lazily_is_named_by_index(tiny_processor, tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(BAD_FILES["truncated.png"][0])
    good = Image.new("RGB", (8, 8))
    with (
        Image.open(path) as lazy,
        pytest.raises(ValueError, match=r"image 1: decoding failed \(OSError: image") as error,
    ):
        tiny_processor.image_processor([good, lazy])
    assert isinstance(error.value.__cause__, OSError)
    with Image.open(path) as lazy, pytest.raises(ValueError, match=r"images\[1\]: decoding failed"):
        tiny_processor(images=[good, lazy], text="<img></img><img></img>")


def test_eps_is_never_decoded(tiny_processor, tmp_path, monkeypatch):
    """PIL decodes EPS by running Ghostscript: such files are refused before any program could start."""

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "check_call", no_subprocess)
    path = tmp_path / "drawing.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(ValueError, match="not an image PIL can read .*EPS is refused"):
        tiny_processor(text=f"<img>{path}</img>hi")
    with Image.open(path) as lazy, pytest.raises(ValueError, match="image 0: EPS images are not decoded"):
        tiny_processor.image_processor(lazy)


def test_directory_fifo_and_missing_paths_are_refused_without_blocking(tiny_processor, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    for path, problem in [
        (fifo, "not a regular file"),
        (tmp_path, "not a regular file"),
        (tmp_path / "no.png", "No such file"),
    ]:
        with pytest.raises(ValueError, match=problem):
            tiny_processor(text=f"<img>{path}</img>hi")


@pytest.mark.parametrize(
    "size", [(100_000, 100_000), (10_000, 10_000)]
)  # beyond 2x the limit (PIL error), 1-2x (warning)
def test_decompression_bomb_is_refused_before_decoding(tiny_processor, tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png(*size))
    assert path.stat().st_size < 100 and size[0] * size[1] > Image.MAX_IMAGE_PIXELS
    start = time.monotonic()
    with pytest.raises(ValueError, match="decompression bomb") as error:
        tiny_processor(text=f"<img>{path}</img>hi")
    assert str(path) in str(error.value)
    assert isinstance(error.value.__cause__, (Image.DecompressionBombWarning, Image.DecompressionBombError))
    with pytest.raises(ValueError, match="decompression bomb"):
        tiny_processor.image_processor(str(path))
    assert time.monotonic() - start < 2  # nothing was decoded


def test_lazily_opened_bomb_is_refused_by_index(tiny_processor, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png(10_000, 10_000))
    with pytest.warns(Image.DecompressionBombWarning):  # PIL itself only warns at this size
        lazy = Image.open(path)
    with lazy, pytest.raises(ValueError, match=r"image 0: it is 10000x10000 pixels, more than PIL.Image.MAX_IMAGE"):
        tiny_processor.image_processor(lazy)


@pytest.mark.parametrize("format", ["GIF", "WEBP"])
def test_animations_use_the_first_frame(tiny_processor, tmp_path, format):
    frames = [Image.new("RGB", (20, 10), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    options = {"lossless": True} if format == "WEBP" else {}
    path = tmp_path / f"animation.{format.lower()}"
    path.write_bytes(encode(frames[0], format, save_all=True, append_images=frames[1:], duration=100, **options))
    with Image.open(path) as check:
        assert check.n_frames == 3
    expected = uniform_pixels((255, 0, 0))
    torch.testing.assert_close(pixel_values(tiny_processor, text=f"<img>{path}</img>hi"), expected)
    torch.testing.assert_close(pixel_values(tiny_processor.image_processor, images=str(path)), expected)
    with Image.open(path) as lazy:
        torch.testing.assert_close(pixel_values(tiny_processor.image_processor, images=lazy), expected)


def _mode_images():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(12, 17, 3), dtype=np.uint8))
    sixteen_bit = Image.fromarray(np.arange(12 * 17, dtype=np.uint16).reshape(12, 17) * 300)  # up to 60,900
    return {
        "CMYK.tiff": rgb.convert("CMYK"),
        "CMYK.jpg": rgb.convert("CMYK"),
        "LA.png": rgb.convert("LA"),
        "P.png": rgb.convert("P"),
        "P-transparent.gif": rgb.convert("P"),
        "I;16.png": sixteen_bit,
    }


@pytest.mark.parametrize("file_name", sorted(_mode_images()))
def test_image_modes_match_the_official_conversion(tiny_processor, tmp_path, file_name):
    """The official pipeline is `Image.open(path).convert("RGB")`: 16-bit values above 255 saturate there too."""
    image = _mode_images()[file_name]
    path = tmp_path / file_name
    options = {"transparency": 0} if "transparent" in file_name else {}
    image.save(path, **options)
    with Image.open(path) as opened:
        assert opened.mode == file_name.split(".")[0].split("-")[0]
        expected = reference_pixels(opened)
    torch.testing.assert_close(pixel_values(tiny_processor, text=f"<img>{path}</img>hi"), expected, atol=1e-5, rtol=0)
    with Image.open(path) as lazy:
        actual = pixel_values(tiny_processor, images=lazy, text="<img></img>hi")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_sixteen_bit_values_saturate_like_the_official_pipeline(tiny_processor, tmp_path):
    path = tmp_path / "bright.png"
    Image.fromarray(np.full((5, 5), 1000, dtype=np.uint16)).save(path)
    torch.testing.assert_close(pixel_values(tiny_processor, text=f"<img>{path}</img>hi"), uniform_pixels((255,) * 3))


@pytest.mark.parametrize("size", [(1, 1), (10_000, 10), (10, 10_000)])
def test_extreme_aspect_ratios_and_single_pixels(tiny_processor, tmp_path, size):
    image = Image.new("RGB", size, (10, 200, 30))
    path = tmp_path / "odd.png"
    image.save(path)
    expected = uniform_pixels((10, 200, 30))
    torch.testing.assert_close(pixel_values(tiny_processor, text=f"<img>{path}</img>hi"), expected)
    torch.testing.assert_close(pixel_values(tiny_processor, images=image, text="<img></img>hi"), expected)
    array = np.asarray(image)
    torch.testing.assert_close(
        pixel_values(tiny_processor.image_processor, images=array, input_data_format="channels_last"), expected
    )
    if size != (1, 1):
        torch.testing.assert_close(pixel_values(tiny_processor.image_processor, images=array), expected)
    else:  # a 1x1x3 array could also be read as one channel of 1x3 pixels
        with pytest.raises(ValueError, match=r"image 0: its shape \(1, 1, 3\) could hold the channels first or last"):
            tiny_processor.image_processor(array)


def test_unusable_in_memory_images(tiny_processor):
    with pytest.raises(ValueError, match=r"image 1: it is empty \(shape \(0, 5, 3\)\)"):
        tiny_processor.image_processor([np.zeros((5, 5, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0: conversion from La to L not supported"):
        tiny_processor.image_processor(Image.new("La", (4, 4)))
    with pytest.raises(ValueError, match="No images to process"):
        tiny_processor.image_processor([])


# Remote images: a local server stands in for the internet.


class _Handler(http.server.BaseHTTPRequestHandler):
    image = encode(Image.new("RGB", (30, 20), (0, 128, 255)), "PNG")

    def do_GET(self):
        self.server.paths.append(self.path)
        try:
            getattr(self, "serve_" + self.path.strip("/").replace("-", "_"), self.serve_missing)()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def reply(self, body: bytes, status: int = 200, declare_length: bool = True, **headers):
        self.send_response(status)
        if declare_length:
            headers["Content-Length"] = len(body)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        self.wfile.write(body)

    def serve_image(self):
        self.reply(self.image)

    def serve_large(self):  # declares its size up front
        self.reply(b"\0" * 5000)

    def serve_large_streamed(self):  # no Content-Length: the body ends when the connection closes
        self.reply(b"\0" * 5000, declare_length=False)

    def serve_slow(self):
        time.sleep(1.5)
        self.reply(self.image)

    def serve_trickle(self):
        self.send_response(200)
        self.end_headers()
        for _ in range(30):
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(0.05)

    def serve_to_file(self):
        self.reply(b"", status=302, Location="file:///etc/passwd")

    def serve_missing(self):
        self.reply(b"not found", status=404)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    block_on_close = False  # do not wait for the slow handlers at shutdown


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.paths = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{path}"


def test_remote_image_is_fetched_only_when_allowed(tiny_processor, server):
    text = f"Picture 1: <img>{url(server, 'image')}</img>\nWhat is it?"
    requests_before = len(server.paths)
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        tiny_processor(text=text)
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        tiny_processor.image_processor(url(server, "image"))
    assert len(server.paths) == requests_before

    batch = tiny_processor(text=text, allow_remote_images=True, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], uniform_pixels((0, 128, 255)))
    assert batch["input_ids"][0].tolist() == tiny_processor.tokenizer.encode(text)  # the URL bytes fill the span
    batch = tiny_processor(images=[url(server, "image")], text="<img></img>hi", allow_remote_images=True)
    assert server.paths[-2:] == ["/image", "/image"]


@pytest.mark.parametrize("path", ["large", "large-streamed"])
def test_remote_image_over_the_byte_limit(tiny_processor, server, path):
    with pytest.raises(ValueError, match="larger than remote_image_max_bytes=1000"):
        tiny_processor(text=f"<img>{url(server, path)}</img>hi", allow_remote_images=True, remote_image_max_bytes=1000)


@pytest.mark.parametrize("path", ["slow", "trickle"])
def test_slow_remote_image_times_out(tiny_processor, server, path):
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"Cannot fetch image URL .*/{path}.*remote_image_timeout") as error:
        tiny_processor(text=f"<img>{url(server, path)}</img>hi", allow_remote_images=True, remote_image_timeout=0.3)
    assert isinstance(error.value.__cause__, TimeoutError)
    assert time.monotonic() - start < 1.2


@pytest.mark.parametrize("path, problem", [("missing", "HTTP Error 404"), ("to-file", "file:///etc/passwd")])
def test_remote_errors_and_redirects_outside_http(tiny_processor, server, path, problem):
    with pytest.raises(ValueError, match=f"Cannot fetch image URL .*{problem}"):
        tiny_processor(text=f"<img>{url(server, path)}</img>hi", allow_remote_images=True)
