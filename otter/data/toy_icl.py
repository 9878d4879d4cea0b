"""The bundled in-context task: shapes with made-up names that only the in-context examples give.

Each episode shows two shapes of different colours, each with a name made up for that episode, then asks for the
name of a third picture, which has the colour of one of them:

    <image>User: What is it called? GPT:<answer> blue bukil<|endofchunk|>   (a blue circle)
    <image>User: What is it called? GPT:<answer> red tefab<|endofchunk|>    (a red cross)
    <image>User: What is it called? GPT:<answer>                            (a blue square: "blue bukil")

An answer says the picture's colour, then its name. The colour comes from the picture (through the cross-attention);
the name only from the example of that colour, by copying it from the context. The query's shape is never its
example's, so only the colour links the two. (Without the colour word, the tiny Otter would have to match the query's
picture against the examples' pictures inside the language model; it does not learn that in the main job's steps:
README, "In-context learning".) Training episodes ask twice, once per example (the first answer is then one more
in-context example for the second); held-out episodes ask once, naming the first example in half of the episodes and
the second in the other half. Names are five letters, consonant-vowel-consonant-vowel-consonant (five tokens of the
tiny tokenizer, `▁b` `u` `k` `i` `l`); every episode draws its two names afresh, and the held-out split uses only
names that no training episode contains, so a model cannot answer from memory: with the examples it can answer (the
ability this task measures), without them it cannot (0), and with blank images it can at best guess one of the two
(1/2). Everything follows from the seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import base64
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .mimicit import mimicit_paths, write_mimicit
from .shapes import COLOURS, SHAPES, Shape, draw_shapes
from .toy import SPLITS, default_cache_dir, png_bytes

logger = logging.getLogger(__name__)

QUESTION = "What is it called?"
CONSONANTS = "bdfgnpstw"  # the first letter: these have a "▁b"-style token of their own in the tiny tokenizer
VOWELS = "aeiou"
MIDDLES = "dfk"  # consonants that never merge with a neighbouring vowel in the tiny tokenizer
ENDINGS = "bcdfkl"
# Pairs the tiny tokenizer keeps whole ("fo", "no") or splits differently ("▁", "ge").
_MERGED = {"fo", "ge", "no"}
NAMES = tuple(c + v + m + w + e for c in CONSONANTS for v in VOWELS if c + v not in _MERGED
              for m in MIDDLES for w in VOWELS for e in ENDINGS)
# One combination in eleven (a stride prime to the table's sides), so that each letter of a held-out name also occurs,
# in the same place, in training names; only the combinations are new. With 3436 training names, most drawn once or
# twice in all the episodes, a model cannot learn the names one by one (with a few hundred, the tiny Otter does, and
# then fails on new ones): it has to copy them letter by letter.
HELDOUT_NAMES = tuple(n for i, n in enumerate(NAMES) if i % 11 == 0)
TRAIN_NAMES = tuple(n for n in NAMES if n not in HELDOUT_NAMES)
NUM_IN_CONTEXT = 2
# Training episodes ask twice (each example's colour once), so the first query's answer is one more copying target in
# the context of the second; held-out episodes ask once, after the two examples.
QUERIES = {"train": 2, "heldout": 1}
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "toy-icl"


def _picture(shape: str, colour: str, rng: random.Random, image_size: int) -> Image.Image:
    center = (round(rng.uniform(0.4, 0.6), 3), round(rng.uniform(0.4, 0.6), 3))
    return draw_shapes([Shape(shape, colour, center, round(rng.uniform(0.22, 0.36), 3))], image_size)


def _names(pool: tuple[str, ...], rng: random.Random) -> tuple[str, str]:
    """Two names that differ in every letter, so each letter of the answer tells which example is meant."""
    while True:
        first, second = rng.sample(pool, 2)
        if all(x != y for x, y in zip(first, second, strict=True)):
            return first, second


@dataclass(frozen=True)
class Picture:
    """One chunk of an episode: what its picture shows, the name it answers, and the PNG."""

    shape: str
    colour: str
    name: str
    png: bytes


def _episode(index: int, pool: tuple[str, ...], queries: int, image_size: int, rng: random.Random,
             forbidden: set[bytes]) -> list[Picture]:
    """The examples' pictures, then the queries': each the colour of an example, in a shape that is not its."""
    colours = rng.sample(tuple(COLOURS), NUM_IN_CONTEXT)
    shapes = [rng.choice(SHAPES) for _ in range(NUM_IN_CONTEXT)]
    names = _names(pool, rng)
    # Balanced: the (last) query names the first example as often as the second.
    targets = [(index + queries - 1 - q) % NUM_IN_CONTEXT for q in range(queries)]

    def picture(shape: str, colour: str, name: str) -> Picture:
        png = png_bytes(_picture(shape, colour, rng, image_size))
        while png in forbidden:
            png = png_bytes(_picture(shape, colour, rng, image_size))
        forbidden.add(png)
        return Picture(shape, colour, name, png)

    examples = [picture(*chosen) for chosen in zip(shapes, colours, names, strict=True)]
    return examples + [
        picture(rng.choice([s for s in SHAPES if s != shapes[t]]), colours[t], names[t]) for t in targets
    ]


def answer(picture: Picture) -> str:
    return f"{picture.colour} {picture.name}"


def _write_split(folder: Path, split: str, episodes: list[list[Picture]], meta: dict) -> dict[str, Path]:
    """One instruction per picture (with what it shows, for checking); the train config lists each episode's last
    query with the chunks before it."""
    prefix = f"ICL_{split.upper()}"
    rows, images, train_config = {}, {}, {}
    for e, pictures in enumerate(episodes):
        ids = [f"{prefix}_EP{e:05d}_{'EX' if i < NUM_IN_CONTEXT else 'Q'}{i}" for i in range(len(pictures))]
        for picture, ins_id in zip(pictures, ids, strict=True):
            img_id = ins_id.replace("_EP", "_IMG_EP")
            images[img_id] = base64.b64encode(picture.png).decode("ascii")
            rows[ins_id] = {"instruction": QUESTION, "answer": answer(picture), "image_ids": [img_id],
                            "rel_ins_ids": [], "shape": picture.shape, "colour": picture.colour, "name": picture.name}
        rows[ids[-1]]["rel_ins_ids"] = train_config[ids[-1]] = ids[:-1]
    return write_mimicit(folder, rows, images, train_config, {**meta, "split": split})


def make_toy_icl_dataset(
    out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 3000, num_heldout: int = 200, image_size: int = 32
) -> dict[str, Path]:
    """Write the binding task's train and held-out episodes under `out_dir/{train,heldout}/` (MIMIC-IT files: the
    queries are the train config's keys, each with its two examples).

    Returns:
        The files, keyed `"{split}_{instructions,images,train_config}"`.
    """
    if min(num_train, num_heldout) < NUM_IN_CONTEXT:
        raise ValueError(f"each split needs at least {NUM_IN_CONTEXT} episodes, one per query position")
    meta = {"name": "otter-toy-icl", "version": "2", "seed": seed, "image_size": image_size, "question": QUESTION,
            "train_names": list(TRAIN_NAMES), "heldout_names": list(HELDOUT_NAMES)}
    forbidden: set[bytes] = set()
    paths = {}
    for split, count, pool in zip(SPLITS, (num_train, num_heldout), (TRAIN_NAMES, HELDOUT_NAMES), strict=True):
        rng = random.Random(f"otter-toy-icl:{seed}:{split}")
        episodes = [_episode(i, pool, QUERIES[split], image_size, rng, forbidden) for i in range(count)]
        written = _write_split(Path(out_dir) / split, split, episodes, meta)
        paths.update({f"{split}_{key.removesuffix('_path')}": path for key, path in written.items()})
    logger.info("Wrote the in-context toy task (%d train, %d held-out episodes) to %s", num_train, num_heldout, out_dir)
    return paths


def toy_icl_dataset_paths(root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """The binding task's files per split, as `MimicItDataset` keyword arguments (built on first use when absent,
    like `toy_dataset_paths`)."""
    if root is None:
        root = BUNDLED if BUNDLED.is_dir() else default_cache_dir().with_name("toy-icl-v2")
    root = Path(root)
    paths = {split: mimicit_paths(root / split) for split in SPLITS}
    if not all(path.is_file() for files in paths.values() for path in files.values()):
        logger.info("Building the in-context toy task in %s", root)
        make_toy_icl_dataset(root)
    return paths
