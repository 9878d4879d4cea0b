"""OFA-style `multi_instruct` TSV files (Otter's April-May 2023 format): one question-answer pair per line.

Eight tab-separated columns `uniq_id, image, caption, question, refs, gt_objects, dataset_name, type`, the image as
urlsafe base64. Type `caption` becomes the question "what does the image describe?" answered by the caption; type
`qa` is answered by the highest-confidence reference of `refs` ("conf|!+answer&&conf|!+answer"); other types are
skipped, as Otter did. gqa and the LLaVA sets write spaces as `#`.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .samples import BadRowError, EncodedImage, InstructionDataset, InstructionSample

COLUMNS = ("uniq_id", "image", "caption", "question", "refs", "gt_objects", "dataset_name", "type")
CAPTION_QUESTION = "what does the image describe?"
HASH_FOR_SPACE = frozenset({"gqa", "complex_reasoning_77k", "detail_23k", "conversation_58k"})


def best_reference(refs: str) -> str:
    """The answer with the highest confidence in `"conf|!+answer&&conf|!+answer"` (the first, on a tie)."""
    return max((_scored_reference(item) for item in refs.split("&&")), key=lambda pair: pair[0])[1]


def _scored_reference(item: str) -> tuple[float, str]:
    confidence, separator, answer = item.partition("|!+")
    try:
        if separator:
            return float(confidence), answer
    except ValueError:
        pass
    raise BadRowError("bad_refs", f"refs item {item!r} is not 'confidence|!+answer'")


def parse_row(line: str) -> InstructionSample:
    """One TSV line as a single-chunk sample; raises `BadRowError` with the reason it cannot be one."""
    fields = line.split("\t")
    if len(fields) != len(COLUMNS):
        raise BadRowError("malformed_row", f"expected {len(COLUMNS)} tab-separated columns, got {len(fields)}")
    row = dict(zip(COLUMNS, fields, strict=True))
    if row["type"] == "caption":
        question, answer = CAPTION_QUESTION, row["caption"]
    elif row["type"] == "qa":
        question, answer = row["question"], best_reference(row["refs"])
    else:
        raise BadRowError("unsupported_type", f"type {row['type']!r} is neither 'caption' nor 'qa'")
    if row["dataset_name"] in HASH_FOR_SPACE:
        question, answer = question.replace("#", " "), answer.replace("#", " ")
    question, answer = question.strip(), answer.strip()
    if not question:
        raise BadRowError("empty_instruction", "empty question")
    if not answer:
        raise BadRowError("empty_answer", "empty answer")
    if not row["image"].strip():
        raise BadRowError("missing_image", "empty image column")
    return InstructionSample(row["uniq_id"], [(question, answer)], [EncodedImage(row["image"].strip(), urlsafe=True)])


class MultiInstructDataset(InstructionDataset):
    """The usable rows of an OFA-style TSV file (blank lines ignored), each a sample without in-context examples.

    Args:
        tsv_path: the TSV file.
        max_examples: keep only the first this many usable rows.
    """

    def __init__(self, tsv_path: str | os.PathLike, *, max_examples: int | None = None):
        bad_rows: Counter[str] = Counter()
        samples: list[InstructionSample] = []
        with open(tsv_path, encoding="utf-8", newline="") as file:
            try:
                for line in file:
                    if max_examples is not None and len(samples) >= max_examples:
                        break
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    try:
                        samples.append(parse_row(line))
                    except BadRowError as error:
                        bad_rows[error.reason] += 1
            except UnicodeDecodeError as error:
                raise ValueError(f"{tsv_path} is not a UTF-8 text file (a TSV): {error}") from error
        super().__init__(f"multi_instruct {Path(tsv_path).name}", samples, bad_rows)
