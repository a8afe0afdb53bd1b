"""The data collator of the recipes: raw records in, a training batch out.

Per record: render it (stage format, see `data.py`), open its images, tokenize text and images with the processor,
compute labels from the token ids. Then the batch is padded on the right, or packed (multi-task pre-training).
Records that fail any step are skipped and counted, not fatal.
"""

import itertools
import logging
import multiprocessing
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import TrainerCallback

from .data import BadRecordError, Example, load_record_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SKIP_REASONS = ("malformed", "missing_image", "corrupt_image", "outside_image_root", "too_long", "no_targets")


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    task: str


def assistant_labels(input_ids: list[int], tokenizer) -> list[int]:
    """Labels for a tokenized ChatML dialogue: the assistant replies are trained, nothing else.

    Convention: in each `<|im_start|>assistant\\n{reply}<|im_end|>`, the tokens of `{reply}` and the closing
    `<|im_end|>` keep their ids; everything else is -100: the system and user turns, the `<|im_start|>assistant\\n`
    header and the newline that follows `<|im_end|>`. The header ends with the token after `assistant` (the newline;
    whitespace a reply starts with can merge into it and then stays untrained). A reply cut off by truncation is
    trained up to the cut.
    """
    header = [tokenizer.im_start_id, *tokenizer.encode("assistant", add_special_tokens=False)]
    labels = [IGNORE_INDEX] * len(input_ids)
    position = 0
    while position < len(input_ids):
        if input_ids[position : position + len(header)] != header:
            position += 1
            continue
        start = position + len(header) + 1
        end = next(
            (i for i in range(start, len(input_ids)) if input_ids[i] == tokenizer.im_end_id), len(input_ids) - 1
        )
        labels[start : end + 1] = input_ids[start : end + 1]
        position = end + 1
    return labels


class QwenVLDataCollator:
    """
    Collate raw records into `input_ids`, `labels`, `pixel_values` and either `attention_mask` (padded batches) or
    `position_ids` (packed batches).

    Args:
        processor ([`QwenVLProcessor`]): Tokenizes text and preprocesses images (its image size is the stage's).
        render (`Callable[[dict, tokenizer], Example]`): Record -> [`Example`] (`render_caption_pair`, `render_task`,
            `render_dialogue`).
        max_length (`int`): Longest tokenized example (and packed row). Longer examples are truncated when no image
            span is cut, skipped otherwise.
        packing (`bool`): Pack examples of the same task into rows of at most `max_length` tokens (first fit, in
            order). Positions restart at 0 for each example and no `attention_mask` is returned, so the model's
            causal mask (transformers' `create_causal_mask`) keeps packed examples from attending to each other; the
            first label of each example is -100 so no example predicts the next one's first token. Padding at the
            end of a row is one more such segment, all labels -100. `per_device_train_batch_size` then counts
            examples, not rows. Hand-written: TRL's packing (`pack_dataset`) packs token sequences of a dataset,
            while here each example brings its images, which must stay in row order with their spans.
        image_root (`str`, *optional*): Directory that relative image paths are resolved against; images outside it
            (`../`, absolute paths elsewhere, symlinks leaving it) are skipped as `outside_image_root`.
        allow_images_outside_root (`bool`): Open images outside `image_root` too (trusted data only).
        completion_only_loss (`bool`): Train prompt-completion examples on their completion only (TRL's
            `SFTConfig.completion_only_loss`). With False their prompt text is trained too, as in the paper's
            multi-task pre-training on packed sequences; image spans (`<img>...</img>`) stay untrained. Dialogues
            always train their assistant replies only.

    Bad records (see [`BadRecordError`]) are skipped; `skipped` counts them by reason, over the DataLoader worker
    processes too. A batch never ends up empty: when all its records are bad, the last good example this collator
    encoded is used again (see `prime`; a `ValueError` if there is none yet).
    """

    def __init__(
        self,
        processor,
        render: Callable[..., Example],
        max_length: int = 2048,
        packing: bool = False,
        image_root: str | None = None,
        allow_images_outside_root: bool = False,
        completion_only_loss: bool = True,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.render = render
        self.max_length = max_length
        self.packing = packing
        self.image_root = image_root
        self.allow_images_outside_root = allow_images_outside_root
        self.completion_only_loss = completion_only_loss
        # Shared memory, so counts made in DataLoader worker processes are visible here.
        self._skipped = multiprocessing.Array("q", len(SKIP_REASONS))
        self._last_good: EncodedExample | None = None
        self._warned: set[str] = set()

    @property
    def skipped(self) -> dict[str, int]:
        """Bad records skipped so far (by this process and its DataLoader workers), by reason."""
        return {reason: count for reason, count in zip(SKIP_REASONS, self._skipped[:]) if count}

    @property
    def num_skipped(self) -> int:
        return sum(self._skipped[:])

    def prime(self, records: Iterable[dict], limit: int = 1000):
        """Encode the first good record among the first `limit` of `records` (a ValueError if none is), so that an
        all-bad first batch has a stand-in too. Records seen here are not counted as skipped."""
        error = None
        for record in itertools.islice(records, limit):
            try:
                self._last_good = self.encode(record)
                return
            except BadRecordError as bad:
                error = bad
        raise ValueError(
            f"None of the first {limit} records can be trained on (last problem: {error}); check the data."
        )

    def encode(self, record: dict) -> EncodedExample:
        """Render, load images, tokenize and label one record; raises `BadRecordError` for a bad one."""
        try:
            example = self.render(record, self.tokenizer)
        except (TypeError, AttributeError, KeyError, IndexError) as error:  # a record of a shape the renderer missed
            raise BadRecordError("malformed", f"{type(error).__name__}: {error}") from None
        root, outside = self.image_root, self.allow_images_outside_root
        images = [load_record_image(reference, root, outside) for reference in example.images]
        inputs = {}
        if example.text:  # empty for pure-text examples, whose whole text is the completion
            try:
                inputs = self.processor(text=example.text, images=images or None, return_tensors="pt")
            except ValueError as error:
                raise BadRecordError("malformed", str(error)) from None
        input_ids = inputs["input_ids"][0].tolist() if inputs else []
        if example.completion is None:
            labels = assistant_labels(input_ids, self.tokenizer)
        else:
            completion_ids = self.tokenizer(example.completion, add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(input_ids) if self.completion_only_loss else self._text_labels(input_ids)
            labels += completion_ids
            input_ids = input_ids + completion_ids
        if len(input_ids) > self.max_length:
            image_ends = [i for i, token in enumerate(input_ids) if token == self.tokenizer.img_end_id]
            if image_ends and image_ends[-1] >= self.max_length:
                raise BadRecordError("too_long", f"{len(input_ids)} tokens, an image span beyond max_length")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadRecordError("no_targets", "no trained token (left) in the record")
        return EncodedExample(input_ids, labels, inputs.get("pixel_values"), example.task)

    def _text_labels(self, input_ids: list[int]) -> list[int]:
        """`input_ids` as labels, with every image span (`<img>`, its positions, `</img>`) set to -100."""
        labels, in_image = [], False
        for token in input_ids:
            in_image |= token == self.tokenizer.img_start_id
            labels.append(IGNORE_INDEX if in_image else token)
            in_image &= token != self.tokenizer.img_end_id
        return labels

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        examples = []
        for record in records:
            try:
                examples.append(self.encode(record))
            except BadRecordError as error:
                self._count(error)
        if examples:
            self._last_good = examples[-1]
        elif self._last_good is not None:
            examples = [self._last_good]
        else:
            raise ValueError(f"Every record of the first batch was bad ({self.skipped}); check the data.")
        return self._pack(examples) if self.packing else self._pad(examples)

    def _count(self, error: BadRecordError):
        with self._skipped.get_lock():
            self._skipped[SKIP_REASONS.index(error.reason)] += 1
        if error.reason not in self._warned:  # the first of each kind in full, the rest in the counts
            self._warned.add(error.reason)
            logger.warning("Skipping a bad record (%s)", error)
        else:
            logger.debug("Skipping a bad record (%s)", error)

    def _pad(self, examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
        """Right-padded rows (padding positions: `pad_token_id`, attention 0, label -100)."""
        batch = {
            "input_ids": _right_pad([e.input_ids for e in examples], self.tokenizer.pad_token_id),
            "attention_mask": _right_pad([[1] * len(e.input_ids) for e in examples], 0),
            "labels": _right_pad([e.labels for e in examples], IGNORE_INDEX),
        }
        return self._add_images(batch, examples)

    def _pack(self, examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
        rows: list[list[EncodedExample]] = []
        for example in examples:
            fits = (
                row
                for row in rows
                if row[0].task == example.task
                and sum(len(e.input_ids) for e in row) + len(example.input_ids) <= self.max_length
            )
            row = next(fits, None)
            if row is None:
                rows.append([example])
            else:
                row.append(example)
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            input_ids.append([token for example in row for token in example.input_ids])
            labels.append([label for example in row for label in (IGNORE_INDEX, *example.labels[1:])])
            position_ids.append([position for example in row for position in range(len(example.input_ids))])
        width = max(map(len, input_ids))
        # Padding continues the positions from 0, so that it reads as one more (masked-out) packed example.
        position_ids = [positions + list(range(width - len(positions))) for positions in position_ids]
        batch = {
            "input_ids": _right_pad(input_ids, self.tokenizer.pad_token_id),
            "labels": _right_pad(labels, IGNORE_INDEX),
            "position_ids": torch.tensor(position_ids),
        }
        return self._add_images(batch, [example for row in rows for example in row])

    @staticmethod
    def _add_images(batch: dict, examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
        """`pixel_values` of the examples in row order, when there are images."""
        pixel_values = [example.pixel_values for example in examples if example.pixel_values is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """[len(rows), longest] LongTensor of `rows` padded on the right with `value`."""
    tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
    return pad_sequence(tensors, batch_first=True, padding_value=value, padding_side="right")


class SkippedRecordsCallback(TrainerCallback):
    """Warn at each logging step when the collator skipped more bad records, and give the total at the end."""

    def __init__(self, collator: QwenVLDataCollator):
        self.collator = collator
        self._reported = 0

    def on_log(self, args, state, control, **kwargs):
        total = self.collator.num_skipped
        if total > self._reported:
            self._reported = total
            logger.warning("Skipped %d bad record(s) so far: %s", total, self.collator.skipped)

    def on_train_end(self, args, state, control, **kwargs):
        logger.info("Skipped %d bad record(s) in total: %s", self.collator.num_skipped, self.collator.skipped)
