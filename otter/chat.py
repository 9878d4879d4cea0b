"""`otter-chat`: talk to Otter about images in the terminal; the same conversation as `otter-demo`.

    otter-chat --image cat.jpg                              # the first question is about cat.jpg
    otter-chat --image a.jpg --image b.jpg --example shot.jpg "What is it?" "A dog." --num-beams 1
    otter-chat --api http://127.0.0.1:8000 --image cat.jpg   # answers from a running otter-serve
    otter-chat --model <video model> --video clip.mp4       # a video (PyAV); --frame a.png --frame b.png: a clip

Without `--image`, the first question is about a drawn yellow triangle (as in `otter-generate`). In the prompt loop,
`/image PATH` attaches an image (or, for a video file, its clip) to the next question, `/frames P1 P2 ...` a clip of those
images, `/clear` starts over, `/quit` or Ctrl-D ends; Ctrl-C stops an
answer (keeping what was written). Follow-up questions without an image are about the last image.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flamingo.cli import add_debug_flag, run_command
from otter.client import add_api_arguments, connect
from otter.settings import GenerationSettings, add_generation_arguments, add_model_arguments

if TYPE_CHECKING:  # otter.conversation imports torch: imported where a conversation runs, not for `--help`
    from PIL import Image

    from otter.conversation import ChatModel, Conversation

HELP = ("/image PATH attaches an image or a video file to the next question, /frames P1 P2 ... a clip of those images, "
        "/clear starts over, /quit ends; Ctrl-C stops an answer.")


def print_streamed(texts: Iterable[str]) -> str:
    """Print each new part of a growing answer as it comes; returns the final answer. The final text is
    post-processed and may not extend what was printed (e.g. text before a generated `<answer>`): then it is
    printed again in full."""
    shown = ""
    for text in texts:
        if text.startswith(shown):
            print(text[len(shown) :], end="", flush=True)
        else:
            print(f"\n(final) {text}", end="", flush=True)
        shown = text
    print()
    return shown


def reply(chat: ChatModel, conversation: Conversation, settings: GenerationSettings) -> Conversation:
    """Answer the pending question, printing it as it streams; Ctrl-C stops the generation, not the program.
    On a model failure the question is dropped from the conversation."""
    from otter.conversation import GenerationError, InputError

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("otter> ", end="", flush=True)
    try:
        return conversation.answer(print_streamed(chat.stream(conversation, settings, stop)))
    except (InputError, GenerationError) as error:
        print(f"\n{error}")
        return conversation.retract()
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_loop(chat: ChatModel, conversation: Conversation, images: list[Image.Image],
              settings: GenerationSettings) -> None:
    """Read questions and commands until /quit or end of input; `images` go with the first question."""
    from otter.conversation import Conversation, InputError, load_image, load_media

    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            conversation, images = Conversation(examples=conversation.examples), []
            print("(new conversation; attach an image with /image PATH)")
        elif line.startswith(("/image", "/frames")):
            try:
                if line.startswith("/image"):
                    images.append(load_media(line.removeprefix("/image").strip()))
                else:
                    images.append(tuple(load_image(path) for path in line.removeprefix("/frames").split()))
                print(f"({len(images)} image(s) for the next question)")  # a clip counts as one
            except InputError as error:
                print(error)
        elif line.startswith("/"):
            print(HELP)
        elif line:
            try:
                conversation = conversation.ask(line, images)
            except InputError as error:
                print(error)
                continue
            images = []
            conversation = reply(chat, conversation, settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otter-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_api_arguments(parser)
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="an image for the first question (repeat for several)")
    parser.add_argument("--video", type=Path, action="append", default=[],
                        help="a video file for the first question, read with PyAV (pip install '.[video]')")
    parser.add_argument("--frame", type=Path, action="append", default=[],
                        help="a frame of one clip for the first question (repeat, in order)")
    parser.add_argument("--example", nargs=3, action="append", default=[], metavar=("IMAGE", "QUESTION", "ANSWER"),
                        help="an in-context example put before the conversation (repeat for several)")
    add_generation_arguments(parser.add_argument_group("generation"))
    add_debug_flag(parser)
    return parser.parse_args(argv)


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    from otter.conversation import Conversation, Example, load_chat_model_from_args, load_image, load_video
    from otter.data.shapes import draw_shape

    examples = [Example.create(load_image(image), question, answer, f"--example {number}")
                for number, (image, question, answer) in enumerate(args.example, 1)]
    images = [load_image(path) for path in args.image] + [load_video(path) for path in args.video]
    if args.frame:
        images.append(tuple(load_image(path) for path in args.frame))
    chat = connect(args.api, args.api_key) if args.api else load_chat_model_from_args(args)
    if not images:
        images = [draw_shape("triangle", "yellow", chat.image_size)]
        print("(no --image: the first question is about a drawn yellow triangle)")
    if not chat.trained:
        print(f"(untrained model: {chat.name} holds only a config, so the answers are noise)")
    print(f"Otter ({chat.name}), {len(examples)} in-context example(s). {HELP}")
    chat_loop(chat, Conversation(examples=tuple(examples)), images, GenerationSettings.from_args(args, chat.trained))


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
