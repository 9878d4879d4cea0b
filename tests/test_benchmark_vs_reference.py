"""scripts/benchmark_vs_reference.py on the tiny config, one short round: it builds all four systems, finds ours and
OpenFlamingo to be the same model, and prints a row for every workload and system."""

import importlib.util
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_vs_reference.py"
SYSTEMS = ["bare LM", "ours", "OpenFlamingo", "IDEFICS"]


pytestmark = pytest.mark.slow  # builds four systems and runs a benchmark round


def load_script():
    for module in ("open_flamingo", "einops_exts"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install --no-deps open-flamingo==2.0.1 einops-exts")
    spec = importlib.util.spec_from_file_location("benchmark_vs_reference", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


@pytest.fixture(scope="module")
def report() -> str:
    benchmark = load_script()
    output = StringIO()
    with redirect_stdout(output):
        benchmark.main(["--config", "tiny", "--rounds", "2", "--memory-passes", "1", "--new-tokens", "3", "--generate-batches", "2"])
    sys.stdout.write(output.getvalue())
    return output.getvalue()


def test_ours_and_openflamingo_are_the_same_model(report):
    difference = float(re.search(r"max \|logit\(ours\) - logit\(OpenFlamingo\)\| = (\S+);", report).group(1))
    assert difference < 1e-5
    assert "identical greedy tokens: yes" in report


def test_every_workload_and_system_has_a_row(report):
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    measured = {(cells[0].strip("| "), cells[3]) for cells in rows if len(cells) == 12 and cells[0] != "| workload"}
    workloads = ["forward", "train step", "train step answers", "generate 3", "generate 1"]
    expected = {(w, s) for w in workloads for s in SYSTEMS if not (w.startswith("train step") and s == "bare LM")}
    assert measured == expected
    per_token = {cells[2] for cells in rows if len(cells) == 6 and cells[0] != "| batch"}
    assert per_token == set(SYSTEMS)


def test_ratios_are_paired_by_round(report):
    """Two rounds: every ratio cell is the median of the two per-round ratios and their range, and lies inside it."""
    rows = [line.strip("| ").split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [cell for row in rows if len(row) == 12 and row[0] != "workload" for cell in row[9:] if cell]
    assert cells, "no ratio cells"
    for cell in cells:
        median, low, high = map(float, re.fullmatch(r"(\S+) \((\S+)-(\S+)\)", cell).groups())
        assert low <= median <= high


def test_ours_loss_only_training_loss_is_openflamingo_s_on_both_label_sets(tmp_path):
    """The training step's losses on the same weights: ours through `labels` + `loss_only`, OpenFlamingo from its
    full logits; the answers-only labels supervise 3 tokens per image chunk."""
    import torch

    benchmark = load_script()
    sizes = benchmark.CONFIGS["tiny"]
    ours, reference = benchmark.build_systems(sizes, tmp_path, ["ours", "OpenFlamingo"], torch.device("cpu"), torch.float32)
    inputs = benchmark.make_inputs(sizes, 2, 3, ours.model.config.media_token_id, torch.Generator().manual_seed(0),
                                   torch.device("cpu"), torch.float32)
    assert ((inputs.answer_labels != -100).sum(dim=1) == 3 * benchmark.ANSWER_TOKENS).all()
    for labels in (inputs.input_ids, inputs.answer_labels):
        assert abs(ours.loss(inputs, labels).item() - reference.loss(inputs, labels).item()) < 1e-5


def test_paired_ratio_takes_the_median_of_per_round_ratios():
    benchmark = load_script()
    # Per round: 2/1, 3/1, 8/2 -> 2, 3, 4; a ratio of medians would give 3/1 = 3 as well, so the range tells them apart.
    assert benchmark.paired_ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == "3.00 (2.00-4.00)"


def test_the_gpu_runs_bfloat16_path_runs_on_the_cpu(tmp_path, capsys):
    """`--device cuda --dtype bfloat16` has never run here (no GPU): its dtype handling (weights, pixels, both label
    sets' losses, AdamW on bf16 parameters) runs on the CPU instead, tiny config at batch 2 (bf16 products are slow on
    a CPU without bf16 instructions)."""
    import torch

    benchmark = load_script()
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    sizes = benchmark.CONFIGS["tiny"]
    ours, reference = benchmark.build_systems(sizes, tmp_path, ["ours", "OpenFlamingo"], cpu, bf16)
    inputs = benchmark.make_inputs(sizes, 2, 3, ours.model.config.media_token_id, torch.Generator().manual_seed(1), cpu, bf16)
    benchmark.check_same_model(ours, reference, inputs, 4)
    # bf16 keeps 8 bits of mantissa: the two implementations round differently but stay the same model
    report = capsys.readouterr().out
    assert float(re.search(r"max \|logit\(ours\) - logit\(OpenFlamingo\)\| = (\S+);", report).group(1)) < 1e-2
    assert "identical greedy tokens: yes" in report
    for labels in (inputs.input_ids, inputs.answer_labels):
        with torch.no_grad():
            losses = [system.loss(inputs, labels).float().item() for system in (ours, reference)]
        assert abs(losses[0] - losses[1]) < 1e-2 * losses[1], losses
    for system in (ours, reference):
        benchmark.Workload("train step answers", 2, 3).run(system, inputs)
        state = [system.optimizer.state[p] for group in system.optimizer.param_groups for p in group["params"]]
        assert state and all(s["exp_avg"].dtype == bf16 for s in state), system.name


def test_compile_compiles_ours_alone_and_says_so(monkeypatch):
    """`--compile` compiles ours' model and not the reference's (compiling for real takes minutes: recorded here)."""
    import torch

    benchmark = load_script()
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *args, **kwargs: compiled.append(module))
    output = StringIO()
    with redirect_stdout(output):
        benchmark.main(["--config", "tiny", "--systems", "ours", "OpenFlamingo", "--workloads", "forward",
                        "--rounds", "1", "--memory-passes", "1", "--compile"])
    assert [type(module).__name__ for module in compiled] == ["FlamingoModel"]
    assert "ours compiled; warm-up took" in output.getvalue()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_cuda_without_a_gpu_is_a_clean_skip():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path is not reachable")
    # The repository root on the path, as pytest's `pythonpath` gives this process (the script imports flamingo).
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--dtype", "bfloat16"],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert "skipped, --device cuda but torch sees no CUDA device" in result.stderr
    assert "Traceback" not in result.stderr and "round" not in result.stdout


@pytest.mark.parametrize("flag", ["--rounds", "--memory-passes"])
def test_a_count_below_one_is_refused_with_the_flag_named(flag, capsys):
    benchmark = load_script()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_arguments([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--systems", "OpenFlamingo", "IDEFICS", "--compile"], "--compile compiles ours, which --systems leaves out (OpenFlamingo, IDEFICS)"),
    (["--compile", "--profile-train-step"], "--compile applies to the timed table, not to --profile-train-step"),
])
def test_compile_without_ours_timed_is_refused(argv, message, capsys):
    benchmark = load_script()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_arguments(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
