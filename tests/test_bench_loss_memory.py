"""The bench scripts of the loss run end to end in their quick forms and their values agree (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_a_table_and_a_headline_whose_values_agree():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--quick", "--methods", "ours-full", "naive"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("| ours, full vocabulary") for line in lines)
    headline = json.loads(lines[-1])
    assert set(headline["peak_extra_mib"]) == {"ours-full", "naive"}
    # ours with topk=0 and the naive JSD are the same number: only float32 rounding may differ.
    assert headline["max_abs_diff"] < 1e-5


def test_step_memory_quick_run_scores_both_paths_to_the_same_loss():
    """bench/step_memory.py --quick: both trainer paths run a step in their own process and agree on the loss."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_memory.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("| from hidden states") for line in lines)
    headline = json.loads(lines[-1])
    assert set(headline["peak_extra_mib"]) == {"hidden", "logits"} and headline["vocab"] == 32_000
    assert headline["loss_rel_diff"] < 1e-4
