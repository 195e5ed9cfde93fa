"""POST /api/inspect on the tiny model: an uploaded image or a dataset sample, per-token records, both answers."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.service.conftest import Service

pytestmark = pytest.mark.services


def _image_base64() -> str:
    image = Image.new("RGB", (112, 112), (240, 240, 240))
    image.paste((0, 0, 255), (50, 50, 60, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_inspect_uploaded_image(service: Service) -> None:
    body = {
        "model": "tiny",
        "image_base64": _image_base64(),
        "question": "What color is the square inside the box?",
        "options": ["red", "green", "blue", "yellow"],
        "bbox": [40, 40, 70, 70],
        "max_new_tokens": 6,
        "show_topk": 3,
        "runtime": {"device": "cpu"},
    }
    response = service.client.post("/api/inspect", headers=service.alice, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"] == "tiny"
    assert 1 <= len(result["tokens"]) <= 6
    token = result["tokens"][0]
    assert len(token["student_top"]) == 3 and len(token["teacher_top"]) == 3
    assert 0.0 <= token["student_prob"] <= 1.0 and token["divergence"] >= 0.0
    assert "red bounding box" in result["student_prompt"]
    assert isinstance(result["teacher_answer"], str)
    assert len(service.client.app.state.model_cache) == 1  # loaded once, kept for the next request

    again = service.client.post("/api/inspect", headers=service.alice, json=body).json()
    assert [t["token_id"] for t in again["tokens"]] == [t["token_id"] for t in result["tokens"]]  # greedy
    assert len(service.client.app.state.model_cache) == 1


def test_inspect_dataset_sample_uses_its_question_and_box(service: Service) -> None:
    body = {"model": "tiny", "dataset": "synth-64", "sample": 3, "max_new_tokens": 4, "runtime": {"device": "cpu"}}
    response = service.client.post("/api/inspect", headers=service.alice, json=body)
    assert response.status_code == 200, response.text
    sample = service.client.get("/api/datasets/synth-64/samples?offset=3&limit=1", headers=service.alice).json()
    assert sample["items"][0]["question"] in response.json()["student_prompt"]
    assert response.json()["evidence"]["source"] == "given"  # the sample's own box
    # The search asked for by name sets the sample's box aside (the studio's "let the model find the evidence").
    body |= {"views": {"evidence": "search", "search_windows": [0.5]}}
    searched = service.client.post("/api/inspect", headers=service.alice, json=body)
    assert searched.status_code == 200, searched.text
    assert searched.json()["evidence"]["source"] == "search"
    assert "red bounding box" not in searched.json()["student_prompt"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bbox": [100, 100, 200, 200]}, None),  # box outside the 112 px image
        ({"model": "missing"}, "model"),
        ({"image_base64": "not base64!"}, "image_base64"),
        ({"dataset": "synth-64", "sample": 0}, "image_base64"),  # two image sources
    ],
)
def test_inspect_rejects_bad_requests(service: Service, change: dict, field: str | None) -> None:
    body = {"model": "tiny", "image_base64": _image_base64(), "question": "Q?", "bbox": [1, 1, 20, 20]} | change
    response = service.client.post("/api/inspect", headers=service.alice, json=body)
    assert response.status_code == 422, response.text
    if field is not None:
        assert response.json()["detail"][0]["loc"] == ["body", field]


def test_inspect_without_a_box_searches_for_the_crop_and_says_so(service: Service) -> None:
    """No box in the request: the model's own search chooses the teacher's crop; the student sees the plain image."""
    body = {
        "model": "tiny",
        "image_base64": _image_base64(),
        "question": "What color is the square?",
        "options": ["red", "green", "blue", "yellow"],
        "max_new_tokens": 4,
        "show_topk": 2,
        "views": {"search_windows": [0.5]},  # 9 candidates: a quick search
        "runtime": {"device": "cpu"},
    }
    response = service.client.post("/api/inspect", headers=service.alice, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    evidence = result["evidence"]
    assert evidence["source"] == "search" and 0.0 <= evidence["confidence"] <= 1.0
    x0, y0, x1, y1 = evidence["box"]
    assert (x1 - x0, y1 - y0) == (56, 56) and x0 % 28 == 0 and y0 % 28 == 0  # a window of the 0.5 grid
    assert "red bounding box" not in result["student_prompt"] and result["tokens"]
    assert result["student_prompt"] == result["teacher_prompt"]

    given = service.client.post("/api/inspect", headers=service.alice, json=body | {"bbox": [40, 40, 70, 70]})
    assert given.status_code == 200, given.text
    assert given.json()["evidence"] == {"box": [40.0, 40.0, 70.0, 70.0], "source": "given", "confidence": None}
