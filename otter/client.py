"""The client side of `otter-serve`: `RemoteChatModel` answers conversations through a running server, with the
interface `otter-demo` and `otter-chat` use from `ChatModel` (`stream`, `name`, `trained`, `image_size`), so
that one server can back many front-ends (`--api URL`).

The conversation goes over the wire as OpenAI chat messages: every in-context example and earlier turn as a user
message (its images as PNG data URLs, then its question) followed by its answer, and the pending question last;
the server rebuilds the same `Conversation`, hence the same prompt.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # otter.conversation imports torch: only where a conversation is answered, not for `--help`
    from PIL import Image

    from otter.conversation import Conversation, GenerationSettings

logger = logging.getLogger(__name__)

API_KEY_ENV = "OTTER_API_KEY"  # the variable otter-serve reads its key from


def image_url(image: Image.Image) -> str:
    """A PNG data URL: lossless, so the server's pixels are the client's."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def media_part(media: Image.Image | tuple[Image.Image, ...]) -> dict:
    """An image's `image_url` part, or a clip's `video` part (its frames as image URLs; see `otter.server.Video`)."""
    if isinstance(media, tuple):
        return {"type": "video", "video": {"frames": [image_url(frame) for frame in media]}}
    return {"type": "image_url", "image_url": {"url": image_url(media)}}


def openai_messages(conversation: Conversation) -> list[dict]:
    """The conversation as chat-completions messages, in-context examples first (`Conversation.messages`, with
    each `{"type": "image"}` part replaced by its image)."""
    images = iter(conversation.images())
    messages = []
    for message in conversation.messages():
        content = [media_part(next(images)) if part["type"] == "image" else part for part in message["content"]]
        messages.append({"role": message["role"], "content": content})
    return messages


class RemoteChatModel:
    """`ChatModel.stream` over HTTP. Settings the API has no field for (beam search, no-repeat n-grams) are not
    sent: the server decodes greedily (`temperature` 0) or samples."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600):
        from openai import OpenAI  # the `serve` extra; only needed in --api mode

        base_url = url.rstrip("/")
        base_url = base_url if base_url.endswith("/v1") else f"{base_url}/v1"
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get(API_KEY_ENV) or "none",
                             timeout=timeout, max_retries=0)
        model = self.client.models.list().data[0]  # also checks that the server is there and the key works
        extra = model.model_extra or {}
        self.name = model.id
        self.trained = bool(extra.get("trained", True))
        self.image_size = int(extra.get("image_size", 224))
        self._ignored_warned = False

    def stream(self, conversation: Conversation, settings: GenerationSettings,
               stop: threading.Event | None = None) -> Iterator[str]:
        """Like `ChatModel.stream`: the answer so far as it grows, then the final answer. Setting `stop` (or
        closing the iterator) closes the connection, which ends the generation on the server."""
        import openai

        from otter.conversation import GenerationError, InputError

        if not conversation.pending:
            raise ValueError("the conversation has no question to answer")
        self._warn_ignored(settings)
        try:
            response = self.client.chat.completions.create(
                model=self.name, messages=openai_messages(conversation), stream=True,
                max_tokens=settings.max_new_tokens, temperature=settings.temperature if settings.do_sample else 0,
                top_p=settings.top_p)
        except openai.BadRequestError as error:
            raise InputError(_message(error)) from error
        except openai.APIError as error:
            raise GenerationError(f"The server failed: {_message(error)}") from error
        text = ""
        try:
            with response:
                for chunk in response:
                    if stop is not None and stop.is_set():
                        break
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        text += piece
                        yield text
        except openai.APIError as error:  # an error event in the stream, or the connection broke
            raise GenerationError(f"The server failed: {_message(error)}") from error
        yield text

    def _warn_ignored(self, settings: GenerationSettings) -> None:
        if not self._ignored_warned and (settings.num_beams > 1 or settings.no_repeat_ngram_size):
            logger.warning("otter-serve decodes without beam search and without no-repeat n-grams; "
                           "num_beams=%d and no_repeat_ngram_size=%d are not sent",
                           settings.num_beams, settings.no_repeat_ngram_size)
            self._ignored_warned = True


def _message(error: Exception) -> str:
    """The `message` of an OpenAI error object, else the exception's text."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(error)


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="URL", help="answer through a running otter-serve (e.g. "
                        "http://127.0.0.1:8000) instead of loading a model; the model arguments are then unused")
    parser.add_argument("--api-key", help=f"the server's key (default: ${API_KEY_ENV})")


def connect(url: str, api_key: str | None = None) -> RemoteChatModel:
    """A `RemoteChatModel` for `--api URL`, or an error that says what is missing (the client, the server, the key)."""
    try:
        import openai
    except ImportError:
        raise SystemExit("--api needs the openai client: pip install 'flamingo-otter-hf[serve]'") from None

    try:
        return RemoteChatModel(url, api_key=api_key)
    except openai.AuthenticationError as error:
        raise SystemExit(f"{url}: {_message(error)}") from error
    except openai.APIConnectionError as error:
        raise SystemExit(f"Cannot reach otter-serve at {url} ({error}); start it with `otter-serve`.") from error


__all__ = ["RemoteChatModel", "add_api_arguments", "connect", "image_url", "openai_messages"]
