"""The official `QWenTokenizer` attribute API that serving engines (vLLM, LightLLM) read, checked in a fresh process
that loads a saved tokenizer through `AutoTokenizer` with `trust_remote_code=True`, against the official values."""

import base64
import json
import subprocess
import sys
import textwrap

import pytest

from modeling_qwen_vl import QwenVLTokenizer

TAGS = {
    "image_start_tag": "<img>",
    "image_end_tag": "</img>",
    "image_pad_tag": "<imgpad>",
    "ref_start_tag": "<ref>",
    "ref_end_tag": "</ref>",
    "box_start_tag": "<box>",
    "box_end_tag": "</box>",
    "quad_start_tag": "<quad>",
    "quad_end_tag": "</quad>",
}
# The official order of `QWenTokenizer.IMAGE_ST`.
OFFICIAL_IMAGE_ST = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
# `*_id` attribute -> token, as in the official tokenizer.
ID_ATTRIBUTES = {
    "img_start_id": "<img>",
    "img_end_id": "</img>",
    "img_pad_id": "<imgpad>",
    "ref_start_id": "<ref>",
    "ref_end_id": "</ref>",
    "box_start_id": "<box>",
    "box_end_id": "</box>",
    "quad_start_id": "<quad>",
    "quad_end_id": "</quad>",
    "im_start_id": "<|im_start|>",
    "im_end_id": "<|im_end|>",
    "eod_id": "<|endoftext|>",
}

# What a serving engine does with the tokenizer. The subclass follows vLLM's `_get_tokenizer_without_image_pad`
# (vllm/model_executor/models/qwen_vl.py): a deep copy whose class overrides `tokenize` and `_decode` on top of the
# tiktoken `Encoding` (`.tokenizer`) and `.decoder`, so `<img></img>` is not expanded (vLLM expands it itself).
FRESH_PROCESS = textwrap.dedent(
    """
    import copy, json, sys, unicodedata
    sys.modules["modeling_qwen_vl"] = None  # only the saved repo's own files exist
    import tiktoken
    from transformers import AutoTokenizer

    repo, texts = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)


    def without_image_pad(tokenizer):
        copied = copy.deepcopy(tokenizer)

        class TokenizerWithoutImagePad(tokenizer.__class__):
            def tokenize(self, text, allowed_special="all", disallowed_special=(), **kwargs):
                text = unicodedata.normalize("NFC", text)
                ids = self.tokenizer.encode(
                    text, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
                return [self.decoder[i] for i in ids]

            def _decode(self, token_ids, skip_special_tokens=False, errors=None, **kwargs):
                token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
                return self.tokenizer.decode(token_ids, errors=errors or self.errors)

        copied.__class__ = TokenizerWithoutImagePad
        return copied


    plain = without_image_pad(tokenizer)
    names = json.loads(sys.argv[3])
    result = {
        "attributes": {name: getattr(tokenizer, name) for name in names},
        "IMAGE_ST": list(tokenizer.IMAGE_ST),
        "special_tokens": tokenizer.special_tokens,
        "is_tiktoken": isinstance(tokenizer.tokenizer, tiktoken.Encoding),
        "n_vocab": tokenizer.tokenizer.n_vocab,
        "decoder": {str(i): [type(tokenizer.decoder[i]).__name__, list(tokenizer.decoder[i]) if isinstance(
            tokenizer.decoder[i], bytes) else tokenizer.decoder[i]] for i in json.loads(sys.argv[4])},
        "errors": tokenizer.errors,
        "padding_side": tokenizer.padding_side,
        "full": [tokenizer(text)["input_ids"] for text in texts],
        "plain": [plain(text)["input_ids"] for text in texts],
        "plain_decoded": [plain.decode(plain(text)["input_ids"]) for text in texts],
        "tokenize_text_only": tokenizer.convert_tokens_to_ids(
            tokenizer.tokenize("hi <|im_end|> <ref>", allowed_special={"<ref>"})
        ),
        "encode_image_st": tokenizer.encode("<|im_end|><ref>x</ref>", allowed_special=set(tokenizer.IMAGE_ST)),
    }
    try:
        tokenizer.tokenize("a <|im_end|>", allowed_special=set(), disallowed_special="all")
        result["disallowed"] = "no error"
    except ValueError as error:
        result["disallowed"] = str(error)
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def saved_tokenizer(vocab_file, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    QwenVLTokenizer(str(vocab_file)).save_pretrained(directory)
    return directory


def test_serving_engine_tokenizer_contract(saved_tokenizer, vocab_file, tokenizer_golden):
    golden = tokenizer_golden["special_tokens"]
    with open(vocab_file, "rb") as f:
        rank_bytes = {
            int(rank): base64.b64decode(token) for token, rank in (line.split() for line in f if line.strip())
        }
    probe_ids = [0, 198, 6023, 151642, *golden.values()]
    texts = [case["text"] for case in tokenizer_golden["encode"] if "<img>" not in case["text"]]
    image_case = next(case for case in tokenizer_golden["encode"] if "<img>" in case["text"])
    # vLLM empties each span before tokenizing (its regex drops what lies between the tags).
    texts.append(image_case["text"].replace("assets/demo.jpeg", ""))
    names = [*TAGS, *ID_ATTRIBUTES]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(saved_tokenizer),
            json.dumps(texts),
            json.dumps(names),
            json.dumps(probe_ids),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    attributes = result["attributes"]
    for name, tag in TAGS.items():
        assert attributes[name] == tag, name
    for name, token in ID_ATTRIBUTES.items():
        assert attributes[name] == golden[token], name
    assert result["IMAGE_ST"] == OFFICIAL_IMAGE_ST
    special_tokens = result["special_tokens"]
    assert len(special_tokens) == 3 + 205 + 9
    for token, token_id in golden.items():
        assert special_tokens[token] == token_id, token
    assert result["is_tiktoken"] and result["n_vocab"] == len(rank_bytes) + len(special_tokens)
    # `.decoder`: id -> token bytes for the ranks, id -> str for the special tokens.
    for token_id in probe_ids:
        kind, value = result["decoder"][str(token_id)]
        if token_id in rank_bytes:
            assert kind == "bytes" and bytes(value) == rank_bytes[token_id]
        else:
            assert kind == "str" and golden[value] == token_id
    assert result["errors"] == "replace" and result["padding_side"] == "left"

    # Text without image spans: the plain subclass and the tokenizer both give the official ids.
    goldens = {case["text"]: case["ids"] for case in tokenizer_golden["encode"]}
    for text, full, plain, decoded in zip(texts[:-1], result["full"], result["plain"], result["plain_decoded"]):
        assert full == plain == goldens[text], text
        assert decoded == text
    # With an image span: the plain subclass leaves `<img></img>` for the engine to expand; the official ids hold the
    # 256 span positions (path bytes and `<imgpad>`) in between.
    official = image_case["ids"]
    start, end = official.index(golden["<img>"]), official.index(golden["</img>"])
    assert result["plain"][-1] == official[: start + 1] + official[end:]
    assert result["full"][-1] == official[: start + 1] + [golden["<imgpad>"]] * 256 + official[end:]
    assert result["plain_decoded"][-1] == texts[-1]

    # `allowed_special` / `disallowed_special` as in the official `tokenize` (and tiktoken).
    assert (
        result["tokenize_text_only"][-1] == golden["<ref>"] and golden["<|im_end|>"] not in result["tokenize_text_only"]
    )
    image_st = result["encode_image_st"]
    assert image_st[-3] == golden["<ref>"] and image_st[-1] == golden["</ref>"] and golden["<|im_end|>"] not in image_st
    assert "disallowed special token" in result["disallowed"]
