"""Bad input to the data readers and `otter-prepare-data`: rows that are not text, malformed ids and lists, mixture
files with wrong entries, files that are not what they claim; and a refused command leaves the disk as it was."""

import base64
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from refusals import tree_hashes

from otter.data.mimicit import MimicItDataset, write_mimicit
from otter.data.mixture import load_mixture
from otter.data.multi_instruct import MultiInstructDataset
from otter.data.prepare import folder_records, validate
from otter.data.shapes import draw_shape
from otter.prepare_data import main as prepare_main

QUESTION = "What colour is the shape?"


def png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    draw_shape("circle", colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(folder: Path, rows: dict, images: dict | None = None, train_config=None) -> dict[str, Path]:
    images = {"IMG": base64.b64encode(png()).decode("ascii")} if images is None else images
    paths = write_mimicit(folder, rows, images, {}, {"version": "test"})
    if train_config is None:
        paths.pop("train_config_path")
    else:
        paths["train_config_path"].write_text(json.dumps(train_config), encoding="utf-8")
    return paths


GOOD = {"instruction": QUESTION, "answer": "red", "image_ids": ["IMG"]}


# ---- answers that are not text -----------------------------------------------------------------------
NOT_TEXT = {
    "NULL_ANSWER": ({"answer": None}, "empty_answer"),
    "MISSING_ANSWER": ({"answer": ...}, "empty_answer"),
    "BLANK_ANSWER": ({"answer": "  "}, "empty_answer"),
    "NUMBER_ANSWER": ({"answer": 3}, "non_text_answer"),
    "LIST_ANSWER": ({"answer": ["red"]}, "non_text_answer"),
    "NULL_INSTRUCTION": ({"instruction": None}, "empty_instruction"),
    "DICT_INSTRUCTION": ({"instruction": {"text": QUESTION}}, "non_text_instruction"),
}


def bad_row(changes: dict) -> dict:
    row = {**GOOD, **changes}
    return {key: value for key, value in row.items() if value is not ...}


def test_rows_that_are_not_text_are_bad_rows_in_the_reader_and_in_validate(tmp_path):
    rows = {"GOOD": GOOD, **{ins_id: bad_row(changes) for ins_id, (changes, _) in NOT_TEXT.items()}}
    paths = write_dataset(tmp_path, rows)
    expected = Counter(reason for _, reason in NOT_TEXT.values())
    dataset = MimicItDataset(**paths)
    assert [sample.sample_id for sample in dataset] == ["GOOD"] and dataset.bad_rows == expected
    assert all("None" not in text for sample in dataset for chunk in sample.chunks for text in chunk)
    statistics = validate(paths)
    assert statistics.rows == 1 and statistics.bad_rows == expected


def test_prepare_folder_counts_the_same_rows_the_same_way(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(png())
    lines = [{**GOOD, "image": "red.png", "id": "GOOD"}]
    lines += [{**bad_row(changes), "image": "red.png", "id": ins_id} for ins_id, (changes, _) in NOT_TEXT.items()]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    bad_rows = Counter()
    records = list(folder_records(tmp_path / "images", jsonl, bad_rows))
    assert [record.ins_id for record in records] == ["GOOD"]
    assert bad_rows == Counter(reason for _, reason in NOT_TEXT.values())


def test_in_context_example_with_a_null_answer_is_dropped_and_counted(tmp_path):
    rows = {"Q": {**GOOD, "rel_ins_ids": ["NULL"]}, "NULL": bad_row({"answer": None})}
    dataset = MimicItDataset(**write_dataset(tmp_path, rows))
    assert [len(sample.chunks) for sample in dataset] == [1]
    assert dataset.bad_rows == Counter({"empty_answer": 1, "in_context_empty_answer": 1})


# ---- malformed ids, lists and files ----------------------------------------------------------------------
def test_malformed_image_ids_and_image_data_are_bad_rows(tmp_path):
    rows = {
        "GOOD": GOOD,
        "IDS_AS_STRING": {**GOOD, "image_ids": "IMG"},  # not one id per character
        "IDS_AS_NUMBERS": {**GOOD, "image_ids": [1]},
        "NULL_IMAGE": {**GOOD, "image_ids": ["NULL_IMG"]},
        "ROW_AS_LIST": ["not", "a", "row"],
    }
    images = {"IMG": base64.b64encode(png()).decode("ascii"), "NULL_IMG": None}
    dataset = MimicItDataset(**write_dataset(tmp_path, rows, images))
    assert len(dataset) == 1
    assert dataset.bad_rows == Counter({"malformed_row": 3, "bad_base64": 1})


@pytest.mark.parametrize("train_config, error", [
    (["Q"], r"train_config.json: expected a JSON object \{query id: \[in-context ids\]\}, got list"),
    ({"GOOD": "OTHER"}, "the train config's entry of instruction 'GOOD' is a str, not a list of ids"),
])
def test_malformed_train_config(tmp_path, train_config, error):
    with pytest.raises(ValueError, match=error):
        MimicItDataset(**write_dataset(tmp_path, {"GOOD": GOOD}, train_config=train_config))


def test_rel_ins_ids_must_be_a_list(tmp_path):
    with pytest.raises(ValueError, match="rel_ins_ids of instruction 'GOOD' is a str, not a list of ids"):
        MimicItDataset(**write_dataset(tmp_path, {"GOOD": {**GOOD, "rel_ins_ids": "Q2"}}))


@pytest.mark.parametrize("content, error", [
    (b"{not json", "instructions.json is not valid JSON"),
    (b"\xff\xfe\x00binary", "instructions.json is not valid JSON"),
    (b"[1, 2]", "instructions.json: expected a JSON object with a 'data' object"),
    (b"", "instructions.json is not valid JSON"),
])
def test_instruction_files_that_are_not_mimicit(tmp_path, content, error):
    paths = write_dataset(tmp_path, {"GOOD": GOOD})
    paths["instructions_path"].write_bytes(content)
    with pytest.raises(ValueError, match=error):
        MimicItDataset(**paths)


def test_images_file_that_is_not_an_object(tmp_path):
    paths = write_dataset(tmp_path, {"GOOD": GOOD})
    paths["images_path"].write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"images.json: expected a JSON object \{image_id: base64\}, got list"):
        MimicItDataset(**paths)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        MimicItDataset(tmp_path / "nope.json", tmp_path / "images.json")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        MultiInstructDataset(tmp_path / "nope.tsv")


def test_tsv_that_is_not_text(tmp_path):
    (tmp_path / "binary.tsv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="binary.tsv is not a UTF-8 text file"):
        MultiInstructDataset(tmp_path / "binary.tsv")
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.tsv: no usable rows"):
        MultiInstructDataset(tmp_path / "empty.tsv")


# ---- mixtures ----------------------------------------------------------------------------------------
@pytest.fixture
def component(tmp_path):
    return write_dataset(tmp_path / "component", {"GOOD": GOOD})


@pytest.mark.parametrize("entry, error", [
    ({"type": "mimicit", "instructions_path": "component/instructions.json"},
     r"dataset entry 1 \(mimicit\): missing a required argument: 'images_path'; mimicit takes instructions_path, images_path"),
    ({"type": "mimicit", "instructions_path": "component/instructions.json", "images_path": "component/images.json",
      "colour": "red"}, r"dataset entry 1 \(mimicit\): got an unexpected keyword argument 'colour'"),
    ({"instructions_path": "component/instructions.json"}, r"dataset entry 1: dataset type None is not one of"),
    ("mimicit", "dataset entry 1 is a str, not a mapping of its settings"),
    ({"type": "mimicit", "weight": "high"}, "dataset entry 1: weight must be a positive number, got 'high'"),
    ({"type": "mimicit", "weight": 0}, "dataset entry 1: weight must be a positive number, got 0"),
    ({"type": "mimicit", "weight": True}, "dataset entry 1: weight must be a positive number, got True"),
    ({"type": "mimicit", "num_samples": "all"}, r"dataset entry 1: num_samples must be an integer \(-1: all\), got 'all'"),
    ({"type": "mimicit", "images_path": 3}, "dataset entry 1: images_path must be a path, got 3"),
])
def test_mixture_entries_are_named_in_errors(tmp_path, component, entry, error):
    spec = write_json_file(tmp_path / "mixture.json", [entry])
    with pytest.raises(ValueError, match=f"mixture.json: {error}"):
        load_mixture(spec)


@pytest.mark.parametrize("spec, error", [
    ({"datasets": [], "length": 3}, "expected a list of datasets"),
    ({}, "expected a list of datasets"),
    ({"datasets": "GOOD"}, "dataset entry 1 is a str"),
    ({"datasets": [{"type": "mimicit", "instructions_path": "component/instructions.json",
                    "images_path": "component/images.json"}], "length": "10"}, "length must be an integer, got '10'"),
    ({"datasets": [{"type": "mimicit", "instructions_path": "component/instructions.json",
                    "images_path": "component/images.json"}], "length": 0}, "a mixture needs a positive length, got 0"),
])
def test_malformed_mixture_files(tmp_path, component, spec, error):
    with pytest.raises(ValueError, match=error):
        load_mixture(write_json_file(tmp_path / "mixture.json", spec))


def write_json_file(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---- otter-prepare-data: refusals leave the disk as it was ----------------------------------------------------
@pytest.fixture
def images_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "red.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png("blue"))  # outside the images folder
    return folder


@pytest.mark.parametrize("line, reason", [
    ({"image": "../secret.png", "instruction": QUESTION, "answer": "blue"}, "image_outside_folder"),
    ({"image": "/etc/hostname", "instruction": QUESTION, "answer": "blue"}, "image_outside_folder"),
    ({"image": "red.png", "instruction": QUESTION, "answer": "red", "in_context": "2"}, "malformed_row"),
    ({"image": "red.png", "instruction": QUESTION, "answer": None}, "empty_answer"),
    ({"image": "nope.png", "instruction": QUESTION, "answer": "red"}, "missing_image"),
    (["red.png", QUESTION, "red"], "malformed_row"),
])
def test_prepare_folder_bad_lines(tmp_path, images_folder, line, reason):
    jsonl = tmp_path / "rows.jsonl"
    good = {"image": "red.png", "instruction": QUESTION, "answer": "red"}
    jsonl.write_text(f"{json.dumps(good)}\n{json.dumps(line)}\n", encoding="utf-8")
    bad_rows = Counter()
    records = list(folder_records(images_folder, jsonl, bad_rows))
    assert len(records) == 1 and bad_rows == Counter({reason: 1})


@pytest.mark.parametrize("existing", [False, True])
def test_prepare_without_usable_rows_writes_nothing(tmp_path, images_folder, existing):
    out = tmp_path / "out"
    if existing:  # an earlier conversion's files stay as they were
        write_dataset(out, {"GOOD": GOOD})
    before = tree_hashes(out)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": "red.png", "instruction": QUESTION, "answer": None}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"no usable rows \(empty_answer: 1\); nothing written to"):
        prepare_main(["folder", str(images_folder), str(jsonl), str(out)])
    assert tree_hashes(out) == before and out.exists() == existing


@pytest.mark.parametrize("argv, error", [
    (["folder", "{tmp}/no-images", "{tmp}/rows.jsonl", "{tmp}/out"], "image folder .*no-images does not exist"),
    (["folder", "{tmp}/images", "{tmp}/no-rows.jsonl", "{tmp}/out"], "no-rows.jsonl"),
    (["folder", "{tmp}/images", "{tmp}/images/red.png", "{tmp}/out"], "red.png is not a UTF-8 text file"),
    (["tsv", "{tmp}/no.tsv", "{tmp}/out"], "no.tsv"),
    (["validate", "{tmp}/out"], "instructions.json"),
])
def test_prepare_refuses_missing_or_wrong_files(tmp_path, images_folder, argv, error):
    (tmp_path / "rows.jsonl").write_text("", encoding="utf-8")
    before = tree_hashes(tmp_path)
    with pytest.raises(SystemExit, match=error):
        prepare_main([arg.format(tmp=tmp_path) for arg in argv])
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, error", [
    ("--image-size", "0", "argument --image-size: must be between 8 and 1024, got 0"),
    ("--image-size", "100000", "argument --image-size: must be between 8 and 1024, got 100000"),
    ("--num-train", "-5", "argument --num-train: must be at least 1, got -5"),
    ("--num-heldout", "many", "argument --num-heldout: expected an integer, got 'many'"),
])
def test_prepare_toy_flags(tmp_path, capsys, flag, value, error):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["toy", str(tmp_path / "toy"), flag, value])
    assert exit_info.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / "toy").exists()
