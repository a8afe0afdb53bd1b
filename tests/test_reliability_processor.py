"""Processor inputs and message items: least privilege (no URL of any media type, no path from typed text) and exact
preprocessing of odd image inputs."""

import builtins
import socket

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image


@pytest.fixture
def blocked(monkeypatch):
    """Connections attempted while active (all refused) and files opened."""
    attempts = {"connect": [], "open": []}

    def refuse(*args, **kwargs):
        attempts["connect"].append(args)
        raise ConnectionRefusedError("network access is blocked in this test")

    real_image_open, real_open = PIL.Image.open, builtins.open

    def record_image_open(fp, *args, **kwargs):
        attempts["open"].append(str(fp))
        return real_image_open(fp, *args, **kwargs)

    def record_open(file, *args, **kwargs):
        attempts["open"].append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(PIL.Image, "open", record_image_open)
    monkeypatch.setattr(builtins, "open", record_open)
    return attempts


def chat(processor, content, **kwargs):
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
    )


@pytest.mark.parametrize(
    "item",
    [
        {"type": "audio", "url": "http://127.0.0.1:9/speech.wav"},
        {"type": "audio", "path": "/etc/passwd"},
        {"type": "video", "url": "http://127.0.0.1:9/clip.mp4"},
        {"type": "video", "path": "/dev/zero"},
        {"type": "file", "url": "ftp://127.0.0.1:9/x"},
        {"url": "http://127.0.0.1:9/x.png"},
    ],
)
def test_unsupported_media_items_are_refused_before_anything_is_opened(tiny_processor, blocked, item):
    for allow in (False, True):  # allowing remote *images* does not allow other media
        with pytest.raises(ValueError, match="Qwen-VL takes only 'text' and 'image' items"):
            chat(tiny_processor, [item, {"type": "text", "text": "hi"}], allow_remote_images=allow)
    assert blocked["connect"] == [] and not any(path in blocked["open"] for path in ("/etc/passwd", "/dev/zero"))


@pytest.mark.parametrize(
    "item",
    [
        {"type": "image", "url": "http://127.0.0.1:9/cat.png"},
        {"type": "image_url", "image_url": {"url": "https://127.0.0.1:9/cat.png"}},  # OpenAI form
    ],
)
def test_image_urls_are_not_fetched_unless_allowed(tiny_processor, blocked, item):
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        chat(tiny_processor, [item, {"type": "text", "text": "what is it?"}])
    assert blocked["connect"] == []


def test_paths_in_typed_text_items_are_never_opened(tiny_processor, blocked, tmp_path):
    """The rule: typed content takes images only from image items; string content keeps the official convention."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(secret)
    blocked["open"].clear()
    text = {"type": "text", "text": f"Compare with <img>{secret}</img> please"}
    for content in ([text], [{"type": "image", "image": Image.new("RGB", (4, 4))}, text]):
        with pytest.raises(ValueError, match="a text item holds an <img>path</img> span"):
            chat(tiny_processor, content)
    assert str(secret) not in blocked["open"]

    # With images passed to the call, spans in the text take those images: the path written in the text is not read.
    given = Image.new("RGB", (4, 4), (200, 0, 0))
    batch = tiny_processor(text=f"<img>{secret}</img> what?", images=[given], return_tensors="pt")
    assert str(secret) not in blocked["open"]
    torch.testing.assert_close(
        batch["pixel_values"], tiny_processor.image_processor(given, return_tensors="pt")["pixel_values"]
    )

    # Plain string content (model.chat's official format) and images=None: the text names the file, which is opened.
    chat(tiny_processor, f"Picture 1: <img>{secret}</img>\nwhat?")
    assert str(secret) in blocked["open"]


def test_float_images_are_not_rescaled_twice(tiny_processor):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    expected = tiny_processor.image_processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    for image in (
        pixels / 255.0,
        (pixels / 255.0).astype(np.float32),
        pixels.astype(np.float32),
        torch.from_numpy(pixels / 255.0),
    ):
        batch = tiny_processor(text="<img></img>hi", images=[image], return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)
    for bad, message in ((pixels / 255.0 - 0.5, r"must lie in \[0, 1\]"), (np.full((6, 5, 3), np.nan), "NaN")):
        with pytest.raises(ValueError, match=message):
            tiny_processor(text="<img></img>hi", images=[bad])


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_empty_images_are_refused(tiny_processor, size):
    with pytest.raises(ValueError, match=r"image 0: it is empty"):
        tiny_processor(text="<img></img>hi", images=[Image.new("RGB", size)])
    with pytest.raises(ValueError, match="it is empty"):
        tiny_processor.image_processor(Image.new("RGB", size))


def test_span_errors_are_found_per_row(tiny_processor):
    """Row 0 closes twice and row 1 never closes: balanced over the batch, but each row is checked on its own."""
    with pytest.raises(ValueError, match=r"text\[0\]: </img> at character \d+ closes nothing"):
        tiny_processor(text=["a</img></img>", "<img>b"], images=[Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match=r"text\[1\]: <img> at character 0 is never closed"):
        tiny_processor(text=["a<img></img>", "<img>b"], images=[Image.new("RGB", (4, 4))] * 2)
