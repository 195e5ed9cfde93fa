"""Jobs on several devices through the REST API: a worker with two "GPUs" (gloo processes on this CPU) takes a
job that asks for two, runs both ranks with torchrun, and cancel and resume reach every rank; a node group of two
"machines" (two workers on this host, one process each) runs a job that asks for two nodes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from app.serve import stop_process, vopd_command
from tests.conftest import free_port
from tests.service.conftest import GROUP, Service, tiny_train_config

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _metric_steps(service: Service, job_id: int) -> list[int]:
    rows = service.client.get(f"/api/jobs/{job_id}/metrics", headers=service.alice).json()["items"]
    return [row["step"] for row in rows]


def _log_text(service: Service, job_id: int) -> str:
    rows = service.client.get(f"/api/jobs/{job_id}/logs", headers=service.alice).json()["items"]
    return "\n".join(row["message"] for row in rows)


def _submit(service: Service, gpus: int, **config: object) -> dict:
    body = {"kind": "train", "resources": {"gpus": gpus}, "config": tiny_train_config(**config)}
    response = service.client.post("/api/jobs", headers=service.alice, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_two_device_job_runs_on_both_ranks_and_cancel_and_resume_reach_them(service: Service, tmp_path: Path):
    log = tmp_path / "worker-2-devices.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen(
            vopd_command("worker", "--gpus", "2"), env=service.env, stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while not any(w["gpus"] == 2 for w in service.client.get("/api/health").json()["workers"]):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        refused = service.client.post(
            "/api/jobs",
            headers=service.alice,
            json={"kind": "train", "resources": {"gpus": 2}, "config": tiny_train_config(batch_size=3)},
        )
        assert refused.status_code == 422 and "multiple of resources.gpus 2" in refused.text
        too_big = _submit(service, 4, batch_size=4)
        assert any("--gpus 4" in warning for warning in too_big["warnings"]), too_big
        assert service.client.post(f"/api/jobs/{too_big['id']}/cancel", headers=service.alice).status_code == 200

        job = _submit(service, 2, steps=4, batch_size=2, save_every=2)
        assert job["gpus"] == 2 and job["queue"].endswith(".gpus2") and not job["warnings"]
        assert job["resolved_config"]["runtime"]["strategy"] == "ddp"
        done = service.wait_for(job["id"], {"succeeded", "failed"}, timeout_s=300)
        assert done["status"] == "succeeded", (done["error"], _log_text(service, job["id"])[-3000:])
        assert _metric_steps(service, job["id"]) == [1, 2, 3, 4]
        assert "training on 2 processes" in _log_text(service, job["id"])
        final = service.settings.job_dir(done["id"]) / "final"
        assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()

        # A failure inside the ranks fails the job with the ranks' own error, and every rank's output in its log.
        broken = _submit(service, 2, steps=2, batch_size=2, lora={"enabled": True, "target_modules": ["no_such_proj"]})
        failed = service.wait_for(broken["id"], {"succeeded", "failed"}, timeout_s=300)
        assert failed["status"] == "failed" and "2 training processes failed" in failed["error"], failed["error"]
        assert "match no linear layer" in failed["error"]
        log_text = _log_text(service, broken["id"])
        assert "[rank0]" in log_text and "[rank1]" in log_text, log_text[-2000:]

        long = _submit(service, 2, steps=40, batch_size=2, save_every=100)
        service.wait_for(long["id"], {"running"}, timeout_s=300, step=lambda step: step >= 1)
        assert service.client.post(f"/api/jobs/{long['id']}/cancel", headers=service.alice).status_code == 200
        cancelled = service.wait_for(long["id"], {"cancelled"}, timeout_s=120)
        assert 0 < cancelled["step"] < 40  # both ranks stopped at the same step (a rank left behind would hang)
        output = service.settings.job_dir(long["id"])
        assert (output / "checkpoints" / f"step-{cancelled['step']}" / "trainer_state.pt").is_file()
        assert service.client.post(f"/api/jobs/{long['id']}/resume", headers=service.alice).status_code == 200
        resumed = service.wait_for(long["id"], {"succeeded", "failed"}, timeout_s=300)
        assert resumed["status"] == "succeeded", (resumed["error"], _log_text(service, long["id"])[-3000:])
        assert _metric_steps(service, long["id"]) == list(range(1, 41))
    finally:
        stop_process(worker)


def test_a_job_over_two_machines_runs_on_a_node_group(service: Service, tmp_path: Path):
    if service.backend != "postgresql":
        pytest.skip("a node group's machines share a database server: exercised on PostgreSQL + Redis")
    queue = f"{service.env['VOPD_QUEUE']}-{GROUP}"  # in the service's VOPD_QUEUES
    group_env = {
        **service.env,
        "VOPD_NODES": "2",
        "VOPD_MASTER_ADDR": "127.0.0.1",
        "VOPD_MASTER_PORT": str(free_port()),
    }
    workers = []
    try:
        for node_rank in (0, 1):
            with (tmp_path / f"node{node_rank}.log").open("wb") as handle:
                workers.append(
                    subprocess.Popen(
                        vopd_command("worker", "--queue", queue, "--node-rank", str(node_rank)),
                        env=group_env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 120
        group = {(2, 0), (2, 1)}  # (nodes, node_rank) of the two machines, once both say alive
        while not group <= {(w["nodes"], w["node_rank"]) for w in service.client.get("/api/health").json()["workers"]}:
            assert all(w.poll() is None for w in workers) and time.monotonic() < deadline, [
                (tmp_path / f"node{rank}.log").read_text()[-2000:] for rank in (0, 1)
            ]
            time.sleep(0.5)

        refused = service.client.post(
            "/api/jobs",
            headers=service.alice,
            json={
                "kind": "train",
                "queue": queue,
                "resources": {"nodes": 2},
                "config": tiny_train_config(batch_size=3),
            },
        )
        assert refused.status_code == 422 and "multiple of resources.gpus x nodes (1 x 2)" in refused.text
        body = {"kind": "train", "queue": queue, "resources": {"gpus": 1, "nodes": 2}}
        job = service.client.post(
            "/api/jobs", headers=service.alice, json={**body, "config": tiny_train_config(steps=2, batch_size=2)}
        ).json()
        assert job["nodes"] == 2 and job["queue"] == f"{queue}.nodes2.gpus1" and not job["warnings"], job
        assert job["resolved_config"]["runtime"]["strategy"] == "ddp"
        done = service.wait_for(job["id"], {"succeeded", "failed"}, timeout_s=300)
        logs = (tmp_path / "node0.log").read_text()[-2000:], (tmp_path / "node1.log").read_text()[-2000:]
        assert done["status"] == "succeeded", (done["error"], _log_text(service, job["id"])[-3000:], logs)
        assert _metric_steps(service, job["id"]) == [1, 2]
        assert "1 on each of 2 machines" in _log_text(service, job["id"])
        output = service.settings.job_dir(done["id"])
        assert (output / "final" / "model.safetensors").is_file()
        assert (output / "ranks-node1.log").is_file()  # machine 1 ran its share: its worker says how it ended
        # Machine 0 marks the job done; machine 1's worker logs its own end of the task a moment later.
        deadline = time.monotonic() + 30
        while "'finished'" not in (node1_log := (tmp_path / "node1.log").read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "vopd.join_ranks" in node1_log and "'finished'" in node1_log, node1_log[-2000:]

        # A machine that never comes fails the job at the rendezvous, with the launcher's reason, instead of a hang.
        stop_process(workers[1])
        config = tiny_train_config(steps=2, batch_size=2, runtime={"device": "cpu", "dist_timeout_s": 10})
        alone = service.client.post("/api/jobs", headers=service.alice, json={**body, "config": config}).json()
        failed = service.wait_for(alone["id"], {"succeeded", "failed"}, timeout_s=120)
        assert failed["status"] == "failed" and "1/2 clients joined" in failed["error"], failed["error"]

        lonely = service.client.post(
            "/api/jobs",
            headers=service.alice,
            json={**body, "resources": {"gpus": 1, "nodes": 3}, "config": tiny_train_config(batch_size=3)},
        ).json()
        assert any("--nodes 3" in warning for warning in lonely["warnings"]), lonely
        assert service.client.post(f"/api/jobs/{lonely['id']}/cancel", headers=service.alice).status_code == 200
    finally:
        for worker in workers:
            stop_process(worker)
