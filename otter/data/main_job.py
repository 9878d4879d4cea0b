"""The main job's data: the bundled toy tasks, mixed for training and held out one by one for scoring.

    vqa   questions about drawn shapes (otter.data.toy): the answer is in the picture
    icl   shapes with made-up names (otter.data.toy_icl): the answer is in the in-context examples

`otter-train` without `--data` trains on `main_job_data()` and scores each task's held-out split with its examples,
without them and with blank images (`otter.evaluate.task_scores`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .mimicit import MimicItDataset
from .mixture import WeightedMixture
from .toy import toy_dataset_paths
from .toy_icl import toy_icl_dataset_paths

TASKS: dict[str, Callable[[], dict[str, dict[str, Path]]]] = {"vqa": toy_dataset_paths, "icl": toy_icl_dataset_paths}
# Sampling weights of the training mixture, per task.
WEIGHTS = {"vqa": 1.0, "icl": 1.0}


def main_job_data(seed: int = 0) -> tuple[WeightedMixture, dict[str, MimicItDataset]]:
    """The training mixture of every task's train split, and each task's held-out split by task name."""
    paths = {task: find_paths() for task, find_paths in TASKS.items()}
    train = [MimicItDataset(**files["train"], seed=seed) for files in paths.values()]
    mixture = WeightedMixture(train, [WEIGHTS[task] for task in paths], length=sum(map(len, train)), seed=seed)
    return mixture, {task: MimicItDataset(**files["heldout"], seed=seed) for task, files in paths.items()}
