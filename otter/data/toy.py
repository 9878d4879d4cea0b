"""The bundled toy dataset: questions about drawn shapes, small enough for a tiny Otter to learn on a CPU.

Four question types, each answered by one word that is a single token of the tiny tokenizer:

    colour    "What colour is the shape?"   red green blue yellow purple orange white black
    shape     "What shape is it?"           circle square triangle cross
    count     "How many shapes are there?"  one two three
    position  "Where is the shape?"         left right top bottom

Within a split and question type the answers are balanced (their counts differ by at most one) and drawn
independently of everything but the image, so a model that ignores the image cannot beat chance (1/8, 1/4, 1/3,
1/4). Each query has two in-context examples of its question type from its own split (in `train_config.json`, and
as `rel_ins_ids`), with independent answers. No picture occurs twice, within a split or across splits. Everything follows from the seed: the
same arguments give byte-identical files.

The files are in MIMIC-IT form, per split: `instructions.json`, `images.json` (base64 PNG) and `train_config.json`.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .mimicit import mimicit_paths, write_mimicit
from .shapes import COLOURS, SHAPES, Shape, draw_shapes

logger = logging.getLogger(__name__)

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}
COUNTS = ("one", "two", "three")
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": tuple(POSITIONS)}
QUESTION_TYPES = {question: kind for kind, question in QUESTIONS.items()}  # for per-type evaluation
SPLITS = ("train", "heldout")
NUM_IN_CONTEXT = 2
# Enough pictures that the tiny Otter generalises instead of learning them: trained on 3000 for 14 epochs, it answered
# every training count question and 84% of the held-out ones; on 16000 for under 3 epochs, 0.955 of all held-out
# questions (seed 0).
NUM_TRAIN = 16000
# The committed copy (`python scripts/prepare_data.py toy`) of `make_toy_dataset` with its defaults.
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "toy"


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 3)


def _colour_scene(answer: str, rng: random.Random) -> list[Shape]:
    center = (_uniform(rng, 0.4, 0.6), _uniform(rng, 0.4, 0.6))
    return [Shape(rng.choice(SHAPES), answer, center, _uniform(rng, 0.18, 0.3))]


def _shape_scene(answer: str, rng: random.Random) -> list[Shape]:
    center = (_uniform(rng, 0.44, 0.56), _uniform(rng, 0.44, 0.56))
    return [Shape(answer, rng.choice(tuple(COLOURS)), center, _uniform(rng, 0.28, 0.38))]


def _count_scene(answer: str, rng: random.Random) -> list[Shape]:
    """`answer` small shapes in distinct cells of a 3x3 grid, so they never overlap."""
    cells = rng.sample([(col, row) for row in range(3) for col in range(3)], COUNTS.index(answer) + 1)
    return [
        Shape(
            rng.choice(SHAPES),
            rng.choice(tuple(COLOURS)),
            ((2 * col + 1) / 6 + _uniform(rng, -0.04, 0.04), (2 * row + 1) / 6 + _uniform(rng, -0.04, 0.04)),
            _uniform(rng, 0.09, 0.12),
        )
        for col, row in cells
    ]


def _position_scene(answer: str, rng: random.Random) -> list[Shape]:
    """A small shape near the middle of the `answer` edge, jittered along that edge more than across it."""
    x, y = POSITIONS[answer]
    across, along = _uniform(rng, -0.03, 0.03), _uniform(rng, -0.12, 0.12)
    center = (x + across, y + along) if answer in ("left", "right") else (x + along, y + across)
    return [Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), center, _uniform(rng, 0.1, 0.15))]


SCENES: dict[str, Callable[[str, random.Random], list[Shape]]] = {
    "colour": _colour_scene,
    "shape": _shape_scene,
    "count": _count_scene,
    "position": _position_scene,
}


def png_bytes(image: Image.Image) -> bytes:
    """A small, lossless PNG: the pictures have a handful of colours, so a palette image holds them exactly."""
    buffer = io.BytesIO()
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _draw_split(count: int, image_size: int, rng: random.Random, forbidden: set[bytes]) -> list[tuple[str, str, bytes]]:
    """`count` (question type, answer, PNG) items in shuffled order: types in turn, each type's answers in turn, and
    each picture redrawn until it is not in `forbidden`, to which it is then added."""
    kinds = [tuple(QUESTIONS)[i % len(QUESTIONS)] for i in range(count)]
    seen = {kind: 0 for kind in QUESTIONS}
    items = []
    for kind in kinds:
        answer = ANSWERS[kind][seen[kind] % len(ANSWERS[kind])]
        seen[kind] += 1
        png = png_bytes(draw_shapes(SCENES[kind](answer, rng), image_size))
        while png in forbidden:
            png = png_bytes(draw_shapes(SCENES[kind](answer, rng), image_size))
        forbidden.add(png)
        items.append((kind, answer, png))
    rng.shuffle(items)
    return items


def _in_context(ids: list[str], kinds: list[str], rng: random.Random) -> dict[str, list[str]]:
    """For each id, `NUM_IN_CONTEXT` other ids of the same question type."""
    by_kind: dict[str, list[str]] = {}
    for ins_id, kind in zip(ids, kinds, strict=True):
        by_kind.setdefault(kind, []).append(ins_id)
    # One spare draw stands in for the query itself if it is drawn.
    draws = {ins_id: rng.sample(by_kind[kind], NUM_IN_CONTEXT + 1) for ins_id, kind in zip(ids, kinds, strict=True)}
    return {ins_id: [other for other in drawn if other != ins_id][:NUM_IN_CONTEXT] for ins_id, drawn in draws.items()}


def _write_split(
    folder: Path, split: str, items: list[tuple[str, str, bytes]], meta: dict, rng: random.Random
) -> dict[str, Path]:
    prefix = f"TOY_{split.upper()}"
    ins_ids = [f"{prefix}_INS_{i:05d}" for i in range(len(items))]
    img_ids = [f"{prefix}_IMG_{i:05d}" for i in range(len(items))]
    in_context = _in_context(ins_ids, [kind for kind, _, _ in items], rng)
    rows = {
        ins_id: {
            "instruction": QUESTIONS[kind],
            "answer": answer,
            "image_ids": [img_id],
            "rel_ins_ids": in_context[ins_id],
        }
        for ins_id, img_id, (kind, answer, _) in zip(ins_ids, img_ids, items, strict=True)
    }
    images = {img_id: base64.b64encode(png).decode("ascii") for img_id, (_, _, png) in zip(img_ids, items, strict=True)}
    return write_mimicit(folder, rows, images, in_context, {**meta, "split": split})


def make_toy_dataset(
    out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = NUM_TRAIN, num_heldout: int = 200, image_size: int = 32
) -> dict[str, Path]:
    """Write the toy dataset's train and held-out splits under `out_dir/{train,heldout}/`.

    Returns:
        The files, keyed `"{split}_{instructions,images,train_config}"`.
    """
    smallest = (NUM_IN_CONTEXT + 1) * len(QUESTIONS)
    if min(num_train, num_heldout) < smallest:
        raise ValueError(
            f"each split needs at least {smallest} samples, for {NUM_IN_CONTEXT} in-context examples per query"
        )
    meta = {"name": "otter-toy-shapes", "version": "2", "seed": seed, "image_size": image_size, "questions": QUESTIONS}
    forbidden: set[bytes] = set()
    paths = {}
    # The held-out split first, so that it is the same whatever the training split's size.
    for split, count in reversed(list(zip(SPLITS, (num_train, num_heldout), strict=True))):
        rng = random.Random(f"otter-toy:{seed}:{split}")
        items = _draw_split(count, image_size, rng, forbidden)
        written = _write_split(Path(out_dir) / split, split, items, meta, rng)
        paths.update({f"{split}_{key.removesuffix('_path')}": path for key, path in written.items()})
    logger.info("Wrote the toy dataset (%d train, %d held-out samples) to %s", num_train, num_heldout, out_dir)
    return paths


def default_cache_dir() -> Path:
    """Where the toy dataset is built when the committed copy is not there (an installed package)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "otter" / "toy-v2"


def toy_dataset_paths(root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """The toy dataset's files per split, as `MimicItDataset` keyword arguments: `MimicItDataset(**paths["train"])`.

    `root` defaults to the copy shipped in the package (`otter/assets/toy`), or, when that is absent, to
    `default_cache_dir()`; a root without the files gets them built there (with the defaults) on first use.
    """
    root = Path(root) if root is not None else BUNDLED if BUNDLED.is_dir() else default_cache_dir()
    paths = {split: mimicit_paths(root / split) for split in SPLITS}
    if not all(path.is_file() for files in paths.values() for path in files.values()):
        logger.info("Building the toy dataset in %s", root)
        make_toy_dataset(root)
    return paths
