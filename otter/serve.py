"""`otter-serve`: an OpenAI-compatible chat-completions server for Otter that batches concurrent requests.

    otter-serve                                             # the default Otter on http://127.0.0.1:8000/v1
    otter-serve --model luodian/OTTER-Image-LLaMA7B-LA-InContext --tokenizer luodian/llama-7b-hf \\
        --device-map auto --dtype bfloat16 --api-key secret --image-dir ./images
    otter-demo --api http://127.0.0.1:8000                  # any number of demos (and otter-chat) on one server

Any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}], max_tokens=64, temperature=0)

Images come as data: URLs; http(s) URLs only with --allow-remote-images, local paths only inside --image-dir.
`temperature` defaults to 1 (sampling), as in OpenAI's API; 0 decodes greedily. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from flamingo.cli import add_debug_flag, run_command
from otter.client import API_KEY_ENV
from otter.defaults import default_model
from otter.settings import add_model_arguments, positive_int

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otter-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--served-model-name", help="the model id clients pass (default: the model's name)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"clients must send it as a bearer token (default: ${API_KEY_ENV}; unset: no key)")
    server.add_argument("--max-batch-size", type=positive_int, default=16, help="rows (choices) per generate call")
    server.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting beyond this get 503")
    server.add_argument("--max-new-tokens-limit", type=positive_int, default=512,
                        help="the largest max_tokens a request may ask for")
    server.add_argument("--max-images", type=positive_int, default=8, help="images per request")
    server.add_argument("--batch-wait-ms", type=float, default=50,
                        help="how long a batch may wait for requests still being prepared (decoding images)")
    images = parser.add_argument_group("images")
    images.add_argument("--allow-remote-images", action="store_true",
                        help="download http(s) image URLs (by default only data: URLs are accepted)")
    images.add_argument("--image-dir", type=Path, help="also accept local image paths, only inside this folder")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.image_dir is not None and not args.image_dir.is_dir():
        parser.error(f"--image-dir {args.image_dir} is not a folder")
    return args


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    import uvicorn

    from otter.conversation import load_chat_model
    from otter.server import ImageSource, ServerSettings, create_app

    chat = load_chat_model(args.model or default_model(), tokenizer=args.tokenizer, device_map=args.device_map,
                           dtype=args.dtype, load_in_8bit=args.load_in_8bit)
    settings = ServerSettings(
        model_id=args.served_model_name or chat.name, api_key=args.api_key, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_new_tokens_limit=args.max_new_tokens_limit, max_images=args.max_images,
        batch_wait_s=args.batch_wait_ms / 1000, images=ImageSource(args.allow_remote_images, args.image_dir))
    if args.host not in LOOPBACK and settings.api_key is None:
        logger.warning("otter-serve is reachable from other machines (--host %s) without an API key", args.host)
    if not chat.trained:
        logger.warning("%s holds only a config: the model is untrained and its answers are noise", chat.name)
    logger.info("serving %s as '%s' on http://%s:%d/v1", chat.name, settings.model_id, args.host, args.port)
    uvicorn.run(create_app(chat, settings), host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
