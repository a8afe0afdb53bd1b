"""The one home of the Qwen-VL text format: its rule for boxes off the grid, and the modules that read it."""

import pytest

from modeling_qwen_vl import text_format
from modeling_qwen_vl.grounding_qwen_vl import box_to_text
from qwen_vl.recipes.data import BadRecordError, render_task


@pytest.mark.parametrize("box", [[0, 0, 999, 999], [5, 6, 5, 6]])
def test_grid_boxes_on_the_grid_are_written_as_given(box):
    assert text_format.grid_box_text(box) == f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"


@pytest.mark.parametrize("box", [[-1, 0, 10, 10], [0, 0, 1000, 10], [10, 0, 5, 10], [1.0, 2, 3, 4], (1, 2, 3)])
def test_grid_boxes_off_the_grid_are_refused_not_clipped(box):
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        text_format.grid_box_text(box, "record box")


def test_geometric_boxes_are_rounded_and_clipped_by_the_one_conversion():
    assert box_to_text((-5, 0.4, 1200, 999.6)) == "<box>(0,0),(999,999)</box>"
    assert box_to_text((320, 240, 640, 480), image_size=(640, 480)) == "<box>(500,500),(999,999)</box>"


def test_training_records_follow_the_grid_rule():
    record = {"task": "ref", "image": "a.png", "phrase": "the dog", "box": [10, 20, 300, 400]}
    assert render_task(record).completion.startswith("<box>(10,20),(300,400)</box>")
    with pytest.raises(BadRecordError, match=r"malformed: bad box \[10, 20, 1300, 400\]"):
        render_task({**record, "box": [10, 20, 1300, 400]})


def test_stop_tokens_and_markup_come_from_one_place(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    assert tokenizer.chat_stop_ids == [tokenizer.convert_tokens_to_ids(t) for t in text_format.CHAT_STOP_TOKENS]
    assert tokenizer.chat_template == text_format.CHAT_TEMPLATE
    assert text_format.MARKUP_TOKEN.findall("<img>a</img><imgpad><ref>b</ref>") == [
        "<img>", "</img>", "<imgpad>", "<ref>", "</ref>"
    ]
    with pytest.raises(ValueError, match=r"q: </box> at character 0 closes nothing"):
        text_format.check_markup("</box>", "q")
