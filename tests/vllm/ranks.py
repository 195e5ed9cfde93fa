"""One training process of tests/vllm/test_vllm_distributed.py (run by torchrun, 2 processes, gloo on CPU).

Each rank makes its own vllm engine (``create_rollout_engine`` under the strategy, as the trainer does), then trains
the shipped tiny model under ddp and under fsdp, with the real per-step sync and with it skipped, and after each
optimizer step measures max |engine log-prob - trained model's log-prob| on prompts of its own. The figures go to
``OUT/rank-R.json`` for the test to judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.vllm.conftest import ROLLOUT
from tests.vllm.test_vllm_engine import conversations_for, make_config, max_difference
from vopd import distributed
from vopd.config import RolloutConfig, RuntimeConfig
from vopd.engines import create_rollout_engine
from vopd.models import load_model_and_processor
from vopd.tiny import shipped_base_model_dir
from vopd.trainer import OPDTrainer

# (strategy, sync skipped after the start, optimizer steps)
RUNS = [("ddp", False, 2), ("ddp", True, 1), ("fsdp", False, 2), ("fsdp", True, 1)]


def main(dataset: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = shipped_base_model_dir()
    loaded = load_model_and_processor(model, RuntimeConfig(device="cpu", dtype="float32"))
    engine = create_rollout_engine(loaded.model, loaded, RolloutConfig.model_validate(ROLLOUT), strategy="ddp", seed=0)
    assert engine.name == "vllm", engine.name
    real_sync = engine.sync

    def start_sync_only(model: torch.nn.Module, everything: bool = False) -> float:
        return real_sync(model, everything=True) if everything else 0.0

    figures: dict[str, object] = {"rank": rank, "world_size": engine.world_size}
    for strategy, skipped, steps in RUNS:
        engine.sync = start_sync_only if skipped else real_sync
        runtime = {"device": "cpu", "dtype": "float32", "strategy": strategy, "dist_timeout_s": 120}
        # 4 prompts a step, 2 on each rank; the checks use this rank's own two prompts.
        config = make_config(model, dataset, out / f"{strategy}-{skipped}", batch_size=4, runtime=runtime)
        trainer = OPDTrainer(config, rollout_engine=engine)
        conversations = conversations_for(loaded, dataset)[rank * 4 : rank * 4 + 4]  # 2 prompts x 2 rollouts
        differences = []
        for _ in range(steps):
            metrics = trainer.train_step()
            trainer.step += 1
            differences.append(max_difference(engine, trainer.student, trainer.loaded, conversations))
            distributed.reshard(trainer.student)  # a scoring forward without a backward (FSDP keeps the root whole)
        figures[f"{strategy}-{'skipped' if skipped else 'synced'}"] = differences
        if not skipped:
            figures[f"{strategy}-sync_s"] = metrics["rollout/sync_s"]
        del trainer
    engine.sync = real_sync
    engine.close()
    (out / f"rank-{rank}.json").write_text(json.dumps(figures))
    dist.barrier()  # the process group outlives the engine's close
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
