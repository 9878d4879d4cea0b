"""scripts/benchmark_main_job.py end to end, on runs of a few steps (what it measures needs full runs: see README)."""

import json
import os
import subprocess
import sys

import pytest
from tiny_models import ROOT


@pytest.mark.slow
def test_benchmark_runs_each_seed_and_summarises_every_task(tmp_path):
    command = [sys.executable, "scripts/benchmark_main_job.py", "--seeds", "2", "--threads", "1", "--output-dir",
               str(tmp_path), "--", "--data", "toy-mixture", "--max-steps", "2", "--copying-steps", "0", "--batch-size", "4",
               "--eval-samples", "4", "--eval-every", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("main_job_vqa_median=") and " main_job_icl_median=" in lines[-1]
    rows = [line.split() for line in lines if line.split()[:1] == ["1"]]
    assert [row[1] for row in rows] == ["0", "1"] and all(len(row) == 4 + 6 for row in rows)
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [(run["threads"], run["seed"]) for run in runs] == [(1, 0), (1, 1)]
    assert all(set(run["tasks"]) == {"vqa", "icl"} for run in runs)
    assert (tmp_path / "threads1-seed1" / "summary.json").is_file()
