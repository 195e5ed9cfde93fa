"""One rank of a multi-device training job: ``python -m worker.ranks JOB_ID WORKER_NAME`` under torchrun.

The worker's pool process claims the job, keeps its heartbeat and records its outcome; it starts the job's N
processes with torchrun (``worker.runner``), each of which runs this module. Every rank trains; rank 0 alone reports
progress, metrics, logs and checkpoints to the database under the claiming worker's name, and polls the cancel flag,
whose answer the trainer broadcasts so that every rank stops at the same step. The outcome is written to
``rank-result.json`` in the job folder for the pool process to read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RESULT_FILE = "rank-result.json"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m worker.ranks JOB_ID WORKER_NAME", file=sys.stderr)
        return 2
    job_id, worker_name = int(argv[0]), argv[1]

    from app.db import make_engine, make_session_factory
    from app.settings import get_settings
    from app.tables import Job
    from vopd.config import TrainConfig
    from vopd.trainer import latest_checkpoint, train
    from worker.reporter import DatabaseReporter, QuotaGuard, json_safe

    settings = get_settings()
    factory = make_session_factory(make_engine(settings))
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            print(f"job {job_id} does not exist", file=sys.stderr)
            return 2
        config = TrainConfig.model_validate(job.resolved_config)
        output_dir = Path(job.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    callbacks = []
    if rank == 0:  # rank 0 reports, and stops the run (all ranks with it) when the owner's quota is used up
        quota = QuotaGuard.for_job(factory, settings, job_id)
        callbacks.append(DatabaseReporter(factory, job_id, worker_name, settings.progress_interval_s, quota))
    result = train(config, callbacks=callbacks, resume=latest_checkpoint(output_dir) is not None)
    if rank == 0:
        outcome = {
            "stopped": result.stopped,
            "step": result.step,
            "total_steps": result.total_steps,
            "final_dir": str(result.final_dir) if result.final_dir else None,
            "last_metrics": json_safe(result.last_metrics),
        }
        (output_dir / RESULT_FILE).write_text(json.dumps(outcome), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
