"""What clients read names no server path, and /openapi.json declares every answer a route gives, in its shape.

The full check is schemathesis with ``status_code_conformance`` and ``response_schema_conformance`` on
(``test_no_server_errors.py``); these are the findings it started from, each on its own.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.service.conftest import tiny_train_config

pytestmark = pytest.mark.services


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app

    settings = Settings(home=tmp_path / "secret-home", database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    with TestClient(app) as client:
        yield client, headers, settings


def test_resolved_config_and_refusals_name_no_server_path(api: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, headers, settings = api
    home = str(settings.home)
    job = client.post("/api/jobs", headers=headers, json={"kind": "train", "config": tiny_train_config()})
    assert job.status_code == 201, job.text
    resolved = job.json()["resolved_config"]
    assert resolved["model"] == "$VOPD_HOME/models/tiny"
    assert resolved["output"] == f"$VOPD_HOME/artifacts/jobs/{job.json()['id']}"
    assert resolved["dataset"].startswith("$VOPD_HOME/datasets/")
    for read in (f"/api/jobs/{job.json()['id']}", "/api/jobs"):
        assert home not in client.get(read, headers=headers).text
    # ...while the worker still runs the absolute paths stored in the row
    from app.db import session_scope
    from app.tables import Job

    with session_scope(client.app.state.session_factory) as session:
        assert session.get(Job, job.json()["id"]).resolved_config["model"] == f"{home}/models/tiny"

    refusals = [
        {"kind": "eval", "config": {"model": "tiny", "benchmark": "vstar", "data": "missing"}},
        {"kind": "eval", "config": {"model": "tiny", "benchmark": "vstar", "data": "/etc"}},
        {"kind": "train", "config": tiny_train_config(model="/opt/elsewhere/model")},
    ]
    for body in refusals:
        response = client.post("/api/jobs", headers=headers, json=body)
        assert response.status_code == 422, response.text
        assert home not in response.text and "$VOPD_HOME/" in response.text, response.text
    inspect = client.post(
        "/api/inspect",
        headers=headers,
        json={"model": "/opt/elsewhere/model", "dataset": "synth-64", "sample": 0},
    )
    assert inspect.status_code == 422 and home not in inspect.text, inspect.text


def _declared(schema: dict, path: str, method: str) -> dict[str, dict]:
    return schema["paths"][path][method]["responses"]


def test_openapi_declares_the_error_codes_routes_give(api: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, _, _ = api
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path != "/api/health":
                assert "401" in codes, (method, path)  # every route but health needs a key
            if method == "post":
                assert "413" in codes, (method, path)  # every body is capped
            if "{" in path:
                assert "404" in codes, (method, path)
            for code in (code for code in codes if not code.startswith("2")):  # errors, not successes (204 has none)
                content = operation["responses"][code].get("content", {}).get("application/json")
                assert content and content["schema"], (method, path, code)  # each error has its body's shape
    for path, method in (("/api/keys", "get"), ("/api/keys", "post"), ("/api/keys/{key_id}/revoke", "post")):
        assert "403" in _declared(schema, path, method)
    for path, method in (("/api/jobs/{job_id}/cancel", "post"), ("/api/jobs/{job_id}/resume", "post")):
        assert "409" in _declared(schema, path, method)


def _validator(schema: dict, path: str, method: str, code: str) -> jsonschema_rs.Draft202012Validator:
    """The declared body schema of one answer, with the document's components for its references."""
    body_schema = _declared(schema, path, method)[code]["content"]["application/json"]["schema"]
    return jsonschema_rs.Draft202012Validator({**body_schema, "components": schema["components"]})


def test_every_dataset_422_matches_its_declared_schema(api: tuple[TestClient, dict[str, str], Settings]) -> None:
    """A dataset that does not load (issues per line), an upload refused before loading (not a zip), a request
    without its file: all three are 422, all three in the declared DatasetRejected shape, none naming a path."""
    client, headers, settings = api
    validator = _validator(client.get("/openapi.json").json(), "/api/datasets", "post", "422")
    bad_lines = b'{"image": "missing.png", "question": "q?"}\n{"nope": 1}\n'
    answers = [
        client.post("/api/datasets", headers=headers, files={"file": ("data.jsonl", io.BytesIO(bad_lines))}),
        client.post("/api/datasets", headers=headers, files={"file": ("notes.txt", io.BytesIO(b"hello"))}),
        client.post("/api/datasets", headers=headers, data={"name": "no file"}),
    ]
    for response in answers:
        assert response.status_code == 422, response.text
        errors = [error.message for error in validator.iter_errors(response.json())]
        assert not errors, (response.json(), errors)
        assert str(settings.home) not in response.text
    assert answers[0].json()["issues"]  # the per-line issues are there when the dataset was read


def test_error_bodies_match_their_declared_schema(api: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, headers, _ = api
    schema = client.get("/openapi.json").json()
    checks = [
        (client.get("/api/jobs/123", headers=headers), "/api/jobs/{job_id}", "get", "404"),
        (client.get("/api/jobs"), "/api/jobs", "get", "401"),
        (client.post("/api/jobs/123/cancel", headers=headers), "/api/jobs/{job_id}/cancel", "post", "404"),
        (
            client.post("/api/jobs", headers={**headers, "Content-Length": str(10**9)}, content=b"{}"),
            "/api/jobs",
            "post",
            "413",
        ),
    ]
    for response, path, method, code in checks:
        assert str(response.status_code) == code, response.text
        errors = [error.message for error in _validator(schema, path, method, code).iter_errors(response.json())]
        assert not errors, (path, response.json(), errors)
    assert json.loads(checks[1][0].text)["detail"].startswith("missing API key")
