"""The web page of `otter-demo` (gradio): chat with history, in-context example slots, streamed answers,
generation settings and a Stop button, on a `ChatModel` or an `otter-serve` client. `otter/demo.py` is the command."""


from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from otter.conversation import (
    MAX_IMAGE_MB,
    MAX_IMAGE_SIDE,
    ChatModel,
    Conversation,
    Example,
    GenerationError,
    InputError,
    load_image,
    load_media,
)
from otter.data.shapes import draw_shape
from otter.data.toy import POSITIONS, QUESTIONS
from otter.settings import GenerationSettings

logger = logging.getLogger(__name__)

EXAMPLE_SLOTS = 2
# Clickable inputs: (query image, question, [(example image, answer)] * EXAMPLE_SLOTS); images are (shape, colour,
# centre) as the toy dataset draws them, and each query's examples ask the same question, as in training.
EXAMPLE_INPUTS = [
    (("triangle", "yellow", POSITIONS["bottom"]), QUESTIONS["colour"],
     [(("circle", "red", (0.5, 0.5)), "red"), (("square", "blue", (0.5, 0.5)), "blue")]),
    (("cross", "green", (0.5, 0.5)), QUESTIONS["shape"],
     [(("circle", "purple", (0.5, 0.5)), "circle"), (("square", "orange", (0.5, 0.5)), "square")]),
    (("circle", "white", POSITIONS["left"]), QUESTIONS["position"],
     [(("square", "red", POSITIONS["top"]), "top"), (("triangle", "blue", POSITIONS["right"]), "right")]),
    (("square", "purple", (0.5, 0.5)), QUESTIONS["colour"], []),
]
CSS = "#untrained {border: 2px solid #e0a800; border-radius: 8px; padding: 0 12px; background: #fff8e1}"


class Demo:
    """The page's event handlers around one `ChatModel`. Each browser session keeps its `Conversation` in a
    `gr.State`; the handlers are plain methods, so that tests call them without a server."""

    def __init__(self, chat: ChatModel, settings: GenerationSettings, concurrent_answers: int | None = 1):
        self.chat, self.settings, self.concurrent_answers = chat, settings, concurrent_answers
        self._stops: dict[str, threading.Event] = {}  # per session: set by Stop, Clear, or closing the tab

    def _stop_event(self, request: gr.Request | None) -> threading.Event:
        return self._stops.setdefault(_session(request), threading.Event())

    # ---- handlers ----------------------------------------------------------------------------------
    def submit(self, message: dict | None, history: list[dict], conversation: Conversation, *slots: Any,
               request: gr.Request | None = None) -> tuple[None, list[dict], Conversation]:
        """Check the question, its images and the example slots, and add the question to the chat (the answer
        follows in `respond`). Bad input raises `gr.Error`, leaving the chat and the text box as they were."""
        message = message or {}
        files = list(message.get("files") or [])
        try:
            images = [load_media(path) for path in files]  # a video file: its clip, one <image> marker
            conversation = conversation.with_examples(examples_from_slots(slots)).ask(message.get("text") or "", images)
        except InputError as error:
            raise gr.Error(str(error)) from None
        self._stop_event(request).clear()
        content = [{"path": str(path)} for path in files] + [conversation.turns[-1].question]
        return None, [*history, {"role": "user", "content": content}], conversation

    def respond(self, conversation: Conversation, history: list[dict], max_new_tokens: float, do_sample: bool,
                temperature: float, top_p: float, num_beams: float, no_repeat_ngram_size: float,
                request: gr.Request | None = None) -> Iterator[tuple[Conversation, list[dict]]]:
        """Stream the answer to the pending question into the chat. If the model fails, the question leaves the
        conversation (later prompts do not contain it), the chat shows the error, and `gr.Error` reports it."""
        settings = GenerationSettings(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p),
                                      int(num_beams), int(no_repeat_ngram_size))
        answer = ""
        try:
            for answer in self.chat.stream(conversation, settings, self._stop_event(request)):
                yield conversation, [*history, {"role": "assistant", "content": answer}]
        except Exception as error:  # whatever it is, the session must not stay stuck on this question
            if not isinstance(error, (InputError, GenerationError)):
                logger.exception("answering failed")
                error = f"{type(error).__name__}: {error}"
            yield conversation.retract(), [*history, {"role": "assistant", "content": f"**Error**: {error}"}]
            raise gr.Error(str(error)) from None
        yield conversation.answer(answer), [*history, {"role": "assistant", "content": answer}]

    def stop(self, request: gr.Request | None = None) -> None:
        """Stop this session's generation at the next token (or, if still queued, right when it starts)."""
        self._stop_event(request).set()

    def clear(self, request: gr.Request | None = None) -> tuple[None, list[dict], Conversation]:
        self.stop(request)
        return None, [], Conversation()

    def forget(self, request: gr.Request | None = None) -> None:
        """The tab was closed: stop its generation, which nobody will read."""
        self.stop(request)
        self._stops.pop(_session(request), None)

    # ---- page ---------------------------------------------------------------------------------------
    def blocks(self, example_dir: Path) -> gr.Blocks:
        """The page; `example_dir` receives the pictures of the clickable example inputs."""
        with gr.Blocks(title="Otter demo", analytics_enabled=False) as blocks:
            gr.Markdown(f"# Otter\nAsk about images; model `{self.chat.name}`. Attach images with the clip "
                        "button, then ask; a follow-up question without an image is about the last image.")
            if not self.chat.trained:
                gr.Markdown(f"**Untrained model**: `{self.chat.name}` holds only a config, so this is a randomly "
                            "initialised Otter and its answers are noise. Train it with `otter-train` (writes "
                            "`outputs/otter-tiny/model`, which the demo then uses) or pass `--model`.",
                            elem_id="untrained")
            conversation = gr.State(Conversation())
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=600, elem_id="chatbot", feedback_options=None,
                                         buttons=["copy", "copy_all"])
                    message = gr.MultimodalTextbox(
                        file_types=["image", "video"], file_count="multiple", label="Question", show_label=False,
                        elem_id="message", placeholder=f"Ask about the images (attach up to {MAX_IMAGE_MB} MB, "
                        f"{MAX_IMAGE_SIDE} px a side, with the clip)")
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear chat", elem_id="clear")
                with gr.Column(scale=2):
                    slots = self._example_slots()
                    settings = self._settings_panel()
            gr.Examples(example_rows(example_dir, self.chat.image_size), [message, *slots], label="Example inputs")

            submitted = message.submit(self.submit, [message, chatbot, conversation, *slots],
                                       [message, chatbot, conversation], concurrency_limit=None)
            # In-process, one generation at a time: every tab's answers queue here (the model's lock is the second
            # guard). Through otter-serve (None), all go at once and the server batches them.
            responding = submitted.success(self.respond, [conversation, chatbot, *settings], [conversation, chatbot],
                                           concurrency_limit=self.concurrent_answers, concurrency_id="generate")
            stop.click(self.stop, queue=False)
            for clearing in (clear.click, chatbot.clear):  # the chat's own trash button clears the state too
                clearing(self.clear, None, [message, chatbot, conversation], queue=False, cancels=[responding])
            blocks.unload(self.forget)
        return blocks

    @staticmethod
    def _example_slots() -> list[gr.components.Component]:
        slots = []
        with gr.Accordion("In-context examples", open=True):
            gr.Markdown("Filled examples go before the conversation, one image each, as answered questions that "
                        "show Otter what to do. Leave a slot empty to skip it.")
            for number in range(1, EXAMPLE_SLOTS + 1):
                with gr.Row(equal_height=True):
                    slots.append(image_slot(label=f"Example {number}", height=110, min_width=100,
                                            sources=["upload", "clipboard"]))
                    with gr.Column(min_width=160):
                        slots.append(gr.Textbox(label=f"Question {number}", lines=1, max_lines=2))
                        slots.append(gr.Textbox(label=f"Answer {number}", lines=1, max_lines=2))
        return slots

    def _settings_panel(self) -> list[gr.components.Component]:
        s = self.settings
        with gr.Accordion("Generation settings", open=True):
            return [
                gr.Slider(1, 1024, s.max_new_tokens, step=1, label="Max new tokens"),
                gr.Checkbox(s.do_sample, label="Sample (otherwise greedy / beam search)"),
                gr.Slider(0.05, 2.0, s.temperature, step=0.05, label="Temperature (sampling)"),
                gr.Slider(0.05, 1.0, s.top_p, step=0.05, label="Top-p (sampling)"),
                gr.Slider(1, 8, s.num_beams, step=1, label="Beams",
                          info="1 streams the answer token by token; beam search shows it when complete"),
                gr.Slider(0, 8, s.no_repeat_ngram_size, step=1, label="No-repeat n-gram size (0: off)"),
            ]


def image_slot(**kwargs: Any) -> gr.Image:
    """A `gr.Image(type="filepath")` whose uploads reach the handlers as their paths, unopened. `gr.Image` opens every
    upload with PIL while preprocessing it, so a text file or a decompression bomb failed inside gradio with its
    internal error instead of `load_image`'s message (which also enforces the demo's size limits). Patched on the
    instance: a subclass of a gradio component makes gradio write a .pyi file beside this module at import."""
    slot = gr.Image(type="filepath", **kwargs)
    slot.preprocess = functools.partial(_unopened_upload, slot.preprocess)
    return slot


def _unopened_upload(preprocess: Callable[[Any], str | None], payload: Any) -> str | None:
    if payload is not None and payload.path is not None and not (payload.url or "").startswith("data:"):
        return str(payload.path)
    try:
        return preprocess(payload)  # pasted data: URLs, decoded by gradio
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise gr.Error(f"The pasted image cannot be read: {error}") from None


def _session(request: gr.Request | None) -> str:
    """The browser session a request comes from ("" when called without one, as tests do)."""
    return getattr(request, "session_hash", None) or ""


def examples_from_slots(slots: Sequence[Any]) -> list[Example]:
    """The filled in-context example slots (image path, question, answer) * n; a half-filled slot is an error."""
    examples = []
    for number, start in enumerate(range(0, len(slots), 3), 1):
        image, question, answer = slots[start : start + 3]
        fields = {"image": image, "question": (question or "").strip(), "answer": (answer or "").strip()}
        missing = [name for name, value in fields.items() if not value]
        if len(missing) == 3:
            continue
        if missing:
            raise InputError(f"In-context example {number} needs an image, a question and an answer; "
                             f"it has no {' and no '.join(missing)}.")
        name = f"in-context example {number}"
        examples.append(Example.create(load_image(image), question, answer, name))
    return examples


def example_rows(folder: Path, size: int) -> list[list[Any]]:
    """`gr.Examples` rows (message, then image, question, answer per slot) of drawn shapes saved in `folder`."""
    size = max(size, 224)  # drawn large enough to look right on the page; the processor resizes anyway

    def save(spec: tuple, name: str) -> str:
        shape, colour, center = spec
        path = folder / f"{name}.png"
        draw_shape(shape, colour, size, center).save(path)
        return str(path)

    rows = []
    for row, (query, question, shots) in enumerate(EXAMPLE_INPUTS):
        slots = []
        for slot, (image, answer) in enumerate(shots):
            slots += [save(image, f"example-{row}-{slot}"), question, answer]
        slots += [None, "", ""] * (EXAMPLE_SLOTS - len(shots))
        rows.append([{"text": question, "files": [save(query, f"query-{row}")]}, *slots])
    return rows
