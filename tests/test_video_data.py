"""Video training data: MIMIC-IT instructions whose image ids are a clip's frames, in-context clips, bad clips
counted, image and video datasets mixed, the collator's vision_x; the toy video task and a few training steps."""

import base64
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from flamingo.loading import load_processor
from otter.data.collate import OtterCollator, UsableSamples
from otter.data.mimicit import MimicItDataset
from otter.data.mixture import load_mixture
from otter.data.toy_video import (
    ANSWERS,
    NUM_FRAMES,
    QUESTION_TYPES,
    make_toy_video_dataset,
    single_frame,
    toy_video_dataset_paths,
)

RED = (200, 0, 0)


def png(level: int) -> str:
    """A base64 PNG whose red channel is `level`: frames told apart by it."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (level, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def row(instruction, answer, image_ids, rel=()):
    return {"instruction": instruction, "answer": answer, "image_ids": list(image_ids), "rel_ins_ids": list(rel)}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def processor():
    return load_processor("tiny-otter-video")


@pytest.fixture
def video_files(tmp_path):
    """A DC-like subset: clips of 6 frames, one with a missing frame, one with an unreadable frame."""
    frames = {f"V{v}_F{t}": png(40 * v + 5 * t) for v in range(4) for t in range(6)}
    frames["V3_F2"] = base64.b64encode(b"not a png").decode("ascii")
    data = {
        "DC_INS_0": row("What happens?", "it moves", [f"V0_F{t}" for t in range(6)], rel=["DC_INS_1"]),
        "DC_INS_1": row("What happens?", "it stops", [f"V1_F{t}" for t in range(6)], rel=["DC_INS_0", "DC_INS_2"]),
        "DC_INS_2": row("What happens?", "it is gone", [*(f"V2_F{t}" for t in range(5)), "NO_SUCH_FRAME"]),
        "DC_INS_3": row("What happens?", "it flickers", [f"V3_F{t}" for t in range(6)]),
    }
    return {
        "instructions_path": write_json(tmp_path / "DC_instructions.json", {"meta": {}, "data": data}),
        "images_path": write_json(tmp_path / "DC.json", frames),
    }


def red(image: Image.Image) -> int:
    return image.getpixel((3, 3))[0]


def test_an_instruction_with_several_image_ids_is_one_clip_in_order(video_files):
    dataset = MimicItDataset(**video_files)
    assert [s.sample_id for s in dataset] == ["DC_INS_0", "DC_INS_1", "DC_INS_3"]
    query = dataset[0].load_images()[-1]
    assert [red(frame) for frame in query] == [0, 5, 10, 15, 20, 25]


def test_in_context_examples_bring_their_own_clips(video_files):
    sample = MimicItDataset(**video_files)[1]
    assert sample.chunks == [("What happens?", "it moves"), ("What happens?", "it stops")]
    clips = sample.load_images()
    assert [red(clip[0]) for clip in clips] == [0, 40]


def test_bad_clips_are_skipped_and_counted(video_files, processor):
    dataset = MimicItDataset(**video_files)
    # DC_INS_2 lacks a frame: skipped as a query and as DC_INS_1's in-context example.
    assert dataset.bad_rows == Counter(missing_frame=1, in_context_missing_frame=1)
    usable = UsableSamples(dataset, processor)
    assert usable[2].sample_id == "DC_INS_0"  # DC_INS_3's frame 2 does not decode: the next sample stands in
    assert usable.dropped == Counter(unreadable_image=1)


def test_clips_follow_the_id_prefix_unless_told(video_files, tmp_path):
    other = {**json.loads(Path(video_files["instructions_path"]).read_text())}
    other["data"] = {key.replace("DC_", "LA_"): value for key, value in other["data"].items()}
    renamed = {**video_files, "instructions_path": write_json(tmp_path / "LA.json", other)}
    with pytest.raises(ValueError, match="no usable rows.*multiple_images: 4"):
        MimicItDataset(**renamed)
    assert len(MimicItDataset(**renamed, clips=True)) == 3
    with pytest.raises(ValueError, match="multiple_images"):
        MimicItDataset(**video_files, clips=False)


def test_num_frames_samples_the_frame_ids(video_files):
    clip = MimicItDataset(**video_files, num_frames=3)[0].load_images()[-1]
    assert [red(frame) for frame in clip] == [0, 10, 25]  # frames 0, 2 (2.5, rounded to even), 5


def test_a_mixture_of_image_and_video_datasets_collates_both(video_files, tmp_path, processor):
    write_json(tmp_path / "images.json", {"IMG": png(250)})
    write_json(tmp_path / "image_instructions.json", {"data": {"LA_INS_0": row("What colour?", "red", ["IMG"])}})
    mixture = write_json(tmp_path / "mix.json", {"seed": 0, "length": 8, "datasets": [
        {"type": "mimicit", "instructions_path": "DC_instructions.json", "images_path": "DC.json",
         "num_in_context": 0, "weight": 1},
        {"type": "mimicit", "instructions_path": "image_instructions.json", "images_path": "images.json", "weight": 1},
    ]})
    dataset = UsableSamples(load_mixture(mixture), processor)
    samples = [dataset[i] for i in range(len(dataset))]
    kinds = {isinstance(sample.images[0], list) for sample in samples}
    assert kinds == {True, False}, "the seeded plan draws from both components"
    batch = OtterCollator(processor)(samples)
    assert batch["vision_x"].shape == (8, 1, 6, 3, 32, 32)
    image_row = next(i for i, s in enumerate(samples) if not isinstance(s.images[0], list))
    assert torch.equal(batch["vision_x"][image_row, 0, 0], batch["vision_x"][image_row, 0, 5])  # stretched
    assert batch["labels"].shape == batch["input_ids"].shape


def test_an_image_model_refuses_a_clip_batch_and_says_so(video_files):
    image_processor = load_processor("tiny-otter")
    samples = [UsableSamples(MimicItDataset(**video_files), image_processor)[0]]
    with pytest.raises(ValueError, match="clip 0 of prompt 0 has 6 frames, but this model takes images only"):
        OtterCollator(image_processor)(samples)


# ---- the toy video task ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-video")
    make_toy_video_dataset(root, num_train=48, num_heldout=24)
    return root


def test_the_toy_video_task_is_deterministic_balanced_and_in_mimicit_form(toy, tmp_path):
    again = tmp_path / "again"
    make_toy_video_dataset(again, num_train=48, num_heldout=24)
    for path in sorted(toy.rglob("*.json")):
        assert path.read_bytes() == (again / path.relative_to(toy)).read_bytes(), path
    paths = toy_video_dataset_paths(toy)
    train = MimicItDataset(**paths["train"])
    assert len(train) == 48 and not train.bad_rows
    answers = Counter((QUESTION_TYPES[s.question], s.answer) for s in train)
    for kind, choices in ANSWERS.items():
        counts = [answers[kind, answer] for answer in choices]
        assert max(counts) - min(counts) <= 1, (kind, counts)
    assert all(len(clip) == NUM_FRAMES for s in train for clip in s.images)


def test_the_in_context_variant_gives_each_example_its_clip(toy):
    sample = MimicItDataset(**toy_video_dataset_paths(toy, num_in_context=1)["train"])[0]
    assert len(sample.chunks) == 2 and len(sample.images) == 2
    assert QUESTION_TYPES[sample.chunks[0][0]] == QUESTION_TYPES[sample.question]
    assert sample.images[0] != sample.images[1]


def test_motion_is_in_the_clip_and_not_in_the_middle_frame(toy):
    """The clip's frames differ (the answer is in the motion); the single-frame version repeats the middle one."""
    sample = MimicItDataset(**toy_video_dataset_paths(toy)["heldout"])[0]
    frames = [frame.tobytes() for frame in sample.load_images()[0]]
    assert len(set(frames)) == NUM_FRAMES
    still = [frame.tobytes() for frame in single_frame(sample).load_images()[0]]
    assert still == [frames[NUM_FRAMES // 2]] * NUM_FRAMES


def test_a_few_training_steps_on_the_toy_video_task_lower_the_loss(toy, tmp_path):
    from otter.train import parse_args
    from otter.training import train

    files = {key: str(value) for key, value in toy_video_dataset_paths(toy)["train"].items() if key.endswith("_path")}
    mixture = write_json(tmp_path / "mix.json", {"datasets": [{"type": "mimicit", **files, "clips": True}]})
    output = tmp_path / "run"
    train(parse_args(["--model", "tiny-otter-video", "--data", str(mixture), "--output-dir", str(output),
                      "--max-steps", "12", "--batch-size", "8", "--eval-samples", "0", "--save-every", "0", "--copying-steps", "0"]))
    losses = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses  # from 6.3 to about 5.2 (seed 0)
