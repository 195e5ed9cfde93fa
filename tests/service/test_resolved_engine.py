"""The job answer names the engine the worker resolved (hf or vllm), not the one asked (often auto): the trainer
writes it into every step's metrics (rollout/engine), an evaluation into its result (engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.auth import create_api_key
from app.crud import job_out
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import Settings
from app.tables import Job


@pytest.mark.parametrize(
    ("kind", "config", "values", "engine"),
    [
        ("train", {"rollout": {"engine": "auto"}}, {}, None),  # no step done yet: unknown
        ("train", {"rollout": {"engine": "auto"}}, {"latest_metrics": {"rollout/engine": "vllm", "loss": 1}}, "vllm"),
        ("train", {}, {"latest_metrics": {"rollout/engine": "hf"}}, "hf"),
        ("train", {}, {"latest_metrics": {"rollout/engine": "something else"}}, None),
        ("eval", {"engine": "auto"}, {"result": {"engine": "vllm", "n": 4}}, "vllm"),
        ("eval", {"engine": "auto"}, {"result": {"n": 4}}, None),  # a result from before the engine was recorded
    ],
)
def test_job_answer_shows_the_resolved_engine(
    tmp_path: Path, kind: str, config: dict[str, Any], values: dict[str, Any], engine: str | None
) -> None:
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    database = make_engine(settings)
    run_migrations(database, settings)
    with session_scope(make_session_factory(database)) as session:
        key, _ = create_api_key(session, "alice")
        job = Job(
            owner_id=key.id,
            kind=kind,
            status="running",
            queue="q",
            config={"model": "tiny", "dataset": "d", **config},
            resolved_config={},
            output_dir=str(tmp_path),
            **values,
        )
        session.add(job)
        session.flush()
        assert job_out(session, job, settings=settings).engine == engine
    database.dispose()
