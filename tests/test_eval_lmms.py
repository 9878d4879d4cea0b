"""The lmms-eval models `otter` and `flamingo`: `lmms-eval eval --model otter --model_args pretrained=<folder>` on
tasks defined in a local task folder over a local dataset (no hub), generation and log-likelihood, two images per
request. Needs the `eval` extra (lmms-eval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import ROOT, TINY_FLAMINGO_DIR, TINY_OTTER_DIR, randomize_gates
from transformers import AutoConfig

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'flamingo-otter-hf[lmms]'; CI runs these tests in a venv of their own)")

TASK_UTILS = """
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]

def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""
GENERATE_TASK = """task: toy_lmms_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["Question"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE_TASK = """task: toy_lmms_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["red", "blue"]
doc_to_target: !function utils.target_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lmms-tasks")
    docs = []
    for i, colour in enumerate(["red", "blue", "red", "blue"]):
        first, second = folder / f"{i}a.png", folder / f"{i}b.png"
        Image.new("RGB", (32, 32), colour).save(first)
        Image.new("RGB", (32, 32), "white").save(second)
        docs.append(
            {"images": [str(first), str(second)], "question": "What colour is the first shape?", "answer": colour}
        )
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(doc) for doc in docs) + "\n")
    (folder / "utils.py").write_text(
        TASK_UTILS + '\ndef target_index(doc):\n    return ["red", "blue"].index(doc["answer"])\n'
    )
    (folder / "toy_lmms_generate.yaml").write_text(GENERATE_TASK.format(data=folder / "docs.jsonl"))
    (folder / "toy_lmms_choice.yaml").write_text(CHOICE_TASK.format(data=folder / "docs.jsonl"))
    return folder


@pytest.fixture(scope="module")
def entry_point_dir(tmp_path_factory) -> Path:
    """The package's `lmms_eval.models` entry point, declared the way pip installs it (a dist-info folder), so that
    lmms-eval finds the models through its plugin mechanism even where this checkout is not pip-installed."""
    folder = tmp_path_factory.mktemp("entry-point")
    info = folder / "flamingo_otter_hf_lmms_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flamingo-otter-hf-lmms-test\nVersion: 0\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    name, value = (
        pyproject.split('[project.entry-points."lmms_eval.models"]', 1)[1].strip().splitlines()[0].split(" = ")
    )
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{name} = {value.strip(chr(34))}\n")
    return folder


def saved_model(folder: Path, model_type: str) -> Path:
    from flamingo import FlamingoModel, FlamingoProcessor
    from otter import OtterModel, OtterProcessor

    model_class, processor_class, config_dir = {
        "otter": (OtterModel, OtterProcessor, TINY_OTTER_DIR),
        "flamingo": (FlamingoModel, FlamingoProcessor, TINY_FLAMINGO_DIR),
    }[model_type]
    torch.manual_seed(0)
    randomize_gates(model_class(AutoConfig.from_pretrained(config_dir)).eval()).save_pretrained(folder)
    processor_class.from_pretrained(config_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_lmms_eval_runs_otter_on_a_local_task(task_dir, entry_point_dir, tmp_path):
    """The command line, end to end (`--model flamingo` runs the same class on a FlamingoModel)."""
    model_type = "otter"
    model = saved_model(tmp_path / "model", model_type)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(entry_point_dir)]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        model_type,
        "--model_args",
        f"pretrained={model}",
        "--tasks",
        "toy_lmms_generate,toy_lmms_choice",
        "--include_path",
        str(task_dir),
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
        "--verbosity",
        "WARNING",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval exits 0 after logging an evaluation error: the results file is the evidence
    assert run.returncode == 0 and "Error during evaluation" not in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*results.json")]
    assert results, run.stdout[-2000:]
    scores = results[0]["results"]
    assert 0.0 <= scores["toy_lmms_generate"]["exact_match,none"] <= 1.0
    assert 0.0 <= scores["toy_lmms_choice"]["acc,none"] <= 1.0
    samples = [
        json.loads(line)
        for p in (tmp_path / "out").rglob("*toy_lmms_choice*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert len(samples) == 4  # every document scored, both choices by log-likelihood


def test_prompts_and_loglikelihood_agree_with_the_model(tmp_path):
    """In process: the multi-image prompt, and `loglikelihood` equal to scoring the joined sequence directly (as a
    loss, lmms-eval's convention)."""
    from lmms_eval.api.instance import Instance

    from flamingo.eval.lmms import FlamingoLmms, OtterLmms, manifests

    assert {m.model_id for m in manifests()} == {"flamingo", "otter"}
    lm = OtterLmms(pretrained=str(saved_model(tmp_path / "model", "otter")))
    assert lm.prompt("What is it?", 2) == "<image><image>User: What is it? GPT:<answer>"
    assert lm.prompt("<image>A <image>B", 2) == "<image>A <image>B"
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")]
    docs = {0: {"x": 1}}
    lm.task_dict = {"t": {"test": docs}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    request = Instance("loglikelihood", ("What is it?", " red", lambda doc: images, 0, "t", "test"), 0, meta)
    (result,) = lm.loglikelihood([request])
    loss, greedy = result.text

    prompt = lm.prompt("What is it?", 2)
    inputs = lm.processor(text=prompt, images=images)
    ids = lm.processor.tokenizer(prompt + " red")["input_ids"]
    prefix = inputs["input_ids"].shape[1]
    logits = lm.model(input_ids=torch.tensor([ids]), vision_x=inputs["vision_x"]).logits[0].log_softmax(-1)
    expected = sum(logits[prefix - 1 + j, t].item() for j, t in enumerate(ids[prefix:]))
    assert loss == pytest.approx(-expected, abs=1e-4) and isinstance(greedy, bool)
    settings = {"max_new_tokens": 3, "until": ["x"]}
    flamingo = FlamingoLmms(pretrained=str(saved_model(tmp_path / "flamingo", "flamingo")))
    assert flamingo.prompt("What is it?", 1) == "<image>Question:What is it? Short answer:"
    generated = lm.generate_until(
        [Instance("generate_until", ("What is it?", settings, lambda doc: images, 0, "t", "test"), 0, meta)]
    )
    assert len(generated) == 1 and isinstance(generated[0], str)
