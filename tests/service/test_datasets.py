"""Dataset upload: good zips and JSONL, per-line errors for bad files, zip slip and zip bombs refused."""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile

import pytest
from PIL import Image

from tests.service.conftest import Service

pytestmark = pytest.mark.services


def _png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(index: int, **fields: object) -> dict:
    record = {
        "id": f"s{index}",
        "image": f"images/{index}.png",
        "question": "What color is the square?",
        "options": ["red", "green"],
        "answer": "red",
        "bbox": [8, 8, 40, 40],
    }
    record.update(fields)
    return record


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _good_zip(n: int = 3, folder: str = "") -> bytes:
    entries = {f"{folder}images/{i}.png": _png((200, 10 * i, 10)) for i in range(n)}
    entries[f"{folder}data.jsonl"] = "".join(json.dumps(_record(i)) + "\n" for i in range(n)).encode()
    return _zip(entries)


def _upload(service: Service, filename: str, data: bytes, headers: dict | None = None, name: str | None = None):
    form = {"name": name} if name else None
    return service.client.post(
        "/api/datasets", headers=headers or service.alice, files={"file": (filename, data)}, data=form
    )


def test_zip_upload_is_listed_with_views_and_private_to_its_owner(service: Service) -> None:
    response = _upload(service, "colours.zip", _good_zip(3, folder="colours/"), name="colours")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "colours" and dataset["n_samples"] == 3 and dataset["shared"] is False

    listed = [item["id"] for item in service.client.get("/api/datasets", headers=service.alice).json()["items"]]
    assert dataset["id"] in listed
    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?offset=1&limit=5", headers=service.alice).json()
    assert page["total"] == 3 and [item["index"] for item in page["items"]] == [1, 2]
    sample = page["items"][0]
    assert sample["id"] == "s1" and sample["bbox"] == [8, 8, 40, 40]
    assert "red bounding box" in sample["student_text"]
    for key in ("student_image", "teacher_image"):
        assert sample[key].startswith("data:image/jpeg;base64,")
        Image.open(io.BytesIO(base64.b64decode(sample[key].split(",", 1)[1]))).verify()

    bob_ids = [item["id"] for item in service.client.get("/api/datasets", headers=service.bob).json()["items"]]
    assert dataset["id"] not in bob_ids
    assert service.client.get(f"/api/datasets/{dataset['id']}", headers=service.bob).status_code == 404
    job = service.client.post(
        "/api/jobs", headers=service.bob, json={"kind": "eval", "config": {"model": "tiny", "dataset": dataset["id"]}}
    )
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "config", "dataset"]


def test_jsonl_with_base64_images_is_accepted(service: Service) -> None:
    encoded = base64.b64encode(_png((0, 200, 0))).decode()
    line = _record(0, answer="green")
    del line["image"]
    line["image_base64"] = encoded
    response = _upload(service, "inline.jsonl", (json.dumps(line) + "\n").encode())
    assert response.status_code == 201, response.text
    assert response.json()["n_samples"] == 1


def test_bad_dataset_is_rejected_with_every_issue_per_line(service: Service) -> None:
    lines = [
        json.dumps(_record(0)),
        "{not json",
        json.dumps(_record(2, bbox=[1, 2])),
        json.dumps(_record(3, answer="purple")),
    ]
    entries = {f"images/{i}.png": _png((200, 0, 0)) for i in (0, 2, 3)}
    entries["data.jsonl"] = "\n".join(lines).encode()
    before = set(service.settings.datasets_dir.iterdir())
    response = _upload(service, "bad.zip", _zip(entries))
    assert response.status_code == 422
    body = response.json()
    issues = {(issue["line"], issue["field"]) for issue in body["issues"]}
    assert {(2, "json"), (3, "bbox"), (4, "answer")} <= issues
    assert all(issue["line"] != 1 for issue in body["issues"])
    assert "nothing was stored" in body["detail"]
    assert set(service.settings.datasets_dir.iterdir()) == before


def test_zip_slip_is_refused_and_nothing_escapes(service: Service) -> None:
    entries = {"data.jsonl": json.dumps(_record(0)).encode(), "images/0.png": _png((1, 2, 3))}
    entries["../../escaped.txt"] = b"owned"
    response = _upload(service, "slip.zip", _zip(entries))
    assert response.status_code == 422
    assert "outside the dataset folder" in response.json()["detail"]
    assert not list(service.settings.home.parent.rglob("escaped.txt"))


def test_zip_bomb_and_oversized_uploads_are_refused(service: Service) -> None:
    bomb = _zip({"data.jsonl": b"{}", "images/zeros.png": bytes(3 << 20)})  # 3 MB of zeros -> a few KB
    response = _upload(service, "bomb.zip", bomb)
    assert response.status_code == 422 and "compression ratio" in response.json()["detail"]

    expands = _zip({"a.bin": os.urandom(1 << 20), "b.bin": bytes(4 << 20)})  # declares > 4 MB (the test limit)
    assert _upload(service, "big.zip", expands).status_code == 413

    too_big = os.urandom(3 << 20)  # over the 2 MB upload limit of the tests
    response = _upload(service, "huge.jsonl", too_big)
    assert response.status_code == 413

    def chunked_body():  # no Content-Length: the limit must hold while the bytes arrive
        yield b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(40):
            yield bytes(100_000)
        yield b"\r\n--XX--\r\n"

    headers = {**service.alice, "Content-Type": "multipart/form-data; boundary=XX"}
    response = service.client.post("/api/datasets", headers=headers, content=chunked_body())
    assert response.status_code == 413 and "2 MB" in response.json()["detail"]
    assert not list((service.settings.home / "tmp").iterdir())


def test_unsupported_file_type_gets_a_clear_message(service: Service) -> None:
    response = _upload(service, "notes.txt", b"hello")
    assert response.status_code == 422
    assert ".zip" in response.json()["detail"]


def test_plain_vqa_dataset_without_boxes_or_answers_uploads_and_trains(service: Service) -> None:
    """The real-data path: image, question, options and nothing else. The upload is accepted, its samples say the
    crop will be searched for, and a short training job on the tiny model searches and trains (vopd.evidence)."""
    entries = {f"images/{i}.png": _png((200, 10 * i, 10)) for i in range(4)}
    lines = [{k: v for k, v in _record(i).items() if k not in ("answer", "bbox")} for i in range(4)]
    entries["data.jsonl"] = "".join(json.dumps(line) + "\n" for line in lines).encode()
    response = _upload(service, "plain.zip", _zip(entries), name="plain-vqa")
    assert response.status_code == 201, response.text
    dataset = response.json()
    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?limit=2", headers=service.alice).json()
    sample = page["items"][0]
    assert sample["bbox"] is None and sample["answer"] is None and sample["evidence"] == "search"
    assert "red bounding box" not in sample["student_text"]

    config = {
        "model": "tiny",
        "dataset": dataset["id"],
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-4,
        "rollout": {"num_rollouts": 1, "max_new_tokens": 4},
        "views": {"search_windows": [0.5], "search_max_new_tokens": 4},
        "collapse_guard": {"enabled": False},
        "runtime": {"device": "cpu"},
    }
    job = service.client.post("/api/jobs", headers=service.alice, json={"kind": "train", "config": config})
    assert job.status_code in (200, 201), job.text
    finished = service.wait_for(job.json()["id"], {"succeeded", "failed"}, timeout_s=180)
    assert finished["status"] == "succeeded", finished["error"]
    metrics = service.client.get(f"/api/jobs/{finished['id']}/metrics", headers=service.alice).json()["items"]
    assert [row["step"] for row in metrics] == [1, 2]
    assert all(0.0 <= row["data"]["evidence/confidence"] <= 1.0 for row in metrics)
    assert metrics[0]["data"]["evidence/searched"] == 2.0


# ------------------------------------------------------------------ Parquet in the official layout
def _official_parquet(rows: int, start: int = 0) -> bytes:
    """Vision-OPD-6K's verl layout: a list of HF image structs, the crop beside it, the question in ``problem`` and
    the answer in ``reward_model.ground_truth`` (no id column: ids come from the row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("images", pa.list_(image_struct)),
            ("bbox_images", pa.list_(image_struct)),
            ("problem", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ]
    )
    table = pa.Table.from_pylist(
        [
            {
                "images": [{"bytes": _png((10 * i, 100, 50)), "path": None}],
                "bbox_images": [{"bytes": _png((200, 0, 0), 16), "path": None}],
                "problem": f"<image>What is written on sign {i}?",
                "reward_model": {"style": "rule", "ground_truth": f"answer {i}"},
            }
            for i in range(start, start + rows)
        ],
        schema=schema,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_a_parquet_file_in_the_official_layout_uploads_with_its_name(service: Service) -> None:
    response = _upload(service, "vision-opd-6k.parquet", _official_parquet(3))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "vision-opd-6k" and dataset["n_samples"] == 3
    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?limit=3", headers=service.alice).json()
    assert [item["question"] for item in page["items"]] == [f"What is written on sign {i}?" for i in range(3)]
    assert page["items"][2]["answer"] == "answer 2"


def test_a_zipped_dataset_folder_with_parquet_shards_uploads_as_one_set(service: Service) -> None:
    """A published dataset's folder as downloaded (README, data/train-0000N-of-00002.parquet) is one set: its
    shards are joined in order."""
    archive = _zip(
        {
            "Vision-OPD-6K/README.md": b"# card",
            "Vision-OPD-6K/data/train-00000-of-00002.parquet": _official_parquet(2, start=0),
            "Vision-OPD-6K/data/train-00001-of-00002.parquet": _official_parquet(3, start=2),
        },
        compression=zipfile.ZIP_STORED,
    )
    response = _upload(service, "Vision-OPD-6K.zip", archive)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["n_samples"] == 5 and dataset["name"] == "Vision-OPD-6K"
    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?limit=5", headers=service.alice).json()
    assert [item["question"] for item in page["items"]] == [f"What is written on sign {i}?" for i in range(5)]
    assert len({item["id"] for item in page["items"]}) == 5


def _names(service: Service, headers: dict) -> dict[str, str]:
    """id -> name of the datasets a key sees."""
    return {item["id"]: item["name"] for item in service.client.get("/api/datasets", headers=headers).json()["items"]}


def test_an_upload_without_a_name_is_named_after_its_file(service: Service) -> None:
    response = _upload(service, "street-signs.zip", _good_zip(2), name="   ")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "street-signs"
    assert _names(service, service.alice)[response.json()["id"]] == "street-signs"


# ------------------------------------------------------------------ synthetic sets
def test_a_synthetic_set_is_built_named_and_equal_to_the_clis(service: Service) -> None:
    from vopd.synth import SynthConfig, generate_item

    response = service.client.post(
        "/api/datasets/synthetic", headers=service.alice, json={"n": 5, "seed": 3, "box": True}
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "Synthetic set (5 items, seed 3, box)"
    assert dataset["n_samples"] == 5 and dataset["shared"] is False and dataset["size_bytes"] > 0
    assert _names(service, service.alice)[dataset["id"]] == dataset["name"]
    assert dataset["id"] not in _names(service, service.bob)

    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?limit=5", headers=service.alice).json()
    for item in page["items"]:
        _, record = generate_item(SynthConfig(n=5, seed=3), item["index"])  # what `vopd synth --seed 3` writes
        assert (item["id"], item["question"], item["options"], item["answer"]) == (
            record["id"],
            record["question"],
            record["options"],
            record["answer"],
        )
        assert item["bbox"] == record["bbox"] and item["evidence"] == "box"


def test_a_box_free_synthetic_set_keeps_its_box_hidden(service: Service) -> None:
    response = service.client.post(
        "/api/datasets/synthetic", headers=service.alice, json={"n": 3, "seed": 7, "box": False, "name": "  no box  "}
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "no box"
    page = service.client.get(f"/api/datasets/{dataset['id']}/samples?limit=1", headers=service.alice).json()
    sample = page["items"][0]
    assert sample["bbox"] is None and sample["evidence"] == "search"
    assert sample["question"] == "What shape is the black object?"
    assert sample["hidden_bbox"] is not None and len(sample["hidden_bbox"]) == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 2001, "seed": 0}, "at most 2,000 items"),
        ({"n": 0, "seed": 0}, "greater than or equal to 1"),
        ({"n": 4, "seed": -1}, "greater than or equal to 0"),
        ({"n": 4, "seed": 0, "colour": "red"}, "Extra inputs"),
    ],
)
def test_a_synthetic_set_out_of_range_is_refused_in_words(service: Service, body: dict, message: str) -> None:
    before = set(service.settings.datasets_dir.iterdir())
    response = service.client.post("/api/datasets/synthetic", headers=service.alice, json=body)
    assert response.status_code == 422, response.text
    assert message in json.dumps(response.json())
    assert set(service.settings.datasets_dir.iterdir()) == before


# ------------------------------------------------------------------ models trained from the CLI
def _cli_run(home, name: str, steps: tuple[int, ...] = ()) -> None:
    """What `vopd train --output $VOPD_HOME/runs/NAME` leaves: final/ and checkpoints/step-N/ (model folders)."""
    import shutil

    tiny = home / "models" / "tiny"
    shutil.copytree(tiny, home / "runs" / name / "final")
    for step in steps:
        shutil.copytree(tiny, home / "runs" / name / "checkpoints" / f"step-{step}")


def test_cli_runs_under_vopd_home_are_listed_and_usable(service: Service, tmp_path) -> None:
    import shutil

    home = service.settings.home
    run = f"cli-{service.backend}"
    _cli_run(home, run, steps=(10, 2))
    (home / "runs" / "empty-run" / "checkpoints").mkdir(parents=True, exist_ok=True)  # nothing saved yet
    outside = tmp_path / "elsewhere"
    shutil.copytree(home / "models" / "tiny", outside / "final")
    (home / "runs" / f"linked-{service.backend}").symlink_to(outside)  # a link out of VOPD_HOME is not followed

    for headers in (service.alice, service.bob):  # on disk like the base models: every key sees them
        models = service.client.get("/api/models", headers=headers).json()["items"]
        runs = [(m["name"], m["kind"], m["step"]) for m in models if m["name"].startswith(f"runs/{run}/")]
        assert runs == [
            (f"runs/{run}/final", "run", None),
            (f"runs/{run}/checkpoints/step-2", "run", 2),
            (f"runs/{run}/checkpoints/step-10", "run", 10),
        ]
        assert not [m for m in models if "empty-run" in m["name"] or "linked-" in m["name"]]

    for model in (f"runs/{run}/final", str(home / "runs" / run / "checkpoints" / "step-2")):
        job = service.client.post(
            "/api/jobs", headers=service.alice, json={"kind": "eval", "config": {"model": model, "dataset": "synth-64"}}
        )
        assert job.status_code == 201, job.text
        service.client.post(f"/api/jobs/{job.json()['id']}/cancel", headers=service.alice)
    for model in (f"runs/linked-{service.backend}/final", str(outside / "final"), f"runs/{run}/../../models/tiny"):
        job = service.client.post(
            "/api/jobs", headers=service.alice, json={"kind": "eval", "config": {"model": model, "dataset": "synth-64"}}
        )
        assert job.status_code == 422, (model, job.text)
