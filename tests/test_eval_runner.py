"""flamingo.eval's runner and command on tiny models: encoded-once images give what plain generation gives, cached
class ranking equals full-sequence scoring, unreadable images are skipped and counted, the output files, Otter's
prompt format, and 2 gloo processes giving what 1 gives."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from extras import needs_eval_extra, needs_java
from tiny_models import ROOT, TINY_FLAMINGO_DIR, TINY_OTTER_DIR, randomize_gates
from transformers import AutoConfig

from flamingo import FlamingoModel, FlamingoProcessor
from flamingo.eval import evaluate, load_task
from flamingo.eval.cli import main as eval_main
from flamingo.eval.runner import _Runner, build_prompt
from otter import OtterModel, OtterProcessor
from otter.data.toy_eval import make_toy_eval_data


def tiny(model_class=FlamingoModel, folder=TINY_FLAMINGO_DIR, seed=0):
    torch.manual_seed(seed)
    return randomize_gates(model_class(AutoConfig.from_pretrained(folder)).eval(), seed)


@pytest.fixture(scope="module")
def flamingo():
    return tiny(), FlamingoProcessor.from_pretrained(TINY_FLAMINGO_DIR)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_eval_data(tmp_path_factory.mktemp("toy-eval"), num_train=12, num_test=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, flamingo):
    folder = tmp_path_factory.mktemp("tiny-model")
    model, processor = flamingo
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def runner(model, processor, task, num_beams=1, batch_size=4):
    from accelerate import PartialState

    return _Runner(model, processor, task, batch_size, num_beams, 4, 0.0, PartialState(), progress=False)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_images_encoded_once_generate_what_plain_generation_does(flamingo, toy, num_beams):
    model, processor = flamingo
    task = load_task(toy["vqa"])
    prompts = [
        build_prompt(processor, task, i, item, task.train[i : i + 2], with_images=True)
        for i, item in enumerate(task.test[:3])
    ]
    ours = runner(model, processor, task, num_beams)._generate(prompts)

    images = [
        [__import__("flamingo.eval.demos", fromlist=["x"]).open_image(p) for p in prompt.images] for prompt in prompts
    ]
    inputs = processor(text=[p.text for p in prompts], images=images)
    generated = model.generate(
        **inputs,
        max_new_tokens=4,
        num_beams=num_beams,
        do_sample=False,
        length_penalty=0.0 if num_beams > 1 else 1.0,
        pad_token_id=processor.pad_token_id,
    )
    plain = [
        a.split("Question")[0].split("Answer")[0].split("Short")[0].split(", ")[0].strip()
        for a in processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])
    ]
    assert ours == plain
    assert all(p.text.count("<image>") == 3 for p in prompts)


def make_classification_task(toy, tmp_path):
    """Hateful-Memes-format data over the toy pictures: label 1 for the colour questions' pictures."""
    vqa = load_task(toy["vqa"])
    for split, items in (("train", vqa.train), ("dev", vqa.test)):
        lines = [
            json.dumps(
                {"id": f"{split}{i}", "img": str(item.image), "label": int(i % 2 == 0), "text": item.fields["question"]}
            )
            for i, item in enumerate(items)
        ]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return load_task("hateful_memes", tmp_path)


def test_cached_prefix_ranking_equals_full_sequence_scoring(flamingo, toy, tmp_path):
    model, processor = flamingo
    task = make_classification_task(toy, tmp_path)
    task.class_names = ["no", "yes", "a red circle"]  # names of several tokens, too
    run = runner(model, processor, task, batch_size=2)
    prompt = build_prompt(processor, task, 0, task.test[0], task.train[:2], with_images=True)
    best, scores = run._rank(prompt)

    from flamingo.eval.demos import open_image

    expected = []
    for name in task.class_names:
        continuation = run._continuation_ids(prompt, name)
        prefix = processor.tokenizer(prompt.text)["input_ids"]
        ids = torch.tensor([prefix + continuation])
        vision_x = processor(text=prompt.text, images=[open_image(p) for p in prompt.images])["vision_x"]
        logprobs = model(input_ids=ids, vision_x=vision_x).logits[0].log_softmax(-1)
        expected.append(
            sum(logprobs[len(prefix) - 1 + j, t].item() for j, t in enumerate(continuation)) / len(continuation)
        )
    assert scores == pytest.approx(expected, abs=1e-4)
    assert best == task.class_names[max(range(3), key=expected.__getitem__)]


@needs_eval_extra
def test_classification_scores_roc_auc(flamingo, toy, tmp_path):
    model, processor = flamingo
    task = make_classification_task(toy, tmp_path)
    results = evaluate(model, processor, task, shots=[0, 2], trials=1, batch_size=4, limit=4, progress=False)
    summary = results.to_json()
    assert summary["metric"] == "ROC AUC" and 0 <= summary["shots"]["2"]["mean"] <= 100
    record = results.trials[-1].predictions[0]
    assert record["prediction"] in ("no", "yes") and len(record["class_scores"]) == 2 and len(record["demos"]) == 2


def test_an_unreadable_image_is_skipped_and_counted(flamingo, toy, tmp_path):
    model, processor = flamingo
    data = tmp_path / "data"
    shutil.copytree(toy["vqa"].parent, data)
    (data / "images" / "vqa_val_00002.png").write_bytes(b"\x89PNG truncated")
    task = load_task(data / "toy_vqa.json")
    results = evaluate(model, processor, task, shots=[0], trials=1, num_beams=1, batch_size=4, progress=False)
    trial = results.trials[0]
    assert trial.skipped == {"unreadable_image": 1}
    assert [r["question_id"] for r in trial.predictions if r.get("skipped")] == [task.test[2].id]
    assert len(trial.predictions) == 8 and results.to_json()["shots"]["0"]["skipped"] == {"unreadable_image": 1}


@needs_java
@needs_eval_extra
def test_command_writes_results_predictions_and_table(model_dir, toy, tmp_path, capsys):
    out = tmp_path / "out"
    status = eval_main(
        [
            "--model",
            str(model_dir),
            "--task",
            str(toy["vqa"]),
            str(toy["captions"]),
            "--shots",
            "0",
            "2",
            "--trials",
            "2",
            "--batch-size",
            "4",
            "--num-beams",
            "2",
            "--limit",
            "4",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    table = capsys.readouterr().out
    assert "| Task | 0-shot | 2-shot |" in table and "| toy_vqa (VQA accuracy) |" in table and " ± " in table
    results = json.loads((out / "toy_vqa" / "results.json").read_text())
    assert set(results) == {"task", "model", "metric", "shots", "config"}
    assert set(results["shots"]) == {"0", "2"} and len(results["shots"]["2"]["trials"]) == 2
    lines = [
        json.loads(line) for line in (out / "toy_captions" / "predictions-2shot-trial1.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 4 and {"image_id", "prediction", "demos"} <= set(lines[0]) and len(lines[0]["demos"]) == 2
    vqa_lines = (out / "toy_vqa" / "predictions-0shot-trial0.jsonl").read_text().splitlines()
    assert "question_id" in json.loads(vqa_lines[0])


def test_command_errors_name_the_file(model_dir, tmp_path, capsys):
    status = eval_main(["--model", str(model_dir), "--task", "vqav2", "--data-dir", str(tmp_path)])
    assert status == 2
    assert "v2_OpenEnded_mscoco_train2014_questions.json: no such file" in capsys.readouterr().err


def test_otter_uses_its_chat_chunks(toy):
    model, processor = tiny(OtterModel, TINY_OTTER_DIR), OtterProcessor.from_pretrained(TINY_OTTER_DIR)
    task = load_task(toy["vqa"])
    prompt = build_prompt(processor, task, 0, task.test[0], task.train[:2], with_images=True)
    demo = task.train[0]
    assert prompt.text.startswith(
        f"<image>User: {demo.fields['question']} GPT:<answer> {demo.answer}<|endofchunk|><image>User:"
    )
    assert prompt.text.endswith(f"User: {task.test[0].fields['question']} GPT:<answer>")
    results = evaluate(model, processor, task, shots=[2], trials=1, num_beams=1, limit=4, progress=False)
    assert len(results.trials[0].predictions) == 4


def test_flamingo_prompts_are_openflamingos():
    processor = FlamingoProcessor.from_pretrained(TINY_FLAMINGO_DIR)
    assert (
        processor.eval_prompt("vqa", question="Why?", answer="no")
        == "<image>Question:Why? Short answer:no<|endofchunk|>\n"
    )
    assert processor.eval_prompt("vqa", question="Why?") == "<image>Question:Why? Short answer:"
    assert processor.eval_prompt("captioning", answer="A cat.") == "<image>Output:A cat.<|endofchunk|>\n"
    assert processor.eval_prompt("imagenet", answer="tench") == "<image>Output:tench<|endofchunk|>"


def test_zero_shot_uses_two_text_only_demonstrations(flamingo, toy):
    model, processor = flamingo
    task = load_task(toy["vqa"])
    results = evaluate(model, processor, task, shots=[0], trials=1, num_beams=1, limit=2, progress=False)
    assert all(len(r["demos"]) == 2 for r in results.trials[0].predictions)
    prompt = build_prompt(processor, task, 0, task.test[0], task.train[:2], with_images=False)
    assert prompt.text.count("<image>") == 1 and prompt.images == [task.test[0].image]


@pytest.mark.slow
def test_two_gloo_processes_give_what_one_gives(model_dir, toy, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same predictions and scores as a single process. 8 items in batches
    of 3: the shards (4 + 4) batch differently from the single process (3 + 3 + 2)."""
    common = [
        "-m",
        "flamingo.eval",
        "--model",
        str(model_dir),
        "--task",
        str(toy["vqa"]),
        "--shots",
        "0",
        "2",
        "--trials",
        "2",
        "--batch-size",
        "3",
        "--num-beams",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run(
        [sys.executable, *common, "--output-dir", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *common,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert one["shots"] == two["shots"]
    assert two["config"]["processes"] == 2 and one["config"]["processes"] == 1
    files = sorted((tmp_path / "one").glob("predictions-*.jsonl"))
    assert len(files) == 4
    for path in files:
        assert path.read_text() == (tmp_path / "two" / path.name).read_text()


def test_help_has_an_example_per_builtin_task(capsys):
    from flamingo.eval import BUILTIN_TASKS
    from flamingo.eval.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(f"--task {name} " in text for name in BUILTIN_TASKS)


def test_rices_with_the_models_vision_tower_caches_next_to_the_data(flamingo, toy, tmp_path):
    model, processor = flamingo
    data = tmp_path / "data"
    shutil.copytree(toy["vqa"].parent, data)
    task = load_task(data / "toy_vqa.json")
    first = evaluate(model, processor, task, shots=[2], trials=2, demos="rices", num_beams=1, limit=3, progress=False)
    (cache,) = (data / "rices_cache").glob("rices-*.pt")
    written = cache.stat().st_mtime_ns
    again = evaluate(model, processor, task, shots=[2], trials=1, demos="rices", num_beams=1, limit=3, progress=False)
    demos = [[r["demos"] for r in trial.predictions] for trial in first.trials + again.trials]
    assert demos[0] == demos[1] == demos[2]  # retrieval is deterministic: every trial and run gets the same
    assert all(len(row) == 2 for row in demos[0])
    assert cache.stat().st_mtime_ns == written  # read back, not recomputed


def test_rices_with_an_open_clip_encoder_retrieves_its_nearest_neighbours(flamingo, toy, tmp_path):
    """`--rices-encoder NAME:WEIGHTS` with a tiny open_clip model built here (random weights, no download): the demos
    are the pool items whose open_clip embeddings are most cosine-similar to the query's, the most similar last,
    computed here independently; the pool's embeddings are cached under a key of their own."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (the --rices-encoder backend)")
    from reference_factory import save_open_clip

    from flamingo.eval.demos import open_image

    vision = {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 16, "layers": 2}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, weights = save_open_clip(tmp_path / "clip", "eval-test-tiny-clip", vision, torch.Generator().manual_seed(0))
    model, processor = flamingo
    data = tmp_path / "data"
    shutil.copytree(toy["vqa"].parent, data)
    task = load_task(data / "toy_vqa.json")
    spec = f"eval-test-tiny-clip:{weights}"
    results = evaluate(
        model,
        processor,
        task,
        shots=[3],
        trials=1,
        demos="rices",
        rices_encoder=spec,
        num_beams=1,
        limit=4,
        progress=False,
    )

    clip, _, preprocess = open_clip.create_model_and_transforms("eval-test-tiny-clip", pretrained=str(weights))
    with torch.no_grad():

        def embed(examples):
            pixels = torch.stack([preprocess(open_image(example.image)) for example in examples])
            return torch.nn.functional.normalize(clip.eval().encode_image(pixels).float(), dim=-1)

        similarity = embed(task.test[:4]) @ embed(task.train).T
    position = {example.id: i for i, example in enumerate(task.train)}
    for record, row in zip(results.trials[0].predictions, similarity, strict=True):
        # compared by similarity: toy images repeat, and equally similar items may come in either order
        chosen = torch.stack([row[position[demo]] for demo in record["demos"]])
        assert torch.allclose(chosen, row.topk(3).values.flip(0), atol=1e-5)
    (cache,) = (data / "rices_cache").glob("rices-*.pt")
    assert torch.load(cache, weights_only=True)["key"] == f"open_clip:{spec}"
