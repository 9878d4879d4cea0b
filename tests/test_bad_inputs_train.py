"""Bad input to otter-train and otter-generate: flags out of range, data that yields no step, damaged checkpoints.
Each refusal names what is wrong; nothing trains on, hangs, or picks a damaged checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from refusals import usage_error

from otter.data.mimicit import write_mimicit
from otter.data.toy import toy_dataset_paths
from otter.generate import parse_args as generate_args
from otter.train import parse_args as train_args
from otter.training import Checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, error", [
    (["--grad-accum", "0"], "argument --grad-accum: must be at least 1, got 0"),
    (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
    (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be at least 1, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["--epochs", "0"], "argument --epochs: must be more than 0, got 0.0"),
    (["--max-length", "3"], "argument --max-length: must be at least 8, got 3"),
    (["--save-every", "-1"], "argument --save-every: must be at least 0, got -1"),
    (["--copying-steps", "-1"], "argument --copying-steps: must be at least 0, got -1"),
])
def test_train_flags_out_of_range_are_usage_errors(capsys, flags, error):
    assert error in usage_error(train_args, flags, capsys)


@pytest.mark.parametrize("flags, error", [
    (["--num-beams", "0"], "argument --num-beams: must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
])
def test_generate_flags_out_of_range_are_usage_errors(capsys, flags, error):
    assert error in usage_error(generate_args, flags, capsys)


# ---- checkpoints: the newest usable one, never a damaged one --------------------------------------------------
class RecordingAccelerator:
    """What `Checkpoints.resume` needs of an Accelerator; `broken` checkpoints fail to load like a bad pickle."""

    def __init__(self, broken=()):
        self.loaded, self.broken = [], set(broken)

    def load_state(self, folder: str) -> None:
        if Path(folder).name in self.broken:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        self.loaded.append(Path(folder).name)


def checkpoint(folder: Path, step: int, files: dict[str, bytes]) -> Path:
    path = folder / f"step-{step:06d}"
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    (path / Checkpoints.MANIFEST).write_text(json.dumps({name: len(data) for name, data in files.items()}))
    return path


@pytest.mark.parametrize("damage", ["truncated", "deleted", "no manifest", "does not load"])
def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, caplog, damage):
    files = {"model.safetensors": b"x" * 100, "optimizer.bin": b"y" * 50}
    checkpoint(tmp_path, 2, files)
    latest = checkpoint(tmp_path, 4, files)
    if damage == "truncated":
        (latest / "optimizer.bin").write_bytes(b"y" * 10)
    elif damage == "deleted":
        (latest / "model.safetensors").unlink()
    elif damage == "no manifest":
        (latest / Checkpoints.MANIFEST).unlink()
    accelerator = RecordingAccelerator(broken={"step-000004"} if damage == "does not load" else ())
    assert Checkpoints(tmp_path, keep=2).resume(accelerator) == 2
    assert accelerator.loaded == ["step-000002"]
    expected = {"truncated": "optimizer.bin has 10 bytes, the manifest says 50", "deleted": "model.safetensors is missing",
                "no manifest": "manifest.json is missing", "does not load": "it does not load (RuntimeError"}[damage]
    assert f"skipping checkpoint {latest}" in caplog.text and expected in caplog.text


def test_resume_without_a_usable_checkpoint_starts_from_scratch(tmp_path, caplog):
    (checkpoint(tmp_path, 2, {"model.safetensors": b"x"}) / "model.safetensors").unlink()
    (tmp_path / "step-000004.tmp").mkdir()  # a write that was killed
    assert Checkpoints(tmp_path, keep=2).resume(RecordingAccelerator()) == 0
    assert "no usable checkpoint" in caplog.text


# ---- data that can give no optimizer step: an error at once, not a hang or an untrained model -----------------
def small_dataset(folder: Path, count: int) -> Path:
    """The first `count` toy training samples as a mixture file."""
    toy = toy_dataset_paths()["train"]
    rows = json.loads(toy["instructions_path"].read_text())["data"]
    images = json.loads(toy["images_path"].read_text())
    keep = dict(list(rows.items())[:count])
    used = {image for row in keep.values() for image in row["image_ids"]}
    write_mimicit(folder, keep, {k: v for k, v in images.items() if k in used}, {k: [] for k in keep}, meta={})
    mixture = folder / "mixture.json"
    mixture.write_text(json.dumps([{"type": "mimicit", "instructions_path": "instructions.json",
                                    "images_path": "images.json", "train_config_path": "train_config.json"}]))
    return mixture


def run_train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "otter.train", "--output-dir", str(tmp_path / "run"), "--eval-samples", "0",
               "--copying-steps", "0", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_fewer_samples_than_one_step_is_an_error_and_saves_nothing(tmp_path):
    result = run_train(tmp_path, "--data", str(small_dataset(tmp_path / "data", 3)), "--batch-size", "4")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the training set has 3 samples, fewer than one optimizer step takes (--batch-size 4 x 1 process(es) x " \
           "--grad-accum 1)" in result.stderr
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_no_usable_sample_is_an_error_not_an_endless_loop(tmp_path):
    result = run_train(tmp_path, "--data", str(small_dataset(tmp_path / "data", 8)), "--batch-size", "4",
                       "--max-length", "8", "--max-steps", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no sample of the 8 in the training set is usable (too_long: 8; max_length 8)" in result.stderr
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_a_failed_push_keeps_the_results(tmp_path):
    """`--push-to-hub` runs last: offline, the upload fails, and the model, its card, summary.json and the loss
    curve are already written."""
    toy = toy_dataset_paths()["heldout"]
    result = subprocess.run(
        [sys.executable, "-m", "otter.train", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
         "--copying-steps", "0", "--batch-size", "4", "--eval-samples", "4", "--heldout", str(toy["instructions_path"]),
         "--data", str(small_dataset(tmp_path / "data", 8)), "--push-to-hub", "someone/otter-test"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr.splitlines()[-1]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "README.md").is_file()
    assert "held-out accuracy" in (run / "model" / "README.md").read_text()


def test_unknown_data_names_the_bundled_sets(capsys, tmp_path):
    error = usage_error(train_args, ["--data", str(tmp_path / "toyy")], capsys)
    assert f"--data '{tmp_path / 'toyy'}' is neither a mixture file nor bundled data (toy, toy-icl, toy-mixture, toy-video)" in error
