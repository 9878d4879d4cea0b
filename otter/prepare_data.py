"""`otter-prepare-data`: convert instruction data to MIMIC-IT files, validate them and print statistics.

    otter-prepare-data tsv vqa.tsv out/vqa                          # OFA-style multi_instruct TSV
    otter-prepare-data folder photos/ instructions.jsonl out/mine   # a folder of images + a JSONL of instructions
    otter-prepare-data validate out/mine                            # check existing MIMIC-IT files
    otter-prepare-data toy otter/assets/toy                         # (re)build the bundled toy dataset
    otter-prepare-data toy-eval data/toy-eval                       # toy evaluation data for flamingo-eval

Every command writes (or reads) `instructions.json`, `images.json` and `train_config.json` in the output folder, then
loads them with `MimicItDataset`, decodes every image and prints: usable rows, bad rows by reason, distinct images,
mean in-context examples per query, and answer length. A JSONL line is
`{"image": "file.jpg", "instruction": ..., "answer": ..., "id": optional, "in_context": [optional ids]}`; a line
without an "id" has its line number (1-based) as id, which is what "in_context" refers to.
Rows that cannot be used are left out of the output and counted; converted images keep their original file bytes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from flamingo.arguments import int_at_least
from flamingo.cli import quiet_third_party

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # toy pictures: smaller shapes are unrecognisable


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="otter-prepare-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tsv = commands.add_parser("tsv", help="convert an OFA-style multi_instruct TSV")
    tsv.add_argument("tsv", type=Path, help="the TSV file (8 columns, urlsafe base64 images)")
    tsv.add_argument("out", type=Path, help="folder to write the MIMIC-IT files into")
    folder = commands.add_parser("folder", help="convert a folder of images and a JSONL of instructions")
    folder.add_argument("images", type=Path, help="folder the JSONL's image paths are relative to")
    folder.add_argument("jsonl", type=Path, help="one instruction per line")
    folder.add_argument("out", type=Path, help="folder to write the MIMIC-IT files into")
    check = commands.add_parser("validate", help="validate MIMIC-IT files written by this tool")
    check.add_argument("folder", type=Path, help="folder with instructions.json, images.json, train_config.json")
    for name, what in (("toy", "the toy VQA dataset"), ("toy-icl", "the in-context toy task (made-up names)")):
        toy = commands.add_parser(name, help=f"build {what} (train and heldout splits)")
        toy.add_argument("out", type=Path, help=f"folder to write the splits into (the bundled copy: otter/assets/{name})")
        toy.add_argument("--seed", type=int, default=0)
        toy.add_argument("--num-train", type=int_at_least(1), help="training samples (default: the bundled copy's)")
        toy.add_argument("--num-heldout", type=int_at_least(1), default=200)
        # Bounded above: every picture is drawn in memory, and 100000 px a side would be 30 GB each.
        toy.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=32,
                         help=f"pixels a side, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default 32)")
    toy_eval = commands.add_parser("toy-eval", help="write toy captioning/VQA evaluation data for flamingo-eval")
    toy_eval.add_argument("out", type=Path, help="folder for the data and its task files (toy_captions.json, toy_vqa.json)")
    toy_eval.add_argument("--seed", type=int, default=0)
    # At least one item of each of the four question types per split.
    toy_eval.add_argument("--num-train", type=int_at_least(4), default=200, help="demonstration pool size per task")
    toy_eval.add_argument("--num-test", type=int_at_least(4), default=100, help="test items per task")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from otter.data.prepare import run

    try:
        run(args)
    except (OSError, ValueError) as error:  # unreadable input, or no usable rows: a message, not a traceback
        raise SystemExit(f"otter-prepare-data: error: {error}") from error


if __name__ == "__main__":
    main()
