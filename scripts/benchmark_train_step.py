"""The main job's training step (the tiny Otter on `--data toy-mixture` batches), with the choices otter-train makes
on a CPU against the ones it made before: attention kernels (SDPA or eager), batches (mixed, or one task each), and
the loss (from the full logits, or `otter.training.training_loss`: the head at the supervised positions only), and
the optimizer (torch's AdamW with its default per-parameter loop, or `flamingo.recipes.adamw`: the fused kernel).

    python scripts/benchmark_train_step.py                 # 2 threads, 5 rounds of 30 steps per variant
    python scripts/benchmark_train_step.py --threads 1 --rounds 7

Each variant trains its own copy of the same model (same seed) on the same batches: forward, backward, gradient
clipping, AdamW, as `otter-train` steps. The variants take turns within every round, the order rotating, so a slow
spell of a shared machine hits them alike; the table shows per variant the median seconds per step over the rounds,
and the median (and min-max) of the per-round ratio baseline / variant. Batches are built before timing: this
measures the model and the optimizer, not the data loading.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flamingo import recipes  # noqa: E402
from flamingo.loading import load_model, load_processor  # noqa: E402
from otter.data.collate import OtterCollator, UsableSamples  # noqa: E402
from otter.data.main_job import bundled_data  # noqa: E402
from otter.data.mixture import TaskBatches  # noqa: E402
from otter.training import training_loss  # noqa: E402

VARIANTS = {  # name: (attention, batches, loss at the supervised positions only, fused AdamW); the first is the baseline
    "sdpa, mixed": ("sdpa", "mixed", False, False),
    "eager, mixed": ("eager", "mixed", False, False),
    "sdpa, per task": ("sdpa", "per task", False, False),
    "eager, per task": ("eager", "per task", False, False),
    "eager, per task, loss_only": ("eager", "per task", True, False),
    "... and fused AdamW": ("eager", "per task", True, True),
}


def main_job_batches(batches: str, count: int, batch_size: int, seed: int) -> list[dict]:
    processor = load_processor("tiny-otter")
    mixture = bundled_data("toy-mixture", seed)[0]
    sampler = TaskBatches(mixture, batch_size, seed) if batches == "per task" else None
    loader = DataLoader(UsableSamples(mixture, processor, max_length=256), batch_size=batch_size, drop_last=True,
                        shuffle=sampler is None, sampler=sampler, collate_fn=OtterCollator(processor),
                        generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(loader, count))


class Trainer:
    def __init__(self, attention: str, loss_only: bool, fused: bool, seed: int):
        self.loss_only = loss_only
        self.model = load_model("tiny-otter", seed=seed).train()
        self.model.set_attn_implementation(attention)
        recipes.apply(self.model, "all")
        self.optimizer = (recipes.adamw(self.model, 1e-3, 0.0) if fused
                          else torch.optim.AdamW(recipes.parameter_groups(self.model, 0.0), lr=1e-3))

    def seconds_per_step(self, batches: list[dict]) -> float:
        started = time.perf_counter()
        for batch in batches:
            loss = training_loss(self.model, batch) if self.loss_only else self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batches = {kind: main_job_batches(kind, args.steps, args.batch_size, args.seed) for kind in ("mixed", "per task")}
    trainers = {name: Trainer(attention, loss_only, fused, args.seed)
                for name, (attention, _, loss_only, fused) in VARIANTS.items()}
    for name, (_, kind, _, _) in VARIANTS.items():  # warm-up
        trainers[name].seconds_per_step(batches[kind][:2])
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            times[name].append(trainers[name].seconds_per_step(batches[VARIANTS[name][1]]))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()),
              file=sys.stderr)

    baseline = names[0]
    print(f"main job training step, batch {args.batch_size}, {args.threads} thread(s), {args.rounds} rounds of "
          f"{args.steps} steps (mixed batches: {tokens(batches['mixed'])}; per task: {tokens(batches['per task'])})")
    print(f"{'variant':<28} {'s/step':>8} {'speed-up':>9} {'(min-max)':>12}")
    for name, values in times.items():
        ratios = [b / v for b, v in zip(times[baseline], values)]
        print(f"{name:<28} {statistics.median(values):>8.3f} {statistics.median(ratios):>8.2f}x "
              f"{min(ratios):>5.2f}-{max(ratios):.2f}")


def tokens(batches: list[dict]) -> str:
    """Mean padded tokens and images per batch."""
    rows = statistics.mean(b["input_ids"].numel() for b in batches)
    images = statistics.mean(b["vision_x"].shape[0] * b["vision_x"].shape[1] for b in batches)
    return f"{rows:.0f} token slots, {images:.0f} images per batch"


if __name__ == "__main__":
    main()
