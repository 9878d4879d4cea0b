"""Evaluation tasks: the readers of the files the datasets publish, and the built-in task definitions.

A task is read into a `Task`: its kind (captioning, vqa, classification), the demonstration pool (`train`) and the
test items (`test`) as `Example`s, and how its predictions are scored. Five file formats are read:

    karpathy       Karpathy-split captions JSON (`dataset_coco.json`, `dataset_flickr30k.json`):
                   {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], "cocoid" | "imgid"}]}
    vqa            VQAv2-format questions {"questions": [{"image_id", "question", "question_id"}]} and annotations
                   {"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}, images by a filename pattern
    image_folder   ImageNet style: <split dir>/<class folder>/<image>, class names from a text file (one per line,
                   in the sorted order of the class folders) or the folder names
    hateful_memes  JSON lines {"id", "img", "label": 0|1, "text"}
    episodes       few-shot episodes, each query with its own demonstrations (e.g. made-up names to learn in context):
                   {"episodes": [{"id", "demos": [{"image", "question", "answer"}], "query": {...the same}}]}, an
                   "image" a file or a folder of frames (a clip); scored by exact match (`--demos episode`)

A task file (JSON) names a format and its files, and may override the prompt; see `TaskSpec` and docs/evaluation.md.
Files that are missing or not in the expected format raise `TaskDataError` naming the file and the format. An item
whose image file does not exist is left out and counted in `Task.skipped`; one whose image exists but cannot be
decoded is skipped (and counted) by the runner when it is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

TaskKind = Literal["captioning", "vqa", "classification"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class TaskDataError(ValueError):
    """A task's data file is missing or not in its format; the message names the file and what was expected."""


@dataclass
class Example:
    """One image with its text: a test item or a candidate demonstration.

    Attributes:
        id: `image_id` for captioning, `question_id` for VQA, the item's id for classification.
        image: the image file.
        answer: what the example shows when it is a demonstration (the first caption, the first human answer, the
            class name), as OpenFlamingo's evaluation does.
        references: every reference caption, or every human answer.
        fields: the text fields of the prompt besides the answer (`question`, `ocr`).
        label: the class index (classification).
    """

    id: Any
    image: Path
    answer: str
    references: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)
    label: int | None = None


@dataclass
class Task:
    """A task ready to evaluate: demonstration pool, test items, prompt style and metric."""

    name: str
    kind: TaskKind
    train: list[Example]
    test: list[Example]
    metric: str
    prompt_style: str  # the key of the processor's evaluation prompt template: captioning, vqa, imagenet, ...
    max_new_tokens: int
    class_names: list[str] = field(default_factory=list)
    prompt: str | None = None  # a task file's template, instead of the processor's
    separator: str | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    source: dict[str, Any] = field(default_factory=dict)
    episode_demos: list[list[int]] | None = None  # per test item, its own demonstrations' positions in `train`

    def limit(self, count: int | None) -> Task:
        """The same task with only its first `count` test items (all when `count` is None)."""
        if count is None:
            return self
        demos = None if self.episode_demos is None else self.episode_demos[:count]
        return dataclasses.replace(self, test=self.test[:count], episode_demos=demos)


@dataclass
class TaskSpec:
    """What a task file holds (JSON). Paths are relative to `data_dir`.

    Keys: `name`, `format` (karpathy | vqa | image_folder | hateful_memes), the format's files (see `FORMAT_FILES`),
    and optionally `prompt` (a template with `{answer}` and the format's fields, e.g.
    "<image>Question:{question} Short answer:{answer}"), `separator` (between demonstrations), `max_new_tokens`,
    `data_dir` (relative to the task file), `train_split`/`test_split` (karpathy).
    """

    name: str
    format: str
    files: dict[str, str]
    prompt: str | None = None
    separator: str | None = None
    max_new_tokens: int | None = None
    train_split: str = "train"
    test_split: str = "test"
    data_dir: str | None = None


# Per format: its file keys (required ones first, then optional ones with their defaults), kind, metric, prompt style.
FORMAT_FILES: dict[str, dict[str, str | None]] = {
    "karpathy": {"annotations": None, "image_dir": ""},
    "vqa": {
        "train_questions": None,
        "train_annotations": None,
        "test_questions": None,
        "test_annotations": None,
        "train_image_dir": "",
        "test_image_dir": "",
        "image_pattern": "{image_id}",
    },
    "image_folder": {"train_dir": None, "test_dir": None, "class_names": ""},
    "hateful_memes": {"train": None, "test": None, "image_dir": ""},
    "episodes": {"episodes": None, "image_dir": ""},
}
_FORMAT_DEFAULTS = {
    "karpathy": dict(kind="captioning", metric="CIDEr", prompt_style="captioning", max_new_tokens=20),
    "vqa": dict(kind="vqa", metric="VQA accuracy", prompt_style="vqa", max_new_tokens=5),
    "image_folder": dict(kind="classification", metric="top-1 accuracy", prompt_style="imagenet", max_new_tokens=0),
    "hateful_memes": dict(kind="classification", metric="ROC AUC", prompt_style="hateful_memes", max_new_tokens=0),
    "episodes": dict(kind="vqa", metric="exact match", prompt_style="vqa", max_new_tokens=8),
}


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "coco": TaskSpec("coco", "karpathy", {"annotations": "dataset_coco.json"}),
    "flickr30k": TaskSpec(
        "flickr30k", "karpathy", {"annotations": "dataset_flickr30k.json", "image_dir": "flickr30k-images"}
    ),
    "vqav2": TaskSpec(
        "vqav2",
        "vqa",
        {
            "train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
            "train_annotations": "v2_mscoco_train2014_annotations.json",
            "test_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "test_annotations": "v2_mscoco_val2014_annotations.json",
            "train_image_dir": "train2014",
            "test_image_dir": "val2014",
            "image_pattern": "COCO_{split}2014_{image_id:012d}.jpg",
        },
    ),
    "okvqa": TaskSpec(
        "okvqa",
        "vqa",
        {
            "train_questions": "OpenEnded_mscoco_train2014_questions.json",
            "train_annotations": "mscoco_train2014_annotations.json",
            "test_questions": "OpenEnded_mscoco_val2014_questions.json",
            "test_annotations": "mscoco_val2014_annotations.json",
            "train_image_dir": "train2014",
            "test_image_dir": "val2014",
            "image_pattern": "COCO_{split}2014_{image_id:012d}.jpg",
        },
    ),
    "textvqa": TaskSpec(
        "textvqa",
        "vqa",
        {
            "train_questions": "train_questions_vqa_format.json",
            "train_annotations": "train_annotations_vqa_format.json",
            "test_questions": "val_questions_vqa_format.json",
            "test_annotations": "val_annotations_vqa_format.json",
            "train_image_dir": "train_images",
            "test_image_dir": "train_images",
            "image_pattern": "{image_id}.jpg",
        },
        max_new_tokens=10,
    ),
    "vizwiz": TaskSpec(
        "vizwiz",
        "vqa",
        {
            "train_questions": "train_questions_vqa_format.json",
            "train_annotations": "train_annotations_vqa_format.json",
            "test_questions": "val_questions_vqa_format.json",
            "test_annotations": "val_annotations_vqa_format.json",
            "train_image_dir": "train",
            "test_image_dir": "val",
            "image_pattern": "{image_id}",
        },
    ),
    "imagenet": TaskSpec(
        "imagenet", "image_folder", {"train_dir": "train", "test_dir": "val", "class_names": "classnames.txt"}
    ),
    "hateful_memes": TaskSpec("hateful_memes", "hateful_memes", {"train": "train.jsonl", "test": "dev.jsonl"}),
}
# The COCO Karpathy split's test images live in val2014; VQAv2 names its images after the split.
_VQA_SPLIT_NAMES = {"train": "train", "test": "val"}


# ---------------------------------------------------------------------------------------------------------------
# Loading a task
# ---------------------------------------------------------------------------------------------------------------


def load_task(task: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Task:
    """A built-in task by name (its files under `data_dir`), or a task file (its paths relative to `data_dir` if
    given, else to the file's `data_dir` key, else to the file's folder)."""
    name = os.fspath(task)
    if name in BUILTIN_TASKS:
        if data_dir is None:
            raise TaskDataError(f"task {name!r} reads its files from --data-dir; none was given")
        return read_task(BUILTIN_TASKS[name], Path(data_dir))
    path = Path(name)
    if not path.is_file():
        raise TaskDataError(
            f"{name!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a task file (no such file)"
        )
    spec = read_task_file(path)
    base = Path(data_dir) if data_dir is not None else path.parent / (spec.data_dir or "")
    return read_task(spec, base)


def read_task_file(path: Path) -> TaskSpec:
    """A `TaskSpec` from a JSON task file; unknown keys and missing files are errors naming the file."""
    data = _read_json(path, 'a JSON task file: {"name", "format", <the format\'s files>, "prompt"?, ...}')
    if not isinstance(data, dict) or "format" not in data:
        raise TaskDataError(f'{path}: a task file is a JSON object with a "format" ({", ".join(FORMAT_FILES)})')
    fmt = data["format"]
    if fmt not in FORMAT_FILES:
        raise TaskDataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMAT_FILES)}")
    options = {f.name for f in dataclasses.fields(TaskSpec)} - {"files", "format", "name"}
    unknown = set(data) - options - set(FORMAT_FILES[fmt]) - {"format", "name"}
    if unknown:
        raise TaskDataError(
            f"{path}: unknown key(s) {sorted(unknown)} for format {fmt!r}; expected {sorted(FORMAT_FILES[fmt])} "
            f"and optionally {sorted(options)}"
        )
    files = {key: str(data[key]) for key in FORMAT_FILES[fmt] if key in data}
    settings = {key: data[key] for key in options if key in data}
    return TaskSpec(name=str(data.get("name", path.stem)), format=fmt, files=files, **settings)


def read_task(spec: TaskSpec, base: Path) -> Task:
    """Read `spec`'s files under `base` into a `Task`."""
    files = _resolve_files(spec, base)
    skipped: Counter[str] = Counter()
    class_names: list[str] = []
    episode_demos = None
    if spec.format == "karpathy":
        train = read_karpathy(files["annotations"], files["image_dir"], spec.train_split, skipped)
        test = read_karpathy(files["annotations"], files["image_dir"], spec.test_split, skipped)
    elif spec.format == "vqa":
        pattern = spec.files.get("image_pattern", FORMAT_FILES["vqa"]["image_pattern"])
        train, test = (
            read_vqa(
                files[f"{split}_questions"],
                files[f"{split}_annotations"],
                files[f"{split}_image_dir"],
                pattern,
                _VQA_SPLIT_NAMES[split],
                skipped,
            )
            for split in ("train", "test")
        )
    elif spec.format == "image_folder":
        class_file = files["class_names"] if files["class_names"].is_file() else None
        class_names = read_class_names(files["test_dir"], class_file)
        train = read_image_folder(files["train_dir"], class_names)
        test = read_image_folder(files["test_dir"], class_names)
    elif spec.format == "hateful_memes":
        class_names = ["no", "yes"]
        train = read_hateful_memes(files["train"], files["image_dir"], skipped)
        test = read_hateful_memes(files["test"], files["image_dir"], skipped)
    else:
        train, test, episode_demos = read_episodes(files["episodes"], files["image_dir"], skipped)
    if not test:
        raise TaskDataError(f"task {spec.name!r} has no usable test items under {base} ({_describe(skipped)})")
    if skipped:
        logger.warning("Task %s: left out %s", spec.name, _describe(skipped))
    defaults = _FORMAT_DEFAULTS[spec.format]
    return Task(
        name=spec.name,
        kind=defaults["kind"],
        train=train,
        test=test,
        metric=defaults["metric"],
        prompt_style=defaults["prompt_style"],
        max_new_tokens=spec.max_new_tokens or defaults["max_new_tokens"],
        class_names=class_names,
        prompt=spec.prompt,
        separator=spec.separator,
        skipped=skipped,
        source={"format": spec.format, "data_dir": os.fspath(base), **{k: os.fspath(v) for k, v in files.items()}},
        episode_demos=episode_demos,
    )


def _resolve_files(spec: TaskSpec, base: Path) -> dict[str, Path]:
    files = {}
    for key, default in FORMAT_FILES[spec.format].items():
        if key == "image_pattern":
            continue
        value = spec.files.get(key, default)
        if value is None:
            raise TaskDataError(f"task {spec.name!r} (format {spec.format}) needs the file key {key!r}")
        files[key] = base / value
    return files


def _describe(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items())) or "nothing"


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file; expected {expected}")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TaskDataError(f"{path}: not valid JSON ({error}); expected {expected}") from error


def _require(path: Path, expected: str, condition: bool, what: str) -> None:
    if not condition:
        raise TaskDataError(f"{path}: {what}; expected {expected}")


def _keep_if_present(example: Example, skipped: Counter[str]) -> bool:
    if example.image.is_file() or example.image.is_dir():  # a folder: a clip's frames
        return True
    skipped["missing_image"] += 1
    logger.debug("No image file %s for item %s", example.image, example.id)
    return False


KARPATHY_FORMAT = (
    'a Karpathy-split captions JSON: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}], '
    '"cocoid" | "imgid"}]}'
)


def read_karpathy(path: Path, image_dir: Path, split: str, skipped: Counter[str]) -> list[Example]:
    """The images of `split` in a Karpathy captions JSON; an image is `image_dir/filepath/filename` (`filepath` when
    the entry has one, as COCO's `train2014`/`val2014`)."""
    data = _read_json(path, KARPATHY_FORMAT)
    _require(path, KARPATHY_FORMAT, isinstance(data, dict) and isinstance(data.get("images"), list), 'no "images" list')
    examples = []
    for position, entry in enumerate(data["images"]):
        try:
            if entry["split"] != split:
                continue
            captions = tuple(sentence["raw"].strip() for sentence in entry["sentences"])
            image_id = entry["cocoid"] if "cocoid" in entry else entry["imgid"]
            image = image_dir / entry.get("filepath", "") / entry["filename"]
        except (KeyError, TypeError, AttributeError) as error:
            raise TaskDataError(f"{path}: images[{position}] lacks {error}; expected {KARPATHY_FORMAT}") from error
        _require(path, KARPATHY_FORMAT, bool(captions), f"images[{position}] has no sentences")
        example = Example(id=image_id, image=image, answer=captions[0], references=captions)
        if _keep_if_present(example, skipped):
            examples.append(example)
    return examples


VQA_QUESTIONS_FORMAT = 'VQAv2-format questions: {"questions": [{"image_id", "question", "question_id"}]}'
VQA_ANNOTATIONS_FORMAT = 'VQAv2-format annotations: {"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}'


def read_vqa(
    questions_path: Path, annotations_path: Path, image_dir: Path, pattern: str, split: str, skipped: Counter[str]
) -> list[Example]:
    """Questions joined with their annotations by `question_id`; the image file is `image_dir/pattern`, formatted
    with the question's `image_id` and `split` (e.g. "COCO_{split}2014_{image_id:012d}.jpg")."""
    questions = _read_json(questions_path, VQA_QUESTIONS_FORMAT)
    annotations = _read_json(annotations_path, VQA_ANNOTATIONS_FORMAT)
    _require(
        questions_path,
        VQA_QUESTIONS_FORMAT,
        isinstance(questions, dict) and isinstance(questions.get("questions"), list),
        'no "questions" list',
    )
    _require(
        annotations_path,
        VQA_ANNOTATIONS_FORMAT,
        isinstance(annotations, dict) and isinstance(annotations.get("annotations"), list),
        'no "annotations" list',
    )
    answers = {}
    for position, annotation in enumerate(annotations["annotations"]):
        try:
            answers[annotation["question_id"]] = tuple(str(a["answer"]) for a in annotation["answers"])
        except (KeyError, TypeError) as error:
            raise TaskDataError(
                f"{annotations_path}: annotations[{position}] lacks {error}; expected {VQA_ANNOTATIONS_FORMAT}"
            ) from error
    examples = []
    for position, question in enumerate(questions["questions"]):
        try:
            question_id, image_id, text = question["question_id"], question["image_id"], question["question"]
        except (KeyError, TypeError) as error:
            raise TaskDataError(
                f"{questions_path}: questions[{position}] lacks {error}; expected {VQA_QUESTIONS_FORMAT}"
            ) from error
        if not answers.get(question_id):
            raise TaskDataError(f"{annotations_path}: no answers for question_id {question_id} of {questions_path}")
        try:
            filename = pattern.format(image_id=image_id, split=split)
        except (KeyError, ValueError, IndexError) as error:
            raise TaskDataError(f"image_pattern {pattern!r} cannot format image_id {image_id!r}: {error}") from error
        example = Example(
            question_id, image_dir / filename, answers[question_id][0], answers[question_id], {"question": text}
        )
        if _keep_if_present(example, skipped):
            examples.append(example)
    return examples


def read_class_names(split_dir: Path, class_file: Path | None) -> list[str]:
    """The class names, in the sorted order of the class folders: one per line of `class_file`, or the folder names
    (underscores as spaces)."""
    folders = _class_folders(split_dir)
    if class_file is None:
        return [folder.name.replace("_", " ") for folder in folders]
    names = [line.strip() for line in class_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise TaskDataError(
            f"{class_file}: {len(names)} class names for {len(folders)} class folders in {split_dir}; expected one "
            "name per line, in the sorted order of the folders"
        )
    return names


def _class_folders(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise TaskDataError(f"{split_dir}: no such folder; expected an image folder: <class folder>/<images>")
    folders = sorted(path for path in split_dir.iterdir() if path.is_dir())
    if not folders:
        raise TaskDataError(f"{split_dir}: no class folders; expected an image folder: <class folder>/<images>")
    return folders


def read_image_folder(split_dir: Path, class_names: list[str]) -> list[Example]:
    """Every image under `split_dir/<class folder>/`, labelled by its folder's position among the sorted folders."""
    folders = _class_folders(split_dir)
    if len(folders) != len(class_names):
        raise TaskDataError(f"{split_dir}: {len(folders)} class folders, but the task has {len(class_names)} classes")
    return [
        Example(id=f"{folder.name}/{image.name}", image=image, answer=class_names[label], label=label)
        for label, folder in enumerate(folders)
        for image in sorted(folder.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]


HATEFUL_MEMES_FORMAT = 'Hateful Memes JSON lines: {"id", "img", "label": 0 | 1, "text"} per line'


def read_hateful_memes(path: Path, image_dir: Path, skipped: Counter[str]) -> list[Example]:
    """The memes of a Hateful Memes jsonl; `img` ("img/01235.png") is relative to `image_dir`."""
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file; expected {HATEFUL_MEMES_FORMAT}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label = int(row["label"])
            example = Example(
                row["id"], image_dir / row["img"], ["no", "yes"][label], fields={"ocr": str(row["text"])}, label=label
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as error:
            raise TaskDataError(
                f"{path}: line {number} is not a meme ({error!r}); expected {HATEFUL_MEMES_FORMAT}"
            ) from error
        if _keep_if_present(example, skipped):
            examples.append(example)
    return examples


EPISODES_FORMAT = (
    'few-shot episodes: {"episodes": [{"id", "demos": [{"image", "question", "answer"}, ...], '
    '"query": {"image", "question", "answer"}}]}'
)


def read_episodes(path: Path, image_dir: Path, skipped: Counter[str]) -> tuple[list[Example], list[Example], list[list[int]]]:
    """The demonstrations of every episode (the pool), the queries (the test items), and per query the positions of
    its own demonstrations in the pool. An episode with a missing image is left out whole."""
    data = _read_json(path, EPISODES_FORMAT)
    _require(path, EPISODES_FORMAT, isinstance(data, dict) and isinstance(data.get("episodes"), list), 'no "episodes" list')
    pool, queries, demos_of, seen = [], [], [], set()
    for position, episode in enumerate(data["episodes"]):
        try:
            episode_id = episode["id"]
            _require(path, EPISODES_FORMAT, episode_id not in seen, f"episodes[{position}] repeats the id {episode_id!r}")
            seen.add(episode_id)
            demos = [_episode_example(f"{episode_id}/demo{k}", demo, image_dir) for k, demo in enumerate(episode["demos"])]
            query = _episode_example(episode_id, episode["query"], image_dir)
        except (KeyError, TypeError, AttributeError) as error:
            raise TaskDataError(f"{path}: episodes[{position}] lacks {error}; expected {EPISODES_FORMAT}") from error
        if all(_keep_if_present(example, skipped) for example in [*demos, query]):
            demos_of.append(list(range(len(pool), len(pool) + len(demos))))
            pool += demos
            queries.append(query)
    return pool, queries, demos_of


def _episode_example(example_id: str, entry: dict, image_dir: Path) -> Example:
    answer = str(entry["answer"])
    return Example(example_id, image_dir / entry["image"], answer, (answer,), {"question": str(entry["question"])})


def task_names() -> Iterable[str]:
    return BUILTIN_TASKS.keys()
