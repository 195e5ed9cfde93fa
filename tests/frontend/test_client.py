"""The typed API client: requests it sends, answers it parses, and the messages its errors carry."""

from __future__ import annotations

import httpx
import pytest

from frontend.client import ApiError, VopdClient, error_from_response
from tests.frontend.conftest import API_KEY, BASE_URL, FakeApi, inspect_json, job_json


def test_every_request_carries_the_bearer_key(api: FakeApi) -> None:
    api.routes["GET /api/models"] = {"items": [{"name": "tiny", "kind": "base"}]}
    models = api.client().models()
    assert [m.name for m in models] == ["tiny"]
    assert api.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


def test_no_key_sends_no_authorization_header(api: FakeApi) -> None:
    api.routes["GET /api/models"] = {"items": []}
    api.client(api_key=None).models()
    assert "Authorization" not in api.requests[0].headers


def test_submit_job_posts_kind_and_config_and_parses_the_job(api: FakeApi) -> None:
    api.routes["POST /api/jobs"] = httpx.Response(201, json=job_json(7, status="queued", queue_position=2))
    job = api.client().submit_job("train", {"model": "tiny", "dataset": "synth-64", "steps": 2})
    assert (job.id, job.status, job.queue_position, job.model_name) == (7, "queued", 2, "tiny")
    assert api.bodies("POST /api/jobs") == [
        {"kind": "train", "config": {"model": "tiny", "dataset": "synth-64", "steps": 2}}
    ]


def test_jobs_filters_and_incremental_reads_use_query_parameters(api: FakeApi) -> None:
    api.routes["GET /api/jobs"] = {"items": [job_json(1)], "total": 1, "limit": 100, "offset": 0}
    api.routes["GET /api/jobs/1/metrics"] = {"items": [], "next_since": 5}
    api.routes["GET /api/jobs/1/logs"] = {"items": [], "next_since": 9}
    client = api.client()
    client.jobs(status="running", kind="train", limit=100)
    assert client.metrics(1, since=5).next_since == 5
    client.logs(1, since=9)
    params = [dict(r.url.params) for r in api.requests]
    assert params[0] == {"status": "running", "kind": "train", "limit": "100", "offset": "0"}
    assert params[1] == {"since": "5"} and params[2] == {"since": "9"}


def test_unknown_fields_from_a_newer_server_are_ignored(api: FakeApi) -> None:
    api.routes["GET /api/jobs/3"] = job_json(3, brand_new_field={"x": 1})
    assert api.client().job(3).id == 3


def test_inspect_parses_token_records(api: FakeApi) -> None:
    api.routes["POST /api/inspect"] = inspect_json(divergences=(0.1, 0.7))
    result = api.client().inspect({"model": "tiny", "question": "q?", "bbox": [0, 0, 4, 4], "image_base64": "eA=="})
    assert [t.divergence for t in result.tokens] == [0.1, 0.7]
    assert result.tokens[1].student_top[0].rank == 1
    assert api.bodies("POST /api/inspect")[0]["bbox"] == [0, 0, 4, 4]


def test_download_artifact_streams_to_the_servers_filename(api: FakeApi, tmp_path) -> None:
    api.routes["GET /api/jobs/2/artifacts/final"] = httpx.Response(
        200, content=b"PK-zip-bytes", headers={"content-disposition": 'attachment; filename="job-2-final.zip"'}
    )
    path = api.client().download_artifact(2, "final", tmp_path)
    assert path == tmp_path / "job-2-final.zip"
    assert path.read_bytes() == b"PK-zip-bytes"


def _error(status: int, **kwargs) -> ApiError:
    request = httpx.Request("POST", f"{BASE_URL}/api/jobs")
    return error_from_response(httpx.Response(status, request=request, **kwargs))


def test_validation_errors_become_field_paths_with_messages() -> None:
    error = _error(
        422,
        json={
            "detail": [
                {"loc": ["body", "config", "steps"], "msg": "Input should be greater than or equal to 1", "type": "x"},
                {"loc": ["body", "config", "model"], "msg": "Value error, unknown model 'nope'", "type": "value_error"},
            ]
        },
    )
    assert str(error) == (
        "config.steps: Input should be greater than or equal to 1; config.model: unknown model 'nope' [HTTP 422]"
    )
    assert error.status_code == 422 and len(error.details) == 2


def test_plain_detail_and_rejected_dataset_issues() -> None:
    assert str(_error(409, json={"detail": "job 3 already finished"})) == "job 3 already finished [HTTP 409]"
    rejected = _error(
        422,
        json={
            "detail": "2 problem(s) in the dataset; nothing was stored",
            "issues": [
                {"line": 3, "field": "bbox", "message": "x1 must exceed x0"},
                {"line": 9, "field": "image", "message": "file not found"},
            ],
        },
    )
    assert "line 3: bbox: x1 must exceed x0" in str(rejected) and "line 9: image: file not found" in str(rejected)


def test_unauthorised_and_non_json_errors_stay_short_and_readable() -> None:
    assert str(_error(401, json={"detail": "unknown or revoked API key"})).startswith("not authorised (unknown")
    gateway = _error(502, text="<html>" + "bad gateway " * 200 + "</html>")
    assert str(gateway).endswith("… [HTTP 502]")
    assert len(str(gateway)) < 620


def test_unreachable_server_and_timeouts_raise_api_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(ApiError, match="cannot reach the API at http://api.test"):
        VopdClient(BASE_URL, "k", transport=httpx.MockTransport(refuse)).health()
    with pytest.raises(ApiError, match="did not answer GET /api/jobs/1 in time"):
        VopdClient(BASE_URL, "k", transport=httpx.MockTransport(slow)).job(1)


def test_a_malformed_answer_is_an_api_error_not_a_crash(api: FakeApi) -> None:
    api.routes["GET /api/jobs/1"] = {"id": "not-a-number"}
    with pytest.raises(ApiError, match="unexpected answer from /api/jobs/1"):
        api.client().job(1)
