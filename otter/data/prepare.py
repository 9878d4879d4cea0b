"""What `otter-prepare-data` (the command: otter/prepare_data.py) does: convert OFA-style TSVs and folders of images +
JSONL instructions to MIMIC-IT files, validate them, build the toy data, and report statistics. Rows that cannot be
used are left out of the output and counted; converted images keep their original file bytes."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .mimicit import MimicItDataset, mimicit_paths, write_mimicit
from .multi_instruct import MultiInstructDataset
from .samples import BadImageError, BadRowError, EncodedImage, decode_image, describe_counts, text_problem
from .toy import make_toy_dataset
from .toy_eval import make_toy_eval_data
from .toy_icl import make_toy_icl_dataset

logger = logging.getLogger(__name__)



@dataclass
class Record:
    """One converted instruction with its image file's bytes."""

    ins_id: str
    instruction: str
    answer: str
    image_id: str
    image: bytes
    in_context: list[str] = field(default_factory=list)


def convert(records: Iterator[Record], out_dir: Path, meta: dict, bad_rows: Counter[str]) -> dict[str, Path]:
    """Write `records` as MIMIC-IT files, leaving out (and counting) repeated ids and images PIL cannot read, and
    in-context references to ids that are not in the output."""
    rows, images, in_context = {}, {}, {}
    for record in records:
        if record.ins_id in rows:
            bad_rows["duplicate_id"] += 1
            continue
        try:
            decode_image(record.image)
        except BadImageError as error:
            bad_rows[error.reason] += 1
            continue
        images[record.image_id] = base64.b64encode(record.image).decode("ascii")
        rows[record.ins_id] = {
            "instruction": record.instruction,
            "answer": record.answer,
            "image_ids": [record.image_id],
        }
        in_context[record.ins_id] = record.in_context
    if not rows:  # refused before writing: an existing output folder keeps its files
        raise ValueError(f"no usable rows ({describe_counts(bad_rows) or 'the input is empty'}); nothing written to {out_dir}")
    for ins_id, examples in in_context.items():
        known = [example for example in examples if example in rows and example != ins_id]
        bad_rows["in_context_unknown_id"] += len(examples) - len(known)
        in_context[ins_id] = rows[ins_id]["rel_ins_ids"] = known
    return write_mimicit(out_dir, rows, images, in_context, meta)


def tsv_records(tsv_path: Path, bad_rows: Counter[str]) -> Iterator[Record]:
    """The usable rows of an OFA-style TSV (its reader's bad rows are added to `bad_rows`)."""
    dataset = MultiInstructDataset(tsv_path)
    bad_rows.update(dataset.bad_rows)
    for sample in dataset:
        (question, answer), (image,) = sample.chunks[0], sample.images
        try:
            raw = image.raw()
        except BadImageError as error:
            bad_rows[error.reason] += 1
            continue
        yield Record(sample.sample_id, question, answer, f"IMG_{sample.sample_id}", raw)


def folder_records(images_dir: Path, jsonl_path: Path, bad_rows: Counter[str]) -> Iterator[Record]:
    """The usable lines of a JSONL of instructions about images in `images_dir`."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist" if not images_dir.exists() else f"{images_dir} is not a folder")
    with open(jsonl_path, encoding="utf-8") as file:
        try:
            lines = list(file)
        except UnicodeDecodeError as error:
            raise ValueError(f"{jsonl_path} is not a UTF-8 text file (JSON lines): {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield _folder_record(images_dir, json.loads(line), number)
        except json.JSONDecodeError:
            bad_rows["malformed_row"] += 1
        except BadRowError as error:
            bad_rows[error.reason] += 1


def _folder_record(images_dir: Path, row: dict, number: int) -> Record:
    if not isinstance(row, dict):
        raise BadRowError("malformed_row", f"line {number} is not a JSON object")
    for key in ("instruction", "answer"):
        if problem := text_problem(row, key):
            raise BadRowError(problem, f"line {number}: {key} {row.get(key)!r} is not a text")
    instruction, answer = row["instruction"].strip(), row["answer"].strip()
    image_path = images_dir / str(row.get("image") or "")
    if not row.get("image") or not image_path.is_file():
        raise BadRowError("missing_image", f"line {number}: no image file {image_path}")
    if not Path(os.path.normpath(image_path)).is_relative_to(os.path.normpath(images_dir)):
        # The output embeds the file's bytes: a JSONL must not pull in files from elsewhere on the machine (an
        # absolute path or ../). Symbolic links inside the folder are the user's own choice, so they are followed.
        raise BadRowError("image_outside_folder", f"line {number}: {row['image']} is not inside {images_dir}")
    in_context = row.get("in_context") or []
    if not isinstance(in_context, list):
        raise BadRowError("malformed_row", f"line {number}: in_context is a {type(in_context).__name__}, not a list")
    in_context = [str(example) for example in in_context]
    ins_id = str(row.get("id", number))
    return Record(ins_id, instruction, answer, Path(row["image"]).as_posix(), image_path.read_bytes(), in_context)


@dataclass
class Statistics:
    """What `validate` found in a MIMIC-IT dataset."""

    rows: int
    bad_rows: Counter[str]
    images: int
    mean_in_context: float
    mean_answer_words: float
    max_answer_words: int

    def report(self) -> str:
        bad = f"{self.bad_rows.total()}" + (f" ({describe_counts(self.bad_rows)})" if self.bad_rows else "")
        return "\n".join(
            [
                f"usable rows:       {self.rows}",
                f"bad rows:          {bad}",
                f"distinct images:   {self.images}",
                f"in-context / query: {self.mean_in_context:.2f} (mean)",
                f"answer words:      {self.mean_answer_words:.2f} mean, {self.max_answer_words} max",
            ]
        )


def validate(paths: dict[str, Path], bad_rows: Counter[str] | None = None) -> Statistics:
    """Load a MIMIC-IT dataset, decode every distinct image once, and count what cannot be used (added to the
    conversion's `bad_rows`, if given). Samples with an unreadable image are not counted as usable."""
    dataset = MimicItDataset(**paths)
    bad_rows = Counter(bad_rows) + dataset.bad_rows
    failures: dict[EncodedImage, str | None] = {}
    usable = []
    for sample in dataset:
        problems = [_decode_problem(image, failures) for image in sample.images]
        problem = next((p for p in problems if p), None)
        if problem:
            bad_rows[problem] += 1
        else:
            usable.append(sample)
    answer_words = [len(sample.answer.split()) for sample in usable] or [0]
    return Statistics(
        rows=len(usable),
        bad_rows=bad_rows,
        images=len(failures),
        mean_in_context=statistics.fmean(len(sample.examples) for sample in usable) if usable else 0.0,
        mean_answer_words=statistics.fmean(answer_words),
        max_answer_words=max(answer_words),
    )


def _decode_problem(image: EncodedImage, failures: dict[EncodedImage, str | None]) -> str | None:
    if image not in failures:
        try:
            image()
            failures[image] = None
        except BadImageError as error:
            failures[image] = error.reason
    return failures[image]


def run(args: argparse.Namespace) -> None:
    """Carry out a parsed `otter-prepare-data` command."""
    bad_rows: Counter[str] = Counter()
    if args.command == "toy-eval":
        tasks = make_toy_eval_data(args.out, seed=args.seed, num_train=args.num_train, num_test=args.num_test)
        print("\n".join(f"task file: {path}" for path in tasks.values()))
        return
    if args.command == "tsv":
        folders = [_write(tsv_records(args.tsv, bad_rows), args.out, args.tsv, bad_rows)]
    elif args.command == "folder":
        folders = [_write(folder_records(args.images, args.jsonl, bad_rows), args.out, args.jsonl, bad_rows)]
    elif args.command in ("toy", "toy-icl"):
        make = make_toy_dataset if args.command == "toy" else make_toy_icl_dataset
        sizes = {"num_train": args.num_train} if args.num_train else {}
        make(args.out, seed=args.seed, num_heldout=args.num_heldout, image_size=args.image_size, **sizes)
        folders = [args.out / "train", args.out / "heldout"]
    else:
        folders = [args.folder]
    for folder in folders:
        print(f"{folder}:\n{validate(mimicit_paths(folder), bad_rows).report()}")


def _write(records: Iterator[Record], out: Path, source: Path, bad_rows: Counter[str]) -> Path:
    convert(records, out, {"source": os.fspath(source), "converted_by": "otter-prepare-data"}, bad_rows)
    return out

