"""The in-context toy task (otter.data.toy_icl) and the main job's data (otter.data.main_job)."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from tiny_models import ROOT, TINY_OTTER_DIR

from otter import OtterProcessor
from otter.data.main_job import TASKS, TASKS_OF, bundled_data
from otter.data.mimicit import MimicItDataset, mimicit_paths
from otter.data.samples import EncodedImage
from otter.data.shapes import COLOURS
from otter.data.toy_icl import BUNDLED, HELDOUT_NAMES, NAMES, QUESTION, TRAIN_NAMES, make_toy_icl_dataset
from otter.defaults import BUNDLED_DATA


@pytest.fixture(scope="module")
def processor():
    return OtterProcessor.from_pretrained(TINY_OTTER_DIR)


def small_task(out_dir, seed=0):
    return make_toy_icl_dataset(out_dir, seed=seed, num_train=40, num_heldout=12)


def episodes(paths, split):
    """Per episode: its last query's row, its examples' rows and its earlier queries' rows."""
    rows = json.loads(paths[f"{split}_instructions"].read_text())["data"]
    config = json.loads(paths[f"{split}_train_config"].read_text())
    return [(rows[query], [rows[i] for i in before if "_EX" in i], [rows[i] for i in before if "_Q" in i])
            for query, before in config.items()]


def test_names_are_letter_tokens(processor):
    tokenizer = processor.tokenizer
    for name in NAMES:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(f"<answer> {name}", add_special_tokens=False).input_ids)
        assert tokens[1:] == ["▁" + name[0], *name[1:]], (name, tokens)


def test_heldout_names_are_new_combinations_of_known_letters():
    assert not set(HELDOUT_NAMES) & set(TRAIN_NAMES) and set(HELDOUT_NAMES) | set(TRAIN_NAMES) == set(NAMES)
    assert len(TRAIN_NAMES) > 3000 and len(HELDOUT_NAMES) > 300
    for position in range(5):
        assert {n[position] for n in HELDOUT_NAMES} <= {n[position] for n in TRAIN_NAMES}


def test_task_is_deterministic(tmp_path):
    first, second, other = small_task(tmp_path / "a"), small_task(tmp_path / "b"), small_task(tmp_path / "c", seed=1)
    assert all(first[key].read_bytes() == second[key].read_bytes() for key in first)
    assert first["train_images"].read_bytes() != other["train_images"].read_bytes()


def test_episodes_need_their_examples(tmp_path):
    """Each query's colour is one example's, its shape not that example's; its answer is that example's colour and
    name; the two names differ in every letter; each split uses its own names; the last queries' targets are balanced."""
    paths = small_task(tmp_path)
    for split, pool in (("train", TRAIN_NAMES), ("heldout", HELDOUT_NAMES)):
        targets = Counter()
        found = episodes(paths, split)
        assert len(found) == {"train": 40, "heldout": 12}[split]
        for last, examples, earlier in found:
            assert len(examples) == 2 and len(earlier) == {"train": 1, "heldout": 0}[split]
            names = [e["name"] for e in examples]
            assert all(e["answer"] == f"{e['colour']} {e['name']}" for e in examples)
            assert set(names) <= set(pool) and all(a != b for a, b in zip(*names))
            for query in [*earlier, last]:
                assert query["instruction"] == QUESTION and {e["instruction"] for e in examples} == {QUESTION}
                matching = [i for i, e in enumerate(examples) if e["colour"] == query["colour"]]
                assert len(matching) == 1 and query["answer"] == examples[matching[0]]["answer"]
                assert query["shape"] != examples[matching[0]]["shape"]
            targets[names.index(last["name"])] += 1
        assert abs(targets[0] - targets[1]) <= 1


def test_pictures_show_their_colour_and_are_unique(tmp_path):
    paths = small_task(tmp_path)
    images = {split: json.loads(paths[f"{split}_images"].read_text()) for split in ("train", "heldout")}
    every = [data for split in images.values() for data in split.values()]
    assert len(set(every)) == len(every) == 4 * 40 + 3 * 12
    for query, examples, _ in episodes(paths, "heldout"):
        for row in [query, *examples]:
            pixels = np.asarray(EncodedImage(images["heldout"][row["image_ids"][0]])())
            assert (pixels == COLOURS[row["colour"]]).all(-1).any()


def test_dataset_reads_queries_with_their_examples(tmp_path):
    small_task(tmp_path)
    dataset = MimicItDataset(**mimicit_paths(tmp_path / "heldout"))
    assert len(dataset) == 12 and all(len(sample.chunks) == 3 for sample in dataset)
    assert all(sample.answer in {name for _, name in sample.examples} for sample in dataset)


@pytest.mark.slow
def test_bundled_task_is_the_default_build(tmp_path):
    fresh = make_toy_icl_dataset(tmp_path)
    for split in ("train", "heldout"):
        files = mimicit_paths(BUNDLED / split)
        for key in ("instructions", "train_config"):
            assert files[f"{key}_path"].read_bytes() == fresh[f"{split}_{key}"].read_bytes()


def test_bundled_data_mixes_its_tasks_and_holds_each_out():
    mixture, heldout = bundled_data("toy-mixture", seed=0)
    assert list(heldout) == ["vqa", "icl"] and set(TASKS) == {"vqa", "icl", "video"}
    draws = Counter(mixture.components.tolist())
    assert len(mixture) == sum(len(d) for d in mixture.datasets) and set(draws) == {0, 1}
    vqa_share = len(mixture.datasets[0]) / len(mixture)  # each task drawn as often as its size
    assert abs(draws[0] / len(mixture) - vqa_share) < 0.02, (draws, vqa_share)
    assert all(len(dataset) == 200 for dataset in heldout.values())
    assert tuple(TASKS_OF) == BUNDLED_DATA, "otter-train --help (otter.defaults) names the same sets"
    assert list(bundled_data("toy")[1]) == ["vqa"] and list(bundled_data("toy-icl")[1]) == ["icl"]
    with pytest.raises(ValueError, match="unknown bundled data 'toys'; expected one of toy, toy-icl, toy-mixture"):
        bundled_data("toys")


def test_video_data_trains_the_video_model_unless_told_otherwise():
    from otter.train import parse_args

    assert parse_args(["--data", "toy-video"]).model == "tiny-otter-video"
    assert parse_args([]).model == "tiny-otter" and parse_args(["--data", "toy-video", "--model", "x"]).model == "x"


@pytest.mark.slow
def test_experiment_script_probes_names_and_answer_positions():
    """scripts/experiment_icl.py (the README's in-context experiments) on 2 steps: the probe names every answer
    position (5 letters, <|endofchunk|>, and the colour word with --colour-word)."""
    command = [sys.executable, "scripts/experiment_icl.py", "--steps", "2", "--probe-every", "2", "--batch-size", "4",
               "--letters", "distinct", "--query", "same", "--colour-word", "--supervise", "queries", "--vqa-share", "0.5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = re.search(r"step 2: held-out names ([\d.]+), per position ((?:[\d.]+ ?)+) copying ([\d.]+) vqa ([\d.]+)",
                      result.stdout)
    assert probe is not None, result.stdout
    assert 0 <= float(probe[1]) <= 1 and len(probe[2].split()) == 7 and all(0 <= float(p) <= 1 for p in probe.groups()[2:])
    assert "final, 100 held-out episodes: {'with_examples':" in result.stdout


def test_experiment_script_draws_different_episodes():
    import argparse
    import random

    sys.path.insert(0, str(ROOT / "scripts"))
    from experiment_icl import Episodes

    args = argparse.Namespace(examples=2, colour_word=False, question="What is it called?", query="colour")
    draw = Episodes(args, random.Random(0))
    drawn = [draw(["badak", "tefol", "nisub", "gopul"], 1) for _ in range(8)]
    assert len({tuple(e.chunks) for e in drawn}) > 1
    assert all(e.chunks[-1][1] in [answer for _, answer in e.chunks[:-1]] for e in drawn)
