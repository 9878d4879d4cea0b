"""What every instruction dataset yields: an `InstructionSample`, with its images still encoded.

Datasets keep images as compact base64 text and decode them only when a batch is made (`OtterCollator`), so a
dataset of millions of rows fits in memory and one unreadable image costs one sample, not the whole run. Problems that
are cheap to see (a missing image id, an empty answer) are found when a dataset is built; those that need decoding are
found by the collator. Both are counted by reason rather than raised.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..processing_otter import build_prompt, chunk

logger = logging.getLogger(__name__)

ImageSource = Callable[[], Image.Image] | Image.Image
# What one chunk's `<image>` marker stands for: an image, or a video clip as the tuple of its frames, in order.
MediaSource = ImageSource | tuple[ImageSource, ...]
# The same, decoded: an image, or a clip's frames.
Media = Image.Image | list[Image.Image]


class BadRowError(ValueError):
    """A row that cannot become a sample; `reason` is its key in the bad-row counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadImageError(BadRowError):
    """An image that cannot be decoded (`bad_base64` or `unreadable_image`)."""


def text_problem(row: dict, key: str) -> str | None:
    """Why `row[key]` cannot be an instruction's or answer's text (`empty_<key>`, `non_text_<key>`), or None.
    Shared by every reader so that a row counts the same everywhere: `null` is empty, not the text "None", and a
    number or list is not text."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"empty_{key}"
    if not isinstance(value, str):
        return f"non_text_{key}"
    return None


@dataclass(frozen=True)
class EncodedImage:
    """An image kept as base64 text (standard, or urlsafe as in OFA's TSV files) and decoded when called."""

    data: str
    urlsafe: bool = False

    def raw(self) -> bytes:
        """The encoded file's bytes (PNG, JPEG, ...)."""
        try:
            return base64.urlsafe_b64decode(self.data) if self.urlsafe else base64.b64decode(self.data)
        except (binascii.Error, ValueError, TypeError) as error:  # TypeError: not text at all (a JSON null, a number)
            raise BadImageError("bad_base64", f"invalid base64 image data: {error}") from error

    def __call__(self) -> Image.Image:
        return decode_image(self.raw())


def decode_image(raw: bytes) -> Image.Image:
    """An RGB image from a file's bytes; anything PIL cannot read fully becomes a `BadImageError`."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError("unreadable_image", f"unreadable image: {error}") from error


@dataclass
class InstructionSample:
    """One training/eval example: in-context chunks followed by the query chunk; one image or clip per chunk.

    `images` holds, per chunk, a PIL image or a zero-argument callable returning one (e.g. an `EncodedImage`), so
    that decoding waits until `load_images()`; or, for a video chunk, a tuple of those: the clip's frames.
    """

    sample_id: str
    chunks: list[tuple[str, str]]
    images: list[MediaSource]

    def __post_init__(self) -> None:
        if not self.chunks:
            raise ValueError(f"sample {self.sample_id!r} has no chunks")
        if len(self.images) != len(self.chunks):
            raise ValueError(
                f"sample {self.sample_id!r} has {len(self.chunks)} chunks but {len(self.images)} images; "
                "every Otter chunk takes exactly one image"
            )

    @property
    def question(self) -> str:
        return self.chunks[-1][0]

    @property
    def answer(self) -> str:
        return self.chunks[-1][1]

    @property
    def examples(self) -> list[tuple[str, str]]:
        """The in-context `(instruction, answer)` chunks before the query."""
        return self.chunks[:-1]

    def prompt(self) -> str:
        """The inference prompt, open at the query's `GPT:<answer>` (for evaluation)."""
        return build_prompt(self.question, self.examples)

    def training_text(self) -> str:
        """The full text the model is trained on: the prompt completed with the query's answer, equal to the chat
        template rendered with every assistant turn."""
        return "".join(chunk(question, answer) for question, answer in self.chunks)

    @property
    def has_clips(self) -> bool:
        return any(isinstance(media, tuple) for media in self.images)

    def load_images(self) -> list[Media]:
        """Decode the media, one per chunk: an image, or a clip's list of frames; raises `BadImageError` for an
        image or frame that cannot be read (which makes the whole clip unusable)."""
        return [[_load(frame) for frame in media] if isinstance(media, tuple) else _load(media) for media in self.images]

    def drop_examples(self, count: int) -> InstructionSample:
        """The sample without its first `count` in-context chunks (the query is always kept)."""
        if not 0 <= count < len(self.chunks):
            raise ValueError(f"can drop 0..{len(self.chunks) - 1} in-context chunks, not {count}")
        return InstructionSample(self.sample_id, self.chunks[count:], self.images[count:])


def _load(image: ImageSource) -> Image.Image:
    return image if isinstance(image, Image.Image) else image()


def blank_like(media: Media) -> Media:
    """A grey image of the same size (for a clip: as many grey frames): what a model sees when it sees nothing."""
    if isinstance(media, list):
        return [blank_like(frame) for frame in media]
    return Image.new("RGB", media.size, (128, 128, 128))


class InstructionDataset(torch.utils.data.Dataset):
    """A list of `InstructionSample`s with the rows that were skipped building it, counted by reason."""

    def __init__(self, name: str, samples: Sequence[InstructionSample], bad_rows: Counter[str]):
        if not samples:
            raise ValueError(f"{name}: no usable rows ({describe_counts(bad_rows) or 'the file is empty'})")
        self.name = name
        self.samples = list(samples)
        self.bad_rows = bad_rows
        if bad_rows:
            logger.warning("%s: skipped %d bad rows (%s)", name, bad_rows.total(), describe_counts(bad_rows))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> InstructionSample:
        return self.samples[index]

    def summary(self) -> str:
        """One line on the samples and skipped rows."""
        line = f"{self.name}: {len(self)} samples, {self.bad_rows.total()} bad rows skipped"
        if self.bad_rows:
            line += f" ({describe_counts(self.bad_rows)})"
        return line


def describe_counts(counts: Counter[str]) -> str:
    """`"reason: n, ..."`, most frequent first."""
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
