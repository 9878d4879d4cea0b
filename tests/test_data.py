"""Training data: MIMIC-IT and OFA TSV readers with their bad rows, Otter prompts, label masking, truncation, mixtures,
the bundled toy dataset and `otter-prepare-data`. Fixtures are written by the tests; images are drawn shapes."""

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_OTTER_DIR

from otter.data.collate import FREE_TOKENS, IGNORE_INDEX, OtterCollator, UsableSamples, build_labels
from otter.data.mimicit import MimicItDataset, mimicit_paths
from otter.data.mixture import TaskBatches, WeightedMixture, load_mixture
from otter.data.multi_instruct import MultiInstructDataset
from otter.data.samples import BadImageError, EncodedImage, InstructionSample
from otter.data.shapes import BACKGROUND, COLOURS, draw_shape
from otter.data.toy import ANSWERS, BUNDLED, NUM_TRAIN, QUESTION_TYPES, QUESTIONS, make_toy_dataset, toy_dataset_paths
from otter.prepare_data import main as prepare_main
from otter.processing_otter import OtterProcessor

BOS, EOC, IMAGE, ANSWER, PAD = 1, 591, 592, 593, 594


@pytest.fixture(scope="module")
def processor():
    return OtterProcessor.from_pretrained(TINY_OTTER_DIR)


def png(colour: str = "red", shape: str = "circle") -> bytes:
    buffer = io.BytesIO()
    draw_shape(shape, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")


def pixels(image: Image.Image) -> list:
    return list(image.convert("RGB").tobytes())


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def row(instruction, answer, *image_ids, rel=()):
    return {"instruction": instruction, "answer": answer, "image_ids": list(image_ids), "rel_ins_ids": list(rel)}


@pytest.fixture
def mimicit(tmp_path):
    """A MIMIC-IT dataset with good rows, one of each bad kind, and images that only fail when decoded."""
    data = {
        "Q1": row("What colour is the shape?", "red", "IMG_RED", rel=["Q2", "Q3"]),
        "Q2": row("What colour is the shape?", "blue", "IMG_BLUE", rel=["Q1"]),
        "Q3": row("What colour is the shape?", "green", "IMG_GREEN"),
        "Q4": row("What colour is the shape?", "red", "IMG_RED", rel=["Q1", "NO_SUCH_ID", "EMPTY_ANSWER", "Q4"]),
        "MISSING_IMAGE": row("What colour is the shape?", "red", "IMG_NONE"),
        "EMPTY_ANSWER": row("What colour is the shape?", "  ", "IMG_RED"),
        "EMPTY_INSTRUCTION": row("", "red", "IMG_RED"),
        "NO_IMAGE": row("What colour is the shape?", "red"),
        "TWO_IMAGES": row("What changed?", "nothing", "IMG_RED", "IMG_BLUE"),
        "BROKEN_BASE64": row("What colour is the shape?", "red", "IMG_BROKEN"),
        "NOT_AN_IMAGE": row("What colour is the shape?", "red", "IMG_TEXT"),
    }
    images = {
        "IMG_RED": b64(png("red")),
        "IMG_BLUE": b64(png("blue")),
        "IMG_GREEN": b64(png("green")),
        "IMG_BROKEN": "abc",
        "IMG_TEXT": b64(b"this is not an image"),
    }
    return {
        "instructions_path": write_json(tmp_path / "instructions.json", {"meta": {"version": "test"}, "data": data}),
        "images_path": write_json(tmp_path / "images.json", images),
    }


# --- MIMIC-IT --------------------------------------------------------------------------------------------------


def test_mimicit_skips_and_counts_bad_rows_and_in_context_references(mimicit):
    dataset = MimicItDataset(**mimicit)
    assert [sample.sample_id for sample in dataset] == ["Q1", "Q2", "Q3", "Q4", "BROKEN_BASE64", "NOT_AN_IMAGE"]
    assert dataset.bad_rows == Counter(
        missing_image=1,
        empty_answer=1,
        empty_instruction=1,
        no_image=1,
        multiple_images=1,
        in_context_unknown_instruction_id=1,
        in_context_empty_answer=1,
        in_context_self_reference=1,
    )
    assert "6 samples" in dataset.summary()


def test_mimicit_sample_is_in_context_chunks_then_query_with_lazy_images(mimicit):
    sample = MimicItDataset(**mimicit)[0]
    assert sample.chunks == [
        ("What colour is the shape?", "blue"),
        ("What colour is the shape?", "green"),
        ("What colour is the shape?", "red"),
    ]
    assert all(isinstance(image, EncodedImage) for image in sample.images), "images must stay encoded until collate"
    assert [pixels(image) for image in sample.load_images()] == [
        pixels(draw_shape("circle", c)) for c in ("blue", "green", "red")
    ]


def test_mimicit_train_config_selects_queries_and_their_examples(mimicit, tmp_path):
    config = write_json(tmp_path / "train.json", {"Q3": ["Q2", "Q1"], "NO_SUCH_ID": [], "EMPTY_ANSWER": ["Q1"]})
    dataset = MimicItDataset(**mimicit, train_config_path=config)
    assert [sample.sample_id for sample in dataset] == ["Q3"]
    assert [answer for _, answer in dataset[0].chunks] == ["blue", "red", "green"]
    assert dataset.bad_rows == Counter(unknown_instruction_id=1, empty_answer=1)


def test_mimicit_num_in_context_is_a_seeded_subset_in_order(mimicit, tmp_path):
    config = write_json(tmp_path / "train.json", {"Q4": ["Q1", "Q2", "Q3"]})

    def example_answers(**kwargs):
        return [answer for _, answer in MimicItDataset(**mimicit, train_config_path=config, **kwargs)[0].examples]

    chosen = {seed: example_answers(num_in_context=2, seed=seed) for seed in range(8)}
    assert all(answers in (["red", "blue"], ["red", "green"], ["blue", "green"]) for answers in chosen.values())
    assert len({tuple(answers) for answers in chosen.values()}) > 1, "the seed must change the choice"
    assert example_answers(num_in_context=2, seed=3) == chosen[3]
    assert example_answers(num_in_context=0) == []
    assert example_answers() == ["red", "blue", "green"]


def test_mimicit_max_examples(mimicit):
    assert [sample.sample_id for sample in MimicItDataset(**mimicit, max_examples=2)] == ["Q1", "Q2"]


def test_mimicit_without_usable_rows_is_an_error(tmp_path):
    paths = {
        "instructions_path": write_json(tmp_path / "i.json", {"data": {"A": row("Q?", "", "IMG")}}),
        "images_path": write_json(tmp_path / "m.json", {"IMG": b64(png())}),
    }
    with pytest.raises(ValueError, match="no usable rows.*empty_answer: 1"):
        MimicItDataset(**paths)


def test_mimicit_parquet_images(mimicit, tmp_path):
    try:
        import pandas
    except ImportError:
        with pytest.raises(ImportError, match="needs pandas and pyarrow"):
            MimicItDataset(mimicit["instructions_path"], tmp_path / "images.parquet")
        return
    pytest.importorskip("pyarrow")
    pandas.DataFrame({"base64": [b64(png("red"))]}, index=["IMG_RED"]).to_parquet(tmp_path / "images.parquet")
    dataset = MimicItDataset(mimicit["instructions_path"], tmp_path / "images.parquet")
    assert pixels(dataset[0].load_images()[-1]) == pixels(draw_shape("circle", "red"))


# --- OFA multi_instruct TSV ------------------------------------------------------------------------------------


def tsv_line(uniq_id, image, caption="", question="", refs="", dataset="vqav2", kind="qa"):
    return "\t".join([uniq_id, image, caption, question, refs, "", dataset, kind])


@pytest.fixture
def tsv(tmp_path):
    red = b64(png("red"), urlsafe=True)
    lines = [
        tsv_line("cap", red, caption="a red circle on grey", kind="caption"),
        tsv_line("qa", red, question="what colour is it?", refs="0.3|!+pink&&0.9|!+red&&0.5|!+orange"),
        tsv_line("gqa", red, question="is#the#circle#red?", refs="1.0|!+yes#it#is", dataset="gqa"),
        tsv_line("broken", "abc", question="what colour is it?", refs="1.0|!+red"),
        "",
        "short\trow\twith\tseven\tcolumns\tonly\there",
        tsv_line("ground", red, kind="grounding"),
        tsv_line("refs", red, question="what colour?", refs="red"),
        tsv_line("noanswer", red, question="what colour?", refs="1.0|!+ "),
        tsv_line("noimage", "", question="what colour?", refs="1.0|!+red"),
        tsv_line("noquestion", red, question=" ", refs="1.0|!+red"),
    ]
    path = tmp_path / "data.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_multi_instruct_rows_become_otter_questions(tsv):
    dataset = MultiInstructDataset(tsv)
    assert {sample.sample_id: sample.chunks for sample in dataset} == {
        "cap": [("what does the image describe?", "a red circle on grey")],
        "qa": [("what colour is it?", "red")],
        "gqa": [("is the circle red?", "yes it is")],
        "broken": [("what colour is it?", "red")],
    }
    assert pixels(dataset[0].load_images()[0]) == pixels(draw_shape("circle", "red"))


def test_multi_instruct_counts_bad_rows(tsv):
    dataset = MultiInstructDataset(tsv)
    assert dataset.bad_rows == Counter(
        malformed_row=1, unsupported_type=1, bad_refs=1, empty_answer=1, missing_image=1, empty_instruction=1
    )
    with pytest.raises(BadImageError, match="base64") as error:
        dataset[3].load_images()
    assert error.value.reason == "bad_base64"


def test_multi_instruct_max_examples(tsv):
    assert len(MultiInstructDataset(tsv, max_examples=2)) == 2


# --- prompts and labels ----------------------------------------------------------------------------------------

ONE_SHOT = InstructionSample(
    "one-shot",
    [("What colour is the shape?", "red"), ("What shape is it?", "circle")],
    [draw_shape("square", "red"), draw_shape("circle", "blue")],
)
# <s> <image> User : What colour is the shape ? GPT : <answer> red <eoc> <image> User : What shape is it ? GPT : <answer> circle <eoc>
ONE_SHOT_IDS = [
    BOS,
    IMAGE,
    335,
    270,
    390,
    396,
    316,
    314,
    460,
    271,
    334,
    270,
    ANSWER,
    444,
    EOC,
    IMAGE,
    335,
    270,
    390,
    460,
    316,
    567,
    271,
    334,
    270,
    ANSWER,
    382,
    EOC,
]
ONE_SHOT_LABELS = [IGNORE_INDEX] * 13 + [444, EOC] + [IGNORE_INDEX] * 11 + [382, EOC]


def test_training_text_is_the_chat_template_with_assistant_turns(processor):
    conversation = []
    for question, answer in ONE_SHOT.chunks:
        conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    assert ONE_SHOT.training_text() == processor.apply_chat_template(conversation, tokenize=False)
    assert ONE_SHOT.training_text() == ONE_SHOT.prompt() + " circle<|endofchunk|>"


def test_labels_supervise_exactly_the_answers_and_their_endofchunk(processor):
    input_ids = processor.tokenizer([ONE_SHOT.training_text()], return_tensors="pt")["input_ids"]
    assert input_ids[0].tolist() == ONE_SHOT_IDS
    assert build_labels(input_ids, processor)[0].tolist() == ONE_SHOT_LABELS


def test_collator_batch_pads_right_and_masks_padding(processor):
    zero_shot = InstructionSample("zero-shot", [("What shape is it?", "circle")], [draw_shape("circle", "blue")])
    batch = collate(processor, [ONE_SHOT, zero_shot])
    padding = len(ONE_SHOT_IDS) - 14
    assert batch["input_ids"][0].tolist() == ONE_SHOT_IDS
    assert batch["input_ids"][1].tolist() == [BOS, *ONE_SHOT_IDS[15:], *[PAD] * padding]
    assert batch["attention_mask"][1].tolist() == [1] * 14 + [0] * padding
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 12 + [382, EOC] + [IGNORE_INDEX] * padding
    assert batch["vision_x"].shape == (2, 2, 1, 3, 32, 32)
    assert batch["vision_x"][1, 1].abs().sum() == 0, "a row with fewer images is zero-padded"
    assert torch.equal(batch["vision_x"][1, 0], batch["vision_x"][0, 1])


def test_unfinished_answer_is_not_supervised(processor):
    input_ids = processor.tokenizer([ONE_SHOT.prompt()], return_tensors="pt")["input_ids"]
    assert build_labels(input_ids, processor)[0].tolist() == ONE_SHOT_LABELS[: len(ONE_SHOT_IDS) - 2]


# --- truncation and collate-time failures ----------------------------------------------------------------------


def three_shot() -> InstructionSample:
    colours = ["red", "green", "blue", "yellow"]
    return InstructionSample(
        "three-shot", [("What colour is the shape?", c) for c in colours], [draw_shape("square", c) for c in colours]
    )


def collate(processor, samples, max_length=512):
    usable = UsableSamples(samples, processor, max_length=max_length)
    return OtterCollator(processor)([usable[i] for i in range(len(samples))])


def test_truncation_drops_whole_chunks_from_the_front(processor):
    full = collate(processor, [three_shot()])
    chunk = 14  # tokens per chunk: <image> User : What colour is the shape ? GPT : <answer> colour <eoc>
    assert full["input_ids"].shape[1] == 1 + 4 * chunk
    usable = UsableSamples([three_shot()], processor, max_length=1 + 2 * chunk + 5)
    batch = OtterCollator(processor)([usable[0]])
    ids = batch["input_ids"][0]
    assert ids.tolist() == [BOS, *full["input_ids"][0, 1 + 2 * chunk :].tolist()], "query and the last example kept"
    assert (ids == IMAGE).sum() == batch["vision_x"].shape[1] == 2
    assert torch.equal(batch["vision_x"][0], full["vision_x"][0, 2:]), "each <image> keeps its own image"
    assert batch["labels"][0].tolist().count(EOC) == 2
    assert usable.shortened == 1 and not usable.dropped


def test_a_sample_that_is_too_long_is_replaced_by_the_next_usable_one(processor):
    long_query = InstructionSample("long", [("What colour is the shape? " * 20, "red")], [draw_shape("circle", "red")])
    usable = UsableSamples([long_query, ONE_SHOT], processor, max_length=40)
    assert usable[0].sample_id == ONE_SHOT.sample_id and usable[1].sample_id == ONE_SHOT.sample_id
    assert usable.dropped == Counter(too_long=1)
    assert "1 samples set aside" in usable.summary()


@pytest.mark.parametrize("text", [
    "", "1", " 12 ", "<image><image><|endofchunk|>", "<image>1<answer>2<|endofchunk|>", "é ü 漢字 🦦", "\n\t  x",
    three_shot().training_text(), ONE_SHOT.training_text()])
def test_the_byte_count_shortcut_never_lets_a_too_long_text_through(processor, text):
    """UsableSamples.fits skips tokenizing texts short in bytes: it must agree with the tokenizer at every limit."""
    tokens = len(processor.tokenizer(text)["input_ids"])
    assert tokens <= len(text.encode()) + FREE_TOKENS
    for max_length in range(max(1, tokens - 2), tokens + 3):
        assert UsableSamples([ONE_SHOT], processor, max_length=max_length).fits(text) == (tokens <= max_length)


def test_no_usable_sample_is_an_error_not_an_endless_loop(processor):
    usable = UsableSamples([three_shot(), ONE_SHOT], processor, max_length=10)
    with pytest.raises(ValueError, match=r"no sample of the 2 in the training set is usable \(too_long: 2; max_length 10\)"):
        usable[1]


def test_undecodable_images_are_set_aside_when_read_and_counted(processor, mimicit):
    dataset = MimicItDataset(**mimicit)
    usable = UsableSamples([dataset[4], dataset[5], dataset[0]], processor)
    assert usable[0].sample_id == dataset[0].sample_id, "samples 4 and 5 are skipped over"
    assert usable.dropped == Counter(bad_base64=1, unreadable_image=1)
    with pytest.raises(ValueError, match="no sample of the 1 in the training set is usable"):
        UsableSamples([dataset[4]], processor)[0]


# --- mixtures --------------------------------------------------------------------------------------------------


class Numbers(torch.utils.data.Dataset):
    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return (self.name, index)


def test_mixture_samples_components_by_weight_deterministically():
    parts = [Numbers("a", 50), Numbers("b", 10)]

    def draws(seed):
        mixture = WeightedMixture(parts, [3, 1], length=4000, seed=seed)
        return [mixture[i] for i in range(len(mixture))]

    drawn = draws(seed=1)
    assert len(drawn) == 4000
    assert abs(sum(name == "a" for name, _ in drawn) / len(drawn) - 0.75) < 0.03
    b_items = Counter(index for name, index in drawn if name == "b")
    assert set(b_items) == set(range(10)) and max(b_items.values()) - min(b_items.values()) <= 1, "used in even passes"
    assert drawn == draws(seed=1)
    assert drawn != draws(seed=2)


def test_mixture_default_weights_are_sizes_and_num_samples_caps():
    mixture = WeightedMixture([Numbers("a", 300), Numbers("b", 100)], [None, None], num_samples=[-1, 20], seed=0)
    drawn = [mixture[i] for i in range(len(mixture))]
    assert len(mixture) == 320
    assert len({index for name, index in drawn if name == "b"}) <= 20
    assert abs(sum(name == "b" for name, _ in drawn) / len(drawn) - 20 / 320) < 0.04


def test_task_batches_take_each_batch_from_one_component_and_use_every_sample_once():
    mixture = WeightedMixture([Numbers("a", 300), Numbers("b", 45), Numbers("c", 13)], [None] * 3, seed=0)
    draws = torch.bincount(mixture.components).tolist()  # about the sizes: each index's component is drawn
    sampler = TaskBatches(mixture, batch_size=8, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(mixture)))  # nothing dropped, nothing twice
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    names = [{mixture[i][0] for i in batch} for batch in batches[:-1]]
    # Whole batches of one component, then the remainders (each under 8) in mixed batches, the partial one last,
    # which a drop_last loader drops.
    assert sum(len(n) == 1 for n in names) == sum(count // 8 for count in draws)
    assert len(names) - sum(len(n) == 1 for n in names) == sum(count % 8 for count in draws) // 8
    assert all(len(batch) == 8 for batch in batches[:-1]) and len(batches[-1]) == (len(mixture) - 1) % 8 + 1
    assert list(sampler) == order  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(mixture)))


def test_task_batches_feed_a_loader_one_task_per_batch():
    mixture = WeightedMixture([Numbers("a", 48), Numbers("b", 32)], [None, None], seed=3)
    loader = torch.utils.data.DataLoader(mixture, batch_size=8, sampler=TaskBatches(mixture, 8, seed=3),
                                         collate_fn=lambda rows: {name for name, _ in rows}, drop_last=True)
    single = [names for names in loader if len(names) == 1]
    assert len(single) == sum(count // 8 for count in torch.bincount(mixture.components).tolist()) >= 8


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_load_mixture_reads_both_formats_with_relative_paths(mimicit, tsv, tmp_path, suffix):
    spec = {
        "seed": 3,
        "length": 200,
        "datasets": [
            {
                "type": "mimicit",
                "instructions_path": mimicit["instructions_path"].name,
                "images_path": mimicit["images_path"].name,
                "weight": 1,
                "num_in_context": 1,
            },
            {"type": "multi_instruct", "tsv_path": tsv.name, "weight": 3},
        ],
    }
    path = tmp_path / f"mixture{suffix}"
    if suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    else:
        write_json(path, spec)
    mixture = load_mixture(path)
    samples = [mixture[i] for i in range(len(mixture))]
    assert len(samples) == 200
    from_tsv = sum(sample.sample_id in ("cap", "qa", "gqa", "broken") for sample in samples)
    assert 0.65 < from_tsv / 200 < 0.85
    assert max(len(sample.examples) for sample in samples) == 1, "dataset options reach the component"
    assert mixture.bad_rows == MimicItDataset(**mimicit).bad_rows + MultiInstructDataset(tsv).bad_rows


def test_load_mixture_rejects_unknown_types(tmp_path):
    with pytest.raises(ValueError, match="'webdataset' is not one of"):
        load_mixture(write_json(tmp_path / "m.json", [{"type": "webdataset", "path": "x"}]))


# --- the toy dataset -------------------------------------------------------------------------------------------


def small_toy(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    return make_toy_dataset(out_dir, seed=seed, num_train=48, num_heldout=16)


def test_toy_dataset_is_deterministic(tmp_path):
    first, second, other = small_toy(tmp_path / "a"), small_toy(tmp_path / "b"), small_toy(tmp_path / "c", seed=1)
    assert sorted(first) == sorted(
        f"{split}_{kind}" for split in ("train", "heldout") for kind in ("instructions", "images", "train_config")
    )
    assert all(first[key].read_bytes() == second[key].read_bytes() for key in first)
    assert first["train_images"].read_bytes() != other["train_images"].read_bytes()


def test_toy_dataset_splits_and_in_context_examples(tmp_path):
    paths = small_toy(tmp_path)
    splits = {split: json.loads(paths[f"{split}_instructions"].read_text())["data"] for split in ("train", "heldout")}
    assert (len(splits["train"]), len(splits["heldout"])) == (48, 16)
    images = {split: set(json.loads(paths[f"{split}_images"].read_text()).values()) for split in splits}
    assert len(images["train"]) == 48 and len(images["heldout"]) == 16 and not images["train"] & images["heldout"]
    for split, rows in splits.items():
        config = json.loads(paths[f"{split}_train_config"].read_text())
        assert list(config) == list(rows)
        for ins_id, examples in config.items():
            assert len(examples) == 2 and ins_id not in examples and set(examples) <= set(rows)
            assert {rows[e]["instruction"] for e in examples} == {rows[ins_id]["instruction"]}
            assert rows[ins_id]["rel_ins_ids"] == examples, "the instructions file alone gives the same examples"


def test_toy_answers_are_balanced_single_tokens(tmp_path, processor):
    rows = json.loads(small_toy(tmp_path)["train_instructions"].read_text())["data"].values()
    by_type = {kind: Counter() for kind in QUESTIONS}
    for item in rows:
        by_type[QUESTION_TYPES[item["instruction"]]][item["answer"]] += 1
    for kind, counts in by_type.items():
        assert set(counts) <= set(ANSWERS[kind]) and max(counts.values()) - min(counts.values()) <= 1
    for answer in {a for answers in ANSWERS.values() for a in answers}:
        assert len(processor.tokenizer.encode(f" {answer}", add_special_tokens=False)) == 1, answer


def test_toy_pictures_show_their_answer(tmp_path):
    """Spot checks that the answers are in the pixels: the colour is there, the shape is on that side."""
    small_toy(tmp_path)
    for sample in MimicItDataset(**mimicit_paths(tmp_path / "train")):
        image = np.asarray(sample.load_images()[-1])
        kind = QUESTION_TYPES[sample.question]
        if kind == "colour":
            assert (image == COLOURS[sample.answer]).all(-1).any()
        elif kind == "position":
            ys, xs = (image != BACKGROUND).any(-1).nonzero()
            side = {"left": xs.mean() < 12, "right": xs.mean() > 20, "top": ys.mean() < 12, "bottom": ys.mean() > 20}
            assert side[sample.answer]


@pytest.mark.slow
def test_bundled_toy_dataset_is_the_default_build(tmp_path):
    bundled = toy_dataset_paths()
    assert bundled["train"]["instructions_path"].parent == BUNDLED / "train"
    fresh = make_toy_dataset(tmp_path)
    for split, files in bundled.items():
        for key in ("instructions", "train_config"):
            assert files[f"{key}_path"].read_bytes() == fresh[f"{split}_{key}"].read_bytes()
        committed, rebuilt = (json.loads(p.read_text()) for p in (files["images_path"], fresh[f"{split}_images"]))
        assert committed.keys() == rebuilt.keys()
        # PNG bytes may differ with the zlib version; the pictures may not.
        assert all(pixels(EncodedImage(committed[k])()) == pixels(EncodedImage(rebuilt[k])()) for k in committed)
    train = MimicItDataset(**bundled["train"])
    assert len(train) == NUM_TRAIN and len(MimicItDataset(**bundled["heldout"])) == 200


def test_toy_dataset_paths_builds_missing_files(tmp_path, monkeypatch):
    from otter.data import toy

    monkeypatch.setattr(toy, "make_toy_dataset", lambda root: small_toy(Path(root)))
    paths = toy_dataset_paths(tmp_path / "cache")
    assert all(path.is_file() for files in paths.values() for path in files.values())
    assert len(MimicItDataset(**paths["heldout"])) == 16


# --- otter-prepare-data ----------------------------------------------------------------------------------------


def test_prepare_folder_and_jsonl(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "red.png").write_bytes(png("red"))
    (photos / "blue.png").write_bytes(png("blue", "square"))
    (photos / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": "red.png", "instruction": "What colour?", "answer": "red"},
        {"id": "b", "image": "blue.png", "instruction": "What shape?", "answer": "a square", "in_context": [1, "x"]},
        {"image": "missing.png", "instruction": "What colour?", "answer": "red"},
        {"image": "red.png", "instruction": "What colour?", "answer": ""},
        {"image": "broken.png", "instruction": "What colour?", "answer": "red"},
    ]
    jsonl = tmp_path / "instructions.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n", encoding="utf-8")

    prepare_main(["folder", str(photos), str(jsonl), str(tmp_path / "out")])

    report = capsys.readouterr().out
    assert "usable rows:       2" in report
    assert "bad rows:          5 (" in report
    for reason in (
        "missing_image: 1",
        "empty_answer: 1",
        "unreadable_image: 1",
        "malformed_row: 1",
        "in_context_unknown_id: 1",
    ):
        assert reason in report
    assert "in-context / query: 0.50" in report and "answer words:      1.50 mean, 2 max" in report
    dataset = MimicItDataset(**mimicit_paths(tmp_path / "out"))
    assert dataset[1].chunks == [("What colour?", "red"), ("What shape?", "a square")]
    assert pixels(dataset[1].load_images()[1]) == pixels(draw_shape("square", "blue"))


def test_prepare_tsv(tsv, tmp_path, capsys):
    prepare_main(["tsv", str(tsv), str(tmp_path / "out")])
    report = capsys.readouterr().out
    assert "usable rows:       3" in report and "bad_base64: 1" in report and "malformed_row: 1" in report
    dataset = MimicItDataset(**mimicit_paths(tmp_path / "out"))
    assert [sample.chunks[0] for sample in dataset][1] == ("what colour is it?", "red")
    assert pixels(dataset[0].load_images()[0]) == pixels(draw_shape("circle", "red"))


def test_prepare_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--help"])
    assert exit_info.value.code == 0 and "otter-prepare-data" in capsys.readouterr().out
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no usable rows"):
        prepare_main(["tsv", str(empty), str(tmp_path / "out")])
