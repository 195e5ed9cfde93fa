"""Eval jobs on a published benchmark: the server resolves `data` only inside VOPD_HOME/benchmarks, and a worker
runs the suite and records its per-category summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app import crud
from app.auth import create_api_key
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.registry import UnknownName
from app.schemas import EvalJobCreate
from app.settings import Settings
from app.tables import Job
from tests.service.conftest import Service
from tests.test_benchmarks import TINY_BASE, write_vstar


class _Queue:
    """Records what would be published; the broker is not under test here."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def enqueue(self, job_id: int, kind: str, queue: str) -> None:
        self.sent.append(job_id)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", database_url_env=f"sqlite:///{tmp_path}/t.db")
    settings.ensure_dirs()
    shutil.copytree(TINY_BASE, settings.models_dir / "tiny")
    write_vstar(crud.benchmarks_dir(settings) / "vstar")
    return settings


def test_benchmark_data_resolves_only_inside_the_benchmarks_folder(settings: Settings, tmp_path: Path) -> None:
    root = crud.benchmarks_dir(settings)
    assert crud.resolve_benchmark_data(settings, "V*", "vstar") == root / "vstar"
    assert crud.resolve_benchmark_data(settings, "vstar", str(root / "vstar")) == root / "vstar"
    outside = tmp_path / "elsewhere"
    write_vstar(outside)
    (root / "linked").symlink_to(outside)  # an administrator's symlink to a data disk is allowed
    assert crud.resolve_benchmark_data(settings, "vstar", "linked") == root / "linked"
    for data, field, message in [
        (str(outside), "data", "lies outside"),
        ("../elsewhere", "data", "'..'"),
        ("missing", "data", "no benchmark folder"),
        (None, "data", "needs config.data"),
    ]:
        with pytest.raises(UnknownName, match=message) as caught:
            crud.resolve_benchmark_data(settings, "vstar", data)
        assert caught.value.field == field
    with pytest.raises(UnknownName, match="known benchmarks: vstar") as caught:
        crud.resolve_benchmark_data(settings, "mmbench", "vstar")
    assert caught.value.field == "benchmark"


def test_create_job_stores_the_resolved_benchmark_folder(settings: Settings) -> None:
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            owner, _ = create_api_key(session, "t")
            owner_id = owner.id
        queue = _Queue()
        body = EvalJobCreate.model_validate(
            {"kind": "eval", "config": {"model": "tiny", "benchmark": "vstar", "data": "vstar", "limit": 2}}
        )
        with factory() as session:
            job = crud.create_job(session, settings, queue, owner_id, body)  # type: ignore[arg-type]
            job_id = job.id
        with factory() as session:
            stored = session.get(Job, job_id)
            assert stored.config["data"] == "vstar" and stored.config.get("dataset") is None  # what the user sent
            assert stored.resolved_config["data"] == str(crud.benchmarks_dir(settings) / "vstar")
            assert stored.resolved_config["benchmark"] == "vstar"
            assert stored.resolved_config["output"].endswith("records.jsonl")
        assert queue.sent == [job_id]
    finally:
        engine.dispose()


@pytest.mark.services
@pytest.mark.slow
def test_benchmark_eval_job_end_to_end(service: Service) -> None:
    write_vstar(crud.benchmarks_dir(service.settings) / "vstar-small")
    config = {
        "model": "tiny",
        "benchmark": "vstar",
        "data": "vstar-small",
        "limit": 4,
        "batch_size": 4,
        "max_new_tokens": 3,
        "views": {"max_pixels": 112 * 112},
        "runtime": {"device": "cpu"},
    }
    response = service.client.post("/api/jobs", headers=service.alice, json={"kind": "eval", "config": config})
    assert response.status_code == 201, response.text
    job = service.wait_for(response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["benchmark"] == "vstar" and result["n"] == 4
    assert {name: stats["n"] for name, stats in result["categories"].items()} == {
        "direct_attributes": 3,
        "relative_position": 1,
    }
    records = service.client.get(f"/api/jobs/{job['id']}/artifacts/records.jsonl", headers=service.alice)
    rows = [json.loads(line) for line in records.text.splitlines()]
    assert len(rows) == 4 and result["accuracy"] == sum(r["full_correct"] for r in rows) / 4

    refused = service.client.post(
        "/api/jobs",
        headers=service.alice,
        json={"kind": "eval", "config": {"model": "tiny", "benchmark": "vstar", "data": "/etc"}},
    )
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "config", "data"]


def test_a_job_may_name_only_the_servers_own_judge(settings: Settings) -> None:
    """The worker sends its judge key to the judge's URL: a job naming another address would collect it."""
    with pytest.raises(UnknownName, match="no judge") as caught:
        crud.check_judge_url(settings, "http://127.0.0.1:9/v1")
    assert caught.value.field == "judge"
    allowed = settings.model_copy(update={"judge_url": "http://judge.internal:8000/v1/"})
    crud.check_judge_url(allowed, "http://judge.internal:8000/v1")
    with pytest.raises(UnknownName, match="must be this server's judge"):
        crud.check_judge_url(allowed, "http://attacker.example/v1")
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            owner, _ = create_api_key(session, "t")
            owner_id = owner.id
        queue = _Queue()
        config = {"model": "tiny", "benchmark": "vstar", "data": "vstar", "judge": {"url": "http://x.example/v1",
                                                                                    "model": "j"}}  # fmt: skip
        body = EvalJobCreate.model_validate({"kind": "eval", "config": config})
        with factory() as session, pytest.raises(UnknownName, match="no judge"):
            crud.create_job(session, settings, queue, owner_id, body)  # type: ignore[arg-type]
        assert queue.sent == []
    finally:
        engine.dispose()


def test_the_server_lists_the_suites_in_its_benchmarks_folder(service: Service) -> None:
    root = service.settings.home / "benchmarks"
    made = [root / "vstar_bench", root / "ZoomBench", root / "hr_bench_4k.tsv", root / "my-notes"]
    root.mkdir(exist_ok=True)
    kept = {path.name for path in root.iterdir()}
    try:
        for path in made:
            if path.suffix:
                path.write_text("index\tquestion\n")
            else:
                path.mkdir(exist_ok=True)
        answer = service.client.get("/api/benchmarks", headers=service.alice)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        listed = {(item["suite"], item["data"]) for item in body["items"] if item["data"] not in kept}
        assert listed == {("vstar", "vstar_bench"), ("zoombench", "ZoomBench"), ("hrbench-4k", "hr_bench_4k.tsv")}
        assert body["folder"] == "$VOPD_HOME/benchmarks"  # no server path
        assert service.client.get("/api/benchmarks").status_code == 401
    finally:
        for path in made:
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
