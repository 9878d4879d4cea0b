"""`otter-train`: instruction-tune Otter on image-instruction data with in-context examples, with accelerate.

    otter-train                                    # the tiny Otter on the bundled toy data, on the CPU
    accelerate launch --config_file configs/accelerate/ddp.yaml -m otter.train \\
        --model luodian/OTTER-LLaMA7B-Init --tokenizer luodian/llama-7b-hf --data mixture.yaml

Writes to `--output-dir`: `checkpoints/step-NNNNNN/` (accelerate state, written atomically, the last
`--keep-checkpoints` kept, the final step always among them), `model/` (`save_pretrained` + processor), `runs/`
(TensorBoard, with held-out probes every `--eval-every` steps), `loss.png`, and `summary.json` with, per task, the
held-out accuracy with its in-context examples, without them and with blank images. `--data` also takes the bundled
toy sets (`toy`, `toy-icl`, `toy-mixture`, `toy-video`: otter.data.main_job). The model is then the default of
otter-generate, otter-chat and otter-demo (see `otter.defaults`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flamingo.arguments import int_at_least
from flamingo.cli import add_debug_flag, run_command
from otter.defaults import (
    BUNDLED_DATA,
    COPYING_STEPS,
    DATA_NEEDING_COPYING,
    DEFAULT_DATA,
    DEFAULT_OUTPUT_DIR,
    TINY_OTTER,
    model_to_train,
)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otter-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help="hub id, folder or shipped config name; a config without weights trains from scratch "
        f"(default: {TINY_OTTER}, or for --data toy-video tiny-otter-video)")
    add("--tokenizer", help="base tokenizer for checkpoints that ship none (Otter's tokens are added)")
    add("--data", default=DEFAULT_DATA, help="a mixture file (YAML/JSON), or bundled toy data: toy (questions about "
        "shapes), toy-icl (made-up names that only the in-context examples give), toy-mixture (both, the default), "
        "toy-video (which way a shape moves, over 5 frames)")
    add("--heldout", help="with a mixture file: the MIMIC-IT instructions JSON of a held-out split (its images.json "
        "and, if present, train_config.json beside it)")
    add("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    add("--trainable", choices=["auto", "otter", "all", "lora"], default="auto",
        help="otter: perceiver + cross-attention + new token rows; all: everything; lora: otter + LoRA on the LM; "
        "auto: all for a model built from scratch, otter otherwise")
    add("--train-vision-encoder", action="store_true")
    add("--copying-steps", type=int_at_least(0), help="first train the language model alone this many steps to copy "
        f"random text (otter.data.copying); default: a model built from scratch with --data "
        f"{'/'.join(DATA_NEEDING_COPYING)} starts from the shipped result of {COPYING_STEPS} such steps "
        "(scripts/make_tiny_copier.py), any other starts as it is")
    add("--epochs", type=positive_float, default=2.0, help="default: %(default)s")
    add("--max-steps", type=int_at_least(1), help="optimizer steps; overrides --epochs")
    add("--batch-size", type=int_at_least(1), default=16, help="per process")
    add("--grad-accum", type=int_at_least(1), default=1)
    add("--lr", type=positive_float, default=5e-4, help="AdamW's peak learning rate (cosine schedule; default "
        "%(default)s, the main job's)")
    add("--weight-decay", type=float, default=0.0)
    add("--warmup-ratio", type=float, default=0.03)
    add("--max-grad-norm", type=positive_float, default=1.0)
    add("--max-length", type=int_at_least(8), default=256)
    add("--gradient-checkpointing", action="store_true")
    add("--attn-implementation", choices=["sdpa", "eager"],
        help="attention kernels (default: sdpa on GPUs, eager on CPUs, faster there at the tiny sizes)")
    add("--mixed-precision", choices=["no", "bf16", "fp16"],
        help="autocast (DeepSpeed: its bf16/fp16 engine); default: what `accelerate launch`/its config says, else no")
    add("--save-every", type=int_at_least(0), default=200, help="checkpoint every N optimizer steps (0: only at the end)")
    add("--keep-checkpoints", type=int_at_least(1), default=2)
    add("--resume", action="store_true", help="continue from the latest usable checkpoint in --output-dir")
    add("--eval-samples", type=int_at_least(0), default=200, help="held-out samples per task to score at the end "
        "(0: skip evaluation)")
    add("--eval-every", type=int_at_least(0), default=500, help="probe held-out accuracy every N optimizer steps "
        "(0: never), into log.jsonl, TensorBoard and loss.png")
    add("--push-to-hub", metavar="REPO_ID")
    add("--seed", type=int, default=0)
    add("--num-workers", type=int_at_least(0), default=0)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.data not in BUNDLED_DATA and not Path(args.data).is_file():
        parser.error(f"--data {args.data!r} is neither a mixture file nor bundled data ({', '.join(BUNDLED_DATA)})")
    args.model = args.model or model_to_train(args.data)
    return args


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    from otter.training import train

    summary = train(args)
    if "tasks" in summary:
        print(results_table(summary))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # gloo can abort at interpreter exit after training (reference/distributed-cpu.md): leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def results_table(summary: dict) -> str:
    """The held-out accuracies per task and condition, as the last lines a run prints."""
    conditions = list(dict.fromkeys(c for scores in summary["tasks"].values() for c in scores))
    lines = [f"{'task':<8}" + "".join(f"{c.replace('_', ' '):>15}" for c in conditions)]
    lines += [f"{task:<8}" + "".join(f"{scores[c]:>15.3f}" if c in scores else f"{'':>15}" for c in conditions)
              for task, scores in summary["tasks"].items()]
    copying = summary.get("copying")
    if not copying:
        pretraining = ""
    elif "from" in copying:  # the shipped copier: pretrained once, not in this run
        pretraining = f"{copying['steps']} copying steps (shipped, {Path(copying['from']).name}) and "
    else:
        pretraining = f"{copying['steps']} copying steps ({copying['seconds']:.0f} s) and "
    lines.append(f"after {pretraining}{summary['steps']} steps, {summary['train_seconds']:.0f} s of training; "
                 f"model in {summary['model_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
