"""The bundled toy video task: clips of a moving or growing shape, whose answer needs the motion, not one frame.

Two question types over clips of `NUM_FRAMES` frames (32x32, one shape on grey):

    motion  "Which way does the shape move?"   left right up down   (steady steps, same size)
    size    "Does it get bigger or smaller?"   bigger smaller       (steady growth or shrinking, same place)

The middle frame of every clip is drawn independently of the answer (its position, size, shape and colour are
chosen first, the motion is then laid around it), so a model given that one frame repeated `NUM_FRAMES` times
cannot beat chance (1/4, 1/2), while the clip answers every question. Answers are balanced per split and question
type; the splits share no clip. Everything follows from the seed: the same arguments give byte-identical files.

The files are in MIMIC-IT video form, per split: an instruction's `image_ids` are the frames of its clip, in order
(`instructions.json`, `images.json` with base64 PNG frames, `train_config.json` with two in-context examples of the
same question type per query, as in the toy dataset, each bringing its own clip).

    paths = toy_video_dataset_paths()
    train = MimicItDataset(**paths["train"])
    scores = score_toy_video(model, processor, MimicItDataset(**paths["heldout"]))
"""

from __future__ import annotations

import base64
import logging
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from .mimicit import mimicit_paths, write_mimicit
from .samples import InstructionSample
from .shapes import COLOURS, SHAPES, Shape, draw_shapes
from .toy import NUM_IN_CONTEXT, _in_context, default_cache_dir, png_bytes

logger = logging.getLogger(__name__)

QUESTIONS = {"motion": "Which way does the shape move?", "size": "Does it get bigger or smaller?"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES = {"bigger": 1, "smaller": -1}
ANSWERS = {"motion": tuple(DIRECTIONS), "size": tuple(SIZES)}
QUESTION_TYPES = {question: kind for kind, question in QUESTIONS.items()}
SPLITS = ("train", "heldout")
NUM_FRAMES = 5  # odd, so that one frame, the middle one, is the clip's centre in time
STEP = 0.12  # of the image side, per frame: 0.48 from the first frame to the last (two 8-pixel patches)
GROWTH = 0.04  # of the image side, added to (or taken from) the shape's half-extent per frame
VERSION = "1"


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 3)


def motion_clip(answer: str, rng: random.Random, num_frames: int = NUM_FRAMES) -> list[list[Shape]]:
    """The scenes of a clip whose shape moves steadily towards `answer` (left, right, up, down)."""
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    middle = (_uniform(rng, 0.42, 0.58), _uniform(rng, 0.42, 0.58))
    scale, (dx, dy) = _uniform(rng, 0.09, 0.12), DIRECTIONS[answer]
    offsets = [(t - num_frames // 2) * STEP for t in range(num_frames)]
    return [[Shape(shape, colour, (middle[0] + dx * o, middle[1] + dy * o), scale)] for o in offsets]


def size_clip(answer: str, rng: random.Random, num_frames: int = NUM_FRAMES) -> list[list[Shape]]:
    """The scenes of a clip whose shape grows (`bigger`) or shrinks (`smaller`) steadily, in place."""
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    center = (_uniform(rng, 0.45, 0.55), _uniform(rng, 0.45, 0.55))
    middle_scale, sign = _uniform(rng, 0.2, 0.26), SIZES[answer]
    return [[Shape(shape, colour, center, round(middle_scale + sign * (t - num_frames // 2) * GROWTH, 3))]
            for t in range(num_frames)]


CLIPS = {"motion": motion_clip, "size": size_clip}


def draw_clip(kind: str, answer: str, rng: random.Random, image_size: int = 32) -> list[Image.Image]:
    """The frames of one clip of question type `kind` whose answer is `answer`."""
    return [draw_shapes(scene, image_size) for scene in CLIPS[kind](answer, rng)]


def _draw_split(count: int, image_size: int, rng: random.Random, forbidden: set[bytes]) -> list[tuple[str, str, list[bytes]]]:
    """`count` (question type, answer, PNG frames) items, shuffled: types in turn, each type's answers in turn;
    a clip whose middle frame was already drawn (in any split) is drawn again."""
    items, seen = [], Counter()
    for i in range(count):
        kind = tuple(QUESTIONS)[i % len(QUESTIONS)]
        answer = ANSWERS[kind][seen[kind] % len(ANSWERS[kind])]
        seen[kind] += 1
        while True:
            pngs = [png_bytes(frame) for frame in draw_clip(kind, answer, rng, image_size)]
            if pngs[NUM_FRAMES // 2] not in forbidden:
                break
        forbidden.add(pngs[NUM_FRAMES // 2])
        items.append((kind, answer, pngs))
    rng.shuffle(items)
    return items


def _write_split(folder: Path, split: str, items: list[tuple[str, str, list[bytes]]], meta: dict,
                 rng: random.Random) -> dict[str, Path]:
    prefix = f"TOYV_{split.upper()}"
    ins_ids = [f"{prefix}_INS_{i:05d}" for i in range(len(items))]
    frame_ids = [[f"{prefix}_VID_{i:05d}_F{t}" for t in range(NUM_FRAMES)] for i in range(len(items))]
    in_context = _in_context(ins_ids, [kind for kind, _, _ in items], rng)
    rows = {
        ins_id: {"instruction": QUESTIONS[kind], "answer": answer, "image_ids": ids, "rel_ins_ids": in_context[ins_id]}
        for ins_id, ids, (kind, answer, _) in zip(ins_ids, frame_ids, items, strict=True)
    }
    images = {
        frame_id: base64.b64encode(png).decode("ascii")
        for ids, (_, _, pngs) in zip(frame_ids, items, strict=True)
        for frame_id, png in zip(ids, pngs, strict=True)
    }
    return write_mimicit(folder, rows, images, in_context, {**meta, "split": split})


def make_toy_video_dataset(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 2000,
                           num_heldout: int = 200, image_size: int = 32) -> dict[str, Path]:
    """Write the toy video task's train and held-out splits under `out_dir/{train,heldout}/`.

    Returns:
        The files, keyed `"{split}_{instructions,images,train_config}"`.
    """
    smallest = (NUM_IN_CONTEXT + 1) * sum(len(answers) for answers in ANSWERS.values())
    if min(num_train, num_heldout) < smallest:
        raise ValueError(f"each split needs at least {smallest} clips (every answer, with an in-context example)")
    meta = {"name": "otter-toy-video", "version": VERSION, "seed": seed, "image_size": image_size,
            "num_frames": NUM_FRAMES, "questions": QUESTIONS}
    forbidden: set[bytes] = set()
    paths = {}
    for split, count in zip(SPLITS, (num_train, num_heldout), strict=True):
        rng = random.Random(f"otter-toy-video:{seed}:{split}")
        written = _write_split(Path(out_dir) / split, split, _draw_split(count, image_size, rng, forbidden), meta, rng)
        paths.update({f"{split}_{key.removesuffix('_path')}": path for key, path in written.items()})
    logger.info("Wrote the toy video task (%d train, %d held-out clips) to %s", num_train, num_heldout, out_dir)
    return paths


def toy_video_dataset_paths(root: str | os.PathLike | None = None, *, num_in_context: int = 0) -> dict[str, dict[str, Any]]:
    """The toy video task per split, as `MimicItDataset` keyword arguments: `MimicItDataset(**paths["train"])`.

    `root` defaults to `<cache>/otter/toy-video-v1` (next to the toy dataset's cache); a root without the files gets
    them built there (with the defaults, a few seconds) on first use. `num_in_context` in-context examples per
    query (0 to 2), each with its own clip."""
    root = Path(root) if root is not None else default_cache_dir().with_name(f"toy-video-v{VERSION}")
    paths = {split: mimicit_paths(root / split) for split in SPLITS}
    if not all(path.is_file() for files in paths.values() for path in files.values()):
        logger.info("Building the toy video task in %s", root)
        make_toy_video_dataset(root)
    return {split: {**files, "clips": True, "num_in_context": num_in_context} for split, files in paths.items()}


# ---- scoring ---------------------------------------------------------------------------------------------------
def single_frame(sample: InstructionSample) -> InstructionSample:
    """The sample with each clip replaced by its middle frame repeated as often: the same input shape and frame
    embeddings, no motion."""
    def still(media):
        return (media[len(media) // 2],) * len(media) if isinstance(media, tuple) else media

    return InstructionSample(sample.sample_id, sample.chunks, [still(media) for media in sample.images])


def score_toy_video(model, processor, heldout: Any, count: int | None = None) -> dict[str, float]:
    """Held-out accuracy on real clips and on single frames repeated, overall and per question type, with chance.

    Returns `video_motion_accuracy` (real clips: the answer needs the motion), `video_single_frame_accuracy` (each
    clip's middle frame repeated `NUM_FRAMES` times: chance by construction), `video_chance` (the expected accuracy
    of a model that cannot see the motion: 1/4 per motion question, 1/2 per size question) and
    `<type>_question_accuracy` / `<type>_question_single_frame_accuracy` per question type (motion, size).
    Answers come from flamingo-eval (`otter.evaluate.run_episodes`), each clip's own examples before it."""
    from flamingo.eval.metrics import normalize_vqa_answer
    from otter.evaluate import run_episodes, write_episodes

    samples = [heldout[i] for i in range(min(count or len(heldout), len(heldout)))]
    kinds = [QUESTION_TYPES[sample.question] for sample in samples]
    scores: dict[str, float] = {"video_chance": sum(1 / len(ANSWERS[kind]) for kind in kinds) / len(samples)}
    with tempfile.TemporaryDirectory(prefix="toy-video-") as folder:
        for name, inputs in (("", samples), ("_single_frame", [single_frame(s) for s in samples])):
            trial = run_episodes(model, processor, write_episodes(inputs, Path(folder) / (name or "clips"), "toy-video"))
            right = [normalize_vqa_answer(record["prediction"]) == normalize_vqa_answer(sample.answer)
                     for record, sample in zip(trial.predictions, samples, strict=True)]
            scores[f"video{name or '_motion'}_accuracy"] = sum(right) / len(right)
            for kind in QUESTIONS:
                mine = [r for r, k in zip(right, kinds, strict=True) if k == kind]
                if mine:
                    scores[f"{kind}_question{name}_accuracy"] = sum(mine) / len(mine)
    return scores


__all__ = ["QUESTIONS", "draw_clip", "make_toy_video_dataset", "score_toy_video", "single_frame",
           "toy_video_dataset_paths"]
