"""Recipes data pipeline: task formats, dialogue rendering, SFT label mask, bad records, loaders, packing."""

import io
import itertools
import json
import tarfile

import datasets
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from qwen_vl.recipes.collator import IGNORE_INDEX, QwenVLDataCollator
from qwen_vl.recipes.data import BadRecordError, load_records, render_caption_pair, render_dialogue, render_task


def _png(path, color=(200, 30, 60), size=(40, 30)):
    PIL.Image.new("RGB", size, color).save(path)
    return str(path)


def _png_bytes(color=(10, 120, 240)):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (24, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "record, prompt, completion",
    [
        (
            {"task": "caption", "image": "a.png", "caption": "a dog"},
            "<img></img>Generate the caption in English:",
            " a dog",
        ),
        (
            {"task": "vqa", "image": "a.png", "question": "Is it red?", "answer": "yes"},
            "<img></img>Is it red? Answer:",
            " yes",
        ),
        (
            {"task": "grounding", "image": "a.png", "caption": "<ref>a dog</ref><box>(1,2),(3,4)</box> runs"},
            "<img></img>Generate the caption in English with grounding:",
            " <ref>a dog</ref><box>(1,2),(3,4)</box> runs",
        ),
        (
            {"task": "ref", "image": "a.png", "phrase": "the dog", "box": [10, 20, 300, 400]},
            "<img></img><ref>the dog</ref>",
            "<box>(10,20),(300,400)</box>",
        ),
        (
            {"task": "grounded_caption", "image": "a.png", "phrase": "a dog", "box": [10, 20, 300, 400]},
            "<img></img><ref>This</ref><box>(10,20),(300,400)</box>",
            " is a dog",
        ),
        ({"task": "ocr", "image": "a.png", "text": "STOP"}, "<img></img>OCR:", " STOP"),
        ({"task": "text", "text": "Once upon a time"}, "", "Once upon a time"),
    ],
)
def test_task_formats(record, prompt, completion):
    example = render_task(record)
    assert (example.text, example.completion, example.task) == (prompt, completion + "<|endoftext|>", record["task"])
    assert example.images == (["a.png"] if "image" in record else [])


def test_caption_pairs_accept_webdataset_keys():
    example = render_caption_pair({"jpg": {"bytes": b"..."}, "txt": "a cat", "__key__": "0001"})
    assert (example.text, example.completion, example.images) == (
        "<img></img>Generate the caption in English:",
        " a cat<|endoftext|>",
        [{"bytes": b"..."}],
    )


def test_official_and_trl_dialogues_render_the_same(tiny_processor):
    official = {
        "id": "1",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat is it?"},
            {"from": "assistant", "value": "hello"},
        ],
    }
    trl = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        ],
        "images": ["a.png"],
    }
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <img></img>\n"
        "What is it?<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
    )
    for record in (official, trl):
        example = render_dialogue(record, tiny_processor.tokenizer)
        assert (example.text, example.images, example.completion) == (expected, ["a.png"], None)


def test_sft_label_mask_is_exact(tiny_processor, tmp_path):
    """Trained: each assistant reply and its closing <|im_end|>. Everything else, headers included, is -100."""
    images = [PIL.Image.new("RGB", (30, 30), (i * 90, 40, 40)) for i in range(2)]
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "which?"}]},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": [{"type": "text", "text": "world"}]},
        ],
        "images": images,
    }
    header = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <img></img>\nPicture 2: <img></img>\n"
    )
    segments = [
        (header + "which?<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello world", True),
        ("<|im_end|>", True),
        ("\n<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n", False),
        ("world", True),
        ("<|im_end|>", True),
    ]
    tokenizer = tiny_processor.tokenizer
    expected_ids, expected_labels = [], []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)

    collator = QwenVLDataCollator(tiny_processor, render_dialogue, max_length=2048)
    encoded = collator.encode(record)
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    assert encoded.pixel_values.shape == (2, 3, 56, 56)
    batch = collator(
        [record, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    )
    assert batch["labels"][0].tolist() == expected_labels
    trained = [tokenizer.decode([t]) for t in batch["labels"][1].tolist() if t != IGNORE_INDEX]
    assert trained == [tokenizer.decode([t]) for t in tokenizer("hello<|im_end|>")["input_ids"]]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # right-padded
    assert batch["input_ids"][1, -1] == tokenizer.pad_token_id


def test_bad_records_are_skipped_and_counted(tiny_processor, tmp_path):
    good = _png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])

    def dialogue(user, reply="hello"):
        return {"conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": reply}]}

    records = [
        dialogue("Picture 1: <img>good.png</img>\nhi"),
        dialogue("Picture 1: <img>missing.png</img>\nhi"),  # missing_image
        dialogue("Picture 1: <img>garbage.png</img>\nhi"),  # corrupt_image
        dialogue("Picture 1: <img>truncated.png</img>\nhi"),  # corrupt_image
        dialogue("<ref>unclosed box"),  # malformed tags
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "assistant", "value": "x"}]},  # malformed role
        {
            "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
            "images": [good, good],
        },  # malformed: 1 placeholder, 2 images
        dialogue("x" * 300 + "Picture 1: <img>good.png</img>\nhi"),  # too_long: the cut would go through the image
        dialogue("x" * 400),  # no_targets: truncation leaves no reply
    ]
    collator = QwenVLDataCollator(tiny_processor, render_dialogue, max_length=400, image_root=str(tmp_path))
    batch = collator(records)
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert collator.skipped == {"malformed": 3, "missing_image": 1, "corrupt_image": 2, "too_long": 1, "no_targets": 1}
    assert collator.num_skipped == 8

    again = collator(records[1:3])  # an all-bad batch reuses the last good example
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert collator.num_skipped == 10
    fresh = QwenVLDataCollator(tiny_processor, render_dialogue, image_root=str(tmp_path))
    with pytest.raises(ValueError, match="Every record of the first batch was bad"):
        fresh(records[1:3])
    fresh.prime(records[1:])  # the first good record becomes the stand-in; priming does not count
    assert fresh(records[1:3])["input_ids"].shape[0] == 1 and fresh.num_skipped == 4
    with pytest.raises(ValueError, match="None of the first 2 records"):
        fresh.prime(records[1:], limit=2)
    with pytest.raises(BadRecordError, match="unknown task"):
        render_task({"task": "poetry", "text": "x"})


def test_loaders_keep_images_lazy(tiny_processor, tmp_path):
    images = [_png(tmp_path / f"{i}.png", (i * 60, 90, 20)) for i in range(2)]
    official = tmp_path / "official.json"
    official.write_text(
        json.dumps(
            [
                {
                    "id": str(i),
                    "conversations": [
                        {"from": "user", "value": f"Picture 1: <img>{path}</img>\nhi"},
                        {"from": "assistant", "value": "hello"},
                    ],
                }
                for i, path in enumerate(images)
            ]
        )
    )
    trl = tmp_path / "trl.jsonl"
    trl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "world"}]},
                    ],
                    "images": [images[0]],
                },
                {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "hello"}]},
            ]
        )
    )
    parquet = tmp_path / "captions.parquet"
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "caption": ["red", "green"]}, features=features).to_parquet(parquet)
    shard = tmp_path / "shard-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, payload in [
            ("0000.png", _png_bytes()),
            ("0000.txt", b"blue"),
            ("0001.png", b"corrupt"),
            ("0001.txt", b"x"),
        ]:
            info = tarfile.TarInfo(key)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    sft = QwenVLDataCollator(tiny_processor, render_dialogue)
    assert sft(list(load_records(str(official))))["pixel_values"].shape[0] == 2
    assert sft(list(load_records([str(trl)])))["input_ids"].shape[0] == 2

    captions = load_records(str(parquet))
    assert isinstance(captions[0]["image"], dict)  # bytes/path, decoded in the collator
    pretrain = QwenVLDataCollator(tiny_processor, render_caption_pair)
    assert pretrain(list(captions))["pixel_values"].shape[0] == 2

    stream = load_records(str(tmp_path / "*.tar"), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    batch = pretrain(list(stream))
    assert batch["input_ids"].shape[0] == 1 and pretrain.skipped == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="must all be one of"):
        load_records([str(official), str(parquet)])


def _multitask_records():
    def image(i):
        return PIL.Image.new("RGB", (20, 20), (i * 40, 80, 160))

    return [
        {"task": "caption", "image": image(1), "caption": "hello world"},
        {"task": "text", "text": "hello hello world"},
        {"task": "vqa", "image": image(2), "question": "what?", "answer": "world"},
        {"task": "caption", "image": image(3), "caption": "hell or"},
        {"task": "text", "text": "world or hello"},
        {"task": "ref", "image": image(4), "phrase": "the hello", "box": [1, 2, 300, 400]},
        {"task": "grounded_caption", "image": image(5), "phrase": "a world", "box": [5, 6, 700, 800]},
        {"task": "grounding", "image": image(6), "caption": "<ref>hello</ref><box>(1,2),(3,4)</box> world"},
        {"task": "ocr", "image": image(7), "text": "HELLO"},
    ]


def test_packing_layout(tiny_processor):
    records = _multitask_records()
    collator = QwenVLDataCollator(tiny_processor, render_task, max_length=600, packing=True)
    batch = collator(records)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 600
    assert batch["pixel_values"].shape[0] == 7
    singles = [collator.encode(record) for record in records]
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        positions = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        segments = [(a, b) for a, b in itertools.pairwise(starts) if (batch["labels"][row, a:b] != IGNORE_INDEX).any()]
        assert positions[segments[-1][1] - 1] == segments[-1][1] - segments[-1][0] - 1  # positions restart
        tasks = set()
        for a, b in segments:
            match = next(s for s in singles if s.input_ids == batch["input_ids"][row, a:b].tolist())
            assert batch["labels"][row, a:b].tolist() == [IGNORE_INDEX, *match.labels[1:]]
            tasks.add(match.task)
        assert len(tasks) == 1  # same-task examples only
        rows.append(len(segments))
    assert sum(rows) == len(records) and max(rows) == 2  # the two captions and the two texts share rows


def test_completion_only_loss_false_trains_the_prompt_text_but_no_image_span(tiny_processor):
    """`completion_only_loss=False`: a referring expression's phrase is trained along with its box; the image span
    and nothing else stays -100; dialogues still train their assistant replies only."""
    tokenizer = tiny_processor.tokenizer
    record = _multitask_records()[5]  # ref: "<img></img><ref>the hello</ref>" -> its box
    only = QwenVLDataCollator(tiny_processor, render_task).encode(record)
    full = QwenVLDataCollator(tiny_processor, render_task, completion_only_loss=False).encode(record)
    assert full.input_ids == only.input_ids
    start, end = full.input_ids.index(tokenizer.img_start_id), full.input_ids.index(tokenizer.img_end_id)
    expected = [IGNORE_INDEX if start <= i <= end else token for i, token in enumerate(full.input_ids)]
    assert full.labels == expected
    phrase = tokenizer("the hello", add_special_tokens=False)["input_ids"]
    trained = [label for label in full.labels if label != IGNORE_INDEX]
    assert any(trained[i : i + len(phrase)] == phrase for i in range(len(trained)))
    untrained_in_only = sum(label == IGNORE_INDEX for label in only.labels)
    assert untrained_in_only == end + 1 + len(phrase) + 2  # <ref>, phrase, </ref> are untrained by default

    dialogue = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    default = QwenVLDataCollator(tiny_processor, render_dialogue).encode(dialogue)
    assert QwenVLDataCollator(tiny_processor, render_dialogue, completion_only_loss=False).encode(dialogue) == default


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_losses_equal_unpacked(tiny_processor, tiny_model_factory, attn_implementation):
    """Packed rows (no attention_mask, restarting position_ids) give every example its unpacked per-token losses."""
    model = tiny_model_factory(attn_implementation=attn_implementation)
    model.config.use_cache = False
    records = _multitask_records()
    packed_collator = QwenVLDataCollator(tiny_processor, render_task, max_length=600, packing=True)
    single_collator = QwenVLDataCollator(tiny_processor, render_task, max_length=600)

    def token_losses(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape), targets

    with torch.no_grad():
        packed = packed_collator(records)
        packed_losses, packed_targets = token_losses(packed)
        compared = 0
        for record in records:
            single = single_collator([record])
            losses, targets = token_losses(single)
            ids = single["input_ids"][0].tolist()
            row, start = next(
                (r, s)
                for r in range(packed["input_ids"].shape[0])
                for s in (packed["position_ids"][r] == 0).nonzero().flatten().tolist()
                if packed["input_ids"][r, s : s + len(ids)].tolist() == ids
            )
            window = slice(start, start + len(ids) - 1)
            assert torch.equal(packed_targets[row, window], targets[0])
            kept = targets[0] != IGNORE_INDEX
            torch.testing.assert_close(packed_losses[row, window][kept], losses[0][kept], rtol=0, atol=1e-5)
            compared += 1
    assert compared == len(records)
