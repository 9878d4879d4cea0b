"""The application behind `otter-serve`: OpenAI's chat-completions API over one `ChatModel`, batching concurrent
requests.

Earlier user/assistant turns become completed chunks of Otter's prompt (in-context examples) through
`otter.conversation.Conversation`, exactly as in `otter-demo`; each user turn's images go first in its chunk.

Batching (see docs/serving.md) is continuous: a worker thread keeps one running batch of rows and, between two
decoding steps, lets waiting requests join it (their prompts run together, left padded, and their KV caches and
image latents are appended to the batch's) and lets ended rows leave it (at their own `max_tokens`, a `stop`
string, `<|endofchunk|>`, or when their client disconnects). Rows share a batch only when their sampling settings
can (greedy with greedy, sampling with the same temperature and top-p; a seeded sampling request runs alone, so that
its seed alone decides its answer).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import DynamicCache, TopPLogitsWarper

from flamingo.kernels import decoding_linears
from flamingo.modeling_flamingo import MediaCache
from flamingo.video import stretch_indices
from otter.client import API_KEY_ENV
from otter.conversation import (
    MAX_IMAGE_MB,
    ChatModel,
    Conversation,
    InputError,
    image_from_bytes,
    load_image,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8  # images per request
REMOTE_IMAGE_TIMEOUT_S = 10
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request body ---------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # accepted for compatibility; Otter sees one resolution


class Video(BaseModel):
    """A video clip as its frames, in order, each an image URL as in `image_url` (data:, or http(s)/local where the
    server allows them): `{"type": "video", "video": {"frames": ["data:image/png;base64,...", ...]}}`."""

    model_config = ConfigDict(extra="forbid")
    frames: list[str] = Field(min_length=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url", "video"]
    text: str | None = None
    image_url: ImageURL | None = None
    video: Video | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The chat-completions parameters this server implements; any other parameter is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy decoding
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; nothing to do here


def parse_request(body: Any) -> ChatCompletionRequest:
    """The request, or a 400 that names the first offending parameter (OpenAI's wording for unknown ones)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise bad_request(f"Unknown parameter: '{where}'.", param=where, code="unknown_parameter") from None
        raise bad_request(f"Invalid value for '{where}': {first['msg']}.", param=where) from None


# ---- images ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSource:
    """Where images may come from: `data:` URLs always; `http(s)` only if allowed (the server would otherwise fetch
    from any host a client names); local paths (`file://` or plain) only inside `image_dir`."""

    allow_remote: bool = False
    image_dir: Path | None = None

    def load(self, url: str, name: str) -> Image.Image:
        if url.startswith("data:"):
            return image_from_bytes(_data_url_bytes(url, name), name)
        if url.startswith(("http://", "https://")):
            return image_from_bytes(self._fetch(url, name), name)
        return load_image(self._local_path(url, name))

    def _fetch(self, url: str, name: str) -> bytes:
        if not self.allow_remote:
            raise InputError(f"{name} is a remote URL; this server does not fetch images from other hosts (start "
                             "it with --allow-remote-images), send the image as a data: URL instead.")
        limit = MAX_IMAGE_MB * 2**20
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_TIMEOUT_S) as response:
                data = response.read(limit + 1)  # one byte more than allowed tells "too large" apart
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise InputError(f"{name}: cannot download {url}: {error}.") from error
        return data

    def _local_path(self, url: str, name: str) -> Path:
        if self.image_dir is None:
            raise InputError(f"{name} is a local path; this server reads local images only when started with "
                             "--image-dir DIR, send the image as a data: URL instead.")
        root = self.image_dir.resolve()
        path = (root / url.removeprefix("file://")).resolve()
        if not path.is_relative_to(root):
            raise InputError(f"{name}: {url} is outside the server's --image-dir.")
        return path


def _data_url_bytes(url: str, name: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputError(f"{name} is a data: URL without base64 data; expected data:image/<type>;base64,<data>.")
    if len(payload) * 3 / 4 > MAX_IMAGE_MB * 2**20 + 4:  # refuse before decoding
        raise InputError(f"{name} is {len(payload) * 3 / 4 / 2**20:.1f} MB; images are limited to {MAX_IMAGE_MB} MB.")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise InputError(f"{name} is not valid base64 ({error}).") from None


# ---- messages -> conversation ----------------------------------------------------------------------
def conversation_from_messages(messages: Sequence[Message], images: ImageSource, max_images: int) -> Conversation:
    """Alternating user and assistant messages ending with a user message, as a `Conversation` whose last question
    is pending; the checks of `Conversation.ask` (text, first image) apply to every user message."""
    count = sum(_image_count(part) for message in messages for part in _parts(message))
    if count > max_images:
        raise InputError(f"The messages hold {count} images; this server accepts at most {max_images} per request "
                         "(--max-images; a video's frames count one each), one <image> per image in the prompt.")
    conversation = Conversation()
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        expected = "user" if number % 2 == 0 else "assistant"
        if message.role in ("system", "developer"):
            raise InputError(f"{where} is a {message.role} message; Otter's prompt has no system part, only "
                             "user and assistant turns.")
        if message.role != expected:
            raise InputError(f"{where} is a {message.role} message where a {expected} message was expected: "
                             "messages alternate user, assistant, user, ... and end with a user message.")
        texts, image_urls = _split_content(message, where)
        if message.role == "assistant":
            if image_urls:
                raise InputError(f"{where}: an assistant message cannot hold images.")
            conversation = conversation.answer(" ".join(texts))
        else:
            loaded = [_load_media(images, name, url) for name, url in image_urls]
            conversation = conversation.ask(" ".join(texts), loaded)
    if not conversation.pending:
        raise InputError("The last message must be a user message (the question to answer).")
    return conversation


def _parts(message: Message) -> list[ContentPart]:
    return [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content


def _image_count(part: ContentPart) -> int:
    if part.type == "video":
        return len(part.video.frames) if part.video is not None else 0
    return int(part.type == "image_url")


def _load_media(images: ImageSource, name: str, url: str | list[str]) -> Image.Image | tuple[Image.Image, ...]:
    """An image, or a video part's frames (a clip: one <image> marker)."""
    if isinstance(url, str):
        return images.load(url, name)
    return tuple(images.load(frame, f"{name}.video.frames[{k}]") for k, frame in enumerate(url))


def _split_content(message: Message, where: str) -> tuple[list[str], list[tuple[str, str | list[str]]]]:
    """The texts, and the (name for errors, URL, or a video's frame URLs) of the images, of one message."""
    texts, image_urls = [], []
    for index, part in enumerate(_parts(message)):
        name = f"{where}.content[{index}]"
        if part.type == "text":
            if part.text is None:
                raise InputError(f"{name} is a text part without 'text'.")
            texts.append(part.text)
        elif part.type == "video":
            if part.video is None:
                raise InputError(f"{name} is a video part without 'video' (expected {{\"frames\": [url, ...]}}).")
            image_urls.append((name, part.video.frames))
        elif part.image_url is None:
            raise InputError(f"{name} is an image_url part without 'image_url'.")
        else:
            image_urls.append((name, part.image_url.url))
    return texts, image_urls


# ---- one choice being generated --------------------------------------------------------------------
def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still turn out to start a stop string (or be half a UTF-8 character)."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                held = max(held, length)
                break
    return held


class Decoder:
    """Token ids -> text as `processor.decode_answers` writes it (special tokens dropped). Byte-fallback tokens
    (`<0xE2>`, LLaMA's pieces for characters outside the vocabulary) decode as a group: a trailing run of them may
    still become other characters, so `settled` leaves it out."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_ids = {id for token, id in tokenizer.get_vocab().items() if BYTE_TOKEN.fullmatch(token)}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def settled(self, ids: list[int]) -> str:
        end = len(ids)
        while end and ids[end - 1] in self.byte_ids:
            end -= 1
        return self.decode(ids[:end])


class AnswerText:
    """The answer of one row as its tokens come: the decoded text stripped and cut before the first stop string.
    `update` returns only text that can no longer change, so the streamed deltas concatenate to the answer."""

    def __init__(self, decoder: Decoder, stops: Sequence[str]):
        self.decoder, self.stops, self.sent = decoder, tuple(stops), ""

    def _cut(self, text: str) -> tuple[str, bool]:
        text = text.lstrip()
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(new settled text, whether a stop string was reached)."""
        text, stopped = self._cut(self.decoder.decode(ids))
        if stopped:
            return self._advance(text.rstrip()), True
        text, _ = self._cut(self.decoder.settled(ids))
        return self._advance(text[: len(text) - _held_back(text, self.stops)].rstrip()), False

    def finish(self, ids: list[int]) -> str:
        """The rest of the answer, once the row has ended."""
        return self._advance(self._cut(self.decoder.decode(ids))[0].strip())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding more tokens rewrote earlier text; cannot unsend it
            logger.warning("streamed text %r is not a prefix of %r", self.sent, text)
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass(frozen=True)
class Sampling:
    """A request's decoding settings; rows share a `generate` call only when their `batch_key`s are equal."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, job_id: int) -> tuple:
        if self.greedy:
            return ("greedy",)
        # Sampled rows draw from one random stream: a seeded request must not share it with others.
        return ("sample", self.temperature, self.top_p, job_id if self.seed is not None else None)

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Row:
    """One choice of a request: its generated ids, answer text and end."""

    index: int
    job: Job
    ids: list[int] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None

    def step(self, token: int, end_ids: set[int]) -> None:
        """Take the row's next token; sets `finish_reason` when the row ends."""
        self.generated += 1
        if self.job.cancelled.is_set():
            self.finish("cancelled")
            return
        if token in end_ids:
            self.finish("stop")
            return
        self.ids.append(token)
        delta, stopped = self.job.text[self.index].update(self.ids)
        if delta:
            self.job.deliver(("delta", self.index, delta))
        if stopped:
            self.finish("stop")
        elif self.generated >= self.job.sampling.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        rest = self.job.text[self.index].finish(self.ids)
        if rest:
            self.job.deliver(("delta", self.index, rest))
        self.job.deliver(("finish", self.index, reason))


class Job:
    """One request: its model inputs, `n` rows, and the events its handler reads (from the worker thread, through
    the handler's event loop)."""

    _ids = itertools.count()

    def __init__(self, inputs: dict[str, torch.Tensor], sampling: Sampling, n: int, decoder: Decoder,
                 loop: asyncio.AbstractEventLoop):
        self.id = next(self._ids)
        self.inputs, self.sampling = inputs, sampling
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.rows = [Row(index, self) for index in range(n)]
        self.text = [AnswerText(decoder, sampling.stops) for _ in range(n)]
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    @property
    def completion_tokens(self) -> int:
        return sum(row.generated for row in self.rows)

    def deliver(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down): nobody listens
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def fail(self, message: str) -> None:
        for row in self.rows:
            if row.finish_reason is None:
                row.finish_reason = "error"
                self.deliver(("error", row.index, message))


# ---- the scheduler ---------------------------------------------------------------------------------
@dataclass
class Counters:
    """What `/health` reports; the tests read `generate_calls` (prompt batches, each joining the running batch)
    against `requests` to see batching."""

    requests: int = 0
    generate_calls: int = 0
    decode_steps: int = 0
    rows_generated: int = 0
    tokens_generated: int = 0
    largest_batch: int = 0
    cancelled_rows: int = 0
    refused_queue_full: int = 0
    # Where the worker's time goes (`scripts/benchmark_serve.py` prints them per level): the prompt passes, split
    # into the images (vision tower and perceiver) and the language model, the decoding steps, and the rows' own
    # work; `images_encoded` counts images (a row's padding images too), `prompt_positions` the prompt tokens run
    # (left padding included), and `decoded_rows` the rows of all decoding steps.
    image_seconds: float = 0.0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    row_seconds: float = 0.0  # each row's own work after a step: detokenizing, stop strings, handing the text over
    images_encoded: int = 0
    prompt_positions: int = 0
    decoded_rows: int = 0


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _pad_images(latents: torch.Tensor, count: int) -> torch.Tensor:
    """(B, T_img, n, D) latents zero-padded to `count` images (padding images are never attended)."""
    missing = count - latents.shape[1]
    return latents if missing <= 0 else torch.cat([latents, latents.new_zeros(latents.shape[0], missing,
                                                                              *latents.shape[2:])], dim=1)


@dataclass
class RunningBatch:
    """The rows being decoded together, between two steps.

    `cache` is one transformers `DynamicCache` for all rows, left padded (`mask` is 0 on the padding): a row that
    joins is padded on the left to the batch's length, and the columns no row uses any more are dropped. Every row
    keeps its own `positions` (the next token's position) and `attended` image (new tokens never are `<image>`, so
    the image they cross-attend to is fixed once the prompt has run); `latents` are each row's encoded images, so
    that decoding steps never run the vision tower again. `next_tokens` are the tokens chosen at the last step, fed
    at the next one."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B,)
    attended: torch.Tensor  # (B,)
    latents: torch.Tensor | None  # (B, T_img, n_latents, D)
    next_tokens: torch.Tensor  # (B,)
    media: MediaCache | None = None

    def __post_init__(self) -> None:
        if self.media is None and self.latents is not None:
            self.media = MediaCache(self.latents)

    def merge(self, other: RunningBatch) -> RunningBatch:
        """This batch's rows followed by `other`'s, on one cache."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        layers = [(torch.cat([_pad_left(a.keys, length, 2), _pad_left(b.keys, length, 2)]),
                   torch.cat([_pad_left(a.values, length, 2), _pad_left(b.values, length, 2)]))
                  for a, b in zip(self.cache.layers, other.cache.layers, strict=True)]
        latents = None
        if self.latents is not None or other.latents is not None:
            parts = [batch.latents for batch in (self, other) if batch.latents is not None]
            if len(parts) < 2:
                raise ValueError("rows with images and rows without cannot share a batch")
            images = max(part.shape[1] for part in parts)
            latents = torch.cat([_pad_images(part, images) for part in parts])
        return RunningBatch(
            self.rows + other.rows, DynamicCache(ddp_cache_data=layers),
            torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)]),
            torch.cat([self.positions, other.positions]), torch.cat([self.attended, other.attended]), latents,
            torch.cat([self.next_tokens, other.next_tokens]))

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices` (the others have ended), and drop the cache columns left unused."""
        if len(indices) < len(self.rows):
            index = torch.tensor(indices, device=self.mask.device)
            self.rows = [self.rows[i] for i in indices]
            self.cache.batch_select_indices(index)
            self.mask, self.positions, self.attended = self.mask[index], self.positions[index], self.attended[index]
            self.next_tokens = self.next_tokens[index]
            if self.latents is not None:
                self.latents = self.latents[index]
                self.media = MediaCache(self.latents, {block: (keys[index], values[index])
                                                       for block, (keys, values) in self.media.keys_values.items()})
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class Scheduler:
    """The request queue and the worker thread that runs the model: one running batch that requests join and
    leave between decoding steps."""

    def __init__(self, chat: ChatModel, *, max_batch_size: int = 16, max_queue: int = 64, batch_wait_s: float = 0.05):
        self.chat, self.max_batch_size, self.max_queue = chat, max_batch_size, max_queue
        self.batch_wait_s = batch_wait_s
        self.counters = Counters()
        self.running: list[Job] = []
        self._waiting: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._preparing = 0  # requests being checked and tokenized, soon to be submitted
        self._thread: threading.Thread | None = None
        processor = chat.processor
        self.end_ids = {processor.endofchunk_token_id, *_as_list(chat.model.generation_config.eos_token_id)}
        # An answer never holds a new image or answer marker: suppressing them keeps streamed text a prefix of
        # the final answer (Otter's decoding keeps only the text after the last <answer>), and keeps the image
        # that new tokens attend to fixed.
        self.suppress_tokens = [processor.media_token_id, processor.answer_token_id]
        self.context = chat.model.config.context_length

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="otter-serve-batches", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._condition:
            self._closing = True
            for job in self._waiting:
                job.cancelled.set()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around checking and tokenizing a request that will be submitted: an idle worker may wait for it."""
        with self._condition:
            self._preparing += 1
        try:
            yield
        finally:
            with self._condition:
                self._preparing -= 1
                self._condition.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with 503 when `max_queue` jobs already wait."""
        with self._condition:
            if len(self._waiting) >= self.max_queue:
                self.counters.refused_queue_full += 1
                raise APIError(503, f"The server's queue is full ({self.max_queue} requests waiting); retry later.",
                               type="server_error", code="queue_full", headers={"Retry-After": "1"})
            self.counters.requests += 1
            self._waiting.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits; a running one's rows end at the next step."""
        job.cancelled.set()
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counters.cancelled_rows += len(job.rows)

    # ---- worker thread -------------------------------------------------------------------------------
    def _work(self) -> None:
        batch: RunningBatch | None = None
        while True:
            jobs = self._joining(batch)
            if jobs is None:  # closing: nobody will read what the rows still running would say
                for job in list(self.running):
                    job.fail("The server is shutting down.")
                return
            try:
                if jobs:
                    joined = self._start(jobs)
                    if joined is not None:
                        batch = joined if batch is None else batch.merge(joined)
                if batch is not None:
                    self.counters.largest_batch = max(self.counters.largest_batch, len(batch.rows))
                    batch = self._decode(batch)
            except Exception as error:  # reported to the requests of the batch; the server goes on
                logger.exception("generation failed")
                failed = list(self.running)
                for job in failed:
                    job.fail(f"The model failed: {type(error).__name__}: {error}")
                self._leave(failed)
                batch = None

    def _joining(self, batch: RunningBatch | None) -> list[Job] | None:
        """The waiting jobs that join `batch` now (or start one: then, once a request waits, also those still being
        prepared, up to batch_wait_s, so that requests sent together start together); None when closing."""
        with self._condition:
            if batch is None:
                while not self._waiting and not self._closing:
                    self._condition.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while self._preparing and not self._closing and (left := deadline - time.monotonic()) > 0:
                    self._condition.wait(left)
            if self._closing:
                return None
            jobs = self._compatible(self._waiting, batch)
            for job in jobs:
                self._waiting.remove(job)
            self.running += jobs
            return jobs

    def _compatible(self, waiting: list[Job], batch: RunningBatch | None) -> list[Job]:
        """The waiting jobs, oldest first, that can share the running batch (or the oldest job's new one): the same
        batch key, at most `max_batch_size` rows. The first job that cannot stops the others from joining, so
        that it runs once the batch has drained rather than wait behind later requests."""
        if not waiting:
            return []
        rows = len(batch.rows) if batch is not None else 0
        key = batch.rows[0].job.sampling.batch_key(batch.rows[0].job.id) if batch is not None else None
        jobs = []
        for job in waiting:
            job_key = job.sampling.batch_key(job.id)
            if (key is not None and job_key != key) or rows + len(job.rows) > self.max_batch_size:
                break
            key, rows = job_key, rows + len(job.rows)
            jobs.append(job)
        return jobs

    @torch.inference_mode()
    def _start(self, jobs: list[Job]) -> RunningBatch | None:
        """Run the prompts of `jobs` (left padded together), choose each row's first token; the rows still going."""
        model, pad = self.chat.model, self.chat.processor.pad_token_id
        device = model.device
        texts = [{name: job.inputs[name] for name in ("input_ids", "attention_mask")} for job in jobs for _ in job.rows]
        inputs = {name: value.to(device) for name, value in left_pad(texts, pad).items()}
        media = self._encode_images(jobs)
        sampling = jobs[0].sampling
        if sampling.seed is not None and not sampling.greedy:
            torch.manual_seed(sampling.seed)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.counters.generate_calls += 1
        started = time.perf_counter()
        # Only the last position's logits choose a token (as in `generate`'s first step): the language-model head
        # over a 32000-token vocabulary at every prompt position would be a fifth of the prompt pass.
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, media_cache=media, use_cache=True,
                       logits_to_keep=1)
        self.counters.prompt_seconds += time.perf_counter() - started
        self.counters.prompt_positions += ids.numel()
        # The image a token after the prompt attends to: that of a text token appended to it.
        attended = model.attended_images(torch.cat([ids, torch.full_like(ids[:, :1], pad)], dim=1))[:, -1]
        rows = [row for job in jobs for row in job.rows]
        media = output.media_cache
        batch = RunningBatch(rows, output.cache, mask, positions[:, -1] + 1, attended,
                             media.latents if media is not None else None,
                             self._choose(output.logits[:, -1], sampling), media)
        return self._advance(batch)

    def _encode_images(self, jobs: list[Job]) -> MediaCache | None:
        """The perceiver latents of every row of `jobs`, each job's images encoded once for all its `n` rows (timed
        apart from the language model's pass)."""
        model = self.chat.model
        vision_x = stack_images([job.inputs for job in jobs])
        if vision_x is None:
            return None
        started = time.perf_counter()
        latents = model.encode_images(vision_x.to(model.device)).latents
        self.counters.image_seconds += time.perf_counter() - started
        self.counters.images_encoded += vision_x.shape[0] * vision_x.shape[1]
        rows = torch.tensor([len(job.rows) for job in jobs], device=latents.device)
        return MediaCache(latents.repeat_interleave(rows, dim=0))

    @torch.inference_mode()
    def _decode(self, batch: RunningBatch) -> RunningBatch | None:
        """One decoding step of every row; the batch without the rows that ended (None when none is left)."""
        self.counters.decode_steps += 1
        self.counters.decoded_rows += len(batch.rows)
        started = time.perf_counter()
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        with decoding_linears(len(batch.rows)):  # a product per layer of a row per sequence: flamingo/kernels.py
            output = self.chat.model(input_ids=batch.next_tokens[:, None], attention_mask=batch.mask,
                                     position_ids=batch.positions[:, None], cache=batch.cache,
                                     media_cache=batch.media, attended_image=batch.attended[:, None], use_cache=True)
        batch.cache, batch.media = output.cache, output.media_cache
        batch.positions = batch.positions + 1
        batch.next_tokens = self._choose(output.logits[:, -1], batch.rows[0].job.sampling)
        self.counters.decode_seconds += time.perf_counter() - started
        return self._advance(batch)

    def _choose(self, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """The next token of every row, as `generate` chooses it (suppressed tokens, then greedy or sampled)."""
        scores = logits.float()
        scores[:, self.suppress_tokens] = float("-inf")
        if sampling.greedy:
            return scores.argmax(dim=-1)
        scores = scores / sampling.temperature
        if sampling.top_p < 1:
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]

    def _advance(self, batch: RunningBatch) -> RunningBatch | None:
        """Hand every row its chosen token; rows that ended leave the batch, jobs whose rows all ended leave
        `running`."""
        started = time.perf_counter()
        for row, token in zip(batch.rows, batch.next_tokens.tolist(), strict=True):
            row.step(token, self.end_ids)
        self.counters.row_seconds += time.perf_counter() - started
        going = [index for index, row in enumerate(batch.rows) if row.finish_reason is None]
        ended = {id(row.job): row.job for row in batch.rows if row.finish_reason is not None}
        self._leave([job for job in ended.values() if all(row.finish_reason is not None for row in job.rows)])
        if not going:
            return None
        batch.keep(going)
        return batch

    def _leave(self, jobs: list[Job]) -> None:
        with self._condition:
            for job in jobs:
                if job in self.running:
                    self.running.remove(job)
                    self.counters.rows_generated += len(job.rows)
                    self.counters.tokens_generated += job.completion_tokens
                    self.counters.cancelled_rows += sum(row.finish_reason == "cancelled" for row in job.rows)


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def left_pad(rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One-row model inputs -> a batch: `input_ids` and `attention_mask` padded on the left (generation appends on
    the right), and the rows' images stacked as `stack_images` does, as `FlamingoProcessor` batches them."""
    length = max(row["input_ids"].shape[1] for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        size = row["input_ids"].shape[1]
        input_ids[index, length - size :] = row["input_ids"][0]
        attention_mask[index, length - size :] = row["attention_mask"][0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    vision_x = stack_images(rows)
    if vision_x is not None:
        batch["vision_x"] = vision_x
    return batch


def stack_images(rows: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """The `vision_x` of one-row model inputs as one batch (None when no row has images): zero-padded to the most
    images of any row (padding images are never attended), clips stretched to the most frames of any row."""
    with_images = [row["vision_x"] for row in rows if "vision_x" in row]
    if not with_images:
        return None
    most = max(vision_x.shape[1] for vision_x in with_images)
    frames = max(vision_x.shape[2] for vision_x in with_images)  # video rows: the processor's frame padding
    vision_x = with_images[0].new_zeros((len(rows), most, frames, *with_images[0].shape[3:]))
    for index, row in enumerate(rows):
        if "vision_x" in row:
            own = row["vision_x"][0]
            vision_x[index, : own.shape[0]] = own[:, stretch_indices(own.shape[1], frames)]
    return vision_x


# ---- the HTTP application --------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_new_tokens_limit: int = 512
    max_images: int = DEFAULT_MAX_IMAGES
    batch_wait_s: float = 0.05
    images: ImageSource = ImageSource()


class OtterServer:
    """The request handlers around one `ChatModel` and its `Scheduler`."""

    def __init__(self, chat: ChatModel, settings: ServerSettings):
        self.chat, self.settings = chat, settings
        self.scheduler = Scheduler(chat, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                   batch_wait_s=settings.batch_wait_s)
        self.decoder = Decoder(chat.processor.tokenizer)
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), self.settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send the server's key (--api-key or $"
                           f"{API_KEY_ENV}) as 'Authorization: Bearer <key>'.", code="invalid_api_key")

    def check_size(self, request: Request) -> None:
        """Refuse a body larger than `max_images` images at the size limit could be, before reading it."""
        limit = self.settings.max_images * MAX_IMAGE_MB * 2**20 * 4 // 3 + 2**20  # base64, plus the text
        length = int(request.headers.get("content-length") or 0)
        if length > limit:
            raise bad_request(f"The request body is {length / 2**20:.0f} MB; this server reads at most "
                              f"{limit / 2**20:.0f} MB ({self.settings.max_images} images of {MAX_IMAGE_MB} MB).")

    def models(self) -> dict:
        config = self.chat.model.config
        return {"object": "list", "data": [{
            "id": self.settings.model_id, "object": "model", "created": self.created, "owned_by": "otter-serve",
            # Beyond OpenAI's fields, for `otter.client`: what the demo shows and sizes its pictures by.
            "trained": self.chat.trained, "image_size": config.vision_config.image_size,
            "context_length": config.context_length, "max_images": self.settings.max_images}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.settings.model_id, "queued": self.scheduler.queued,
                "running": len(self.scheduler.running), "torch_threads": torch.get_num_threads(),
                **vars(self.scheduler.counters)}

    def prepare(self, body: ChatCompletionRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Checks, images and tokenization of one request (in a worker thread: decoding images is slow)."""
        if body.model != self.settings.model_id:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                           f"'{self.settings.model_id}' (GET /v1/models).", param="model", code="model_not_found")
        if body.n > self.settings.max_batch_size:
            raise bad_request(f"n is {body.n}; this server generates at most {self.settings.max_batch_size} choices "
                              "per request (--max-batch-size).", param="n")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > 4 or not all(stops):
            raise bad_request("'stop' takes up to 4 non-empty strings.", param="stop")
        limit = self.settings.max_new_tokens_limit
        requested = body.max_completion_tokens or body.max_tokens or limit
        if requested > limit:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise bad_request(f"{param} is {requested}; this server generates at most {limit} tokens per answer "
                              "(--max-new-tokens-limit).", param=param)
        try:
            conversation = conversation_from_messages(body.messages, self.settings.images, self.settings.max_images)
            inputs = self.chat.inputs(conversation)  # refuses prompts that leave no room in the context
        except InputError as error:
            raise bad_request(str(error), param="messages") from None
        inputs = {name: value.cpu() for name, value in inputs.items()}
        context = self.chat.model.config.context_length
        if context is not None:
            requested = min(requested, context - inputs["input_ids"].shape[1])
        sampling = Sampling(requested, body.temperature, body.top_p, body.seed, stops)
        return Job(inputs, sampling, body.n, self.decoder, loop)

    async def chat_completions(self, request: Request) -> JSONResponse | StreamingResponse:
        self.check_key(request)
        self.check_size(request)
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("The request body is not valid JSON.") from None
        body = parse_request(payload)
        with self.scheduler.preparing():
            job = await asyncio.to_thread(self.prepare, body, asyncio.get_running_loop())
            self.scheduler.submit(job)
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(job, completion, include_usage), media_type="text/event-stream")
        return await self._complete(job, completion, request)

    async def _complete(self, job: Job, completion: dict, request: Request) -> JSONResponse:
        texts = [""] * len(job.rows)
        try:
            async for kind, index, value in self._events(job, request):
                if kind == "delta":
                    texts[index] += value
                elif kind == "error":
                    raise APIError(500, value, type="server_error")
        finally:
            if any(row.finish_reason is None for row in job.rows):
                self.scheduler.cancel(job)
        choices = [{"index": row.index, "message": {"role": "assistant", "content": texts[row.index]},
                    "finish_reason": row.finish_reason, "logprobs": None} for row in job.rows]
        return JSONResponse({**completion, "object": "chat.completion", "choices": choices, "usage": _usage(job)})

    async def _events(self, job: Job, request: Request | None = None) -> AsyncIterator[tuple]:
        """The job's events until every row has finished; checks for a disconnected client while waiting."""
        finished = 0
        while finished < len(job.rows):
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                continue
            finished += event[0] in ("finish", "error")
            yield event

    async def _stream(self, job: Job, completion: dict, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; starlette cancels this generator when the client leaves."""
        chunk = {**completion, "object": "chat.completion.chunk"}

        def event(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

        try:
            yield event([{"index": row.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for row in job.rows])
            async for kind, index, value in self._events(job):
                if kind == "delta":
                    yield event([{"index": index, "delta": {"content": value}, "finish_reason": None}])
                elif kind == "finish":
                    yield event([{"index": index, "delta": {}, "finish_reason": value}])
                else:
                    yield f"data: {json.dumps(APIError(500, value, type='server_error').body())}\n\n"
            if include_usage:
                yield event([], usage=_usage(job))
            yield "data: [DONE]\n\n"
        finally:
            if any(row.finish_reason is None for row in job.rows):
                self.scheduler.cancel(job)


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def create_app(chat: ChatModel, settings: ServerSettings) -> FastAPI:
    """The ASGI application: `/v1/chat/completions`, `/v1/models`, `/health`; the scheduler runs while it does."""
    server = OtterServer(chat, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        server.scheduler.close()

    app = FastAPI(title="otter-serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        server.check_key(request)
        (served,) = server.models()["data"]
        if model_id != served["id"]:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{served['id']}'.",
                           param="model", code="model_not_found")
        return served

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    return app


# ---- running it -----------------------------------------------------------------------------------
class ServerThread:
    """A uvicorn server in a background thread on an already bound socket (tests, benchmarks, notebooks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.create_server((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
