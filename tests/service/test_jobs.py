"""Jobs on a real `vopd worker` process: train and eval end to end, cancel, resume, a killed worker, failures."""

from __future__ import annotations

import io
import json
import os
import signal
import zipfile
from pathlib import Path

import pytest

from tests.service.conftest import Service, tiny_train_config

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _submit(service: Service, kind: str, config: dict, headers: dict | None = None) -> dict:
    response = service.client.post("/api/jobs", headers=headers or service.alice, json={"kind": kind, "config": config})
    assert response.status_code == 201, response.text
    return response.json()


def _events(service: Service, job_id: int) -> list[tuple[str, dict]]:
    """Read the server-sent events of a job until the server ends the stream."""
    events, name, data = [], None, []
    with service.client.stream("GET", f"/api/jobs/{job_id}/events", headers=service.alice, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif not line and name:
                events.append((name, json.loads("\n".join(data))))
                name, data = None, []
    return events


def _metric_steps(service: Service, job_id: int) -> list[int]:
    rows = service.client.get(f"/api/jobs/{job_id}/metrics", headers=service.alice).json()["items"]
    return [row["step"] for row in rows]


def _log_text(service: Service, job_id: int) -> str:
    rows = service.client.get(f"/api/jobs/{job_id}/logs", headers=service.alice).json()["items"]
    return "\n".join(row["message"] for row in rows)


def test_train_job_end_to_end(service: Service, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    job = _submit(service, "train", tiny_train_config())
    assert job["status"] == "queued" and job["queue_position"] >= 1
    # Paths relative to the server's home: the client learns which model and folder, not the server's layout.
    assert job["resolved_config"]["output"] == f"$VOPD_HOME/artifacts/jobs/{job['id']}"
    assert job["resolved_config"]["model"] == "$VOPD_HOME/models/tiny"
    assert str(service.settings.home) not in json.dumps(job)

    events = _events(service, job["id"])
    # The whole job once (``status``), then only what changed (``change``).
    statuses = [data["status"] for name, data in events if name in ("status", "change") and "status" in data]
    assert statuses[-1] == "succeeded" and "running" in statuses, statuses
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index)
    assert [data["step"] for name, data in events if name == "metric"] == [1, 2, 3, 4]
    assert events[-1] == ("end", {"status": "succeeded"})

    job = service.client.get(f"/api/jobs/{job['id']}", headers=service.alice).json()
    assert (job["step"], job["total_steps"], job["progress"], job["attempts"]) == (4, 4, 1.0, 1)
    assert job["result"]["model"] == f"job-{job['id']}/final" and job["latest_metrics"]
    assert job["engine"] == "hf"  # rollout.engine auto, resolved by a CPU worker
    assert job["started_at"] < job["finished_at"] and job["error"] is None

    metrics = service.client.get(f"/api/jobs/{job['id']}/metrics", headers=service.alice).json()
    assert [row["step"] for row in metrics["items"]] == [1, 2, 3, 4]
    assert all(isinstance(row["data"], dict) and row["data"] for row in metrics["items"])
    newer = service.client.get(
        f"/api/jobs/{job['id']}/metrics?since={metrics['items'][1]['id']}", headers=service.alice
    )
    assert [row["step"] for row in newer.json()["items"]] == [3, 4]
    assert "checkpoint saved at step 2" in _log_text(service, job["id"])

    artifacts = service.client.get(f"/api/jobs/{job['id']}/artifacts", headers=service.alice).json()["items"]
    names = {item["name"]: item for item in artifacts}
    assert {"final", "metrics.jsonl", "checkpoints/step-2", "checkpoints/step-4"} <= set(names)
    assert names["final"]["model_name"] == f"job-{job['id']}/final" and names["final"]["is_folder"]
    assert Path(service.settings.job_dir(job["id"]), "checkpoints", "step-4").is_dir()

    download = service.client.get(f"/api/jobs/{job['id']}/artifacts/final", headers=service.alice)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / "final")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "final")
    served = AutoModelForImageTextToText.from_pretrained(service.settings.job_dir(job["id"]) / "final")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), served.state_dict().values(), strict=True))
    metrics_file = service.client.get(f"/api/jobs/{job['id']}/artifacts/metrics.jsonl", headers=service.alice)
    assert [json.loads(line)["step"] for line in metrics_file.text.splitlines()] == [1, 2, 3, 4]

    model_names = [m["name"] for m in service.client.get("/api/models", headers=service.alice).json()["items"]]
    assert {f"job-{job['id']}/final", f"job-{job['id']}/step-4"} <= set(model_names)

    # Owner isolation: for bob the job does not exist, and neither does its model.
    for path in ("", "/metrics", "/logs", "/artifacts", "/artifacts/final"):
        assert service.client.get(f"/api/jobs/{job['id']}{path}", headers=service.bob).status_code == 404
    assert service.client.post(f"/api/jobs/{job['id']}/cancel", headers=service.bob).status_code == 404
    assert service.client.get("/api/jobs", headers=service.bob).json()["total"] == 0
    bob_models = [m["name"] for m in service.client.get("/api/models", headers=service.bob).json()["items"]]
    assert f"job-{job['id']}/final" not in bob_models
    stolen = service.client.post(
        "/api/jobs",
        headers=service.bob,
        json={"kind": "eval", "config": {"model": f"job-{job['id']}/final", "dataset": "synth-64"}},
    )
    assert stolen.status_code == 422


def test_eval_job_reports_accuracies_and_records(service: Service) -> None:
    config = {"model": "tiny", "dataset": "synth-64", "limit": 4, "batch_size": 4, "max_new_tokens": 4}
    job = _submit(service, "eval", {**config, "runtime": {"device": "cpu"}})
    job = service.wait_for(job["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["n"] == 4 and job["result"]["gap"] == pytest.approx(
        job["result"]["crop_accuracy"] - job["result"]["full_accuracy"]
    )
    assert (job["step"], job["total_steps"], job["unit"]) == (4, 4, "sample")
    assert job["result"]["engine"] == job["engine"] == "hf"  # engine auto, resolved by a CPU worker
    records = service.client.get(f"/api/jobs/{job['id']}/artifacts/records.jsonl", headers=service.alice)
    assert records.status_code == 200
    rows = [json.loads(line) for line in records.text.splitlines()]
    assert len(rows) == 4 and {"full_text", "crop_text", "full_correct"} <= set(rows[0])


def test_cancel_running_and_queued_jobs_then_resume(service: Service) -> None:
    long_config = tiny_train_config(steps=10, save_every=100)
    running = _submit(service, "train", long_config)
    waiting = _submit(service, "train", tiny_train_config(steps=2, seed=1))
    assert waiting["queue_position"] >= 1

    cancelled = service.client.post(f"/api/jobs/{waiting['id']}/cancel", headers=service.alice).json()
    assert cancelled["status"] == "cancelled"  # a queued job stops at once

    service.wait_for(running["id"], {"running"}, step=lambda step: step >= 2)
    response = service.client.post(f"/api/jobs/{running['id']}/cancel", headers=service.alice)
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    stopped = service.wait_for(running["id"], {"cancelled"})
    assert 2 <= stopped["step"] < 10
    checkpoints = [
        item["step"]
        for item in service.client.get(f"/api/jobs/{running['id']}/artifacts", headers=service.alice).json()["items"]
        if item["kind"] == "checkpoint"
    ]
    assert checkpoints == [stopped["step"]]  # saved on the way out, although save_every was never reached

    again = service.client.post(f"/api/jobs/{running['id']}/resume", headers=service.alice)
    assert again.status_code == 200 and again.json()["status"] == "queued"
    finished = service.wait_for(running["id"], {"succeeded", "failed"})
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["step"] == 10 and finished["attempts"] == 2
    assert _metric_steps(service, running["id"]) == list(range(1, 11))
    assert "resumed from" in _log_text(service, running["id"])

    skipped = service.client.get(f"/api/jobs/{waiting['id']}", headers=service.alice).json()
    assert skipped["status"] == "cancelled" and skipped["attempts"] == 0  # its message was skipped by the worker
    assert service.client.post(f"/api/jobs/{running['id']}/resume", headers=service.alice).status_code == 409
    assert service.client.post(f"/api/jobs/{running['id']}/cancel", headers=service.alice).status_code == 409

    page = service.client.get("/api/jobs?status=cancelled&kind=train&limit=1", headers=service.alice).json()
    assert page["limit"] == 1 and len(page["items"]) == 1 and page["total"] >= 1
    assert all(item["status"] == "cancelled" for item in page["items"])


def test_killed_worker_process_job_is_redelivered_and_resumes(service: Service) -> None:
    job = _submit(service, "train", tiny_train_config(steps=9, save_every=3))
    running = service.wait_for(job["id"], {"running"}, step=lambda step: step >= 4)
    host, _, pid = running["worker"].rpartition(":")
    os.kill(int(pid), signal.SIGKILL)  # the pool process dies mid-step, as under the kernel's OOM killer

    finished = service.wait_for(job["id"], {"succeeded", "failed"}, timeout_s=180)
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2 and finished["worker"] != running["worker"]
    assert _metric_steps(service, job["id"]) == list(range(1, 10))
    logs = _log_text(service, job["id"])
    assert f"taking over from {running['worker']}" in logs and "resumed from" in logs


def test_failing_job_stores_the_error(service: Service) -> None:
    broken = service.settings.models_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    job = _submit(service, "train", tiny_train_config(model="broken"))
    failed = service.wait_for(job["id"], {"failed", "succeeded"})
    assert failed["status"] == "failed"
    assert "ModelLoadError" in failed["error"] and "broken" in failed["error"]
    logs = service.client.get(f"/api/jobs/{job['id']}/logs", headers=service.alice).json()["items"]
    assert any(row["level"] == "error" and "Traceback" in row["message"] for row in logs)


def test_a_train_job_may_name_a_recipe_that_its_config_is_merged_over(service: Service) -> None:
    body = {
        "kind": "train",
        "recipe": "tiny-cpu",
        "config": {"model": "tiny", "dataset": "synth-64", "steps": 1, "collapse_guard": {"enabled": False}},
    }
    response = service.client.post("/api/jobs", headers=service.alice, json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    from vopd.config import recipe

    tiny = recipe("tiny-cpu")
    assert job["config"]["steps"] == 1 and job["config"]["lr"] == tiny["lr"]
    assert job["config"]["divergence"]["alpha"] == tiny["divergence"]["alpha"]
    assert job["config"]["teacher"]["mode"] == tiny["teacher"]["mode"]
    assert job["config"]["rollout"]["num_rollouts"] == tiny["rollout"]["num_rollouts"]
    service.wait_for(job["id"], {"succeeded"})

    body["recipe"] = "fastest"
    refused = service.client.post("/api/jobs", headers=service.alice, json=body)
    assert refused.status_code == 422 and "known recipes" in refused.text
