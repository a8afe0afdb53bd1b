"""Model inputs: every malformed batch gives a ValueError/TypeError naming the argument; cheap forms are accepted."""

import pytest
import torch

from .conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def model():
    from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

    torch.manual_seed(0)
    return QwenVLForConditionalGeneration._from_config(QwenVLConfig(**TINY_CONFIG), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def batch(model):
    """Two left-padded rows, one image each."""
    config = model.config
    start, n = config.image_start_id, config.visual["n_queries"]
    span = [start] + [start + 2] * n + [start + 1]
    rows = [[5, 6] + span + [7, 8, 9], [0, 0, 5] + span + [7, 8]]
    size = config.visual["image_size"]
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor([[1] * len(rows[0]), [0, 0] + [1] * (len(rows[1]) - 2)]),
        "pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
    }


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def changed(batch, **overrides):
    return {**batch, **overrides}


def test_cheap_pixel_value_forms_are_accepted(model, batch):
    expected = run(model, **batch).logits
    images = batch["pixel_values"]
    for form in (list(images), images.permute(0, 2, 3, 1), [image[None] for image in images]):
        torch.testing.assert_close(run(model, **changed(batch, pixel_values=form)).logits, expected)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {"pixel_values": torch.randn(2, 3, 56, 70)},
            ValueError,
            r"pixel_values must have shape \[images, 3, 56, 56\]",
        ),
        ({"pixel_values": torch.randn(2, 5, 56, 56)}, ValueError, "pixel_values must have shape"),
        ({"pixel_values": torch.zeros(2, 3, 56, 56, dtype=torch.uint8)}, TypeError, "normalised floats"),
        ({"pixel_values": [1, 2]}, TypeError, "list of image tensors"),
        ({"pixel_values": "image.png"}, TypeError, "pixel_values must be a float torch.Tensor"),
        ({"pixel_values": torch.randn(1, 3, 56, 56)}, ValueError, "2 <img>...</img> spans but 1 images"),
    ],
)
def test_bad_pixel_values(model, batch, overrides, error, message):
    with pytest.raises(error, match=message):
        run(model, **changed(batch, **overrides))


def test_bad_input_ids(model, batch):
    ids, vocab = batch["input_ids"], model.config.vocab_size
    cases = [
        (
            ids.clone().index_fill_(1, torch.tensor([0]), vocab),
            ValueError,
            rf"input_ids\[0\] holds the id {vocab}, outside",
        ),
        (ids.clone().index_fill_(1, torch.tensor([1]), -3), ValueError, r"input_ids\[0\] holds the id -3"),
        (ids[0], ValueError, r"add the batch dimension with input_ids\[None\]"),
        (ids.float(), TypeError, "integer token ids"),
        (ids.tolist(), TypeError, "input_ids must be a torch.LongTensor"),
        (ids[:, :0], ValueError, "input_ids is empty"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            run(model, input_ids=bad)


def test_image_spans_are_checked_per_row(model, batch):
    """Row 0 closes twice, row 1 never closes: the batch-wide counts agree, but no feature may spill across rows."""
    config = model.config
    start, end, pad, n = config.image_start_id, config.image_end_id, config.image_pad_id, config.visual["n_queries"]
    rows = torch.tensor([[5, end, 6, end, 7] + [7] * n, [5, start, 6] + [pad] * n + [8, 9]])
    with pytest.raises(ValueError, match=r"input_ids\[0\] has an unclosed, unopened or nested <img>"):
        run(model, input_ids=rows, pixel_values=batch["pixel_values"])
    nested = torch.tensor([[start, start] + [pad] * (n - 1) + [end, end]])
    with pytest.raises(ValueError, match=r"input_ids\[0\] has an unclosed, unopened or nested"):
        run(model, input_ids=nested, pixel_values=batch["pixel_values"])
    short = torch.tensor([[5, start] + [pad] * n + [end], [5, start] + [pad] * (n - 1) + [end, 6]])
    with pytest.raises(ValueError, match=r"input_ids\[1\]: every <img>...</img> span must hold exactly"):
        run(model, input_ids=short, pixel_values=batch["pixel_values"])


def test_bad_masks_positions_and_labels(model, batch):
    ids = batch["input_ids"]
    cases = [
        (
            {"attention_mask": batch["attention_mask"][:, 1:]},
            ValueError,
            r"attention_mask has shape \(2, \d+\) but must be",
        ),
        ({"attention_mask": batch["attention_mask"][:1]}, ValueError, "attention_mask has shape"),
        (
            {"attention_mask": batch["attention_mask"][0]},
            ValueError,
            r"attention_mask must have shape \[batch, length\]",
        ),
        ({"attention_mask": batch["attention_mask"].tolist()}, TypeError, "attention_mask must be a torch.Tensor"),
        ({"position_ids": torch.arange(ids.shape[1] - 1)[None]}, ValueError, "position_ids must have shape"),
        ({"position_ids": torch.arange(ids.shape[1])}, ValueError, "position_ids must have shape"),
        ({"labels": ids[:, 1:]}, ValueError, "labels must have the shape of input_ids"),
        ({"labels": ids.float()}, TypeError, "labels must be an integer"),
        ({"labels": ids + model.config.vocab_size}, ValueError, r"labels must be token ids in \[0, 512\) or -100"),
        ({"labels": ids.clone().fill_(-5)}, ValueError, "or -100"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            run(model, **changed(batch, **overrides))
    # The accepted forms still work: -100 labels, a [1, length] position row for the whole batch.
    labels = ids.clone().masked_fill_(batch["attention_mask"] == 0, -100)
    positions = torch.arange(ids.shape[1])[None]
    assert torch.isfinite(run(model, **changed(batch, labels=labels, position_ids=positions)).loss)


def test_caches_from_elsewhere(model, batch, tiny_model_factory):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefill = run(model, **batch, use_cache=True)
    step = {"input_ids": ids[:, -1:], "attention_mask": torch.cat([mask, mask[:, -1:]], 1)}
    expected = run(model, **step, cache=prefill.cache).logits

    other = tiny_model_factory(num_hidden_layers=3).eval()
    foreign = run(other, **batch, use_cache=True).cache
    with pytest.raises(ValueError, match="The cache holds 3 layers but this model has 2"):
        run(model, **step, cache=foreign)
    narrow = tiny_model_factory(num_attention_heads=2, kv_channels=64).eval()
    with pytest.raises(ValueError, match=r"The cache holds keys of shape \(2, 2, \d+, 64\)"):
        run(model, **step, cache=run(narrow, **batch, use_cache=True).cache)
    with pytest.raises(ValueError, match="attention_mask has shape"):  # the mask must cover the cached tokens too
        run(model, input_ids=ids[:, -1:], attention_mask=mask[:, -1:], cache=run(model, **batch, use_cache=True).cache)
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        run(model, **step, cache={"layers": []})

    # A legacy tuple of (key, value) per layer is accepted as a DynamicCache and gives the same step.
    legacy = tuple((layer.keys, layer.values) for layer in run(model, **batch, use_cache=True).cache.layers)
    torch.testing.assert_close(run(model, **step, past_key_values=legacy).logits, expected)
    with pytest.raises(TypeError, match="legacy tuple of 2 \\(key, value\\) pairs, got tuple of length 1"):
        run(model, **step, cache=legacy[:1])


def test_generate_validates_once_and_still_decodes(model, batch):
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(**changed(batch, attention_mask=batch["attention_mask"][:, :-2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model.generate(input_ids=torch.tensor([[5, 10_000]]), max_new_tokens=2)
