"""The bench scripts of the loss run end to end in their quick forms and their values agree (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_run(script: str, *args: str) -> list[str]:
    """The script's printed lines (it must exit 0)."""
    command = [sys.executable, str(ROOT / "bench" / script), "--quick", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    return result.stdout.strip().splitlines()


def test_quick_run_prints_a_table_and_a_headline_whose_values_agree():
    lines = _quick_run("loss_memory.py", "--methods", "ours-full", "naive")
    assert any(line.startswith("| ours, full vocabulary") for line in lines)
    headline = json.loads(lines[-1])
    assert set(headline["peak_extra_mib"]) == {"ours-full", "naive"}
    # ours with topk=0 and the naive JSD are the same number: only float32 rounding may differ.
    assert headline["max_abs_diff"] < 1e-5


def test_step_memory_quick_run_scores_both_paths_to_the_same_loss():
    """bench/step_memory.py --quick: the trainer's paths (hidden states or logits; one prompt pass or two) each run a
    step in their own process and agree on the loss."""
    lines = _quick_run("step_memory.py")
    assert any(line.startswith("| from hidden states") for line in lines)
    headline = json.loads(lines[-1])
    assert set(headline["peak_extra_mib"]) == {"hidden", "logits", "two-passes"} and headline["vocab"] == 32_000
    assert headline["loss_rel_diff"] < 1e-4
