"""Tokenizer of Qwen-VL: tiktoken BPE over the official `qwen.tiktoken` vocabulary, with image spans and ChatML."""

import base64
import os
import re
import shutil
import unicodedata

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# The private-use markers with which `apply_chat_template(..., sanitize_control_tokens=True)` wraps control tokens
# found in user strings (transformers' `mark_control_tokens`).
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

from .text_format import (
    BOX_TAGS,
    CHAT_STOP_TOKENS,
    CHAT_TEMPLATE,
    CONTROL_TOKENS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_SPAN_LENGTH,
    IMAGE_ST,
    IMAGE_TAGS,
    QUAD_TAGS,
    REF_TAGS,
    SPECIAL_TOKENS,
    from_list_format,
    to_list_format,
)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# In a chat rendered from marked input: a control token the user typed (wrapped in markers, group 1), a lone marker,
# or a control token the template wrote (group 2).
_CONTROL = "|".join(re.escape(token) for token in sorted(CONTROL_TOKENS, key=len, reverse=True))
_MARKED_CHAT = re.compile(
    f"{_CONTROL_TOKEN_START}({_CONTROL}){_CONTROL_TOKEN_END}|[{_CONTROL_TOKEN_START}{_CONTROL_TOKEN_END}]|({_CONTROL})"
)

BYTE_ENCODER = bytes_to_unicode()  # GPT-2's reversible byte -> printable character table
BYTE_DECODER = {char: b for b, char in BYTE_ENCODER.items()}
# `bytes.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)` turns token bytes into their byte-level string.
_LATIN1_TO_BYTE_LEVEL = str.maketrans({chr(b): char for b, char in BYTE_ENCODER.items()})


def load_tiktoken_ranks(vocab_file: str) -> dict[bytes, int]:
    """Read a `base64(token) rank` file (one token per line) into `{token_bytes: rank}`."""
    ranks = {}
    with open(vocab_file, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(
                    f"{vocab_file}, line {line_number}: expected 'base64(token) rank', got {line[:80]!r}"
                )
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


class QwenVLTokenizer(PreTrainedTokenizer):
    """
    Qwen-VL tokenizer: byte-level BPE (tiktoken) over the ranks of a `qwen.tiktoken` file, followed by the special
    tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`...`<|extra_204|>`, `<ref>`, `</ref>`, `<box>`,
    `</box>`, `<quad>`, `</quad>`, `<img>`, `</img>`, `<imgpad>` (ids `len(ranks)` onwards, so any vocabulary in that
    format works). Special tokens written in text are recognised.

    An image span `<img>PATH</img>` always encodes to `image_span_length + 2` ids (258 for the official models):
    `<img>`, the UTF-8 bytes of PATH used as ids, `<imgpad>` up to `image_span_length` ids, `</img>`. The model replaces
    the inner positions by image features. Unclosed or nested image spans, a `</img>` without `<img>`, paths longer than
    the span and truncation through a span raise a `ValueError`. Encoding and decoding touch neither files nor the
    network.

    Tokens are shown as byte-level strings (GPT-2 convention); text is NFC-normalised before encoding. Batches are
    padded on the left (`padding_side="left"`, saved with the tokenizer), as generation with a decoder-only model needs.

    Serving engines (vLLM, LightLLM) use the official `QWenTokenizer` attribute API, which this class exposes with the
    official values: the tag strings (`image_start_tag`, `image_end_tag`, `image_pad_tag`, `ref_start_tag`,
    `ref_end_tag`, `box_start_tag`, `box_end_tag`, `quad_start_tag`, `quad_end_tag`), `IMAGE_ST`, `special_tokens`
    (token -> id), `img_start_id`/`img_end_id`/`img_pad_id` and the other `*_id`s, `mergeable_ranks`, the tiktoken
    `Encoding` as `tokenizer`, `decoder` (id -> token bytes, special tokens as str), `errors`, and
    `tokenize(text, allowed_special="all", disallowed_special=())`. `convert_tokens_to_ids` also takes the official
    tokens (bytes, or str for special tokens), so a subclass may override `tokenize` and `_decode` on top of
    `tokenizer` and `decoder`, as vLLM does to leave image spans unexpanded. (vLLM then expands each `<img></img>` to
    `(image_size // patch_size // 2) ** 2` positions itself, which must equal the model's `n_queries`: 256 for the
    released 448 px models.)

    Args:
        vocab_file (`str`): Path of the `qwen.tiktoken` vocabulary.
        errors (`str`, *optional*, defaults to `"replace"`): How `decode` treats invalid UTF-8 (see `bytes.decode`).
        eos_token (`str`, *optional*, defaults to `"<|endoftext|>"`): End of document token.
        pad_token (`str`, *optional*, defaults to `"<|endoftext|>"`): Padding token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to Qwen-VL-Chat's ChatML.
        image_span_length (`int`, *optional*, defaults to 256): Positions between `<img>` and `</img>`; must equal
            the model's `config.visual["n_queries"]` (256 in every official checkpoint).
        padding_side (`str`, *optional*, defaults to `"left"`): Side on which batches are padded.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"  # save_pretrained copies this file next to tokenizer_config.json
    padding_side = "left"
    # The official QWenTokenizer's names for the multimodal tags.
    ref_start_tag, ref_end_tag = REF_TAGS
    box_start_tag, box_end_tag = BOX_TAGS
    quad_start_tag, quad_end_tag = QUAD_TAGS
    image_start_tag, image_end_tag = IMAGE_TAGS
    image_pad_tag = IMAGE_PAD
    IMAGE_ST = IMAGE_ST

    def __init__(
        self,
        vocab_file: str,
        errors: str = "replace",
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        chat_template: str | dict | None = CHAT_TEMPLATE,
        image_span_length: int = IMAGE_SPAN_LENGTH,
        padding_side: str = "left",
        **kwargs,
    ):
        if not isinstance(image_span_length, int) or isinstance(image_span_length, bool) or image_span_length < 1:
            raise ValueError(
                f"image_span_length must be a positive int (the model's n_queries), got {image_span_length!r}"
            )
        self.image_span_length = image_span_length
        self.vocab_file = vocab_file
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        num_ranks = len(self.mergeable_ranks)
        if sorted(self.mergeable_ranks.values()) != list(range(num_ranks)):
            raise ValueError(f"{vocab_file}: ranks must be the distinct integers 0..{num_ranks - 1}")
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ValueError(
                f"{vocab_file}: a byte-level BPE vocabulary needs all 256 single-byte tokens; missing {len(missing)} "
                f"(e.g. byte {missing[0]})"
            )
        self.special_tokens = {token: num_ranks + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._piece_encoding = None  # built on first need by `_bpe_encode`
        self.errors = errors
        self.encoding = tiktoken.Encoding(
            "qwen_vl", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.tokenizer = self.encoding  # the official QWenTokenizer's name for it
        self.decoder = {rank: token_bytes for token_bytes, rank in self.mergeable_ranks.items()}
        self.decoder.update({index: token for token, index in self.special_tokens.items()})

        self._id_to_token = [""] * num_ranks
        for token_bytes, rank in self.mergeable_ranks.items():
            self._id_to_token[rank] = token_bytes.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)
        self._token_to_id = {token: rank for rank, token in enumerate(self._id_to_token)}

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.ref_start_id, self.ref_end_id = (self.special_tokens[t] for t in REF_TAGS)
        self.box_start_id, self.box_end_id = (self.special_tokens[t] for t in BOX_TAGS)
        self.quad_start_id, self.quad_end_id = (self.special_tokens[t] for t in QUAD_TAGS)
        self.img_start_id, self.img_end_id = (self.special_tokens[t] for t in IMAGE_TAGS)
        self.img_pad_id = self.special_tokens[IMAGE_PAD]
        self.image_special_tokens = {
            self.ref_start_id,
            self.ref_end_id,
            self.box_start_id,
            self.box_end_id,
            self.quad_start_id,
            self.quad_end_id,
        }

        # The special tokens are fixed by the vocabulary: a saved `added_tokens_decoder` may only repeat them.
        for index, token in kwargs.pop("added_tokens_decoder", {}).items():
            if self.special_tokens.get(str(token)) != index:
                raise ValueError(
                    f"added_tokens_decoder maps id {index} to {str(token)!r}, which disagrees with the special tokens "
                    f"of {vocab_file}; remove `added_tokens_decoder` from tokenizer_config.json"
                )
        self._added_tokens_decoder = {
            index: AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
            for token, index in self.special_tokens.items()
        }
        kwargs["extra_special_tokens"] = [t for t in SPECIAL_TOKENS if t not in (str(eos_token), str(pad_token))]
        super().__init__(
            errors=errors,
            eos_token=eos_token,
            pad_token=pad_token,
            chat_template=chat_template,
            image_span_length=image_span_length,
            padding_side=padding_side,
            **kwargs,
        )

    @property
    def chat_stop_ids(self) -> list[int]:
        """Ids that end a ChatML reply, as the official chat stops: `<|im_end|>`, `<|im_start|>`, `<|endoftext|>`."""
        return [self.special_tokens[token] for token in CHAT_STOP_TOKENS]

    @property
    def vocab_size(self) -> int:
        """Number of ids: BPE ranks plus special tokens."""
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return {**self._token_to_id, **self.special_tokens}

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False) -> int:
        """The vocabulary is fixed (its ids index the model's embeddings): only its own special tokens are accepted."""
        unknown = [str(token) for token in new_tokens if str(token) not in self.special_tokens]
        if unknown:
            raise ValueError(
                f"Cannot add tokens {unknown}: the Qwen-VL vocabulary is fixed. Use one of the reserved special "
                "tokens '<|extra_0|>'...'<|extra_204|>' instead."
            )
        return 0

    def apply_chat_template(self, conversation, *args, sanitize_control_tokens: bool | None = None, **kwargs):
        """
        transformers' `apply_chat_template`, encoding like the official `make_context` by default: ChatML control
        tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|extra_N|>`) typed inside messages stay plain text,
        so user text cannot open a new turn; only the image and grounding tags are special inside content.

        `sanitize_control_tokens` defaults to `True` when tokenizing; pass `False` for trusted input whose control
        tokens should act as such. `return_assistant_tokens_mask=True` needs the processor
        ([`QwenVLProcessor.apply_chat_template`]), which computes the mask without a fast tokenizer's offsets.
        """
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError(
                "return_assistant_tokens_mask=True: use the processor's apply_chat_template "
                "(AutoProcessor.from_pretrained(...)); for TRL pass it as SFTTrainer's processing_class."
            )
        if sanitize_control_tokens is None:
            sanitize_control_tokens = kwargs.get("tokenize", True)
        return super().apply_chat_template(
            conversation, *args, sanitize_control_tokens=sanitize_control_tokens, **kwargs
        )

    def _get_control_tokens(self, chat_template: str) -> tuple[str, ...]:
        """The tokens that sanitizing keeps as text in messages: ChatML's, not the image and grounding tags."""
        return CONTROL_TOKENS

    def _mark_chat_inputs(
        self, chat_template, conversations, tools, documents, template_kwargs, tokenize, assistant_mask
    ):
        """
        transformers' marking of typed control tokens, also with `return_assistant_tokens_mask` (which it refuses
        because a fast tokenizer's offsets would not match the marked text): here the offsets that the mask is built
        from are characters of the marked chat itself (see `_encode_marked_chat`).
        """
        return super()._mark_chat_inputs(
            chat_template, conversations, tools, documents, template_kwargs, tokenize, False
        )

    def _encode_plus(
        self, text, *args, sanitize_control_tokens: bool = False, return_offsets_mapping: bool = False, **kwargs
    ):
        """
        transformers' `_encode_plus`, where `sanitize_control_tokens` marks a chat rendered from marked input (see
        `apply_chat_template`) and `return_offsets_mapping=True` (per text) adds the `(start, end)` characters
        behind each id (see `_char_offsets`), which transformers' python tokenizers do not provide.
        """
        if sanitize_control_tokens:
            kwargs["marked_chat"] = True
        if not isinstance(text, str) or not return_offsets_mapping:
            if return_offsets_mapping:  # a batch: each text comes back here
                kwargs["return_offsets_mapping"] = True
            return super()._encode_plus(text, *args, **kwargs)
        if args or kwargs.get("text_pair") is not None:
            raise ValueError("return_offsets_mapping=True takes single texts, not text pairs.")
        ids, offsets = self._encode(text, return_offsets=True, **kwargs)
        if not ids:
            return super()._encode_plus(text, *args, **kwargs)
        return_tensors = kwargs.pop("return_tensors", None)
        encoding = super()._encode_plus(ids, *args, **kwargs)  # ids pass through: truncation applies to them
        kept = len(encoding["input_ids"])
        encoding["offset_mapping"] = (
            offsets[len(offsets) - kept :] if self.truncation_side == "left" else offsets[:kept]
        )
        return BatchEncoding(dict(encoding), tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)

    def tokenize(
        self,
        text: str,
        allowed_special: set[str] | str | None = None,
        disallowed_special: set[str] | str = (),
        **kwargs,
    ) -> list[str]:
        """
        Split `text` into tokens. As in the official tokenizer (and tiktoken), special-token text in
        `allowed_special` (a set, or `"all"`: the default) becomes special tokens, other special-token text is plain
        text unless it is in `disallowed_special` (a set or `"all"`), which raises. `split_special_tokens=True` is
        transformers' spelling of `allowed_special=set()`. The arguments also reach here through `encode` and
        `__call__`, e.g. `tokenizer.encode(text, allowed_special=set(tokenizer.IMAGE_ST))`.
        """
        return self.convert_ids_to_tokens(self._encode(text, allowed_special, disallowed_special, **kwargs)[0])

    def _encode(
        self,
        text: str,
        allowed_special: set[str] | str | None = None,
        disallowed_special: set[str] | str = (),
        split_special_tokens: bool | None = None,
        marked_chat: bool = False,
        return_offsets: bool = False,
        **unused,
    ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Ids of `text` (see `tokenize`; `marked_chat`: see `_encode_marked_chat`), and their offsets if asked."""
        if marked_chat:
            return self._encode_marked_chat(text, return_offsets)
        if allowed_special is None:
            split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
            allowed_special = set() if split else "all"
        ids = self._encode_ids(text, allowed_special, disallowed_special)
        return ids, self._char_offsets(text, ids) if return_offsets else None

    def _encode_marked_chat(
        self, chat: str, return_offsets: bool = False
    ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """
        Ids of a chat rendered from marked input, as the official `make_context` encodes it: the control tokens the
        template wrote are special ids; each role name, the newline after it and each content string are encoded
        separately, with only `IMAGE_ST` special (user-typed control tokens, their markers dropped, are plain text).
        With `return_offsets`, also the `(start, end)` characters of `chat` behind each id. An assistant reply thus
        starts on a token boundary, where the template's `{% generation %}` span starts.
        """
        ids, offsets = [], []
        text, origin = (
            "",
            [],
        )  # the text since the template's last control token, and where its characters are in `chat`
        after_im_start = False

        def encode_text():
            parts = text.split("\n", 1) if after_im_start else [text]
            if len(parts) == 2:
                parts.insert(1, "\n")
            position = 0
            for part in parts:
                if part:
                    part_ids = self._encode_ids(part, allowed_special=set(IMAGE_ST))
                    ids.extend(part_ids)
                    if return_offsets:
                        where = origin[position : position + len(part)]
                        offsets.extend(
                            (where[start], where[end - 1] + 1) if end > start else (where[start],) * 2
                            for start, end in self._char_offsets(part, part_ids)
                        )
                position += len(part)

        position = 0
        for match in _MARKED_CHAT.finditer(chat):
            text += chat[position : match.start()]
            origin.extend(range(position, match.start()))
            position = match.end()
            if match.group(1):  # typed by the user: plain text
                text += match.group(1)
                origin.extend(range(*match.span(1)))
            elif match.group(2):  # written by the template
                encode_text()
                ids.append(self.special_tokens[match.group(2)])
                offsets.append(match.span(2))
                text, origin, after_im_start = "", [], match.group(2) == IM_START
        text += chat[position:]
        origin.extend(range(position, len(chat)))
        encode_text()
        return ids, offsets if return_offsets else None

    def _bpe_encode(
        self, text: str, allowed_special: set[str] | str, disallowed_special: set[str] | str = ()
    ) -> list[int]:
        """
        tiktoken's `encode`. Its regex engine gives up on some long inputs (a run of about a million spaces exceeds its
        backtracking stack). Such text is cut around its long whitespace pieces, found by Python's `regex` module
        with the same pattern (whitespace spelled as the Unicode property tiktoken's engine uses): each long piece is
        BPE-encoded whole, which is what tiktoken does with a piece, and the text between them goes through tiktoken's
        own pre-tokenizer, so letters and digits keep tiktoken's Unicode tables (the `regex` module's can be newer).
        The ids are those tiktoken gives wherever it succeeds.
        """
        try:
            return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        except ValueError as error:
            if "regex" not in str(error).lower():
                raise
        specials = self.special_tokens if allowed_special == "all" else set(allowed_special)
        splitter = re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) or "(?!)")
        if self._piece_encoding is None:
            ranks = self.mergeable_ranks
            self._piece_encoding = (
                # BPE without pre-tokenization: one piece in, its ids out
                tiktoken.Encoding("qwen_vl_piece", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={}),
                # tiktoken's pre-tokenization and BPE, for the text between long whitespace pieces
                tiktoken.Encoding("qwen_vl_text", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={}),
            )
        piece_encoding, text_encoding = self._piece_encoding

        def encode_segment(segment: str) -> list[int]:
            ids, between = [], []
            for piece in _pieces(segment):
                if len(piece) > _LONG_PIECE and piece.isspace():
                    ids += text_encoding.encode_ordinary("".join(between)) + piece_encoding.encode_ordinary(piece)
                    between = []
                else:
                    between.append(piece)
            return ids + text_encoding.encode_ordinary("".join(between))

        ids, position = [], 0
        for match in [*splitter.finditer(text), None]:
            ids += encode_segment(text[position : match.start() if match else len(text)])
            if match:
                ids.append(self.special_tokens[match.group()])
                position = match.end()
        return ids

    def _char_offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """
        `(start, end)` characters of `text` behind each of its ids (from `_encode_ids`). Exact for BPE and special
        tokens (a character split over tokens belongs to each of them); inside an image span, path bytes share the
        path's characters and `<imgpad>` padding covers none. Text that NFC normalisation changes maps every id to
        the whole text.
        """
        if not ids or unicodedata.normalize("NFC", text) != text:
            return [(0, len(text))] * len(ids)
        char_of_byte = [index for index, char in enumerate(text) for _ in range(len(char.encode()))] + [len(text)]
        data = text.encode()

        def chars(start: int, end: int) -> tuple[int, int]:
            return (char_of_byte[start], char_of_byte[end - 1] + 1) if end > start else (char_of_byte[start],) * 2

        offsets, position, index = [], 0, 0
        while index < len(ids):
            token = self.decoder[ids[index]]
            length = len(token) if isinstance(token, bytes) else len(token.encode())
            offsets.append(chars(position, position + length))
            position += length
            index += 1
            if ids[index - 1] == self.img_start_id:  # the span's positions follow, then `</img>`
                end = data.index(IMAGE_TAGS[1].encode(), position)
                offsets.extend(
                    chars(end, end) if inner == self.img_pad_id else chars(position, end)
                    for inner in ids[index : index + self.image_span_length]
                )
                position, index = end, index + self.image_span_length
        if position != len(data):  # not the ids of this text
            raise ValueError(f"The ids do not encode {text[:60]!r}")
        return offsets

    def _encode_ids(
        self, text: str, allowed_special: set[str] | str = "all", disallowed_special: set[str] | str = ()
    ) -> list[int]:
        """
        NFC-normalise, BPE-encode (recognising the special tokens in `allowed_special`, a set or `"all"`; see
        `tokenize` for `disallowed_special`) and lay out every `<img>...</img>` span as `image_span_length + 2` ids.
        """
        text = unicodedata.normalize("NFC", text)
        ids = self._bpe_encode(text, allowed_special, disallowed_special)
        if self.img_start_id not in ids and self.img_end_id not in ids:
            return ids
        output = []
        position = 0
        while True:
            start = _find(ids, self.img_start_id, position)
            stray = _find(ids, self.img_end_id, position)
            if stray != -1 and (start == -1 or stray < start):
                raise ValueError(
                    f"{IMAGE_TAGS[1]} without {IMAGE_TAGS[0]} in {text[:200]!r}: open each image span with "
                    f"{IMAGE_TAGS[0]}, or pass split_special_tokens=True to encode tags as plain text"
                )
            if start == -1:
                break
            end = _find(ids, self.img_end_id, start + 1)
            if end == -1:
                raise ValueError(
                    f"Unclosed {IMAGE_TAGS[0]} in {text[:200]!r}: close each image span with {IMAGE_TAGS[1]}"
                )
            # `<imgpad>` already inside the span is padding, so re-encoding decoded tokens gives the same ids.
            inner = [i for i in ids[start + 1 : end] if i != self.img_pad_id]
            nested = [SPECIAL_TOKENS[i - self.eod_id] for i in inner if i >= self.eod_id]
            if nested:
                raise ValueError(
                    f"Image span in {text[:200]!r} contains {nested[0]}: an image span holds only a path; close it "
                    f"with {IMAGE_TAGS[1]} before other tags"
                )
            content = self.encoding.decode_bytes(inner)
            if len(content) > self.image_span_length:
                raise ValueError(
                    f"Image path {content.decode('utf-8', 'replace')[:60]!r}... is {len(content)} bytes long; an "
                    f"image span holds at most {self.image_span_length} bytes. Use a shorter path, or pass the image "
                    "itself to the processor."
                )
            output += ids[position:start]
            output += [self.img_start_id, *content]
            output += [self.img_pad_id] * (self.image_span_length - len(content)) + [self.img_end_id]
            position = end + 1
        return output + ids[position:]

    def truncate_sequences(
        self,
        ids: list[int],
        pair_ids: list[int] | None = None,
        num_tokens_to_remove: int = 0,
        truncation_strategy: str = "longest_first",
        stride: int = 0,
    ) -> tuple[list[int], list[int] | None, list[int]]:
        """Truncate as usual, but raise instead of cutting through an image span (its ids belong together)."""
        ids, pair_ids, overflowing_tokens = super().truncate_sequences(
            ids, pair_ids, num_tokens_to_remove, truncation_strategy, stride
        )
        for kept in (ids, pair_ids or []):
            starts = [i for i, token_id in enumerate(kept) if token_id == self.img_start_id]
            ends = [i for i, token_id in enumerate(kept) if token_id == self.img_end_id]
            if len(starts) != len(ends) or any(e - s != self.image_span_length + 1 for s, e in zip(starts, ends)):
                raise ValueError(
                    f"Truncation to max_length would cut through an image span ({self.image_span_length + 2} tokens "
                    "that belong together): raise max_length or shorten the text so that the cut falls outside the "
                    "image"
                )
        return ids, pair_ids, overflowing_tokens

    def _convert_token_to_id(self, token: str | bytes) -> int:
        """Id of a byte-level string (as `tokenize` returns), or of an official token (bytes)."""
        index = self.mergeable_ranks.get(token) if isinstance(token, bytes) else self._token_to_id.get(token)
        if index is None:
            raise ValueError(
                f"Unknown token {token!r}: tokens are byte-level strings as returned by `tokenize`, or the token "
                "bytes of the vocabulary"
            )
        return index

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self._id_to_token):
            raise ValueError(f"Token id {index} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str | bytes]) -> str:
        """Text of byte-level string tokens (as `tokenize` returns) and/or official tokens (bytes)."""
        data = b"".join(
            token
            if isinstance(token, bytes)
            else token.encode("utf-8")
            if token in self.special_tokens
            else bytes(BYTE_DECODER[c] for c in token)
            for token in tokens
        )
        return data.decode("utf-8", errors=self.errors)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs,
    ) -> str:
        """
        Decode ids to text. Image spans come back as `<img>PATH</img>` (padding dropped); `skip_special_tokens=True`
        drops every special token, image tags included, but keeps the path.
        """
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        errors = errors or self.errors
        pieces = []
        run = []  # consecutive BPE ids, decoded together so multi-byte characters split over tokens survive

        def flush():
            if run:
                pieces.append(self.encoding.decode(run, errors=errors))
                run.clear()

        index = 0
        while index < len(ids):
            token_id = ids[index]
            if token_id == self.img_start_id and (span := self._image_span(ids, index)) is not None:
                end, path = span
                flush()
                path = path.decode("utf-8", errors=errors)
                pieces.append(path if skip_special_tokens else IMAGE_TAGS[0] + path + IMAGE_TAGS[1])
                index = end + 1
                continue
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"Token id {token_id} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
            if token_id >= self.eod_id:
                flush()
                if not skip_special_tokens:
                    pieces.append(SPECIAL_TOKENS[token_id - self.eod_id])
            else:
                run.append(token_id)
            index += 1
        flush()
        text = "".join(pieces)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def _image_span(self, ids: list[int], start: int) -> tuple[int, bytes] | None:
        """`(end, path bytes)` of the image span opened at `start`, or None if it is unclosed or holds non-byte ids."""
        end = _find(ids, self.img_end_id, start + 1)
        if end == -1:
            return None
        content = [token_id for token_id in ids[start + 1 : end] if token_id != self.img_pad_id]
        if not all(0 <= token_id < 256 for token_id in content):
            return None
        return end, bytes(content)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """
        Write `qwen.tiktoken`: a byte-for-byte copy of the loaded file while it exists (so checksums still match),
        otherwise the ranks as `base64(token) rank` lines.
        """
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path {save_directory} should be an existing directory")
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "qwen.tiktoken")
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(path):
                shutil.copyfile(self.vocab_file, path)
            return (path,)
        with open(path, "wb") as f:
            for token_bytes, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                f.write(base64.b64encode(token_bytes) + b" " + str(rank).encode() + b"\n")
        return (path,)

    def from_list_format(self, list_format: list[dict]) -> str:
        """The official list format to a query, with this tokenizer's image span (`text_format.from_list_format`)."""
        return from_list_format(list_format, self.image_span_length)

    def to_list_format(self, text: str) -> list[dict[str, str]]:
        """A text split into official list-format elements (`text_format.to_list_format`)."""
        return to_list_format(text)


def _pieces(text: str) -> list[str]:
    """tiktoken's pre-tokenization of `text` (the pieces `PAT_STR` matches), computed without a backtracking limit."""
    import regex  # tiktoken's own dependency; needed only for inputs tiktoken's regex engine gives up on

    global _PIECE_PATTERN
    if _PIECE_PATTERN is None:
        # tiktoken's engine (Rust `fancy-regex`) reads `\s` as the Unicode White_Space property; Python's differs.
        _PIECE_PATTERN = regex.compile(PAT_STR.replace(r"\s", r"\p{White_Space}").replace(r"\S", r"\P{White_Space}"))
    return _PIECE_PATTERN.findall(text)


_PIECE_PATTERN = None
# Whitespace pieces longer than this are BPE-encoded on their own when tiktoken's regex engine gives up.
_LONG_PIECE = 256


def _find(ids: list[int], token_id: int, start: int) -> int:
    """Index of `token_id` in `ids` from `start`, or -1."""
    try:
        return ids.index(token_id, start)
    except ValueError:
        return -1
