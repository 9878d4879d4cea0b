"""scripts/benchmark_vs_reference.py on the tiny config, one short round: it builds all four systems, finds ours and
OpenFlamingo to be the same model, and prints a row for every workload and system."""

import importlib.util
import re
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_vs_reference.py"
SYSTEMS = ["bare LM", "ours", "OpenFlamingo", "IDEFICS"]


pytestmark = pytest.mark.slow  # builds four systems and runs a benchmark round


@pytest.fixture(scope="module")
def report() -> str:
    for module in ("open_flamingo", "einops_exts"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install --no-deps open-flamingo==2.0.1 einops-exts")
    spec = importlib.util.spec_from_file_location("benchmark_vs_reference", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = StringIO()
    with redirect_stdout(output):
        benchmark.main(["--config", "tiny", "--rounds", "1", "--new-tokens", "3", "--generate-batches", "2"])
    sys.stdout.write(output.getvalue())
    return output.getvalue()


def test_ours_and_openflamingo_are_the_same_model(report):
    difference = float(re.search(r"max \|logit\(ours\) - logit\(OpenFlamingo\)\| = (\S+);", report).group(1))
    assert difference < 1e-5
    assert "identical greedy tokens: yes" in report


def test_every_workload_and_system_has_a_row(report):
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    measured = {(cells[0].strip("| "), cells[3]) for cells in rows if len(cells) == 8 and cells[0] != "| workload"}
    workloads = ["forward", "train step", "generate 3", "generate 1"]
    expected = {(w, s) for w in workloads for s in SYSTEMS if not (w == "train step" and s == "bare LM")}
    assert measured == expected
    per_token = {cells[2] for cells in rows if len(cells) == 6 and cells[0] != "| batch"}
    assert per_token == set(SYSTEMS)
