"""`flamingo-eval`: few-shot evaluation of a FlamingoModel or OtterModel, OpenFlamingo's protocol.

examples:
  # COCO captioning (Karpathy split: dataset_coco.json, train2014/, val2014/ under --data-dir), CIDEr
  flamingo-eval --model openflamingo/OpenFlamingo-9B-vitl-mpt7b --tokenizer anas-awadalla/mpt-7b \\
      --task coco --data-dir data/coco --shots 0 4 8 16 32 --trials 3 --output-dir results/coco
  # Flickr30K (dataset_flickr30k.json, flickr30k-images/), CIDEr, RICES demonstrations from an open_clip model
  flamingo-eval --model MODEL --task flickr30k --data-dir data/flickr30k --demos rices --rices-encoder ViT-L-14:openai
  # VQAv2 (v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json,
  # train2014/, val2014/), VQA accuracy
  flamingo-eval --model MODEL --task vqav2 --data-dir data/vqav2 --shots 0 4 8 --limit 1000
  # OK-VQA (OpenEnded_mscoco_{train,val}2014_questions.json, mscoco_{train,val}2014_annotations.json, COCO images)
  flamingo-eval --model MODEL --task okvqa --data-dir data/okvqa
  # TextVQA and VizWiz in VQAv2 format ({train,val}_{questions,annotations}_vqa_format.json + their images)
  flamingo-eval --model MODEL --task textvqa --data-dir data/textvqa
  flamingo-eval --model MODEL --task vizwiz --data-dir data/vizwiz
  # ImageNet-style folders (train/<class>/..., val/<class>/..., classnames.txt), top-1 by log-likelihood ranking
  flamingo-eval --model MODEL --task imagenet --data-dir data/imagenet --shots 0 4 --batch-size 64
  # Hateful Memes (train.jsonl, dev.jsonl, img/), ROC AUC
  flamingo-eval --model MODEL --task hateful_memes --data-dir data/hateful_memes --shots 0 4
  # a task file (format, files, prompt template): e.g. the toy data of `otter-prepare-data toy-eval data/toy-eval`
  flamingo-eval --model outputs/otter-tiny/model --task data/toy-eval/toy_vqa.json data/toy-eval/toy_captions.json \\
      --shots 0 2 4
  # few-shot episodes, each query with its own demonstrations: e.g. the held-out split `otter-train` writes
  flamingo-eval --model outputs/otter-tiny/model --task outputs/otter-tiny/heldout/icl/task.json --demos episode \
      --shots 2 --trials 1 --num-beams 1
  # sharded over processes (GPUs; on a CPU: torchrun --nproc_per_node 2 -m flamingo.eval ...)
  accelerate launch -m flamingo.eval --model MODEL --task coco --data-dir data/coco

Writes to --output-dir: results.json ({"task", "model", "metric", "shots": {"4": {"mean", "std", "trials"}},
"config"}), one predictions-<shots>shot-trial<k>.jsonl per trial, results.md; with several tasks, one folder per
task. Prints the table (rows: tasks, columns: shots, cells: mean ± std over the trials).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flamingo.arguments import int_at_least
from flamingo.cli import add_debug_flag, run_command

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flamingo-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a model folder (save_pretrained) or hub id")
    parser.add_argument("--tokenizer", help="the base LM's tokenizer, for checkpoints that ship none")
    parser.add_argument(
        "--task",
        nargs="+",
        required=True,
        help="built-in task names (coco flickr30k vqav2 okvqa textvqa vizwiz imagenet hateful_memes) "
        "or task files (JSON)",
    )
    parser.add_argument("--data-dir", type=Path, help="the built-in tasks' data folder (task files: overrides theirs)")
    parser.add_argument("--shots", type=int_at_least(0), nargs="+", default=[0, 4, 8])
    parser.add_argument("--trials", type=int_at_least(1), default=3, help="trials per shot count; trial k seeds with --seed + k")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--demos",
        choices=("random", "rices", "episode"),
        default="random",
        help="random from the pool; RICES (most similar images); episode: each query's own (format 'episodes')",
    )
    parser.add_argument(
        "--rices-encoder", help="open_clip NAME[:PRETRAINED] for RICES (default: the model's vision tower)"
    )
    parser.add_argument(
        "--zero-shot-text-demos",
        type=int_at_least(0),
        default=2,
        help="demonstrations without their images at 0 shots, as Flamingo's protocol (0: the query alone)",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--num-beams", type=int_at_least(1), default=3)
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's (20 captioning, 5 VQA, 10 TextVQA)")
    parser.add_argument("--limit", type=int_at_least(1), help="evaluate only the first N test items")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device-map", help='e.g. "auto" or "cuda:0" (default: CPU, or each process\'s GPU)')
    parser.add_argument("--output-dir", type=Path, default=Path("eval-results"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def distributed_state():
    """The process group of `accelerate launch`/torchrun; gloo on a CPU (accelerate needs `cpu=True` there, or each
    process silently runs alone)."""
    import torch
    from accelerate import PartialState

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=world_size > 1 and not torch.cuda.is_available())
    if state.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate formed a group of {state.num_processes}")
    return state


def _main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from flamingo.loading import load_model_and_processor

    from .runner import evaluate, markdown_table
    from .tasks import load_task

    state = distributed_state()
    tasks = [load_task(task, args.data_dir) for task in args.task]  # bad files fail before the model loads
    device_map = args.device_map or ({"": str(state.device)} if state.device.type != "cpu" else None)
    loaded = load_model_and_processor(args.model, tokenizer=args.tokenizer, device_map=device_map, dtype=args.dtype)
    if not loaded.trained:
        logger.warning("%s is untrained (random weights): its scores mean nothing", args.model)
    model, processor = loaded.model, loaded.processor
    all_results = []
    for task in tasks:
        results = evaluate(
            model,
            processor,
            task,
            shots=args.shots,
            trials=args.trials,
            seed=args.seed,
            demos=args.demos,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            zero_shot_text_demos=args.zero_shot_text_demos,
            rices_encoder=args.rices_encoder,
            limit=args.limit,
            state=state,
            progress=not args.no_progress,
            model_name=args.model,
        )
        if state.is_main_process:
            folder = args.output_dir if len(tasks) == 1 else args.output_dir / task.name
            write_results(results, folder)
        all_results.append(results)
    if state.is_main_process:
        table = markdown_table(all_results)
        (args.output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
        print(table)
    return 0


def write_results(results, folder: Path) -> None:
    """results.json, one predictions jsonl per trial, results.md."""
    from .runner import markdown_table

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    for trial in results.trials:
        path = folder / f"predictions-{trial.shots}shot-trial{trial.trial}.jsonl"
        with open(path, "w", encoding="utf-8") as file:
            for record in trial.predictions:
                file.write(json.dumps({k: v for k, v in record.items() if k != "index"}, default=str) + "\n")
    (folder / "results.md").write_text(markdown_table([results]) + "\n", encoding="utf-8")
    logger.info("Wrote %s", folder / "results.json")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
