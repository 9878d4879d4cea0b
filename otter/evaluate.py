"""Scoring Otter on held-out instruction samples with flamingo-eval, the project's one scorer.

The samples become a task of episodes on disk (`write_episodes`): each sample's earlier chunks are the
demonstrations of its last one, whose answer is scored by exact match. `flamingo.eval.evaluate` runs it greedily with
each episode's own demonstrations, so that the same numbers come from the command line:

    flamingo-eval --model out/model --task out/heldout/icl/task.json --demos episode --shots 2 --trials 1 \\
        --num-beams 1 --zero-shot-text-demos 0

A condition that changes the samples (every image blank, a clip's motion taken away) is a task of its own, written
beside them (`heldout/icl/blank_images/task.json`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flamingo.eval.runner import OneProcess, TrialResult, evaluate
from flamingo.eval.tasks import Task, load_task
from otter.data.samples import InstructionSample, Media, blank_like
from otter.modeling_otter import OtterModel
from otter.processing_otter import OtterProcessor

SampleChange = Callable[[InstructionSample], InstructionSample]
CONDITIONS = ("with_examples", "no_examples", "blank_images")


def blank_images(sample: InstructionSample) -> InstructionSample:
    """The sample with every image (and frame) grey: what a model can answer without seeing."""
    return InstructionSample(sample.sample_id, sample.chunks, [_as_source(blank_like(m)) for m in sample.load_images()])


def _as_source(media: Media):
    return tuple(media) if isinstance(media, list) else media


# ---- samples to a task --------------------------------------------------------------------------------------
def write_episodes(samples: Sequence[InstructionSample], folder: str | Path, name: str) -> Task:
    """Write `samples` under `folder` as a flamingo-eval task of episodes and return it read back: `task.json`,
    `episodes.json` and `media/` (PNG images; a clip as a folder of its frames)."""
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    episodes = []
    for number, sample in enumerate(samples):
        entries = []
        for position, ((question, answer), media) in enumerate(zip(sample.chunks, sample.load_images(), strict=True)):
            path = Path("media") / f"{number:05d}-{position}"
            entries.append({"image": _save_media(media, folder / path).relative_to(folder).as_posix(),
                            "question": question, "answer": answer})
        episodes.append({"id": f"{number}:{sample.sample_id}", "demos": entries[:-1], "query": entries[-1]})
    (folder / "episodes.json").write_text(json.dumps({"episodes": episodes}) + "\n", encoding="utf-8")
    task_file = folder / "task.json"
    task_file.write_text(json.dumps({"name": name, "format": "episodes", "episodes": "episodes.json"}, indent=1) + "\n",
                         encoding="utf-8")
    return load_task(task_file)


def _save_media(media: Media, stem: Path) -> Path:
    if not isinstance(media, list):
        media.save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")
    stem.mkdir(exist_ok=True)
    for index, frame in enumerate(media):
        frame.save(stem / f"{index:03d}.png")
    return stem


def heldout_tasks(samples: Sequence[InstructionSample], folder: str | Path, name: str,
                  changes: Mapping[str, SampleChange] | None = None) -> dict[str, Task]:
    """The samples as they are (`with_examples`, also scored without them) and changed by `blank_images` and each
    of `changes`, each a task of episodes (the changed ones in subfolders of `folder` named after the condition)."""
    folder = Path(folder)
    tasks = {"with_examples": write_episodes(samples, folder, name)}
    for condition, change in {"blank_images": blank_images, **(changes or {})}.items():
        tasks[condition] = write_episodes([change(s) for s in samples], folder / condition, f"{name}-{condition}")
    return tasks


# ---- scoring ------------------------------------------------------------------------------------------------
def run_episodes(model: OtterModel, processor: OtterProcessor, task: Task, shots: int | None = None,
                 limit: int | None = None) -> TrialResult:
    """Greedy answers to the first `limit` queries (all by default) after the last `shots` of their episodes'
    demonstrations (all by default; 0: the query alone), on this process alone: the score (exact match, in %) and
    one prediction per query, in order."""
    shots = len(task.episode_demos[0]) if shots is None else shots
    results = evaluate(model, processor, task, shots=[shots], trials=1, demos="episode", batch_size=32, num_beams=1,
                       zero_shot_text_demos=0, limit=limit, state=OneProcess(), progress=False)
    return results.trials[0]


def episode_accuracy(model: OtterModel, processor: OtterProcessor, task: Task, shots: int | None = None,
                     limit: int | None = None) -> float:
    """The fraction of the first `limit` queries answered right, in [0, 1]."""
    return run_episodes(model, processor, task, shots, limit).score / 100


def task_scores(model: OtterModel, processor: OtterProcessor, tasks: Mapping[str, Task]) -> dict[str, float]:
    """Accuracy with the episodes' examples, without them, and under each changed condition of `heldout_tasks`."""
    plain = tasks["with_examples"]
    scores = {"with_examples": episode_accuracy(model, processor, plain),
              "no_examples": episode_accuracy(model, processor, plain, shots=0)}
    scores.update({condition: episode_accuracy(model, processor, task)
                   for condition, task in tasks.items() if condition != "with_examples"})
    return scores


def sample_scores(model: OtterModel, processor: OtterProcessor, samples: Sequence[InstructionSample],
                  changes: Mapping[str, SampleChange] | None = None) -> dict[str, float]:
    """`task_scores` of samples in memory, through a temporary folder (for scripts and notebooks)."""
    with tempfile.TemporaryDirectory(prefix="otter-episodes-") as folder:
        return task_scores(model, processor, heldout_tasks(samples, folder, "samples", changes))
