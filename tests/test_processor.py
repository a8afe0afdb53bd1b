"""QwenVLProcessor: image spans paired with pixel values, padding, chat inputs and save/load."""

import pytest
import torch
from PIL import Image

from modeling_qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor
from modeling_qwen_vl.processing_qwen_vl import QwenVLProcessor
from modeling_qwen_vl.text_format import IMAGE_SPAN_LENGTH
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer

from .conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def processor(vocab_file):
    return QwenVLProcessor(QwenVLImageProcessor(), QwenVLTokenizer(str(vocab_file)))


@pytest.fixture(scope="module")
def image_paths(fixtures_dir):
    return {name: str(fixtures_dir / "fixture_a" / f"{name}.png") for name in ("cat", "a", "b")}


@pytest.fixture(scope="module")
def images(image_paths):
    def load(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    return {name: load(path) for name, path in image_paths.items()}


def image_spans(ids, tokenizer):
    """Content ids of every `<img>...</img>` span in `ids`."""
    ids = list(ids)
    starts = [i for i, token_id in enumerate(ids) if token_id == tokenizer.img_start_id]
    return [ids[start + 1 : ids.index(tokenizer.img_end_id, start)] for start in starts]


def test_image_count_mismatch(processor, images):
    with pytest.raises(ValueError, match=r"Got 2 images for 1 <img></img> spans"):
        processor(images=[images["cat"], images["a"]], text="Picture 1: <img></img>\nWhat is it?")
    with pytest.raises(ValueError, match=r"Got 1 images for 3 <img></img> spans"):
        processor(images=[[images["cat"]], []], text=["<img></img><img></img>", "<img></img>"])
    with pytest.raises(ValueError, match=r"Got 0 images for 1 <img></img> spans"):
        processor(text="<img></img> no image given")


def test_pixel_values_and_spans(processor, images):
    text = ["Picture 1: <img></img>\nDescribe it.", "Picture 1: <img>ignored.png</img>\nPicture 2: <img></img>\n"]
    batch = processor(images=[[images["cat"]], [images["a"], images["b"]]], text=text, return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 448, 448) and batch["pixel_values"].dtype == torch.float32
    expected = processor.image_processor([images["cat"], images["a"], images["b"]], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    tokenizer = processor.tokenizer
    spans = [span for row in batch["input_ids"].tolist() for span in image_spans(row, tokenizer)]
    assert spans == [[tokenizer.img_pad_id] * IMAGE_SPAN_LENGTH] * 3


def test_left_padding_by_default(processor, images):
    text = ["Picture 1: <img></img>\nDescribe the picture in detail.", "Hi"]
    batch = processor(images=images["cat"], text=text, return_tensors="pt")
    short = processor.tokenizer.encode("Hi")
    padding = batch["input_ids"].shape[1] - len(short)
    assert batch["input_ids"][1].tolist() == [processor.tokenizer.pad_token_id] * padding + short
    assert batch["attention_mask"][1].tolist() == [0] * padding + [1] * len(short)
    assert batch["attention_mask"][0].all()
    right = processor(images=images["cat"], text=text, padding_side="right", return_tensors="pt")
    assert right["input_ids"][1, : len(short)].tolist() == short
    assert right["attention_mask"][1, -1].item() == 0


def test_paths_in_text_are_loaded(processor, images, image_paths):
    text = f"Picture 1: <img>{image_paths['cat']}</img>\nPicture 2: <img>{image_paths['a']}</img>\nCompare."
    batch = processor(text=text, return_tensors="pt")
    # Without explicit images the ids keep the official form: the path bytes inside the span.
    assert batch["input_ids"][0].tolist() == processor.tokenizer.encode(text)
    expected = processor.image_processor([images["cat"], images["a"]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)


def test_remote_images_are_not_fetched(processor):
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        processor(text="Picture 1: <img>https://example.com/demo.jpeg</img>\nWhat is this?")
    with pytest.raises(ValueError, match="remote images are not fetched unless allowed"):
        processor(images=["http://example.com/a.png"], text="<img></img>")


def test_chat_with_image_items_matches_text(processor, images, image_paths):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["cat"]},
                {"type": "image", "path": image_paths["a"]},
                {"type": "text", "text": "What differs?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <img></img>\nPicture 2: <img></img>\nWhat differs?<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = processor(images=[images["cat"], images["a"]], text=text, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


def test_images_only(processor, images):
    pixel_values = processor(images=images["b"], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 448, 448)


def test_grounding_and_decode(processor, images):
    output = "<ref>the cat</ref><box>(0,0),(500,500)</box>"
    assert processor.post_process_grounding(output, (280, 67)) == [{"phrase": "the cat", "box": (0, 0, 140, 33.5)}]
    drawn = processor.draw_grounding(images["cat"], output)
    assert drawn.size == images["cat"].size and drawn is not images["cat"]
    ids = processor.tokenizer.encode(output)
    assert processor.decode(ids) == output
    assert processor.batch_decode([ids, ids], skip_special_tokens=True) == ["the cat(0,0),(500,500)"] * 2


def test_save_load_round_trip(processor, images, vocab_file, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == vocab_file.read_bytes()
    reloaded = QwenVLProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded.tokenizer, QwenVLTokenizer)
    assert isinstance(reloaded.image_processor, QwenVLImageProcessor)
    assert reloaded.chat_template == processor.chat_template == processor.tokenizer.chat_template
    text = ["Picture 1: <img></img>\nWhat is it?", "Hi"]
    before = processor(images=images["cat"], text=text, return_tensors="pt")
    after = reloaded(images=images["cat"], text=text, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_ground_returns_pixel_boxes_and_saves_a_picture(tiny_model_factory, tiny_processor, tmp_path):
    """`ground` asks the model, parses `<box>` in its answer into pixels, and draws them; the model here is forced to
    answer with a known box so the parsing and scaling are checked exactly."""
    from PIL import Image

    model = tiny_model_factory().eval()
    tok = tiny_processor.tokenizer
    answer = tok("<box>(100,200),(500,600)</box>", add_special_tokens=False)["input_ids"] + [tok.eod_id]
    calls = []

    def scripted_generate(**kwargs):
        calls.append(kwargs)
        return torch.cat([kwargs["input_ids"], torch.tensor([answer])], dim=1)

    model.generate = scripted_generate
    image = Image.new("RGB", (200, 100), "white")
    boxes = tiny_processor.ground(model, image, "the dog", save_to=tmp_path / "boxes.png")
    assert boxes == [{"phrase": "the dog", "box": (20.0, 20.0, 100.0, 60.0)}]
    assert tok.decode(calls[0]["input_ids"][0]).endswith("<ref>the dog</ref>")
    drawn = Image.open(tmp_path / "boxes.png")
    assert drawn.size == image.size and drawn.getpixel((20, 40)) != (255, 255, 255)
    with pytest.raises(ValueError, match="phrase"):
        tiny_processor.ground(model, image, "  ")


def test_model_with_fewer_queries_runs_from_the_processor(tiny_model_factory, tiny_vocab_file, images):
    """n_queries=16 in the config and image_span_length=16 in the tokenizer go together; a mismatch is named."""
    size = 56
    model = tiny_model_factory(visual={**TINY_CONFIG["visual"], "n_queries": 16})
    image_processor = QwenVLImageProcessor(size={"height": size, "width": size})
    processor = QwenVLProcessor(image_processor, QwenVLTokenizer(str(tiny_vocab_file), image_span_length=16))
    batch = processor(images=images["cat"], text="<img></img>a cat", return_tensors="pt")
    assert batch["input_ids"].shape[1] == 16 + 2 + len(processor.tokenizer.encode("a cat"))
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    mismatched = QwenVLProcessor(image_processor, QwenVLTokenizer(str(tiny_vocab_file)))
    with pytest.raises(ValueError, match="image_span_length"):
        model(**mismatched(images=images["cat"], text="<img></img>a cat", return_tensors="pt"))
