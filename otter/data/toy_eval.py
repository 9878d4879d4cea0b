"""The toy shapes as evaluation data in the real formats, so that `flamingo-eval` runs on a toy-trained model.

    make_toy_eval_data("data/toy-eval")
    flamingo-eval --model <otter-train output> --task data/toy-eval/toy_vqa.json --shots 0 2 4

writes, under the output folder:

    images/                               the pictures (PNG)
    dataset_toy_captions.json             Karpathy-split captions: 5 captions per image, splits "train" and "test"
    vqa_{train,val}_questions.json        VQAv2-format questions (the toy's four question types)
    vqa_{train,val}_annotations.json      VQAv2-format annotations: 10 human answers per question
    toy_captions.json, toy_vqa.json       flamingo-eval task files for the two

The numbers a model gets on them are toy numbers: they say the harness runs end to end, not how good a model is.
Everything follows from the seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from .shapes import COLOURS, SHAPES, Shape, draw_shapes
from .toy import ANSWERS, QUESTIONS, _draw_split, png_bytes

logger = logging.getLogger(__name__)

CAPTION_FORMS = (
    "a {colour} {shape}",
    "the {colour} {shape}",
    "{colour} {shape}",
    "one {colour} {shape}",
    "a {shape} that is {colour}",
)
NUM_ANSWERS = 10


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _caption_split(out: Path, split: str, count: int, image_size: int, rng: random.Random, first_id: int) -> list[dict]:
    """Karpathy entries of one split: a single shape per picture, described by five captions."""
    entries = []
    for offset in range(count):
        shape, colour = SHAPES[offset % len(SHAPES)], tuple(COLOURS)[rng.randrange(len(COLOURS))]
        center = (round(rng.uniform(0.35, 0.65), 3), round(rng.uniform(0.35, 0.65), 3))
        image_id = first_id + offset
        filename = f"cap_{image_id:05d}.png"
        (out / "images" / filename).write_bytes(png_bytes(draw_shapes([Shape(shape, colour, center, 0.3)], image_size)))
        captions = [form.format(colour=colour, shape=shape) for form in CAPTION_FORMS]
        entries.append(
            {
                "filepath": "images",
                "filename": filename,
                "split": split,
                "cocoid": image_id,
                "imgid": image_id,
                "sentences": [{"raw": caption, "tokens": caption.split()} for caption in captions],
            }
        )
    return entries


def _human_answers(kind: str, answer: str, rng: random.Random) -> list[dict]:
    """Ten answers as annotators give them: mostly the right word, sometimes another one of the same type."""
    wrong = [other for other in ANSWERS[kind] if other != answer]
    answers = [answer if rng.random() < 0.85 else rng.choice(wrong) for _ in range(NUM_ANSWERS)]
    return [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i, text in enumerate(answers)]


def _vqa_split(out: Path, split: str, count: int, image_size: int, rng: random.Random, forbidden: set[bytes]) -> None:
    questions, annotations = [], []
    for image_id, (kind, answer, png) in enumerate(_draw_split(count, image_size, rng, forbidden)):
        (out / "images" / f"vqa_{split}_{image_id:05d}.png").write_bytes(png)
        question_id = image_id * 10
        questions.append({"image_id": image_id, "question": QUESTIONS[kind], "question_id": question_id})
        annotations.append(
            {
                "image_id": image_id,
                "question_id": question_id,
                "question_type": kind,
                "answer_type": "other",
                "multiple_choice_answer": answer,
                "answers": _human_answers(kind, answer, rng),
            }
        )
    _write_json(out / f"vqa_{split}_questions.json", {"data_subtype": f"toy_{split}", "questions": questions})
    _write_json(out / f"vqa_{split}_annotations.json", {"data_subtype": f"toy_{split}", "annotations": annotations})


def make_toy_eval_data(
    out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 200, num_test: int = 100, image_size: int = 32
) -> dict[str, Path]:
    """Write the toy captioning and VQA evaluation data and their task files under `out_dir`.

    Returns:
        The task files, keyed `captions` and `vqa`.
    """
    if min(num_train, num_test) < len(QUESTIONS):
        raise ValueError(f"each split needs at least {len(QUESTIONS)} items (one per question type)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"otter-toy-eval:{seed}")
    entries = _caption_split(out, "train", num_train, image_size, rng, 0)
    entries += _caption_split(out, "test", num_test, image_size, rng, num_train)
    _write_json(out / "dataset_toy_captions.json", {"dataset": "toy", "images": entries})
    forbidden: set[bytes] = set()
    _vqa_split(out, "train", num_train, image_size, rng, forbidden)
    _vqa_split(out, "val", num_test, image_size, rng, forbidden)
    tasks = {
        "captions": {
            "name": "toy_captions",
            "format": "karpathy",
            "annotations": "dataset_toy_captions.json",
            "max_new_tokens": 8,
        },
        "vqa": {
            "name": "toy_vqa",
            "format": "vqa",
            "train_questions": "vqa_train_questions.json",
            "train_annotations": "vqa_train_annotations.json",
            "test_questions": "vqa_val_questions.json",
            "test_annotations": "vqa_val_annotations.json",
            "train_image_dir": "images",
            "test_image_dir": "images",
            "image_pattern": "vqa_{split}_{image_id:05d}.png",
            "max_new_tokens": 4,
        },
    }
    paths = {}
    for key, spec in tasks.items():
        paths[key] = out / f"{spec['name']}.json"
        _write_json(paths[key], spec)
    logger.info("Wrote toy evaluation data (%d train, %d test items per task) to %s", num_train, num_test, out)
    return paths
