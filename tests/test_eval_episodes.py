"""Tasks of episodes (each query with its own demonstrations), the format otter-train scores its held-out splits in:
the written task gives Otter's training prompts and the samples' own pictures, flamingo-eval's greedy answers equal
plain `model.generate` on the processor's inputs (images and clips, with examples, without, blank), and bad episode
files are named."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny_models import TINY_OTTER_DIR, randomize_gates
from transformers import AutoConfig

from flamingo.eval import load_task
from flamingo.eval.demos import EpisodeDemos, open_media
from flamingo.eval.metrics import exact_match
from flamingo.eval.runner import build_prompt, evaluate
from flamingo.eval.tasks import TaskDataError
from flamingo.video import media_kwargs
from otter import OtterModel, OtterProcessor
from otter.data.main_job import bundled_data
from otter.data.samples import InstructionSample
from otter.data.toy_video import single_frame, toy_video_dataset_paths
from otter.evaluate import blank_images, heldout_tasks, run_episodes, task_scores, write_episodes

VIDEO_DIR = TINY_OTTER_DIR.parent / "tiny-otter-video"


def tiny_otter(folder=TINY_OTTER_DIR):
    torch.manual_seed(0)
    return randomize_gates(OtterModel(AutoConfig.from_pretrained(folder)).eval(), 0), OtterProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def icl_samples():
    return [bundled_data("toy-icl")[1]["icl"][i] for i in range(6)]


def plain_answers(model, processor, samples, drop_examples=False):
    """Greedy answers from the processor's inputs and `model.generate`: what the harness must reproduce."""
    if drop_examples:
        samples = [s.drop_examples(len(s.examples)) for s in samples]
    inputs = processor(text=[s.prompt() for s in samples], **media_kwargs([s.load_images() for s in samples]))
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1,
                               eos_token_id=processor.endofchunk_token_id, pad_token_id=processor.pad_token_id)
    return [a.strip() for a in processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])]


def test_written_episodes_are_the_samples_prompts_and_pictures(icl_samples, tmp_path):
    processor = OtterProcessor.from_pretrained(TINY_OTTER_DIR)
    task = write_episodes(icl_samples, tmp_path, "icl")
    assert (task.kind, task.metric, len(task.test), len(task.train)) == ("vqa", "exact match", 6, 12)
    chosen = EpisodeDemos(task.episode_demos).select(list(enumerate(task.test)), 2, seed=0)
    for (index, item), demos, sample in zip(enumerate(task.test), chosen, icl_samples, strict=True):
        prompt = build_prompt(processor, task, index, item, [task.train[d] for d in demos], with_images=True)
        assert prompt.text == sample.prompt()  # Otter's chunks, as trained
        for path, image in zip(prompt.images, sample.load_images(), strict=True):
            assert np.array_equal(np.asarray(open_media(path)), np.asarray(image))
        assert item.answer == sample.answer


def test_episode_demos_are_the_last_ones_and_no_more_than_the_episode_has(icl_samples, tmp_path):
    task = write_episodes(icl_samples, tmp_path, "icl")
    assert EpisodeDemos(task.episode_demos).select([(1, task.test[1])], 1, seed=3) == [[3]]  # episode 1: pool 2, 3
    with pytest.raises(ValueError, match=r"3 demonstrations asked for, but episode '1:.*' has only 2"):
        EpisodeDemos(task.episode_demos).select([(1, task.test[1])], 3, seed=0)
    write_episodes(icl_samples, tmp_path / "again", "icl")
    assert (tmp_path / "again" / "episodes.json").read_text() == (tmp_path / "episodes.json").read_text()
    model, processor = tiny_otter()
    with pytest.raises(ValueError, match="--demos episode needs a task made of episodes"):
        evaluate(model, processor, dataclasses.replace(task, episode_demos=None), shots=[2], trials=1, demos="episode",
                 progress=False)


@torch.no_grad()
def test_harness_answers_equal_plain_generation(icl_samples, tmp_path):
    model, processor = tiny_otter()
    tasks = heldout_tasks(icl_samples, tmp_path, "icl")
    answers = {c: [r["prediction"] for r in run_episodes(model, processor, t).predictions] for c, t in tasks.items()}
    assert answers["with_examples"] == plain_answers(model, processor, icl_samples)
    assert answers["blank_images"] == plain_answers(model, processor, [blank_images(s) for s in icl_samples])
    alone = [r["prediction"] for r in run_episodes(model, processor, tasks["with_examples"], shots=0).predictions]
    assert alone == plain_answers(model, processor, icl_samples, drop_examples=True)
    assert answers["blank_images"] != answers["with_examples"] != alone  # the pictures and the examples count
    scores = task_scores(model, processor, tasks)
    assert list(scores) == ["with_examples", "no_examples", "blank_images"] and all(0 <= v <= 1 for v in scores.values())


@torch.no_grad()
def test_clips_are_episodes_too(tmp_path):
    from otter.data.mimicit import MimicItDataset

    model, processor = tiny_otter(VIDEO_DIR)
    heldout = MimicItDataset(**toy_video_dataset_paths()["heldout"])
    samples = [heldout[i] for i in range(4)]
    tasks = heldout_tasks(samples, tmp_path, "video", {"single_frame": single_frame})
    assert (tmp_path / "media" / "00000-0").is_dir()  # a clip: a folder of its frames
    for condition, changed in (("with_examples", samples), ("single_frame", [single_frame(s) for s in samples])):
        ours = [r["prediction"] for r in run_episodes(model, processor, tasks[condition]).predictions]
        assert ours == plain_answers(model, processor, changed)


def test_exact_match_normalises_as_vqa_predictions():
    assert exact_match({1: "Three.", 2: "a red circle", 3: "blue"}, {1: "three", 2: "red circle", 3: "green"}) == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("episodes", "expected"),
    [
        ({"episodes": [{"id": "a", "demos": []}]}, r"episodes\[0\] lacks 'query'"),
        ({"episodes": [{"id": "a", "demos": [], "query": {"image": "x.png", "question": "q"}}]}, r"lacks 'answer'"),
        ({"episodes": [{"id": "a", "demos": [], "query": {"image": "x.png", "question": "q", "answer": "y"}}] * 2},
         r"episodes\[1\] repeats the id 'a'"),
        ({"rows": []}, 'no "episodes" list'),
    ],
)
def test_bad_episode_files_are_named(tmp_path, episodes, expected):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "episodes.json").write_text(json.dumps(episodes))
    (tmp_path / "task.json").write_text(json.dumps({"format": "episodes", "episodes": "episodes.json"}))
    with pytest.raises(TaskDataError, match=expected) as error:
        load_task(tmp_path / "task.json")
    assert "episodes.json" in str(error.value)


def test_an_episode_with_a_missing_image_is_left_out_and_counted(icl_samples, tmp_path):
    task = write_episodes(icl_samples, tmp_path, "icl")
    next((tmp_path / "media").glob("00002-1.png")).unlink()  # episode 2's second demonstration
    again = load_task(tmp_path / "task.json")
    assert len(again.test) == 5 and again.skipped["missing_image"] == 1
    assert [item.id for item in again.test] == [item.id for i, item in enumerate(task.test) if i != 2]
    assert all(again.train[d].id.startswith(item.id + "/") for item, demos in zip(again.test, again.episode_demos)
               for d in demos)


def test_an_episode_with_fewer_examples_than_the_shots_is_an_error(icl_samples, tmp_path):
    shorter = InstructionSample("short", icl_samples[0].chunks[1:], icl_samples[0].images[1:])
    task = write_episodes([icl_samples[1], shorter], tmp_path, "mixed")
    with pytest.raises(ValueError, match=r"2 demonstrations asked for, but episode '1:short' has only 1"):
        run_episodes(*tiny_otter(), task)
