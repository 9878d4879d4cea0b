#!/usr/bin/env python
"""Train the tiny video Otter on the toy video task with the library's training code, then score it on the held-out
clips twice: with the real clips, and with each clip's middle frame repeated (no motion, chance by construction).

    python scripts/benchmark_video.py                      # defaults: the run quoted in docs/video.md
    python scripts/benchmark_video.py --max-steps 40       # a quick look

Prints the per-question scores and ends with one line:

    video_motion_accuracy=0.xxx video_single_frame_accuracy=0.xxx
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/benchmark-video"))
    parser.add_argument("--data-dir", type=Path, help="where the toy video task is (built if absent; default: the cache)")
    parser.add_argument("--model", default="tiny-otter-video")
    parser.add_argument("--max-steps", type=int, default=800, help="optimizer steps (default: 6.4 epochs of 2000 clips)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train_and_score(args: argparse.Namespace) -> dict:
    from flamingo.loading import load_model, load_processor
    from otter.data.mimicit import MimicItDataset
    from otter.data.toy_video import score_toy_video, toy_video_dataset_paths
    from otter.train import parse_args as train_args
    from otter.training import train

    paths = toy_video_dataset_paths(args.data_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    mixture = args.output_dir / "toy-video.json"
    train_files = {key: str(value) for key, value in paths["train"].items() if key.endswith("_path")}
    mixture.write_text(json.dumps({"seed": args.seed, "datasets": [
        {"type": "mimicit", **train_files, "clips": True, "num_in_context": 0}]}, indent=1))
    started = time.perf_counter()
    summary = train(train_args([
        "--model", args.model, "--data", str(mixture), "--output-dir", str(args.output_dir),
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--eval-samples", "0", "--save-every", "0", "--seed", str(args.seed)]))
    seconds = time.perf_counter() - started
    model_dir = Path(summary["model_dir"])
    model, processor = load_model(model_dir), load_processor(model_dir)
    scores = score_toy_video(model, processor, MimicItDataset(**paths["heldout"]), args.eval_samples)
    return {**scores, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "total_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = train_and_score(args)
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    (args.output_dir / "benchmark_video.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"video_motion_accuracy={result['video_motion_accuracy']:.3f} "
          f"video_single_frame_accuracy={result['video_single_frame_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
