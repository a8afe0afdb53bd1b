"""QwenVLImageProcessor: golden pixel values of the official pipeline, input types, modes, sizes, serialisation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor


def _fixture_images_and_golden(fixtures_dir, name):
    from safetensors.torch import load_file

    folder = fixtures_dir / name
    order = json.loads((folder / "golden.json").read_text())["image_order"]
    images = [Image.open(folder / file_name) for file_name in order]
    return images, load_file(str(folder / "golden.safetensors"))["pixel_values"]


@pytest.mark.parametrize("name", ["fixture_a", "fixture_b"])
def test_matches_official_pixel_values(fixtures_dir, name):
    images, golden = _fixture_images_and_golden(fixtures_dir, name)
    size = golden.shape[-1]
    processor = QwenVLImageProcessor(size={"height": size, "width": size})
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == golden.shape
    assert pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values, golden, atol=1e-5, rtol=0)


def test_defaults_shape_and_dtype():
    processor = QwenVLImageProcessor()
    assert (processor.size.height, processor.size.width) == (448, 448)
    assert not processor.do_center_crop
    images = [Image.new("RGB", (37, 91), (255, 0, 0)), Image.new("RGB", (500, 20), (0, 0, 255))]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 448, 448)
    assert pixel_values.dtype == torch.float32
    # A uniform red image stays uniform and is normalised channel by channel.
    expected_red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(processor.image_mean)) / torch.tensor(
        processor.image_std
    )
    torch.testing.assert_close(pixel_values[0].mean(dim=(1, 2)), expected_red)


def test_integer_size_is_square_224():
    processor = QwenVLImageProcessor(size=224)
    assert (processor.size.height, processor.size.width) == (224, 224)
    pixel_values = processor(Image.new("RGB", (300, 100)), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)


def test_numpy_and_tensor_inputs_equal_pil_input():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8)
    processor = QwenVLImageProcessor(size=224)
    from_pil = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
    from_numpy = processor(array, return_tensors="pt")["pixel_values"]
    from_list = processor([array, array], return_tensors="pt")["pixel_values"]
    from_chw_tensor = processor(torch.from_numpy(array).permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_numpy, from_pil, atol=0, rtol=0)
    torch.testing.assert_close(from_list, from_pil.expand(2, -1, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(from_chw_tensor, from_pil, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I", "I;16", "F"])
def test_any_mode_gives_three_channels_like_pil_convert(mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 200)
    processor = QwenVLImageProcessor(size=224)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    expected = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, expected, atol=0, rtol=0)


def test_alpha_is_dropped_not_composited():
    """The official pipeline uses `convert("RGB")`: fully transparent pixels keep their colour (no white fill)."""
    rgba = Image.new("RGBA", (20, 20), (10, 200, 30, 0))
    processor = QwenVLImageProcessor(size=224)
    expected = processor(Image.new("RGB", (20, 20), (10, 200, 30)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(rgba, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    torch.testing.assert_close(
        processor(np.array(rgba), return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0
    )


def test_grayscale_array_is_repeated_to_rgb():
    gray = np.random.default_rng(2).integers(0, 256, size=(25, 35, 1), dtype=np.uint8)
    processor = QwenVLImageProcessor(size=224)
    expected = processor(Image.fromarray(gray[..., 0]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(gray, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    processor = QwenVLImageProcessor(size={"height": 224, "width": 224})
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "QwenVLImageProcessor"
    assert saved["size"] == {"height": 224, "width": 224}
    assert saved["do_center_crop"] is False
    assert saved["resample"] == Image.Resampling.BICUBIC

    loaded = QwenVLImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = Image.new("RGB", (50, 70), (12, 34, 56))
    torch.testing.assert_close(
        loaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )
