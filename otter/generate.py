"""`otter-generate`: answer a question about an image with in-context examples, end to end.

    otter-generate                                  # tiny Otter from configs/tiny-otter, random weights
    otter-generate --model luodian/OTTER-Image-LLaMA7B-LA-InContext --tokenizer luodian/llama-7b-hf \\
        --image cat.jpg --question "What is the cat doing?" --device-map auto --dtype bfloat16

Without `--image`, the query and example images are drawn coloured shapes.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from otter import OtterConfig, OtterModel, OtterProcessor
from otter.data.shapes import draw_shape
from otter.processing_otter import build_prompt

logger = logging.getLogger(__name__)

TINY_OTTER = Path(__file__).resolve().parents[1] / "configs" / "tiny-otter"
EXAMPLES = [("What colour is the shape?", "red"), ("What colour is the shape?", "blue")]
EXAMPLE_IMAGES = [("circle", "red"), ("square", "blue")]


def has_weights(folder: Path) -> bool:
    """Whether a local folder holds a checkpoint, or only a config (the tiny defaults)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def load_model(name: str, device_map: str | None, dtype: str) -> OtterModel:
    """A checkpoint (hub id or folder), or, for a folder with a config but no weights, a randomly
    initialised model of that config (the tiny defaults)."""
    folder = Path(name)
    if folder.is_dir() and not has_weights(folder):
        logger.warning("%s has no weights: building an untrained model from its config", folder)
        torch.manual_seed(0)
        return OtterModel(OtterConfig.from_pretrained(folder)).to(getattr(torch, dtype)).eval()
    return OtterModel.from_pretrained(name, device_map=device_map, dtype=getattr(torch, dtype)).eval()


def load_processor(model_name: str, tokenizer: str | None) -> OtterProcessor:
    """The published checkpoints ship no tokenizer: build it from the base LM's (`--tokenizer`)."""
    if tokenizer is not None:
        return OtterProcessor.from_base_tokenizer(tokenizer)
    return OtterProcessor.from_pretrained(model_name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_OTTER), help="hub id or folder (default: the tiny Otter)")
    parser.add_argument("--tokenizer", help="base tokenizer to add Otter's tokens to (for checkpoints without one)")
    parser.add_argument("--image", type=Path, help="query image (default: a drawn yellow triangle)")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument("--no-examples", action="store_true", help="zero-shot: no in-context examples")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device-map", default=None, help='e.g. "auto" to shard over the visible GPUs')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(args.model, args.device_map, args.dtype)
    processor = load_processor(args.model, args.tokenizer)
    size = model.config.vision_config.image_size

    examples = [] if args.no_examples else EXAMPLES
    images = [] if args.no_examples else [draw_shape(shape, colour, size) for shape, colour in EXAMPLE_IMAGES]
    images.append(Image.open(args.image).convert("RGB") if args.image else draw_shape("triangle", "yellow", size))
    prompt = build_prompt(args.question, examples)
    inputs = processor(text=prompt, images=images)

    start = time.perf_counter()
    generated = model.generate(**inputs.to(model.device), max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                               do_sample=False, pad_token_id=processor.pad_token_id)
    seconds = time.perf_counter() - start
    answer = processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]
    print(f"prompt: {prompt}\nimages: {len(images)} ({inputs['vision_x'].shape[-1]} px)\nanswer: {answer!r}")
    print(f"generated {generated.shape[1] - inputs['input_ids'].shape[1]} tokens in {seconds:.2f} s")


if __name__ == "__main__":
    main()
