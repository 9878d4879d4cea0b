"""The main job (`otter-train` with its defaults) over several seeds and thread counts: does its accuracy hold?

    python scripts/benchmark_main_job.py --seeds 5                    # seeds 0-4, OMP_NUM_THREADS 1 and 2
    python scripts/benchmark_main_job.py --seeds 5 --threads 1 --jobs 2   # two 1-thread runs at a time

Each run is a separate `otter-train` process (so that OMP_NUM_THREADS takes effect) writing to
`--output-dir/threads<T>-seed<S>/`. Prints one row per run (the seconds of the copying pretraining and of training,
and per task the held-out accuracy with its in-context examples, without them and with blank images), then the
median and min per task and condition over all runs, and ends with `main_job_vqa_median=… main_job_icl_median=…`
(with examples, over all runs).
Extra arguments after `--` go to every `otter-train` (e.g. `-- --max-steps 200` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONDITIONS = ("with_examples", "no_examples", "blank_images")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS values")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (keep jobs x threads <= cores)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmark-main-job"))
    args, extra = parser.parse_known_args()
    return args, [a for a in extra if a != "--"]


def run_one(threads: int, seed: int, output_dir: Path, extra: list[str]) -> dict:
    """One `otter-train` run; returns its summary.json, plus the thread count and seed."""
    out = output_dir / f"threads{threads}-seed{seed}"
    command = [sys.executable, "-m", "otter.train", "--seed", str(seed), "--output-dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("XDG_CACHE_HOME", str(output_dir / "cache"))  # do not make the benchmark's model the user's default
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "console.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"otter-train failed for threads {threads} seed {seed} (exit {done.returncode}): see {out / 'console.log'}")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "threads": threads, "seed": seed, "wall_seconds": round(time.perf_counter() - started, 1)}


def copying_seconds(run: dict) -> float:
    """The copying pretraining's seconds in this run, part of its training budget: 0 when it had none or started
    from the shipped copier (pretrained once, by scripts/make_tiny_copier.py)."""
    copying = run.get("copying") or {}
    return 0.0 if "from" in copying else copying.get("seconds", 0.0)


SHORT = {"with_examples": "with", "no_examples": "none", "blank_images": "blank"}


def header(tasks: list[str]) -> str:
    names = " ".join(f"{task + ':' + SHORT[c]:>10}" for task in tasks for c in CONDITIONS)
    return f"{'threads':>7} {'seed':>4} {'copy s':>7} {'train s':>8} {names}"


def row(run: dict, tasks: list[str]) -> str:
    cells = [f"{run['threads']:>7}", f"{run['seed']:>4}", f"{copying_seconds(run):>7.0f}", f"{run['train_seconds']:>8.0f}"]
    cells += [f"{run['tasks'][task][c]:>10.3f}" for task in tasks for c in CONDITIONS]
    return " ".join(cells)


def main() -> None:
    args, extra = parse_args()
    plan = [(threads, seed) for threads in args.threads for seed in range(args.seeds)]
    print(f"{len(plan)} runs of otter-train {' '.join(extra)} ({args.jobs} at a time), into {args.output_dir}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda p: run_one(*p, args.output_dir, extra), plan))
    tasks = list(runs[0]["tasks"])
    print("columns: per task, held-out accuracy with its in-context examples / without them / with blank images")
    print(header(tasks))
    for run in runs:
        print(row(run, tasks))
    print()
    print(f"{'task':<6} {'condition':<14} {'median':>7} {'min':>7} {'max':>7}")
    for task in tasks:
        for condition in CONDITIONS:
            values = [run["tasks"][task][condition] for run in runs]
            print(f"{task:<6} {condition:<14} {statistics.median(values):>7.3f} {min(values):>7.3f} {max(values):>7.3f}")
    seconds = [copying_seconds(run) + run["train_seconds"] for run in runs]
    print(f"training seconds (copying included): median {statistics.median(seconds):.0f}, max {max(seconds):.0f}")
    (args.output_dir / "runs.json").write_text(json.dumps(runs, indent=1))
    medians = {task: statistics.median(run["tasks"][task]["with_examples"] for run in runs) for task in tasks}
    print(" ".join(f"main_job_{task}_median={value:.3f}" for task, value in medians.items()))


if __name__ == "__main__":
    main()
