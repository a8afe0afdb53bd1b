"""The demo world's texts: stage-3 dialogues whose answers cannot be copied from earlier turns, and the stage-0
language model's scene documents, whose answers can be read from the context above them."""

import random
import re

import pytest
from PIL import Image

from qwen_vl.demo import stage0, world


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    return [world.render_scene(rng, 56, word_probability=0.5)[1] for _ in range(300)]


def test_dialogue_answers_are_not_in_earlier_turns(scenes):
    rng = random.Random(1)
    orders = set()
    for scene in scenes:
        turns = world.dialogue(scene, rng, max_turns=8)
        questions = [question for question, _ in turns]
        assert 1 <= len(turns) <= 8 and len(set(questions)) == len(questions)
        grounding = [i for i, q in enumerate(questions) if q.startswith("Where is")]
        assert len(grounding) == len(scene.shapes)  # every shape, once
        assert grounding == list(range(grounding[0], grounding[0] + len(grounding)))
        boxes = [re.search(r"<box>.*</box>", turns[i][1]).group() for i in grounding]
        expected = [re.search(r"<box>.*</box>", scene.grounding("", s)).group() for s in scene.shapes]
        assert sorted(boxes) == sorted(expected)
        head = questions[: grounding[0]]  # count and caption come before any grounding question, count first
        assert head in ([], [world.CAPTION_PROMPT], [world.COUNT_PROMPT, world.CAPTION_PROMPT])
        orders.add(len(head))
        assert world.COUNT_PROMPT not in questions[grounding[0] :]
        assert len(turns) - grounding[-1] - 1 <= world.EXTRA_TURNS
    assert orders == {0, 1, 2}


def test_sft_records_are_official_format_dialogues(scenes):
    for index, scene in enumerate(scenes[:20]):
        scene.image = f"images/train_{index:05d}.png"
    records = world.sft_records(scenes[:20], random.Random(2))
    for record, scene in zip(records, scenes):
        turns = record["conversations"]
        assert [turn["from"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns[0]["value"].startswith(f"Picture 1: <img>{scene.image}</img>\n")
        assert all("<img>" not in turn["value"] for turn in turns[1:])


def test_language_model_documents_hold_the_answers_in_context(scenes):
    texts = stage0.world_texts(scenes, seed=0)
    assert len(texts) == len(scenes)
    grounded = {world.grounded_caption(scene) for scene in scenes}
    for text in texts:
        first, *lines = text.split("\n")
        assert first in grounded  # each document starts with its scene's grounded caption
        assert 2 <= len(lines) <= 12 and len(lines) % 2 == 0
        for question, answer in zip(lines[::2], lines[1::2]):
            if question.startswith("Where is"):
                assert re.search(r"<box>.*</box>", answer).group() in first


def test_scenes_are_the_same_whatever_the_number_of_painting_processes(tmp_path):
    """`generate_scenes` draws every scene from one random stream and paints them in worker processes: the images
    and scenes do not depend on how many."""
    one = world.generate_scenes(tmp_path / "one", "train", 300, 56, seed=3, progress=False, workers=1)
    two = world.generate_scenes(tmp_path / "two", "train", 300, 56, seed=3, progress=False, workers=2)
    assert one == two
    for scene in one:
        assert (tmp_path / "one" / scene.image).read_bytes() == (tmp_path / "two" / scene.image).read_bytes()
    image, scene = world.render_scene(random.Random("3-train"), 56)
    assert scene.shapes == one[0].shapes
    assert image.tobytes() == Image.open(tmp_path / "one" / one[0].image).convert("RGB").tobytes()
