"""A conversation with Otter about images, independent of any front-end: `otter-demo` (web) and `otter-chat`
(terminal) both use it.

The prompt is Otter's chunk format, rendered by the processor's chat template:

    <image>User: {example question} GPT:<answer> {example answer}<|endofchunk|>     one chunk per in-context example
    <image>User: {question 1} GPT:<answer> {answer 1}<|endofchunk|>                  earlier turns, completed chunks
    User: {follow-up} GPT:<answer> {answer 2}<|endofchunk|>                          a turn without a new image
    <image><image>User: {question 3} GPT:<answer>                                    the question being answered

Every attached image becomes one `<image>` marker at the start of its turn, so the prompt always holds exactly as
many markers as images (the model refuses anything else). A video clip attached to a turn (a tuple of its frames,
for a model with frame embeddings) is one marker too, like an image. A follow-up question without a new image adds no
marker: its text attends to the latest image before it, i.e. it is about the last image shown, as in Otter's own
demo. With several images in one turn, the question attends to the last of them (Flamingo's cross-attention sees
one image per token); the earlier ones reach it only through self-attention to their own `<image>` tokens.

Generation runs `model.generate` in a thread and streams decoded text from a `TextIteratorStreamer`; a
`threading.Event` stops it at the next token, and a lock keeps one generation at a time per model.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from flamingo.loading import load_model_and_processor
from flamingo.video import media_kwargs
from otter import OtterConfig, OtterModel, OtterProcessor
from otter.defaults import default_model
from otter.settings import GenerationSettings

logger = logging.getLogger(__name__)

MAX_IMAGE_MB = 20
MAX_IMAGE_SIDE = 8192
MAX_VIDEO_MB = 200
VIDEO_FRAMES = 16  # frames read from an attached video file, as Otter's video demo did; the processor may keep fewer
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif", ".m4v")


class InputError(ValueError):
    """Something the user gave cannot be used (not an image, too large, a reserved marker in the text, ...);
    the message says what and is meant to be shown as is."""


class GenerationError(RuntimeError):
    """`model.generate` failed; the message is meant to be shown as is."""


# ---- inputs -------------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, refusing files over `MAX_IMAGE_MB` or `MAX_IMAGE_SIDE` pixels per side before
    decoding them (a small compressed file can decode to gigabytes)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InputError(f"Cannot read {path.name}: {error.strerror}.") from error
    return _decode_image(path, size, path.name)


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def load_video(path: str | Path, num_frames: int = VIDEO_FRAMES) -> tuple[Image.Image, ...]:
    """A video file's clip: `num_frames` frames sampled evenly, first and last kept (PyAV: the `video` extra)."""
    from flamingo.video import read_video

    path = Path(path)
    try:
        megabytes = path.stat().st_size / 2**20
    except OSError as error:
        raise InputError(f"Cannot read {path.name}: {error.strerror}.") from error
    if megabytes > MAX_VIDEO_MB:
        raise InputError(f"{path.name} is {megabytes:.0f} MB; videos are limited to {MAX_VIDEO_MB} MB.")
    try:
        return tuple(read_video(path, num_frames, path.name))
    except (ValueError, ImportError) as error:
        raise InputError(str(error)) from error


def load_media(path: str | Path) -> Image.Image | tuple[Image.Image, ...]:
    """An attached file: a video file's clip (by its suffix), else an image."""
    return load_video(path) if is_video_file(path) else load_image(path)


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """`load_image` for an image already in memory (an upload); `name` says which one in error messages."""
    return _decode_image(io.BytesIO(data), len(data), name)


def _decode_image(source: Path | io.BytesIO, size: int, name: str) -> Image.Image:
    megabytes = size / 2**20
    if megabytes > MAX_IMAGE_MB:
        raise InputError(f"{name} is {megabytes:.1f} MB; images are limited to {MAX_IMAGE_MB} MB.")
    try:
        with Image.open(source) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                width, height = image.size
                raise InputError(f"{name} is {width}×{height} px; images are limited to {MAX_IMAGE_SIDE} px "
                                 "a side.")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # a valid image, refused by Pillow before its size is known here
        raise InputError(f"{name} has too many pixels ({_pixel_count(error)}); images are limited to "
                         f"{MAX_IMAGE_SIDE} px a side.") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"{name} is not an image (or not one Pillow can read).") from error


def _pixel_count(error: Image.DecompressionBombError) -> str:
    """The image's pixel count as Pillow's message states it ("Image size (N pixels) exceeds limit ...")."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(match.group(1)):,} pixels" if match else f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"


def check_text(text: str, what: str) -> str:
    """`text` stripped, refusing Otter's special tokens: typed into a question they would break the chunk format,
    and a typed `<image>` would ask for an image that was never given."""
    text = text.strip()
    if not text:
        raise InputError(f"The {what} is empty.")
    for token in OtterConfig.special_tokens:
        if token in text:
            if token == "<image>":
                raise InputError(f"The {what} contains <image>, which would need more images than were given: "
                                 "attach images instead (each attached image gets its own <image> marker).")
            raise InputError(f"The {what} contains {token}, one of Otter's reserved markers; remove it.")
    return text


# ---- conversation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """An in-context example: an image, a question about it and the answer Otter should imitate."""

    image: Image.Image
    question: str
    answer: str

    @classmethod
    def create(cls, image: Image.Image, question: str, answer: str, name: str = "example") -> Example:
        return cls(image, check_text(question, f"question of {name}"), check_text(answer, f"answer of {name}"))


# What one `<image>` marker of a turn stands for: an image, or a video clip as the tuple of its frames.
Media = Image.Image | tuple[Image.Image, ...]


@dataclass(frozen=True)
class Turn:
    """A question with the images (or clips) attached to it and, once generated, its answer."""

    question: str
    images: tuple[Media, ...] = ()
    answer: str | None = None


@dataclass(frozen=True)
class Conversation:
    """In-context examples and turns. Immutable: each step returns a new conversation, so a web session's state
    is only replaced once a step has succeeded."""

    examples: tuple[Example, ...] = ()
    turns: tuple[Turn, ...] = ()

    @property
    def pending(self) -> bool:
        """Whether the last question still waits for its answer."""
        return bool(self.turns) and self.turns[-1].answer is None

    def with_examples(self, examples: Sequence[Example]) -> Conversation:
        """The same turns after other in-context examples (they prefix the whole conversation)."""
        return replace(self, examples=tuple(examples))

    def ask(self, question: str, images: Sequence[Media] = ()) -> Conversation:
        """Add a question (pending until `answer`). Without images it is a follow-up about the last image. A clip
        (a tuple of frames) counts as one image."""
        question = check_text(question, "question")
        if self.pending:
            raise InputError("Wait for the answer to the last question (or stop it) before asking another one.")
        if not images and not any(turn.images for turn in self.turns):
            raise InputError("Attach an image to your first question: Otter answers questions about images.")
        if any(isinstance(media, (tuple, list)) and not media for media in images):
            raise InputError("A video clip without frames was attached; attach at least one frame.")
        media = tuple(tuple(item) if isinstance(item, (tuple, list)) else item for item in images)
        return replace(self, turns=(*self.turns, Turn(question, media)))

    def answer(self, text: str) -> Conversation:
        """Complete the pending question with its answer."""
        if not self.pending:
            raise ValueError("no question is waiting for an answer")
        return replace(self, turns=(*self.turns[:-1], replace(self.turns[-1], answer=text)))

    def retract(self) -> Conversation:
        """Drop the pending question (its generation failed), so that it is not part of later prompts."""
        return replace(self, turns=self.turns[:-1]) if self.pending else self

    def messages(self) -> list[dict]:
        """The conversation as transformers chat messages, in-context examples first."""
        chunks = [(example.question, (example.image,), example.answer) for example in self.examples]
        chunks += [(turn.question, turn.images, turn.answer) for turn in self.turns]
        messages = []
        for question, images, answer in chunks:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def images(self) -> list[Media]:
        """All images and clips in the order of their `<image>` markers in the prompt."""
        return [example.image for example in self.examples] + [image for turn in self.turns for image in turn.images]

    def prompt(self, processor: OtterProcessor) -> str:
        """Otter's prompt (see the module docstring), open at `GPT:<answer>` when a question is pending."""
        return processor.apply_chat_template(self.messages(), add_generation_prompt=self.pending, tokenize=False)


# ---- generation ---------------------------------------------------------------------------------
class StopOnEvent(StoppingCriteria):
    """Ends generation (every row and beam) at the next token once `event` is set, e.g. by a Stop button."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _GenerationThread(threading.Thread):
    """`model.generate` under the model's lock, until done or `stop` is set, keeping its output or its exception for
    the caller. A daemon, so that an interrupted terminal chat can exit without waiting for it."""

    def __init__(self, lock: threading.Lock, model: OtterModel, kwargs: dict, streamer: TextIteratorStreamer | None,
                 stop: threading.Event):
        super().__init__(name="otter-generate", daemon=True)
        self.lock, self.model, self.kwargs, self.streamer, self.stop = lock, model, kwargs, streamer, stop
        self.output: torch.Tensor | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with self.lock:
                start = time.perf_counter()
                self.output = self.model.generate(**self.kwargs, streamer=self.streamer,
                                                  stopping_criteria=StoppingCriteriaList([StopOnEvent(self.stop)]))
            logger.info("%d new tokens in %.1f s%s", self.output.shape[1] - self.kwargs["input_ids"].shape[1],
                        time.perf_counter() - start, ", stopped" if self.stop.is_set() else "")
        except Exception as error:  # handed to the caller, which reports it
            logger.exception("generation failed")
            self.error = error
            if self.streamer is not None:
                self.streamer.end()  # unblock the caller waiting for text


class ChatModel:
    """A model and its processor answering conversations, one generation at a time (a lock, as several web
    sessions share the model). `trained` is False for a model built from a config with random weights."""

    def __init__(self, model: OtterModel, processor: OtterProcessor, *, name: str = "", trained: bool = True):
        self.model, self.processor, self.name, self.trained = model, processor, name, trained
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def inputs(self, conversation: Conversation) -> BatchFeature:
        """The model inputs of a conversation with a pending question; refuses prompts longer than the model's
        context (a long chat grows past it)."""
        if not conversation.pending:
            raise ValueError("the conversation has no question to answer")
        try:
            media = conversation.images()
            inputs = self.processor(text=conversation.prompt(self.processor), **(media_kwargs([media]) if media else {}))
        except ValueError as error:  # the processor's refusals (a prompt past the context, images it cannot use)
            raise InputError(str(error)) from error
        length, context = inputs["input_ids"].shape[1], self.model.config.context_length
        if context is not None and length >= context:
            raise InputError(f"The conversation is {length} tokens, more than the model's context of {context}: "
                             "clear the chat (or use fewer in-context examples).")
        return inputs.to(self.model.device)

    def stream(self, conversation: Conversation, settings: GenerationSettings,
               stop: threading.Event | None = None) -> Iterator[str]:
        """Answer the pending question: yields the answer so far as it grows (with beam search, nothing until the
        end), then the final answer, post-processed like `OtterProcessor.decode_answers`. Setting `stop` ends the
        generation at the next token, keeping what was generated; closing the iterator early stops it too.
        Raises `InputError` before generating, `GenerationError` if the model fails."""
        inputs = self.inputs(conversation)
        prompt_length = inputs["input_ids"].shape[1]
        stop = stop if stop is not None else threading.Event()
        kwargs = {**inputs, **settings.generate_kwargs(), "pad_token_id": self.processor.pad_token_id}
        context = self.model.config.context_length
        if context is not None:
            kwargs["max_new_tokens"] = min(settings.max_new_tokens, context - prompt_length)
        streamer = None
        if settings.streams:
            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        job = _GenerationThread(self._lock, self.model, kwargs, streamer, stop)
        job.start()
        try:
            text = ""
            for piece in streamer or ():
                text += piece
                if piece.strip():
                    yield text.strip()
            job.join()
        finally:
            if job.is_alive():  # the caller stopped listening (closed tab, Ctrl-C): stop generating as well
                stop.set()
                job.join()
        if job.error is not None:
            raise GenerationError(f"The model failed: {type(job.error).__name__}: {job.error}") from job.error
        yield self.processor.decode_answers(job.output, prompt_length=prompt_length)[0]


# ---- loading and command-line arguments -----------------------------------------------------------
def load_chat_model(name: str | None = None, *, tokenizer: str | None = None, device_map: str | None = None,
                    dtype: str = "float32", load_in_8bit: bool = False) -> ChatModel:
    """The model (default: `otter.defaults.default_model()`) as `flamingo.loading` loads it, ready to chat."""
    loaded = load_model_and_processor(name or default_model(), tokenizer=tokenizer, device_map=device_map, dtype=dtype,
                                      load_in_8bit=load_in_8bit)
    return ChatModel(loaded.model, loaded.processor, name=loaded.name, trained=loaded.trained)


def load_chat_model_from_args(args: argparse.Namespace) -> ChatModel:
    return load_chat_model(args.model, tokenizer=args.tokenizer, device_map=args.device_map, dtype=args.dtype,
                           load_in_8bit=args.load_in_8bit)


__all__ = ["ChatModel", "Conversation", "Example", "GenerationError", "GenerationSettings", "InputError", "Turn",
           "image_from_bytes", "load_chat_model", "load_image", "load_media", "load_video"]
