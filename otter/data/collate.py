"""Batches for training Otter: prompt text, decoded images, and labels on the answers only.

`UsableSamples` is where images are decoded and sequences are fitted to `max_length`, so it is also where the
samples that cannot be used are set aside: an undecodable image, or a query chunk longer than `max_length` on its
own. Such a sample is counted and replaced by the next usable one, so the collator always gets full batches (every
process of a distributed run steps together) and a dataset with nothing usable is an error, never an endless loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flamingo.video import media_kwargs

from ..processing_otter import OtterProcessor
from .samples import BadImageError, InstructionSample, Media, describe_counts

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FREE_TOKENS = 3  # tokens that cover no byte of the text: BOS, EOS, a leading space marker (UsableSamples.fits)


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


@dataclass(frozen=True)
class PreparedSample:
    """A sample ready to batch: its training text (fitted to `max_length`) and its decoded images (a video chunk's:
    the list of its frames)."""

    sample_id: str
    text: str
    images: list[Media]


class UsableSamples(torch.utils.data.Dataset):
    """`dataset`'s `InstructionSample`s as `PreparedSample`s.

    A sample longer than `max_length` tokens loses in-context chunks from the front, whole chunks with their
    images, until it fits, so `<image>` tokens and images stay paired. A sample whose query chunk alone is too long,
    or whose images cannot be decoded, is replaced by the next usable sample (index + 1, + 2, ...: deterministic, so
    resuming repeats the same batches); it is logged and counted in `dropped` by reason (`too_long`, `bad_base64`,
    `unreadable_image`), shortened samples in `shortened`. The counters live in the process that reads: with
    DataLoader workers, each worker has its own copies.

    Args:
        dataset: a dataset of `InstructionSample`s.
        processor: the Otter processor (its tokenizer measures lengths).
        max_length: the most tokens of a row, BOS included.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, processor: OtterProcessor, max_length: int = 512):
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self.dataset, self.processor, self.max_length = dataset, processor, max_length
        self.dropped: Counter[str] = Counter()
        self.shortened = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> PreparedSample:
        for offset in range(len(self)):
            prepared = self._prepare(self.dataset[(index + offset) % len(self)])
            if prepared is not None:
                return prepared
        raise ValueError(f"no sample of the {len(self)} in the training set is usable "
                         f"({describe_counts(self.dropped)}; max_length {self.max_length})")

    def fit(self, sample: InstructionSample) -> InstructionSample | None:
        """`sample` without as many leading in-context chunks as needed to fit `max_length`, or None if even the
        query chunk alone does not fit."""
        for count in range(len(sample.chunks)):
            candidate = sample.drop_examples(count)
            if self.fits(candidate.training_text()):
                return candidate
        return None

    def fits(self, text: str) -> bool:
        """Whether `text` is at most `max_length` tokens. Every token covers at least one byte of the text except the
        few a tokenizer adds (BOS, EOS, a SentencePiece space marker), so a text this short in bytes fits without
        being tokenized: the collator tokenizes it anyway, and most training texts are short."""
        if len(text.encode()) + FREE_TOKENS <= self.max_length:
            return True
        return len(self.processor.tokenizer(text)["input_ids"]) <= self.max_length

    def summary(self) -> str:
        """One line on the dataset and the samples set aside and shortened so far (logged once per epoch)."""
        name = self.dataset.summary() if hasattr(self.dataset, "summary") else f"{len(self)} samples"
        line = f"{name}; {self.dropped.total()} samples set aside, {self.shortened} shortened to {self.max_length} tokens"
        return line + (f" ({describe_counts(self.dropped)})" if self.dropped else "")

    def _prepare(self, sample: InstructionSample) -> PreparedSample | None:
        fitted = self.fit(sample)
        if fitted is None:
            return self._drop(sample, "too_long", f"its query alone is longer than {self.max_length} tokens")
        try:
            images = fitted.load_images()
        except BadImageError as error:
            return self._drop(sample, error.reason, str(error))
        if len(fitted.chunks) < len(sample.chunks):
            self.shortened += 1
        return PreparedSample(sample.sample_id, fitted.training_text(), images)

    def _drop(self, sample: InstructionSample, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        logger.warning("Set aside sample %s: %s", sample.sample_id, message)


class OtterCollator:
    """`PreparedSample`s -> `input_ids`, `attention_mask`, `vision_x` `(B, T_img, F, 3, H, W)` and `labels`,
    padded on the right (each row's positions start at 0, as in training without `position_ids`). `F` is 1 for
    images; with clips in the batch, the most frames of any clip (`flamingo.video.media_kwargs`)."""

    def __init__(self, processor: OtterProcessor):
        self.processor = processor

    def __call__(self, samples: Sequence[PreparedSample]) -> dict[str, torch.Tensor]:
        batch = self.processor(text=[s.text for s in samples], **media_kwargs([s.images for s in samples]),
                               padding_side="right", return_tensors="pt")
        return {**batch, "labels": build_labels(batch["input_ids"], self.processor)}
