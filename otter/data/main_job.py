"""The bundled toy tasks, by name, for `otter-train --data NAME`: mixed for training, held out one by one for scoring.

    vqa    questions about drawn shapes (otter.data.toy): the answer is in the picture
    icl    shapes with made-up names (otter.data.toy_icl): the answer is in the in-context examples
    video  which way a shape moves, or whether it grows (otter.data.toy_video): the answer is in the frames

    --data toy           vqa
    --data toy-icl       icl
    --data toy-mixture   vqa and icl, each drawn as often as its size (the default: the main job)
    --data toy-video     video (with `tiny-otter-video`, which has frame embeddings)

`otter-train` writes each task's held-out split as a flamingo-eval task of episodes (`<output>/heldout/<task>/`) and
scores it with its examples, without them and with blank images (`otter.evaluate.task_scores`), and under
`EXTRA_CONDITIONS` (video: each clip's middle frame repeated, which takes the motion away).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..defaults import DEFAULT_DATA
from .mimicit import MimicItDataset
from .mixture import WeightedMixture
from .samples import InstructionSample
from .toy import toy_dataset_paths
from .toy_icl import toy_icl_dataset_paths
from .toy_video import single_frame, toy_video_dataset_paths

TASKS: dict[str, Callable[[], dict[str, dict[str, Any]]]] = {
    "vqa": toy_dataset_paths, "icl": toy_icl_dataset_paths, "video": toy_video_dataset_paths}
TASKS_OF = {"toy": ("vqa",), "toy-icl": ("icl",), "toy-mixture": ("vqa", "icl"), "toy-video": ("video",)}
EXTRA_CONDITIONS: dict[str, dict[str, Callable[[InstructionSample], InstructionSample]]] = {
    "video": {"single_frame": single_frame}}


def bundled_data(name: str = DEFAULT_DATA, seed: int = 0) -> tuple[MimicItDataset | WeightedMixture, dict[str, MimicItDataset]]:
    """The training mixture of the named set's tasks, and each task's held-out split by task name. Each task is
    drawn in proportion to its size, so that an epoch sees about every sample once: with equal shares, the VQA's
    16000 questions got half of the steps and seeds 2 and 3 of the main job stopped at 0.77 and 0.75 (README)."""
    if name not in TASKS_OF:
        raise ValueError(f"unknown bundled data {name!r}; expected one of {', '.join(TASKS_OF)}")
    paths = {task: TASKS[task]() for task in TASKS_OF[name]}
    train = [MimicItDataset(**files["train"], seed=seed) for files in paths.values()]
    # One task trains on its dataset as it is, in the order the main job has always had.
    mixture = train[0] if len(train) == 1 else WeightedMixture(train, [None] * len(train), seed=seed)
    return mixture, {task: MimicItDataset(**files["heldout"], seed=seed) for task, files in paths.items()}
