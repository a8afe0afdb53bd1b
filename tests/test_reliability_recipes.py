"""Training records: images only from inside `image_root`, and every malformed record skipped and counted."""

import builtins
import os

import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_vl.recipes.collator import QwenVLDataCollator
from qwen_vl.recipes.data import BadRecordError, render_caption_pair, render_dialogue, render_task


def dialogue(image: str) -> dict:
    return {
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{image}</img>\nWhat is it?"},
            {"from": "assistant", "value": "A square."},
        ]
    }


@pytest.fixture
def image_tree(tmp_path):
    """root/inside.png, root/link_in.png -> inside.png, root/link_out.png -> ../outside.png, outside.png."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "sub" / "inside.png")
    PIL.Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "outside.png")
    os.symlink(root / "sub" / "inside.png", root / "link_in.png")
    os.symlink(tmp_path / "outside.png", root / "link_out.png")
    return root


def test_images_outside_image_root_are_never_opened(tiny_processor, image_tree, monkeypatch):
    outside = str(image_tree.parent / "outside.png")
    opened = []
    real_open, real_image_open = builtins.open, PIL.Image.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(os.fspath(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **k: opened.append(str(f)) or real_image_open(f, *a, **k))

    collator = QwenVLDataCollator(tiny_processor, render_dialogue, image_root=str(image_tree))
    escaping = ["../outside.png", "sub/../../outside.png", outside, "link_out.png", "/etc/passwd"]
    for path in escaping:
        with pytest.raises(BadRecordError, match="outside image_root") as error:
            collator.encode(dialogue(path))
        assert error.value.reason == "outside_image_root"
    for path in ("sub/inside.png", "link_in.png", str(image_tree / "sub" / "inside.png")):  # inside, however named
        assert collator.encode(dialogue(path)).pixel_values.shape[0] == 1
    batch = collator([dialogue(path) for path in escaping] + [dialogue("sub/inside.png")])
    assert batch["pixel_values"].shape[0] == 1
    assert collator.skipped == {"outside_image_root": len(escaping)}
    assert not any(os.path.realpath(path) in (outside, "/etc/passwd") for path in opened)

    trusting = QwenVLDataCollator(
        tiny_processor, render_dialogue, image_root=str(image_tree), allow_images_outside_root=True
    )
    assert trusting.encode(dialogue("../outside.png")).pixel_values.shape[0] == 1


MALFORMED = [
    None,
    5,
    "a string",
    [],
    [{"from": "user", "value": "hi"}],
    {},
    {"conversations": 5},
    {"conversations": "Picture 1: <img>a.png</img>"},
    {"conversations": [None, 5]},
    {"conversations": [{"from": ["user"], "value": "hi"}, {"from": "gpt", "value": "ok"}]},
    {"conversations": [{"from": "user", "value": {"text": "hi"}}, {"from": "gpt", "value": "ok"}]},
    {"messages": {"role": "user"}},
    {"messages": [{"role": "user", "content": [5]}, {"role": "assistant", "content": "ok"}]},
    {
        "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "ok"}],
        "images": "abc",
    },
    {"task": ["caption"], "image": "a.png", "caption": "x"},
    {"task": {"caption": 1}},
    {"task": "caption", "image": 5, "caption": "x"},
    {"task": "ref", "image": "a.png", "phrase": ["x"], "box": [1, 2, 3, 4]},
    {"task": "ref", "image": "a.png", "phrase": "x", "box": "1,2,3,4"},
    {"image": "a.png", "caption": ["x"]},
    {"image": {"bytes": 5}, "caption": "x"},
]


@pytest.mark.parametrize("render", [render_dialogue, render_task, render_caption_pair])
def test_malformed_records_of_any_shape_are_skipped_and_counted(tiny_processor, image_tree, render):
    collator = QwenVLDataCollator(tiny_processor, render, image_root=str(image_tree))
    good = {
        render_dialogue: dialogue("sub/inside.png"),
        render_task: {"task": "caption", "image": "sub/inside.png", "caption": "a green square"},
        render_caption_pair: {"image": "sub/inside.png", "caption": "a green square"},
    }[render]
    for record in MALFORMED:
        with pytest.raises(BadRecordError):
            collator.encode(record)
    batch = collator([*MALFORMED, good])
    assert batch["input_ids"].shape[0] == 1
    assert collator.num_skipped == len(MALFORMED)
    assert set(collator.skipped) <= {"malformed", "missing_image"}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.text(max_size=8)
    | st.sampled_from(["user", "gpt", "image", "text"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "from",
                    "value",
                    "role",
                    "content",
                    "type",
                    "text",
                    "image",
                    "images",
                    "task",
                    "caption",
                    "conversations",
                    "messages",
                    "box",
                    "phrase",
                    "bytes",
                    "path",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=json_values)
def test_any_record_is_encoded_or_refused_as_a_bad_record(tiny_processor, tmp_path, record):
    for render in (render_dialogue, render_task, render_caption_pair):
        collator = QwenVLDataCollator(tiny_processor, render, image_root=str(tmp_path))
        try:
            collator.encode(record)
        except BadRecordError as error:
            assert error.reason in ("malformed", "missing_image", "corrupt_image", "outside_image_root", "no_targets")
