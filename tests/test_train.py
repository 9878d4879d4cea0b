"""otter-train on the CPU: a short single-process run, resume after SIGTERM, and 2-process DDP/FSDP runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from otter import OtterModel

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--batch-size", "4", "--max-length", "128", "--eval-samples", "8", "--lr", "3e-3", "--seed", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_train(output: Path, *extra: str, launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable, "-m"]), "otter.train", "--output-dir", str(output), *SHORT_RUN, *extra]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def logged_losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def accelerate_launch(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
            "--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no", "-m"]


@pytest.mark.parametrize("trainable", ["otter", "lora", "all"])
def test_trainable_sets(trainable):
    from argparse import Namespace

    from otter.train import configure_trainable
    from tiny_models import tiny_model

    model = tiny_model()
    configure_trainable(model, Namespace(trainable=trainable, train_vision_encoder=False), from_scratch=False)
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any(".gated_cross_attn_layer." in n for n in trained) and any(n.startswith("perceiver.") for n in trained)
    assert any("lora_" in n for n in trained) == (trainable == "lora")
    assert any(n.endswith("self_attn.q_proj.weight") for n in trained) == (trainable == "all")


def test_short_run_writes_everything(tmp_path):
    result = run_train(tmp_path, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["heldout_accuracy"] <= 1 and 0 <= summary["blank_image_accuracy"] <= 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    losses = logged_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    assert (tmp_path / "loss.png").stat().st_size > 0 and list((tmp_path / "runs").rglob("events.out.tfevents*"))
    model = OtterModel.from_pretrained(summary["model_dir"])
    assert model.config.model_type == "otter"
    assert "held-out accuracy" in result.stdout


def test_resume_after_sigterm_continues_the_same_loss_curve(tmp_path):
    steps = ["--max-steps", "60", "--save-every", "1000"]  # long enough that SIGTERM lands mid-run
    reference = run_train(tmp_path / "uninterrupted", *steps)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "otter.train", "--output-dir", str(interrupted), *SHORT_RUN, *steps]
    stderr = (tmp_path / "interrupted.stderr").open("w")  # a file, not a pipe nobody drains while it runs
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    log = interrupted / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, (tmp_path / "interrupted.stderr").read_text()[-3000:]
    saved = [p.name for p in (interrupted / "checkpoints").iterdir()]
    assert len(saved) == 1 and not saved[0].endswith(".tmp")
    stopped_at = int(saved[0].removeprefix("step-"))
    assert 3 <= stopped_at < 60

    resumed = run_train(interrupted, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = logged_losses(tmp_path / "uninterrupted"), logged_losses(interrupted)
    assert sorted(got) == list(range(1, 61))
    for step in range(1, 61):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_ddp_and_fsdp_on_two_processes_agree_and_save_a_loadable_model(tmp_path):
    losses, held = {}, {}
    for strategy, expected in (("ddp.yaml", "MULTI_CPU"), ("fsdp.yaml", "FSDP")):
        output = tmp_path / strategy
        result = run_train(output, "--max-steps", "3", "--save-every", "2", launcher=accelerate_launch(strategy))
        assert result.returncode == 0, result.stderr[-4000:]
        assert f"on 2 process(es), {expected}" in result.stderr
        assert (output / "checkpoints" / "step-000002").is_dir()
        assert OtterModel.from_pretrained(output / "model").config.model_type == "otter"
        losses[strategy] = logged_losses(output)
        held[strategy] = [int(m.replace(",", "")) for m in re.findall(r"process \d holds ([\d,]+) parameter values", result.stderr)]
    assert len(held["ddp.yaml"]) == len(held["fsdp.yaml"]) == 2
    assert held["ddp.yaml"][0] == held["ddp.yaml"][1]  # replicated
    assert max(held["fsdp.yaml"]) < 0.6 * held["ddp.yaml"][0]  # really sharded: about half each
    assert sorted(losses["ddp.yaml"]) == [1, 2, 3]
    for step, loss in losses["ddp.yaml"].items():
        assert losses["fsdp.yaml"][step] == pytest.approx(loss, rel=1e-4), step
