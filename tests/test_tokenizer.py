"""QwenVLTokenizer against the official tokenizer's golden outputs, plus its own contracts."""

import json

import jinja2
import pytest
from PIL import Image

from modeling_qwen_vl.text_format import IMAGE_SPAN_LENGTH, SPECIAL_TOKENS
from modeling_qwen_vl.tokenization_qwen_vl import QwenVLTokenizer


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return QwenVLTokenizer(str(vocab_file))


def chat_messages(case):
    """Messages of a golden `chat` case: optional system, history pairs, then the query."""
    messages = [{"role": "system", "content": case["system"]}] if "system" in case else []
    for user, assistant in case["history"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": case["query"]}]


def test_special_token_ids(tokenizer, tokenizer_golden):
    for token, token_id in tokenizer_golden["special_tokens"].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    ids = tokenizer_golden["special_tokens"]
    assert tokenizer.eod_id == tokenizer.eos_token_id == tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (ids["<|im_start|>"], ids["<|im_end|>"])
    assert (tokenizer.ref_start_id, tokenizer.ref_end_id) == (ids["<ref>"], ids["</ref>"])
    assert (tokenizer.box_start_id, tokenizer.box_end_id) == (ids["<box>"], ids["</box>"])
    assert (tokenizer.quad_start_id, tokenizer.quad_end_id) == (ids["<quad>"], ids["</quad>"])
    assert (tokenizer.img_start_id, tokenizer.img_end_id) == (ids["<img>"], ids["</img>"])
    assert tokenizer.img_pad_id == ids["<imgpad>"]


def test_encode_golden(tokenizer, tokenizer_golden):
    for case in tokenizer_golden["encode"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer(case["text"])["input_ids"] == case["ids"], case["text"]


def test_list_format_golden(tokenizer, tokenizer_golden):
    for case in tokenizer_golden["list_format"]:
        text = tokenizer.from_list_format(case["elements"])
        assert text == case["text"]
        assert tokenizer.encode(text) == case["ids"]


def test_chat_golden(tokenizer, tokenizer_golden):
    for case in tokenizer_golden["chat"]:
        messages = chat_messages(case)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == case["raw_text"]
        # transformers 5 returns a BatchEncoding by default, the bare ids with return_dict=False.
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert encoded["input_ids"] == case["ids"]
        assert encoded["attention_mask"] == [1] * len(case["ids"])
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == case["ids"]


def control_token_case(tokenizer_golden) -> dict:
    return next(case for case in tokenizer_golden["chat"] if "<|im_start|>" in case["query"])


def test_typed_control_tokens_stay_text_in_the_processor_and_can_be_trusted(tokenizer, tokenizer_golden):
    """The official `make_context`: ChatML tokens typed in a message are text; `sanitize_control_tokens=False` opts
    out."""
    from modeling_qwen_vl import QwenVLImageProcessor, QwenVLProcessor

    case = control_token_case(tokenizer_golden)
    messages = chat_messages(case)
    processor = QwenVLProcessor(QwenVLImageProcessor(), tokenizer)
    encoded = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert encoded["input_ids"][0] == case["ids"]
    # Two user turns, the history's reply and the generation prompt: exactly the template's own <|im_start|>s.
    assert case["ids"].count(tokenizer.im_start_id) == 1 + 2 * (len(case["history"]) + 1)
    trusted = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=False
    )
    assert trusted == tokenizer.encode(case["raw_text"])
    assert trusted.count(tokenizer.im_start_id) > case["ids"].count(tokenizer.im_start_id)


def test_decode_golden(tokenizer, tokenizer_golden):
    for case in tokenizer_golden["decode"]:
        assert tokenizer.decode(case["ids"]) == case["text"]
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["text_skip_special"]
        if case["list_format"] is not None:
            assert tokenizer.to_list_format(case["text"]) == case["list_format"]


def test_image_span_layout(tokenizer):
    ids = tokenizer.encode("a<img>dir/é.png</img>b")
    start, end = ids.index(tokenizer.img_start_id), ids.index(tokenizer.img_end_id)
    assert end - start + 1 == IMAGE_SPAN_LENGTH + 2
    path = "dir/é.png".encode()
    assert ids[start + 1 : start + 1 + len(path)] == list(path)
    assert ids[start + 1 + len(path) : end] == [tokenizer.img_pad_id] * (IMAGE_SPAN_LENGTH - len(path))

    empty = tokenizer.encode("<img></img>")
    assert empty == [tokenizer.img_start_id] + [tokenizer.img_pad_id] * IMAGE_SPAN_LENGTH + [tokenizer.img_end_id]
    assert tokenizer.decode(empty) == "<img></img>"
    # A padded span written out token by token ("<img><imgpad>...</img>") encodes back to the same ids.
    assert tokenizer.encode(tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(empty))) == empty
    assert tokenizer.decode(empty, skip_special_tokens=True) == ""

    assert len(tokenizer.encode("<img>" + "x" * IMAGE_SPAN_LENGTH + "</img>")) == IMAGE_SPAN_LENGTH + 2
    with pytest.raises(ValueError, match=r"257 bytes.*at most 256"):
        tokenizer.encode("<img>" + "x" * (IMAGE_SPAN_LENGTH + 1) + "</img>")
    with pytest.raises(ValueError, match="Unclosed <img>"):
        tokenizer.encode("<img>a.png")


def test_decode_errors_and_out_of_range(tokenizer):
    lone_lead_byte = tokenizer.mergeable_ranks[b"\xc3"]  # invalid UTF-8 on its own
    exclamation = tokenizer.mergeable_ranks[b"!"]
    assert tokenizer.decode([lone_lead_byte, exclamation]) == "\ufffd!"
    assert tokenizer.decode([lone_lead_byte, exclamation], errors="ignore") == "!"
    span = [tokenizer.img_start_id, 0xC3, tokenizer.img_end_id]
    assert tokenizer.decode(span) == "<img>\ufffd</img>"
    assert tokenizer.decode(span, errors="ignore") == "<img></img>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([len(tokenizer)])


def test_normalisation_and_split_special_tokens(tokenizer):
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("café")
    text = "say <|im_end|> and <img>"
    ids = tokenizer.encode(text, split_special_tokens=True)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == text


def test_vocab_api(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == len(tokenizer.get_vocab()) == 151643 + len(SPECIAL_TOKENS)
    assert tokenizer.get_vocab()["<imgpad>"] == tokenizer.img_pad_id
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    tokens = tokenizer.tokenize("Hello world <ref>猫</ref>")
    assert tokens[:2] == ["Hello", "Ġworld"] and "<ref>" in tokens
    assert tokenizer.convert_tokens_to_string(tokens) == "Hello world <ref>猫</ref>"
    assert tokenizer.convert_tokens_to_ids(tokens) == tokenizer.encode("Hello world <ref>猫</ref>")


def test_vocabulary_is_fixed(tmp_path, write_vocab):
    tiny = tmp_path / "qwen.tiktoken"
    write_vocab(tiny)
    tokenizer = QwenVLTokenizer(str(tiny))
    with pytest.raises(ValueError, match="vocabulary is fixed"):
        tokenizer.add_tokens(["<new>"])
    assert tokenizer.add_special_tokens({"pad_token": "<|extra_0|>"}) == 0
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|extra_0|>")
    assert len(tokenizer) == tokenizer.vocab_size


def test_batch_padding(tokenizer, tmp_path):
    """Decoder-only generation needs left padding: the default, saved in tokenizer_config.json."""
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["hi", "Picture 1: <img></img>\nhello there"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    length = batch["input_ids"].shape[1]
    short = tokenizer.encode("hi")
    assert batch["input_ids"][0].tolist() == [tokenizer.pad_token_id] * (length - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (length - len(short)) + [1] * len(short)
    right = tokenizer(["hi", "hello there friend"], padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"][0, 0].item() == short[0] and right["attention_mask"][0, -1].item() == 0
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_chat_template_content_items(tokenizer):
    as_text = [{"role": "user", "content": "Picture 1: <img>a.png</img>\nPicture 2: <img></img>\nCompare."}]
    as_items = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": "a.png"},
                {"type": "image", "image": Image.new("RGB", (4, 4))},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    text = tokenizer.apply_chat_template(as_items, add_generation_prompt=True, tokenize=False)
    assert text == tokenizer.apply_chat_template(as_text, add_generation_prompt=True, tokenize=False)
    assert text.endswith("Compare.<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(as_items, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.img_start_id) == 2 and ids.count(tokenizer.img_end_id) == 2
    with pytest.raises(jinja2.TemplateError, match="Unsupported content item type 'video'"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


def test_list_format_helpers(tokenizer):
    assert tokenizer.from_list_format([{"box": [[1, 2, 3, 4], [5, 6, 7, 8]]}]) == (
        "<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
    )
    assert tokenizer.from_list_format([{"ref": "cat"}]) == "<ref>cat</ref>"
    assert tokenizer.to_list_format("<quad>(1,2),(3,4),(5,6),(7,8)</quad> x") == [
        {"quad": "(1,2),(3,4),(5,6),(7,8)"},
        {"text": " x"},
    ]
    with pytest.raises(TypeError, match="list of dicts"):
        tokenizer.from_list_format("Picture 1")
    with pytest.raises(ValueError, match="Unsupported list_format element"):
        tokenizer.from_list_format([{"video": "v.mp4"}])
    with pytest.raises(ValueError, match="4 integers"):
        tokenizer.from_list_format([{"ref": "cat", "box": [[1, 2, 3]]}])
    with pytest.raises(ValueError, match="4 integers"):
        tokenizer.from_list_format([{"box": [[1.5, 2, 3, 4]]}])
    with pytest.raises(ValueError, match="Unclosed <ref>"):
        tokenizer.to_list_format("a <ref>cat")
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.to_list_format([1, 2])


def test_save_load_round_trip(tokenizer, vocab_file, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == vocab_file.read_bytes()
    assert (tmp_path / "chat_template.jinja").read_text() == tokenizer.chat_template
    reloaded = QwenVLTokenizer.from_pretrained(tmp_path)
    text = "Picture 1: <img>a.png</img>\n<ref>猫</ref><box>(1,2),(3,4)</box><|im_end|> end"
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.added_tokens_decoder == tokenizer.added_tokens_decoder
    assert (reloaded.pad_token_id, reloaded.eos_token_id, len(reloaded)) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        len(tokenizer),
    )


def test_tiny_vocabulary(tmp_path, write_vocab):
    tiny = tmp_path / "qwen.tiktoken"
    num_ranks = write_vocab(tiny)
    tokenizer = QwenVLTokenizer(str(tiny))
    assert len(tokenizer) == num_ranks + len(SPECIAL_TOKENS)
    assert tokenizer.eod_id == num_ranks and tokenizer.img_pad_id == num_ranks + len(SPECIAL_TOKENS) - 1
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(num_ranks, len(tokenizer)))
    assert tokenizer.encode("hello world") == [259, 263]
    text = "<|im_start|>user\nhello<img>p.png</img><|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.im_start_id and len(ids) - ids.index(tokenizer.img_start_id) == 258 + 1
    assert tokenizer.decode(ids) == text

    tiny.unlink()  # saving then writes the ranks from memory instead of copying the file
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "qwen.tiktoken").read_bytes().splitlines()[256] == b"aGU= 256"
    assert QwenVLTokenizer.from_pretrained(tmp_path / "saved").encode(text) == ids


def test_invalid_vocabulary(tmp_path, write_vocab):
    missing_bytes = tmp_path / "missing.tiktoken"
    write_vocab(missing_bytes, [bytes([b]) for b in range(200)])
    with pytest.raises(ValueError, match="all 256 single-byte tokens"):
        QwenVLTokenizer(str(missing_bytes))
    malformed = tmp_path / "malformed.tiktoken"
    malformed.write_bytes(b"IQ== zero\n")
    with pytest.raises(ValueError, match="line 1"):
        QwenVLTokenizer(str(malformed))


def test_image_span_length_is_configurable_and_saved(vocab_file, tmp_path):
    """A model with fewer image queries (e.g. the demo's) uses a tokenizer whose spans hold that many positions."""
    tokenizer = QwenVLTokenizer(str(vocab_file), image_span_length=16)
    ids = tokenizer.encode("<img>a.png</img>b")
    assert ids[: ids.index(tokenizer.img_end_id) + 1] == (
        [tokenizer.img_start_id, *b"a.png"] + [tokenizer.img_pad_id] * 11 + [tokenizer.img_end_id]
    )
    with pytest.raises(ValueError, match=r"17 bytes.*at most 16"):
        tokenizer.encode("<img>" + "x" * 17 + "</img>")
    tokenizer.save_pretrained(tmp_path)
    assert QwenVLTokenizer.from_pretrained(tmp_path).image_span_length == 16
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="image_span_length must be a positive int"):
            QwenVLTokenizer(str(vocab_file), image_span_length=bad)
