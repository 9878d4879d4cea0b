"""`otter-generate`: answer a question about an image with in-context examples, end to end.

    otter-generate                                  # the model otter-train wrote (else an untrained tiny Otter)
    otter-generate --image cat.jpg --question "What is the cat doing?" \\
        --example dog.jpg "A dog is sleeping on a sofa." --example bird.jpg "A bird sits on a branch."
    otter-generate --model luodian/OTTER-Image-LLaMA7B-LA-InContext --tokenizer luodian/llama-7b-hf \\
        --image cat.jpg --question "What is the cat doing?" --device-map auto --dtype bfloat16

Without `--image`, the query is a drawn yellow triangle; without `--example`, a toy question (colour, shape, count,
position) gets two drawn examples of its own kind and any other question is asked zero-shot.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from flamingo.cli import add_debug_flag, run_command
from otter.defaults import default_model
from otter.settings import add_model_arguments, positive_int

logger = logging.getLogger(__name__)

# Two drawn examples per toy question kind: (shape, colour, count, position) of each picture and its answer.
TOY_EXAMPLES = {
    "colour": [(("circle", "red"), "red"), (("square", "blue"), "blue")],
    "shape": [(("circle", "green"), "circle"), (("square", "orange"), "square")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otter-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", type=Path, help="query image (default: a drawn yellow triangle)")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument("--example", nargs=2, action="append", metavar=("IMAGE", "ANSWER"), default=[],
                        help="an in-context example: its image and the answer to --question about it (repeatable)")
    parser.add_argument("--no-examples", action="store_true", help="zero-shot: no in-context examples")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--num-beams", type=positive_int, default=1)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def examples_for(args: argparse.Namespace, size: int) -> list:
    """The in-context examples as (image, answer) pairs: the user's, else drawn ones for a toy question."""
    from otter.conversation import load_image
    from otter.data.shapes import draw_shape
    from otter.data.toy import QUESTION_TYPES

    if args.no_examples:
        return []
    if args.example:
        return [(load_image(image), answer) for image, answer in args.example]
    drawn = TOY_EXAMPLES.get(QUESTION_TYPES.get(args.question), [])
    return [(draw_shape(shape, colour, size), answer) for (shape, colour), answer in drawn]


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    from flamingo.loading import load_model_and_processor
    from otter.conversation import load_image
    from otter.data.shapes import draw_shape
    from otter.processing_otter import build_prompt

    loaded = load_model_and_processor(args.model or default_model(), tokenizer=args.tokenizer,
                                      device_map=args.device_map, dtype=args.dtype, load_in_8bit=args.load_in_8bit)
    model, processor = loaded.model, loaded.processor
    size = model.config.vision_config.image_size
    examples = examples_for(args, size)
    query = load_image(args.image) if args.image else draw_shape("triangle", "yellow", size)
    prompt = build_prompt(args.question, [(args.question, answer) for _, answer in examples])
    inputs = processor(text=prompt, images=[image for image, _ in examples] + [query])

    start = time.perf_counter()
    generated = model.generate(**inputs.to(model.device), max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                               do_sample=False, pad_token_id=processor.pad_token_id)
    seconds = time.perf_counter() - start
    answer = processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]
    print(f"model: {loaded.name}{'' if loaded.trained else ' (untrained: random weights)'}")
    print(f"prompt: {prompt}\nimages: {len(examples) + 1} ({inputs['vision_x'].shape[-1]} px)\nanswer: {answer!r}")
    print(f"generated {generated.shape[1] - inputs['input_ids'].shape[1]} tokens in {seconds:.2f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
