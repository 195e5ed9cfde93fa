"""No input gets a 5xx: ids past the database's integers, a job folder that cannot hold an archive, a stream of a
missing job, and schemathesis's generated requests against /openapi.json (with a valid key, a fixed seed), whose every
answer must also be declared in the document, in the declared shape (status_code_conformance,
response_schema_conformance)."""

from __future__ import annotations

import io
import time
import zipfile
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from app.auth import create_api_key
from app.db import session_scope
from app.tables import Artifact, Job
from tests.service.conftest import Service

pytestmark = pytest.mark.services

MIN_CASES = 1000
EXAMPLES_PER_MODE = 45  # per operation, positive and negative each; small operations yield fewer
# A stream of a live job never ends by design; its missing-job answer is tested below.
NOT_FUZZED = {("GET", "/api/jobs/{job_id}/events")}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/jobs/{}"),
        ("post", "/api/jobs/{}/cancel"),
        ("post", "/api/jobs/{}/resume"),
        ("get", "/api/jobs/{}/metrics"),
        ("get", "/api/jobs/{}/logs"),
        ("get", "/api/jobs/{}/artifacts"),
        ("get", "/api/jobs/{}/events"),
    ],
)
@pytest.mark.parametrize("job_id", [2**31, 2**63, 2**70, -1])
def test_ids_past_the_database_integers_are_refused(service: Service, method: str, path: str, job_id: int) -> None:
    response = service.client.request(method, path.format(job_id), headers=service.alice)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["path", "job_id"]


@pytest.mark.parametrize("query", ["since=1180591620717411303424", "since=2147483648", "limit=5&since=-1"])
def test_metrics_since_out_of_range_is_refused(service: Service, query: str) -> None:
    job_id = _finished_job(service, with_folder=False)
    for route in ("metrics", "logs"):
        response = service.client.get(f"/api/jobs/{job_id}/{route}?{query}", headers=service.alice)
        assert response.status_code == 422, response.text
    assert service.client.get("/api/jobs?offset=1180591620717411303424", headers=service.alice).status_code == 422


def test_events_of_a_missing_job_are_404_before_the_stream(service: Service) -> None:
    response = service.client.get("/api/jobs/2147483000/events", headers=service.alice)
    assert response.status_code == 404, response.text
    assert "not found" in response.json()["detail"]
    assert response.headers["content-type"].startswith("application/json")


def _finished_job(service: Service, *, with_folder: bool) -> int:
    """A succeeded job row of alice's (no need to train: only its rows and folders matter here)."""
    me = service.client.get("/api/me", headers=service.alice).json()
    with session_scope(service.client.app.state.session_factory) as session:
        job = Job(
            owner_id=me["id"],
            kind="train",
            status="succeeded",
            queue=service.settings.queue,
            config={},
            resolved_config={},
            output_dir="",
        )
        session.add(job)
        session.flush()
        job.output_dir = str(service.settings.job_dir(job.id))
        if with_folder:
            final = service.settings.job_dir(job.id) / "final"
            final.mkdir(parents=True)
            (final / "config.json").write_text("{}")
            session.add(Artifact(job_id=job.id, name="final", kind="model", path=str(final), size_bytes=2))
        session.commit()
        return job.id


def test_folder_artifact_of_an_unwritable_job_folder(service: Service) -> None:
    job_id = _finished_job(service, with_folder=True)
    # The job's own archive cache cannot be made (a file sits where its folder would be; root ignores mode bits).
    (service.settings.job_dir(job_id) / "archives").write_text("not a folder")
    response = service.client.get(f"/api/jobs/{job_id}/artifacts/final", headers=service.alice)
    assert response.status_code == 200, response.text  # packed in the server's scratch folder instead
    assert zipfile.ZipFile(io.BytesIO(response.content)).namelist() == ["config.json"]

    job_id = _finished_job(service, with_folder=True)
    (service.settings.job_dir(job_id) / "archives").write_text("not a folder")
    scratch = service.settings.artifacts_dir / "archives"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"job-{job_id}").write_text("not a folder either")
    response = service.client.get(f"/api/jobs/{job_id}/artifacts/final", headers=service.alice)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "could not be packed" in detail and "final" in detail
    assert str(service.settings.home) not in detail


CHECKS = [status_code_conformance, response_schema_conformance]


def _first_line(error: Exception) -> str:
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())[:400]


def _fuzz(
    operation: schemathesis.APIOperation, mode: GenerationMode, headers: dict, calls: Counter, failures: list[str]
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        calls[operation.label] += 1
        try:
            response = case.call(headers=dict(headers))
        except Exception as error:  # the in-process client re-raises what the server did not handle
            failures.append(f"{operation.label} raised {error!r}: {case.as_curl_command()}")
            return
        if response.status_code >= 500:
            failures.append(f"{operation.label} -> {response.status_code}: {case.as_curl_command()}")
            return
        try:  # every answer is one the document declares, in the declared shape
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as error:  # schemathesis raises a group of the failed checks
            failures.append(f"{operation.label} -> {response.status_code}: {_first_line(error)}: {response.text[:300]}")

    try:
        call()
    except Unsatisfiable:  # no invalid request exists for an operation without parameters
        assert mode == GenerationMode.NEGATIVE


def test_schemathesis_finds_no_server_error(service: Service) -> None:
    """Every operation of /openapi.json, positive and negative cases, with a valid key: no 5xx, no undeclared status
    code, no body outside its declared schema. Derandomized, so the same cases run every time."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.client.app)
    calls: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in NOT_FUZZED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # A key of its own for each run: the fuzzer may revoke the key it holds (POST /api/keys/{id}/revoke).
            with session_scope(service.client.app.state.session_factory) as session:
                _, key = create_api_key(session, f"fuzz-{len(calls)}-{mode.value}")
                session.commit()
            _fuzz(operation, mode, {"Authorization": f"Bearer {key}"}, calls, failures)
    elapsed = time.monotonic() - started
    total = sum(calls.values())
    print(f"schemathesis {schemathesis.SCHEMATHESIS_VERSION}: {total} cases in {elapsed:.0f} s: {dict(calls)}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:400])
    assert total >= MIN_CASES, dict(calls)
