"""otter-train on the CPU: a short single-process run, resume after SIGTERM, gradient accumulation, gradient
checkpointing and bf16 autocast, and 2-process DDP/FSDP/DeepSpeed ZeRO-2 and ZeRO-3 runs."""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from otter import OtterModel

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--batch-size", "4", "--max-length", "128", "--eval-samples", "8", "--lr", "3e-3", "--seed", "0",
             "--copying-steps", "0"]
TWO_PROCESS_RUN = ["--max-steps", "4", "--save-every", "2"]  # DDP, FSDP, ZeRO-2/3: compared step by step
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_train(output: Path, *extra: str, launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """On timeout, kill the launcher and every process under it: torch's launcher starts each worker in a session of
    its own, and a worker waiting in a collective would otherwise outlive the test."""
    command = [*(launcher or [sys.executable, "-m"]), "otter.train", "--output-dir", str(output), *SHORT_RUN, *extra]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher_process = psutil.Process(process.pid)
        for leftover in [*launcher_process.children(recursive=True), launcher_process]:
            leftover.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"otter-train ran past {timeout} s: {' '.join(command)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def logged_losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def saved_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model" / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def held_values(stderr: str) -> list[int]:
    return [int(m.replace(",", "")) for m in re.findall(r"process \d holds ([\d,]+) parameter values", stderr)]


def accelerate_launch(config: str, mixed_precision: str | None = "no") -> list[str]:
    """`mixed_precision=None`: what the config says (the shipped configs say bf16)."""
    precision = ["--mixed_precision", mixed_precision] if mixed_precision else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
            "--num_processes", "2", "--main_process_port", "0", *precision, "-m"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    """A 2-process DDP run in fp32, the reference for FSDP, DeepSpeed and gradient accumulation."""
    output = tmp_path_factory.mktemp("ddp")
    result = run_train(output, *TWO_PROCESS_RUN, launcher=accelerate_launch("ddp.yaml"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es), MULTI_CPU, mixed precision no" in result.stderr
    return output, result.stderr


@pytest.fixture(scope="module")
def deepspeed_importable() -> None:
    """Checked in a subprocess, like the runs that use it: importing deepspeed into the test process would bring
    its import-time setup (accelerator detection, patches) to every other test there."""
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env=ENV, capture_output=True, text=True)
    if probe.returncode:
        reason = (probe.stderr.strip().splitlines() or ["no error message"])[-1]
        pytest.skip(f"deepspeed is not importable ({reason}); install it as .ci/run does: "
                    "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8")


@pytest.mark.parametrize("trainable", ["otter", "lora", "all"])
def test_trainable_sets(trainable):
    from argparse import Namespace

    from tiny_models import tiny_model

    from otter.training import configure_trainable

    model = tiny_model()
    configure_trainable(model, Namespace(trainable=trainable, train_vision_encoder=False), from_scratch=False)
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any(".gated_cross_attn_layer." in n for n in trained) and any(n.startswith("perceiver.") for n in trained)
    assert any("lora_" in n for n in trained) == (trainable == "lora")
    assert any(n.endswith("self_attn.q_proj.weight") for n in trained) == (trainable == "all")


def test_a_model_from_scratch_starts_with_open_gates_and_sin_cos_positions():
    from argparse import Namespace

    from tiny_models import tiny_model

    from otter.training import configure_trainable

    model = tiny_model(open_gates=False)
    configure_trainable(model, Namespace(trainable="auto", train_vision_encoder=False), from_scratch=True)
    gates = [p for n, p in model.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    assert gates and all(torch.all(g == 0.5) for g in gates)
    positions = model.vision_encoder.embeddings.position_embedding.weight.detach()  # (1 + side * side, dim)
    side, quarter = math.isqrt(positions.shape[0] - 1), positions.shape[1] // 4
    grid = positions[1:].reshape(side, side, 4, quarter)  # (row, column, [sin x, cos x, sin y, cos y], frequency)
    assert torch.all(positions[0] == 0)  # the class token
    assert not torch.allclose(grid[:, :1, :2].expand(-1, side, -1, -1), grid[:, :, :2])  # x varies along a row
    assert torch.allclose(grid[:1, :, :2].expand(side, -1, -1, -1), grid[:, :, :2])  # ... and not down a column
    assert torch.allclose(grid[:, :1, 2:].expand(-1, side, -1, -1), grid[:, :, 2:])  # y: the other way round
    assert torch.allclose(grid[0, 1, 0], 0.2 * torch.sin(10000.0 ** -(torch.arange(quarter) / quarter)))
    assert torch.cdist(positions[1:], positions[1:]).fill_diagonal_(1).min() > 0.1  # every patch told apart


def test_sin_cos_positions_refuse_a_grid_that_is_not_square():
    from otter.training import sincos_position_embeddings

    with pytest.raises(ValueError, match="square grid.*got 12 patches of width 64"):
        sincos_position_embeddings(torch.nn.Embedding(13, 64))


def test_the_training_loss_is_the_full_loss_without_the_full_logits():
    """otter-train's loss (`training_loss`) runs the head only where Otter's labels supervise the next token; its
    value and gradients are those of the plain `labels` loss (tolerance 1e-6, float32)."""
    from argparse import Namespace

    from flamingo.loading import load_model, load_processor
    from otter.data.collate import OtterCollator, UsableSamples
    from otter.data.main_job import bundled_data
    from otter.training import configure_trainable, training_loss

    processor = load_processor("tiny-otter")
    samples = bundled_data("toy-mixture", 0)[0]
    usable = UsableSamples(samples, processor, max_length=256)
    batch = OtterCollator(processor)([usable[i] for i in range(4)])
    model = load_model("tiny-otter", seed=0).train()
    configure_trainable(model, Namespace(trainable="otter", train_vision_encoder=False), from_scratch=False)
    supervised = (batch["labels"][:, 1:] != -100).sum().item()
    assert 0 < supervised < batch["labels"][:, 1:].numel() / 2, "Otter's labels cover the answers only"

    def loss_and_gradients(loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    head_outputs = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: head_outputs.append(out.shape))
    fast_loss, fast_grads = loss_and_gradients(lambda: training_loss(model, batch))
    assert head_outputs == [], "no full (batch, length, vocab) logits"
    full_loss, full_grads = loss_and_gradients(lambda: model(**batch).loss)
    hook.remove()
    assert head_outputs == [(*batch["input_ids"].shape, model.config.text_config.vocab_size)]
    assert torch.allclose(fast_loss, full_loss, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys() and any("lm_head" in n for n in fast_grads)
    assert max_difference(fast_grads, full_grads) < 1e-6


@pytest.mark.slow
def test_short_run_writes_everything(tmp_path):
    result = run_train(tmp_path, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "2", "--eval-every", "3",
                       "--data", "toy-mixture", "--copying-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and set(summary["tasks"]) == {"vqa", "icl"}
    assert summary["copying"]["steps"] == 3 and 0 <= summary["copying"]["accuracy"] <= 1
    assert "after 3 copying steps (" in result.stdout.splitlines()[-1]  # the budget counts the pretraining too
    for scores in summary["tasks"].values():
        assert set(scores) == {"with_examples", "no_examples", "blank_images"} and all(0 <= v <= 1 for v in scores.values())
    assert summary["heldout_accuracy"] == summary["tasks"]["vqa"]["with_examples"]
    assert summary["blank_image_accuracy"] == summary["tasks"]["vqa"]["blank_images"]
    probes = [row for row in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "heldout/vqa" in row]
    assert [row["step"] for row in probes] == [3] and 0 <= probes[0]["heldout/icl"] <= 1
    # every 2 steps, the last step always, the newest 2 kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    losses = logged_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    assert (tmp_path / "loss.png").stat().st_size > 0 and list((tmp_path / "runs").rglob("events.out.tfevents*"))
    model = OtterModel.from_pretrained(summary["model_dir"])
    assert model.config.model_type == "otter"
    # the scores are flamingo-eval's: its command on the written held-out task gives the same number
    from flamingo.eval.cli import main as eval_main

    assert eval_main(["--model", summary["model_dir"], "--task", str(tmp_path / "heldout" / "icl" / "task.json"),
                      "--demos", "episode", "--shots", "2", "--trials", "1", "--num-beams", "1", "--no-progress",
                      "--output-dir", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["shots"]["2"]["mean"] / 100 == summary["tasks"]["icl"]["with_examples"]
    # scripts/toy_vqa_by_question.py splits the VQA's number by question type
    by_question = subprocess.run([sys.executable, "scripts/toy_vqa_by_question.py", str(tmp_path)], cwd=ROOT, env=ENV,
                                 capture_output=True, text=True, check=False)
    assert by_question.returncode == 0, by_question.stderr[-3000:]
    header, row = by_question.stdout.splitlines()
    assert header.split()[1:5] == ["colour", "shape", "count", "position"]
    counts = [tuple(map(int, cell.split("/"))) for cell in row.split()[1:5]]
    asked = sum(asked for _, asked in counts)
    assert asked == len(json.loads((tmp_path / "heldout" / "vqa" / "episodes.json").read_text())["episodes"])
    assert sum(right for right, _ in counts) / asked == summary["tasks"]["vqa"]["with_examples"]
    table = result.stdout.splitlines()[-4:]
    assert table[0].split() == ["task", "with", "examples", "no", "examples", "blank", "images"], result.stdout
    assert [line.split()[0] for line in table[1:3]] == ["vqa", "icl"] and "steps" in table[3]


@pytest.mark.slow
def test_resume_after_sigterm_continues_the_same_loss_curve(tmp_path):
    steps = ["--max-steps", "60", "--save-every", "1000"]  # long enough that SIGTERM lands mid-run
    with ThreadPoolExecutor(max_workers=1) as pool:  # the uninterrupted run on the other core meanwhile
        uninterrupted = pool.submit(run_train, tmp_path / "uninterrupted", *steps)
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
        reference = uninterrupted.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
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


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_processes_agree_and_save_a_loadable_model(tmp_path, ddp_run):
    losses, held = {}, {}
    ddp_output, ddp_stderr = ddp_run
    output = tmp_path / "fsdp"
    result = run_train(output, *TWO_PROCESS_RUN, launcher=accelerate_launch("fsdp.yaml"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es), FSDP" in result.stderr
    for strategy, folder, stderr in (("ddp", ddp_output, ddp_stderr), ("fsdp", output, result.stderr)):
        assert (folder / "checkpoints" / "step-000002").is_dir()
        assert OtterModel.from_pretrained(folder / "model").config.model_type == "otter"
        losses[strategy], held[strategy] = logged_losses(folder), held_values(stderr)
    assert len(held["ddp"]) == len(held["fsdp"]) == 2
    assert held["ddp"][0] == held["ddp"][1]  # replicated
    assert max(held["fsdp"]) < 0.6 * held["ddp"][0]  # really sharded: about half each
    assert sorted(losses["ddp"]) == [1, 2, 3, 4]
    for step, loss in losses["ddp"].items():
        assert losses["fsdp"][step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp_resumes_and_saves_a_loadable_model(deepspeed_importable, tmp_path, ddp_run, stage):
    """fp32: otter-train's `--mixed-precision no` overrides the config's bf16 (bf16 has a test of its own)."""
    ddp_output, ddp_stderr = ddp_run
    output, launcher = tmp_path / "run", accelerate_launch(f"zero{stage}.yaml", mixed_precision=None)
    result = run_train(output, *TWO_PROCESS_RUN, "--mixed-precision", "no", launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"on 2 process(es), DEEPSPEED ZeRO-{stage}, mixed precision no" in result.stderr
    held, replicated = held_values(result.stderr), held_values(ddp_stderr)[0]
    assert len(held) == 2
    if stage == 2:
        assert held == [replicated, replicated]  # ZeRO-2 shards gradients and optimizer state only
    else:
        assert max(held) < 0.6 * replicated  # ZeRO-3: parameters too, about half each
    # Same data, same initial weights, same updates as DDP: the processes really exchange gradients.
    expected, losses = logged_losses(ddp_output), logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert OtterModel.from_pretrained(output / "model").config.model_type == "otter"  # gathered under ZeRO-3
    assert max_difference(saved_weights(output), saved_weights(ddp_output)) < 1e-4
    assert (output / "checkpoints" / "step-000002").is_dir() and (output / "checkpoints" / "step-000004").is_dir()
    shutil.rmtree(output / "checkpoints" / "step-000004")  # as if the run had been killed after step 3

    resumed = run_train(output, *TWO_PROCESS_RUN, "--mixed-precision", "no", "--resume", "--eval-samples", "0",
                        launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and str(output / "checkpoints" / "step-000002") in resumed.stderr
    again = logged_losses(output)
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):  # redone from the step-2 checkpoint: model, optimizer, scheduler and data order restored
        assert again[step] == pytest.approx(losses[step], abs=1e-6), step


@pytest.mark.slow
def test_deepspeed_bf16_as_configured(deepspeed_importable, tmp_path, ddp_run):
    """The shipped ZeRO-3 config unchanged: DeepSpeed's bf16 engine (bf16 weights and activations, fp32 master
    weights)."""
    ddp_output, _ = ddp_run
    output = tmp_path / "run"
    result = run_train(output, *TWO_PROCESS_RUN, launcher=accelerate_launch("zero3.yaml", mixed_precision=None))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es), DEEPSPEED ZeRO-3, mixed precision bf16" in result.stderr
    expected, losses = logged_losses(ddp_output), logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(loss) and loss == pytest.approx(expected[step], rel=1e-2) for step, loss in losses.items())
    assert any(abs(loss - expected[step]) > 1e-5 for step, loss in losses.items())  # really computed in bf16
    model = OtterModel.from_pretrained(output / "model")
    assert model.dtype == torch.bfloat16 and model.config.model_type == "otter"


@pytest.mark.slow
def test_grad_accum_on_one_process_matches_ddp_on_two(tmp_path, ddp_run):
    """Two batches of 4 accumulated on one process are the two processes' batches of 4 under DDP (accelerate deals
    batches to processes in turn), and both average the two batches' gradients: the same updates. Stepping at every
    batch, or not accumulating at all, would move the weights elsewhere (checked: far more than the tolerance)."""
    from accelerate.utils import set_seed
    from tiny_models import TINY_OTTER_DIR as TINY_OTTER

    from otter import OtterConfig
    from otter.training import start_from_scratch

    ddp_output, _ = ddp_run
    output = tmp_path / "accumulated"
    result = run_train(output, *TWO_PROCESS_RUN, "--grad-accum", "2", "--eval-samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(logged_losses(output)) == [1, 2, 3, 4]  # optimizer steps, not batches
    set_seed(0)  # otter-train's initial weights (--seed 0, built from the config)
    initial = OtterModel(OtterConfig.from_pretrained(TINY_OTTER))
    start_from_scratch(initial)
    accumulated, ddp = (OtterModel.from_pretrained(folder / "model").state_dict() for folder in (output, ddp_output))
    assert max_difference(ddp, initial.state_dict()) > 1e-3
    assert max_difference(accumulated, ddp) < 1e-5


@pytest.mark.slow
def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    steps = ["--max-steps", "3", "--save-every", "0", "--eval-samples", "0"]
    runs = {}
    variants = {"fp32": [], "checkpointed": ["--gradient-checkpointing"], "bf16": ["--mixed-precision", "bf16"]}
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:  # independent one-thread runs: they share the cores
        results = pool.map(lambda variant: run_train(tmp_path / variant[0], *steps, *variant[1]), variants.items())
        for name, result in zip(variants, results, strict=True):
            assert result.returncode == 0, result.stderr[-3000:]
            runs[name] = (logged_losses(tmp_path / name), result.stderr)
    # 4 LM layers, 2 CLIP layers, 2 perceiver blocks, 2 cross-attention blocks
    assert "gradient checkpointing: 10 layers recompute" in runs["checkpointed"][1]
    assert "mixed precision bf16" in runs["bf16"][1] and "mixed precision no" in runs["fp32"][1]
    fp32, checkpointed, bf16 = (runs[name][0] for name in ("fp32", "checkpointed", "bf16"))
    assert sorted(fp32) == sorted(checkpointed) == sorted(bf16) == [1, 2, 3]
    for step, loss in fp32.items():
        assert checkpointed[step] == pytest.approx(loss, abs=1e-5), step  # recomputation changes nothing
        assert math.isfinite(bf16[step]) and bf16[step] == pytest.approx(loss, rel=2e-2), step
    assert any(abs(bf16[step] - fp32[step]) > 1e-5 for step in fp32)  # autocast really computed in bf16
    weights = saved_weights(tmp_path / "bf16")
    assert {v.dtype for v in weights.values()} == {torch.float32}  # autocast: the weights stay fp32
    assert OtterModel.from_pretrained(tmp_path / "bf16" / "model").config.model_type == "otter"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_loopback_train_like_two_processes_on_one(tmp_path, ddp_run):
    """configs/accelerate/fsdp-multinode.yaml as two 'machines' on this one (one process each, gloo on loopback),
    both writing to one shared output folder: the losses of 2-process DDP, and one set of checkpoints."""
    output, port = tmp_path / "shared", free_port()
    config = ROOT / "configs/accelerate/fsdp-multinode.yaml"

    def machine(rank: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_machines", "2",
                "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--mixed_precision", "no", "-m"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda rank: run_train(output, *TWO_PROCESS_RUN, launcher=machine(rank)), (0, 1))
    assert first.returncode == 0, first.stderr[-4000:]
    assert second.returncode == 0, second.stderr[-4000:]
    assert "on 2 process(es), FSDP" in first.stderr
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert len(list((output / "checkpoints" / "step-000004").glob("random_states_*.pkl"))) == 2  # one per process
    assert (output / "summary.json").is_file() and not (output / "model.tmp").exists()
    expected, losses = logged_losses(ddp_run[0]), logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
