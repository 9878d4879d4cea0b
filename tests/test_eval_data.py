"""flamingo.eval's readers and demonstration selection: formats, errors that name the file, skipped images,
random and RICES demonstrations; and the toy evaluation data of `otter-prepare-data toy-eval`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flamingo.eval.demos import RandomDemos, RicesDemos
from flamingo.eval.tasks import TaskDataError, load_task
from otter.data.toy_eval import make_toy_eval_data
from otter.prepare_data import main as prepare_main


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    return make_toy_eval_data(tmp_path_factory.mktemp("toy-eval"), num_train=12, num_test=8)


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


# --- the toy data and the readers -------------------------------------------------------------------------------


def test_toy_eval_data_is_in_the_real_formats(toy):
    folder = toy["vqa"].parent
    karpathy = json.loads((folder / "dataset_toy_captions.json").read_text())
    assert {entry["split"] for entry in karpathy["images"]} == {"train", "test"}
    assert all(len(entry["sentences"]) == 5 for entry in karpathy["images"])
    annotations = json.loads((folder / "vqa_val_annotations.json").read_text())["annotations"]
    assert all(len(a["answers"]) == 10 for a in annotations)
    captions, vqa = load_task(toy["captions"]), load_task(toy["vqa"])
    assert (len(captions.train), len(captions.test), len(vqa.train), len(vqa.test)) == (12, 8, 12, 8)
    assert captions.kind == "captioning" and vqa.kind == "vqa"
    assert all(item.image.is_file() for item in captions.test + vqa.test)
    assert len(vqa.test[0].references) == 10 and vqa.test[0].fields["question"].endswith("?")


def test_prepare_data_toy_eval_command(tmp_path, capsys):
    prepare_main(["toy-eval", str(tmp_path / "out"), "--num-train", "8", "--num-test", "4"])
    assert "toy_vqa.json" in capsys.readouterr().out
    assert len(load_task(tmp_path / "out" / "toy_vqa.json").test) == 4


def test_builtin_layouts(tmp_path):
    """The built-in tasks read the files the datasets publish, under --data-dir."""
    image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg")
    image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000007.jpg")
    write(
        tmp_path / "coco" / "dataset_coco.json",
        {
            "images": [
                {
                    "filepath": "val2014",
                    "filename": "COCO_val2014_000000000042.jpg",
                    "split": "test",
                    "cocoid": 42,
                    "sentences": [{"raw": "A cat."}, {"raw": "a cat on a mat "}],
                },
                {
                    "filepath": "train2014",
                    "filename": "COCO_train2014_000000000007.jpg",
                    "split": "train",
                    "cocoid": 7,
                    "sentences": [{"raw": "A dog."}],
                },
                {
                    "filepath": "val2014",
                    "filename": "unused.jpg",
                    "split": "restval",
                    "cocoid": 8,
                    "sentences": [{"raw": "x"}],
                },
            ]
        },
    )
    coco = load_task("coco", tmp_path / "coco")
    assert [e.id for e in coco.test] == [42] and coco.test[0].references == ("A cat.", "a cat on a mat")
    assert [e.answer for e in coco.train] == ["A dog."]

    root = tmp_path / "vqav2"
    for split, image_id in (("train", 7), ("val", 42)):
        image(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg")
        write(
            root / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
            {"questions": [{"image_id": image_id, "question": "What?", "question_id": image_id * 10}]},
        )
        write(
            root / f"v2_mscoco_{split}2014_annotations.json",
            {"annotations": [{"question_id": image_id * 10, "answers": [{"answer": "yes"}] * 10}]},
        )
    vqa = load_task("vqav2", root)
    assert [e.id for e in vqa.test] == [420] and vqa.test[0].image.name == "COCO_val2014_000000000042.jpg"

    for split in ("train", "val"):
        for name in ("n01", "n02"):
            image(tmp_path / "imagenet" / split / name / "a.JPEG")
    write(tmp_path / "imagenet" / "classnames.txt", "tench\ngoldfish\n")
    imagenet = load_task("imagenet", tmp_path / "imagenet")
    assert imagenet.class_names == ["tench", "goldfish"] and [e.label for e in imagenet.test] == [0, 1]

    image(tmp_path / "hm" / "img" / "01.png")
    write(tmp_path / "hm" / "train.jsonl", '{"id": 1, "img": "img/01.png", "label": 1, "text": "hi"}\n')
    write(tmp_path / "hm" / "dev.jsonl", '{"id": 2, "img": "img/01.png", "label": 0, "text": "yo"}\n')
    memes = load_task("hateful_memes", tmp_path / "hm")
    assert memes.test[0].fields == {"ocr": "yo"} and memes.test[0].label == 0 and memes.metric == "ROC AUC"


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("vqa_val_questions.json", None, r"vqa_val_questions\.json: no such file; expected VQAv2-format questions"),
        ("vqa_val_questions.json", "{not json", r"vqa_val_questions\.json: not valid JSON .*expected VQAv2-format"),
        ("vqa_val_questions.json", {"qs": []}, r"vqa_val_questions\.json: no \"questions\" list"),
        (
            "vqa_val_annotations.json",
            {"annotations": [{"question_id": 1}]},
            r"vqa_val_annotations\.json: annotations\[0\] lacks 'answers'",
        ),
        (
            "dataset_toy_captions.json",
            {"images": [{"filename": "x.png"}]},
            r"dataset_toy_captions\.json: images\[0\] lacks 'split'.*Karpathy",
        ),
    ],
)
def test_missing_or_malformed_files_are_named(toy, tmp_path, filename, content, expected):
    folder = tmp_path / "data"
    folder.mkdir()
    for path in toy["vqa"].parent.glob("*.json"):
        (folder / path.name).write_text(path.read_text())
    target = folder / filename
    if content is None:
        target.unlink()
    else:
        write(target, content)
    task = "toy_captions.json" if filename.startswith("dataset") else "toy_vqa.json"
    with pytest.raises(TaskDataError, match=expected):
        load_task(folder / task, data_dir=folder)


def test_malformed_task_file_and_jsonl_are_named(tmp_path):
    with pytest.raises(TaskDataError, match="neither a built-in task"):
        load_task(tmp_path / "nope.json")
    with pytest.raises(TaskDataError, match=r"t\.json: unknown key\(s\) \['annotation'\]"):
        load_task(write(tmp_path / "t.json", {"format": "karpathy", "annotation": "x.json"}))
    with pytest.raises(TaskDataError, match="reads its files from --data-dir"):
        load_task("coco")
    write(tmp_path / "hm" / "train.jsonl", '{"id": 1, "img": "a.png"}\n')
    with pytest.raises(TaskDataError, match=r"train\.jsonl: line 1 is not a meme .*Hateful Memes JSON lines"):
        load_task("hateful_memes", tmp_path / "hm")


def test_missing_images_are_left_out_and_counted(toy, tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    for path in toy["vqa"].parent.glob("*.json"):
        (folder / path.name).write_text(path.read_text())
    for path in (toy["vqa"].parent / "images").glob("vqa_*"):
        (folder / "images" / path.name).write_bytes(path.read_bytes())
    (folder / "images" / "vqa_val_00003.png").unlink()
    task = load_task(folder / "toy_vqa.json")
    assert len(task.test) == 7 and task.skipped == {"missing_image": 1}


# --- demonstrations ---------------------------------------------------------------------------------------------


def test_random_demos_reproducible_per_seed_different_across_trials_never_the_query(toy):
    task = load_task(toy["vqa"])
    pool = task.train
    queries = list(enumerate(pool))  # the queries are pool items: each must never get itself
    first, again = RandomDemos(pool).select(queries, 4, seed=42), RandomDemos(pool).select(queries, 4, seed=42)
    other_trial = RandomDemos(pool).select(queries, 4, seed=43)
    assert first == again
    assert first != other_trial
    for (index, _), chosen, chosen_later in zip(queries, first, other_trial):
        assert index not in chosen and index not in chosen_later and len(set(chosen)) == 4
    with pytest.raises(ValueError, match="only 11 other items"):
        RandomDemos(pool).select(queries[:1], 12, seed=0)


class ColourEncoder:
    """Embeds an image (one colour) as its colour: constructed embeddings whose neighbours the test knows."""

    key = "mean-colour"

    def __init__(self):
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return torch.tensor([im.getpixel((0, 0)) for im in images], dtype=torch.float32)


def test_rices_returns_the_true_nearest_neighbours_most_similar_last_and_reuses_its_cache(tmp_path):
    from flamingo.eval.tasks import Example

    generator = torch.Generator().manual_seed(0)
    colours = (torch.rand(20, 3, generator=generator) * 255).round().int().tolist()
    pool = [Example(i, image(tmp_path / f"p{i}.png", tuple(c)), "x") for i, c in enumerate(colours)]
    queries = [(0, Example("q", image(tmp_path / "q.png", (250, 10, 10)), "x")), (1, pool[5])]

    encoder = ColourEncoder()
    rices = RicesDemos(pool, encoder, cache_dir=tmp_path / "cache", batch_size=8, progress=False)
    chosen = rices.select(queries, 3, seed=0)

    vectors = torch.nn.functional.normalize(torch.tensor(colours, dtype=torch.float32), dim=1)
    for (_, query), row in zip(queries, chosen):
        q = torch.nn.functional.normalize(
            torch.tensor(Image.open(query.image).getpixel((0, 0)), dtype=torch.float32), dim=0
        )
        similarity = vectors @ q
        if query in pool:
            similarity[pool.index(query)] = -2  # never the query itself
        expected = similarity.argsort(descending=True)[:3].tolist()
        assert row == expected[::-1]  # the most similar last
    assert 5 not in chosen[1]

    cache_files = list((tmp_path / "cache").glob("rices-*.pt"))
    assert len(cache_files) == 1
    reused = ColourEncoder()
    assert RicesDemos(pool, reused, cache_dir=tmp_path / "cache", progress=False).select(queries, 3, 0) == chosen
    assert reused.calls == 1  # the two queries only; the pool came from the cache
    other = ColourEncoder()
    other.key = "another-encoder"
    RicesDemos(pool, other, cache_dir=tmp_path / "cache", progress=False)
    assert other.calls > 0 and len(list((tmp_path / "cache").glob("rices-*.pt"))) == 2


def test_rices_never_retrieves_an_unreadable_pool_image(tmp_path):
    from flamingo.eval.tasks import Example

    pool = [Example(i, image(tmp_path / f"p{i}.png", (10 * i, 100, 100)), "x") for i in range(4)]
    (tmp_path / "p2.png").write_bytes(b"not a png")
    rices = RicesDemos(pool, ColourEncoder(), progress=False)
    chosen = rices.select([(0, Example("q", image(tmp_path / "q.png", (20, 100, 100)), "x"))], 3, seed=0)
    assert 2 not in chosen[0]
