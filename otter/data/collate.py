"""Batches for training Otter: prompt text, decoded images, and labels on the answers only.

The collator is where images are decoded and sequences are fitted to `max_length`, so it is also where the samples
that cannot be used are dropped: an undecodable image, or a query chunk longer than `max_length` on its own. A batch
whose samples are all dropped comes back as `None` (see `OtterCollator.__call__`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from PIL import Image

from ..processing_otter import OtterProcessor
from .samples import BadImageError, InstructionSample, describe_counts

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def build_labels(input_ids: torch.Tensor, processor: OtterProcessor) -> torch.Tensor:
    """Causal-LM labels that supervise every answer and the `<|endofchunk|>` closing it, and nothing else.

    For each `<answer>` token, `input_ids[answer + 1 : next <|endofchunk|> + 1]` is copied (Otter's HEAD masking, which
    also trains the in-context examples' answers and teaches the model to end its answer); an `<answer>` with no
    closing `<|endofchunk|>` is an unfinished answer and is not supervised. Everything else is -100: the prompt text,
    `<image>`, `<answer>` and padding. Works with either padding side.
    """
    answer, endofchunk = processor.answer_token_id, processor.endofchunk_token_id
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids.tolist()):
        ends = [i for i, token in enumerate(ids) if token == endofchunk]
        for start in (i + 1 for i, token in enumerate(ids) if token == answer):
            end = next((e for e in ends if e >= start), None)
            if end is not None:
                labels[row, start : end + 1] = input_ids[row, start : end + 1]
    never = torch.tensor([processor.media_token_id, answer, processor.pad_token_id])
    labels[torch.isin(labels, never)] = IGNORE_INDEX
    return labels


class OtterCollator:
    """Turns `InstructionSample`s into `input_ids`, `attention_mask`, `vision_x` `(B, T_img, 1, 3, H, W)` and
    `labels`, padded on the right (each row's positions start at 0, as in training without `position_ids`).

    A sample longer than `max_length` tokens loses in-context chunks from the front, whole chunks with their
    images, until it fits, so `<image>` tokens and images stay paired; if its query chunk alone is too long it is
    dropped. Samples whose images cannot be decoded are dropped too. Drops are logged and counted in `dropped` (by
    reason: `too_long`, `bad_base64`, `unreadable_image`), shortened samples in `shortened`; `summary()` logs both.
    These counters live in the process that collates: with DataLoader workers, each worker has its own copies.

    Args:
        processor: the Otter processor (tokenizer with `<image>`, `<answer>`, `<|endofchunk|>`, `<PAD>`).
        max_length: the most tokens of a row, BOS included.
    """

    def __init__(self, processor: OtterProcessor, max_length: int = 512):
        self.processor = processor
        self.max_length = max_length
        self.dropped: Counter[str] = Counter()
        self.shortened = 0

    def __call__(self, samples: Sequence[InstructionSample]) -> dict[str, torch.Tensor] | None:
        """The batch, or None if no sample of `samples` is usable: the training loop must then skip the step (on
        every process at once, when training on several: a process that skips while others run backward hangs)."""
        prepared = [pair for pair in map(self._prepare, samples) if pair is not None]
        if not prepared:
            logger.warning("All %d samples of a batch were dropped; the batch is None", len(samples))
            return None
        texts, images = zip(*prepared)
        batch = self.processor(text=list(texts), images=list(images), padding_side="right", return_tensors="pt")
        return {**batch, "labels": build_labels(batch["input_ids"], self.processor)}

    def fit(self, sample: InstructionSample) -> InstructionSample | None:
        """`sample` without as many leading in-context chunks as needed to fit `max_length`, or None if even the
        query chunk alone does not fit."""
        for count in range(len(sample.chunks)):
            candidate = sample.drop_examples(count)
            if len(self.processor.tokenizer(candidate.training_text())["input_ids"]) <= self.max_length:
                return candidate
        return None

    def summary(self) -> str:
        """One line on the samples dropped and shortened so far (call it at the end of an epoch); logged and
        returned."""
        line = f"collator: {self.dropped.total()} samples dropped, {self.shortened} shortened to {self.max_length} tokens"
        if self.dropped:
            line += f" ({describe_counts(self.dropped)})"
        logger.info(line)
        return line

    def _prepare(self, sample: InstructionSample) -> tuple[str, list[Image.Image]] | None:
        """The training text and decoded images of `sample` fitted to `max_length`, or None if it is dropped."""
        fitted = self.fit(sample)
        if fitted is None:
            self._drop(sample, "too_long", f"its query alone is longer than {self.max_length} tokens")
            return None
        if len(fitted.chunks) < len(sample.chunks):
            self.shortened += 1
        try:
            return fitted.training_text(), fitted.load_images()
        except BadImageError as error:
            self._drop(sample, error.reason, str(error))
            return None

    def _drop(self, sample: InstructionSample, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        logger.warning("Dropped sample %s: %s", sample.sample_id, message)
