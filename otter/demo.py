"""`otter-demo`: a web page to talk to Otter about images, with in-context examples.

    otter-demo                      # the model the last otter-train wrote, else an untrained tiny Otter
    otter-demo --model luodian/OTTER-Image-LLaMA7B-LA-InContext --tokenizer luodian/llama-7b-hf \\
        --device-map auto --dtype bfloat16
    otter-demo --host 0.0.0.0       # reachable from other machines (by default only from this one)
    otter-demo --api http://127.0.0.1:8000   # answers from a running otter-serve (which batches many demos' questions)

Any number of browser tabs can chat at once; their questions queue for the model, which answers one at a time
(with --api, the server takes them together).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from flamingo.cli import add_debug_flag, run_command
from otter.client import add_api_arguments, connect
from otter.settings import GenerationSettings, add_generation_arguments, add_model_arguments

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otter-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_api_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish through a temporary gradio.live link")
    generation = parser.add_argument_group("generation defaults (the page's side panel starts with these)")
    add_generation_arguments(generation)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    from otter.conversation import MAX_IMAGE_MB, load_chat_model_from_args
    from otter.webui import CSS, Demo  # pip install "flamingo-otter-hf[demo]"

    chat = connect(args.api, args.api_key) if args.api else load_chat_model_from_args(args)
    settings = GenerationSettings.from_args(args, chat.trained)
    if args.host != "127.0.0.1" or args.share:
        logger.warning("The demo is reachable from other machines (--host %s%s); it has no authentication",
                       args.host, ", --share" if args.share else "")
    with tempfile.TemporaryDirectory(prefix="otter-demo-") as example_dir:
        # gradio copies the example pictures to its cache; through a server, answers need not wait for each other
        blocks = Demo(chat, settings, None if args.api else 1).blocks(Path(example_dir))
    blocks.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                          max_file_size=f"{MAX_IMAGE_MB}mb", ssr_mode=False, show_error=True, css=CSS)


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
