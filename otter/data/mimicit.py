"""MIMIC-IT instruction datasets (Otter's format from June 2023): instructions JSON, images JSON/parquet, train config.

    instructions: {"meta": {...}, "data": {INS_ID: {"instruction", "answer", "image_ids": [IMG_ID], "rel_ins_ids": [...]}}}
    images:       {IMG_ID: base64}  (or parquet: index = IMG_ID, column "base64")
    train config: {INS_ID: [in-context INS_IDs]}  (optional)

As in Otter, the train config's keys are the queries (without it, every instruction is) and its lists are each
query's in-context examples (without it, the instruction's `rel_ins_ids`). Every chunk has one `<image>` marker: one
image, or one video clip whose frames are the instruction's `image_ids`, in order (MIMIC-IT's video subsets: DC,
E4D, FunQA, TVC; also SD's image pairs and SN's views, as Otter reads them). Whether an instruction with several
image ids is a clip follows its id's prefix (`VIDEO_PREFIXES`) unless `clips=` says; otherwise it is skipped and
counted (`multiple_images`). An in-context example brings its own clip.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from flamingo.video import sample_frame_indices

from .samples import EncodedImage, InstructionDataset, InstructionSample, MediaSource, text_problem

PathLike = str | os.PathLike
# The MIMIC-IT subsets whose instructions' image ids are the frames of one clip (Otter's `3e7e4a7` reader).
VIDEO_PREFIXES = ("DC", "E4D", "FunQA", "SD", "SN", "TVC")


def is_video_id(instruction_id: str) -> bool:
    """Whether an instruction id belongs to a MIMIC-IT subset of clips (`DC_INS_00001`, `E4D_...`)."""
    return instruction_id.split("_", 1)[0] in VIDEO_PREFIXES


def mimicit_paths(folder: PathLike) -> dict[str, Path]:
    """The files of one MIMIC-IT dataset written by `write_mimicit`, keyed by `MimicItDataset`'s argument names."""
    folder = Path(folder)
    return {
        "instructions_path": folder / "instructions.json",
        "images_path": folder / "images.json",
        "train_config_path": folder / "train_config.json",
    }


def write_mimicit(
    folder: PathLike, rows: dict[str, dict], images: dict[str, str], train_config: dict[str, list[str]], meta: dict
) -> dict[str, Path]:
    """Write a dataset's three files into `folder`, one instruction, image or list per line, so that the files stay
    compact yet diff line by line; returns `mimicit_paths(folder)`."""
    paths = mimicit_paths(folder)
    paths["instructions_path"].parent.mkdir(parents=True, exist_ok=True)
    instructions = f'{{"meta": {json.dumps(meta)},\n"data": {_json_lines(rows)}}}\n'
    paths["instructions_path"].write_text(instructions, encoding="utf-8")
    paths["images_path"].write_text(_json_lines(images) + "\n", encoding="utf-8")
    paths["train_config_path"].write_text(_json_lines(train_config) + "\n", encoding="utf-8")
    return paths


def _json_lines(mapping: dict[str, Any]) -> str:
    """A JSON object with one key per line."""
    return "{\n" + ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in mapping.items()) + "\n}"


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON (UTF-8 text): {error}") from error


def read_images(path: PathLike) -> dict[str, str]:
    """Image id -> base64 text, from a JSON object or (with pandas and pyarrow installed) a parquet file/folder."""
    path = Path(path)
    if path.suffix == ".parquet" or path.is_dir():
        try:
            import pandas
        except ImportError as error:
            raise ImportError(
                f"{path} is parquet, which needs pandas and pyarrow (pip install pandas pyarrow); "
                "or convert the images to a JSON object {id: base64}"
            ) from error
        frame = pandas.read_parquet(path, columns=["base64"])
        return {str(key): value for key, value in frame["base64"].items()}
    images = read_json(path)
    if not isinstance(images, dict):
        raise ValueError(f"{path}: expected a JSON object {{image_id: base64}}, got {type(images).__name__}")
    return images


def row_problem(row: Any, images: dict[str, str], clip: bool = False) -> str | None:
    """Why an instruction row cannot be a chunk (the bad-row reason), or None if it can. With `clip`, several image
    ids are the frames of one clip, and a clip with a frame missing is a bad clip (`missing_frame`)."""
    if not isinstance(row, dict):
        return "unknown_instruction_id" if row is None else "malformed_row"
    if problem := text_problem(row, "instruction") or text_problem(row, "answer"):
        return problem
    image_ids = row.get("image_ids") or []
    if not isinstance(image_ids, list) or not all(isinstance(image_id, str) for image_id in image_ids):
        return "malformed_row"  # a bare string would otherwise read as one image id per character
    if not image_ids:
        return "no_image"
    if len(image_ids) > 1 and not clip:
        return "multiple_images"
    missing = [image_id for image_id in image_ids if image_id not in images]
    if missing:
        return "missing_frame" if len(image_ids) > 1 else "missing_image"
    if not all(isinstance(images[image_id], str) for image_id in image_ids):
        return "bad_base64"
    return None


class MimicItDataset(InstructionDataset):
    """One sample per query instruction: its in-context examples' chunks, then its own.

    Args:
        instructions_path: the instructions JSON.
        images_path: the images JSON `{id: base64}` or parquet.
        train_config_path: optional JSON `{query id: [in-context ids]}`.
        max_examples: keep only the first this many usable queries.
        num_in_context: at most this many in-context examples per query, a seeded random subset kept in order
            (None: all of them; 0: zero-shot).
        seed: seeds that choice, per query, so it does not depend on the order or number of queries.
        clips: whether an instruction with several image ids is one clip of those frames (True), or skipped
            (False); None: a clip when its id has a MIMIC-IT video prefix (`VIDEO_PREFIXES`).
        num_frames: a longer clip keeps this many of its frames, evenly spaced, first and last included (None:
            all; the processor still samples them down to the model's frame embeddings).
    """

    def __init__(
        self,
        instructions_path: PathLike,
        images_path: PathLike,
        train_config_path: PathLike | None = None,
        *,
        max_examples: int | None = None,
        num_in_context: int | None = None,
        seed: int = 0,
        clips: bool | None = None,
        num_frames: int | None = None,
    ):
        instructions = read_json(instructions_path)
        if not isinstance(instructions, dict) or not isinstance(instructions.get("data"), dict):
            raise ValueError(f"{instructions_path}: expected a JSON object with a 'data' object of instructions")
        self._rows: dict[str, dict] = instructions["data"]
        self._images = read_images(images_path)
        self._train_config: dict[str, list[str]] | None = read_json(train_config_path) if train_config_path else None
        if self._train_config is not None and not isinstance(self._train_config, dict):
            raise ValueError(
                f"{train_config_path}: expected a JSON object {{query id: [in-context ids]}}, "
                f"got {type(self._train_config).__name__}"
            )
        self._num_in_context = num_in_context
        self._seed = seed
        self._clips = clips
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        self._num_frames = num_frames

        bad_rows: Counter[str] = Counter()
        samples: list[InstructionSample] = []
        for query_id in self._train_config if self._train_config is not None else self._rows:
            if max_examples is not None and len(samples) >= max_examples:
                break
            problem = self._problem(query_id)
            if problem:
                bad_rows[problem] += 1
                continue
            samples.append(self._sample(query_id, bad_rows))
        super().__init__(f"MIMIC-IT {Path(instructions_path).name}", samples, bad_rows)

    def _sample(self, query_id: str, bad_rows: Counter[str]) -> InstructionSample:
        """The query with its usable in-context examples; dropped examples are counted as `in_context_<reason>`."""
        examples = []
        for example_id in self._in_context_ids(query_id):
            problem = "self_reference" if example_id == query_id else self._problem(example_id)
            if problem:
                bad_rows[f"in_context_{problem}"] += 1
            else:
                examples.append(example_id)
        examples = self._choose(query_id, examples)
        rows = [self._rows[ins_id] for ins_id in [*examples, query_id]]
        return InstructionSample(
            sample_id=query_id,
            chunks=[(str(row["instruction"]).strip(), str(row["answer"]).strip()) for row in rows],
            images=[self._media(row["image_ids"]) for row in rows],
        )

    def _is_clip(self, instruction_id: str) -> bool:
        return self._clips if self._clips is not None else is_video_id(instruction_id)

    def _problem(self, instruction_id: str) -> str | None:
        return row_problem(self._rows.get(instruction_id), self._images, self._is_clip(instruction_id))

    def _media(self, image_ids: list[str]) -> MediaSource:
        """One image, or the frames of one clip (a tuple), sampled to `num_frames`; still encoded."""
        if len(image_ids) == 1:
            return EncodedImage(self._images[image_ids[0]])
        kept = sample_frame_indices(len(image_ids), self._num_frames or len(image_ids))
        return tuple(EncodedImage(self._images[image_ids[i]]) for i in kept)

    def _in_context_ids(self, query_id: str) -> list[str]:
        ids = self._train_config[query_id] if self._train_config is not None else self._rows[query_id].get("rel_ins_ids")
        if ids is not None and not isinstance(ids, list):
            # Not iterated: a string would give one "id" per character.
            where = "the train config's entry" if self._train_config is not None else "rel_ins_ids"
            raise ValueError(f"{where} of instruction {query_id!r} is a {type(ids).__name__}, not a list of ids")
        return list(ids or [])

    def _choose(self, query_id: str, examples: list[str]) -> list[str]:
        if self._num_in_context is None or len(examples) <= self._num_in_context:
            return examples
        # A string seed is hashed with SHA-512, so the choice is the same in every process and run.
        keep = random.Random(f"{self._seed}:{query_id}").sample(range(len(examples)), self._num_in_context)
        return [examples[i] for i in sorted(keep)]
