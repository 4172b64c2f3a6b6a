"""scripts/bench_device.py, the command prepared for the first GPU or TPU machine, runs end to end at tiny shapes
on the CPU (ours and torch's figures, the JSON line), so that a single call on a lent machine gives the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.pipeline
def test_bench_device_runs_every_figure_at_tiny_shapes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_device.py"), "--models", "tiny",
                           "--batch", "2", "--seq", "32", "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["platform"] == "cpu" and result["peak_flops"] > 0
    (row,) = result["rows"]
    assert (row["model"], row["batch"], row["seq"], row["span"]) == ("tiny", 2, 32, [2, 2])
    assert row["forward"]["tokens_per_s"] > 0 and 0 < row["forward"]["mfu"] < 1
    assert set(row["train"]) == {"mse_cached", "kd_cached", "lm"}
    for step in row["train"].values():
        assert step["s"] > 0 and step["flops"] > 0 and 0 < step["mfu"] < 1
    assert row["joint_evaluation"]["together_s"] > 0 and row["joint_evaluation"]["apart_s"] > 0
    assert row["torch"]["device"] == "cpu" and row["torch"]["forward_s"] > 0 and row["torch"]["lm_s"] > 0
    assert row["ours_over_torch"]["forward"] > 0
    assert "train step kd_cached" in proc.stdout and "torch (cpu)" in proc.stdout
