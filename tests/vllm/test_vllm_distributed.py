"""The vllm engine colocated per rank under ddp and fsdp: two training processes (torchrun, gloo on CPU), each with
its own engine; after every optimizer step each rank's engine gives the log-probs of the model that rank trains
(under FSDP synced from shards gathered one tensor at a time), and the check fails with the per-step sync skipped.
The work of each rank is tests/vllm/ranks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_trainer import write_dataset
from tests.vllm.test_vllm_engine import LOGPROB_TOLERANCE


def test_an_engine_per_rank_follows_the_trained_model_under_ddp_and_fsdp(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data", count=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "tests.vllm.ranks", str(dataset), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert figures["world_size"] == 2  # the engine saw the training processes' group
        for strategy in ("ddp", "fsdp"):
            synced, skipped = figures[f"{strategy}-synced"], figures[f"{strategy}-skipped"]
            assert len(synced) == 2 and max(synced) < LOGPROB_TOLERANCE, (rank, strategy, synced)
            assert min(skipped) > 1e-2, (rank, strategy, skipped)
            assert figures[f"{strategy}-sync_s"] > 0
