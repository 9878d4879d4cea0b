"""`flamingo-memory`: per-GPU memory of a Flamingo/Otter model (weights, gradients, AdamW state, activations, CUDA
context), and whether it fits. The planner is `flamingo.memory`; docs/memory.md states its assumptions.

    flamingo-memory otter-9b-llama --gpus 4x24GB --mode training --strategy device_map --batch 4
    flamingo-memory otter-video-llama7b --gpus 1x80GB --frames 16    # one 16-frame clip per sample

Exit status 0 if it fits, 1 if not.
"""

from __future__ import annotations

import argparse

from flamingo.arguments import fraction, gpus, int_at_least, parse_gpus
from flamingo.cli import add_debug_flag, run_command

# The planner's choices (flamingo.memory.DTYPES, STRATEGIES; flamingo.recipes.TRAINABLE_SETS): tests check they agree.
DTYPES = ("bf16", "fp16", "fp32")
STRATEGIES = ("single", "device_map", "ddp", "fsdp", "zero2", "zero3")
TRAINABLE_SETS = ("otter", "all", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flamingo-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a shipped config name (otter-9b-llama, openflamingo-9b-mpt7b, ...), a folder "
                        "with config.json, or a hub id")
    parser.add_argument("--gpus", type=gpus, default="1x80GB", help="COUNTxSIZE, e.g. 4x24GB, 2x24GB, 1x80GB (GB = GiB)")
    parser.add_argument("--mode", choices=["inference", "training"], default="training")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batch", type=int_at_least(1), default=1, help="per process (the whole batch for single/device_map)")
    parser.add_argument("--seq", type=int_at_least(1), default=512, help="text tokens per sample")
    parser.add_argument("--images", type=int_at_least(0), default=1, help="images (or video clips) per sample")
    parser.add_argument("--frames", type=int_at_least(1), default=1,
                        help="frames per image: video clips, at most the model's max_num_frames (default 1: images)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="single")
    parser.add_argument("--trainable", choices=TRAINABLE_SETS, default="otter")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                        help="8-bit weights (bitsandbytes) for the LM decoder layers")
    parser.add_argument("--margin", type=fraction, default=0.1,
                        help="fraction of each GPU kept free, 0 <= margin < 1 (default 0.1)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.strategy == "single" and parse_gpus(args.gpus)[0] != 1:
        parser.error(f"--strategy single runs on one GPU, but --gpus {args.gpus} has more; use 1xSIZE or another strategy")
    return args


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from flamingo.loading import load_config
    from flamingo.memory import format_counts, plan_memory

    plan = plan_memory(
        load_config(args.model), gpus=args.gpus, mode=args.mode, dtype=args.dtype, batch=args.batch, seq=args.seq,
        images=args.images, strategy=args.strategy, trainable=args.trainable, checkpointing=args.gradient_checkpointing,
        int8=args.int8, margin=args.margin, frames=args.frames,
    )
    print(f"{args.model}: {args.mode}, {args.dtype}, strategy {args.strategy}, {args.gpus}, batch {args.batch}, "
          f"seq {args.seq}, images {args.images}, frames {args.frames}, trainable {args.trainable}, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, int8 {'on' if args.int8 else 'off'}")
    print(format_counts(plan.counts))
    print(plan.table())
    for note in plan.notes:
        print("note:", note)
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
