"""Stage 0 of the demo on a few tiny scenes: the cached dataset gives the items decoding anew would, and training
with a DataLoader worker (the demo's setting) gives the same losses as without."""

import json

import open_clip
import pytest
import torch
from PIL import Image

from qwen_vl.demo import run as demo
from qwen_vl.demo import stage0, world


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(8 drawn train scenes at 56 px, their OpenCLIP CSV, the registered tiny OpenCLIP config)."""
    root = tmp_path_factory.mktemp("stage0")
    train = world.generate_scenes(root, "train", 8, demo.FAST.image_size, seed=0, progress=False)
    csv_path = stage0.write_clip_csv(root / "clip_train.csv", train)
    config = stage0.register_clip_config(root / "configs", "test-shapes-clip", 56, demo.FAST.model["visual"], 48)
    return train, csv_path, config


def test_cached_items_are_the_freshly_decoded_ones(scenes):
    train, csv_path, config = scenes
    tokenizer = open_clip.get_tokenizer(config.stem)
    dataset = stage0.CaptionedScenes(csv_path, train, tokenizer)
    for index, scene in enumerate(train):
        with Image.open(csv_path.parent / scene.image) as image:
            expected = stage0.to_pixels(image.convert("RGB"))
        for _ in range(2):  # first use decodes, the second comes from the cache
            item = dataset[index]
            assert torch.equal(item["pixel_values"], expected)
            assert torch.equal(item["text"], tokenizer([world.caption(scene)])[0])
            assert torch.equal(item["shape_targets"], stage0.shape_targets(scene))
    # The collated batch equals tokenizing the batch's captions at once, as OpenCLIP's training script does.
    batch = torch.stack([dataset[i]["text"] for i in range(len(train))])
    assert torch.equal(batch, tokenizer([world.caption(scene) for scene in train]))


def test_a_dataloader_worker_gives_the_same_losses(scenes, tmp_path):
    """Two epochs (the second from the cache, in the worker process), with and without a worker."""
    train, csv_path, config = scenes
    settings = {**demo.FAST.common, **demo.FAST.clip, "max_steps": 4, "per_device_train_batch_size": 4}
    settings.update(logging_steps=1, disable_tqdm=True)
    losses = []
    for workers in (0, 1):
        output_dir = tmp_path / f"workers{workers}"
        run = {**settings, "dataloader_num_workers": workers, "dataloader_persistent_workers": workers > 0}
        stage0.train_clip(config.stem, csv_path, train, output_dir, run, 1.0, seed=0)
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        losses.append([entry["loss"] for entry in history if "loss" in entry])
    assert len(losses[0]) == 4 and losses[1] == losses[0]
