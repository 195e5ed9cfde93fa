"""Reading the divergence: an absolute colour scale by default, the detail panel on the most divergent token,
views large enough to see, and input errors that name everything missing."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult
from frontend.tabs import inspect
from tests.frontend.conftest import inspect_json


def test_a_negligible_divergence_stays_pale_on_the_absolute_scale() -> None:
    """Both sides agreeing (max JSD 0.012) used to paint the top token saturated red: relative to its own answer."""
    result = InspectResult.model_validate(inspect_json(divergences=(0.002, 0.012, 0.004)))
    strip, legend, *_ = inspect.render_result(result, strings.METRIC_JSD)
    assert max(score for _, score in strip) < 0.02
    assert f"{math.log(2):.3g}" in legend and "absolute" in legend
    relative, relative_legend, *_ = inspect.render_result(result, strings.METRIC_JSD, None, strings.SCALE_RELATIVE)
    assert max(score for _, score in relative) == 1.0 and "relative" in relative_legend  # the option stays
    large = InspectResult.model_validate(inspect_json(divergences=(0.69, 0.1)))
    assert inspect.render_result(large, strings.METRIC_JSD)[0][0][1] > 0.99


def test_the_detail_panel_opens_on_the_most_divergent_token() -> None:
    result = InspectResult.model_validate(inspect_json(divergences=(0.1, 0.5, 0.2)))
    text, student_top, _ = inspect.first_details(result, strings.METRIC_JSD)
    assert "Position 1" in text and "most divergent" in text and student_top.iloc[0]["token"] == "t1"
    # by the metric shown: forward KL here is 2x the divergence, the same peak
    assert "Position 1" in inspect.first_details(result, strings.METRIC_FORWARD)[0]
    assert inspect.first_details(None, strings.METRIC_JSD) == (strings.SELECT_TOKEN_HINT, None, None)


def test_small_views_are_enlarged_pixel_for_pixel() -> None:
    crop = Image.new("RGB", (48, 40), (10, 20, 30))
    crop.putpixel((0, 0), (255, 0, 0))
    shown = render.enlarged(crop)
    assert shown.size == (48 * 7, 40 * 7) and max(shown.size) >= 320
    assert shown.getpixel((6, 6)) == (255, 0, 0) and shown.getpixel((7, 7)) == (10, 20, 30)  # nearest, not smoothed
    big = Image.new("RGB", (640, 480))
    assert render.enlarged(big) is big and render.enlarged(None) is None


def test_upload_previews_show_the_teachers_crop_large() -> None:
    path = inspect.on_image_uploaded(render.stable_png_path(Image.new("RGB", (112, 112), (200, 210, 220))))[0]
    student, teacher = inspect.upload_previews(path, (40, 40, 64, 64))
    assert min(student.size) >= 320 and max(teacher.size) >= 320


def test_a_run_with_nothing_given_names_everything_missing() -> None:
    """With no image it said only "Type a question."."""
    with pytest.raises(render.UiInputError) as raised:
        inspect.build_request(
            source=strings.SOURCE_UPLOAD,
            image_path=None,
            sample=None,
            question="",
            options_text="",
            box_values=(None, None, None, None),
            model="tiny",
            greedy=True,
            max_new_tokens=8,
            alpha=0.5,
            show_topk=5,
        )
    message = str(raised.value)
    assert message.startswith("Missing: an image") and "a question" in message and "a model" not in message


def test_a_dataset_sample_is_drawn_on_the_surface_in_its_own_pixels(api) -> None:
    """ "Dataset sample" mode hid the drawing surface: a sample's box could only be typed."""
    import base64
    import io

    original = Image.new("RGB", (112, 96), (30, 40, 50))
    png = io.BytesIO()
    original.save(png, format="PNG")
    thumb = io.BytesIO()
    original.resize((32, 28)).save(thumb, format="JPEG")
    api.routes["GET /api/datasets/synth-64/samples"] = {
        "total": 64,
        "items": [
            {
                "index": 2,
                "id": "s2",
                "question": "Which?",
                "options": ["a", "b"],
                "answer": "a",
                "bbox": [10, 12, 40, 44],
                "student_text": "",
                "teacher_text": "",
                "student_image": "data:image/jpeg;base64," + base64.b64encode(thumb.getvalue()).decode(),
                "teacher_image": "data:image/jpeg;base64," + base64.b64encode(thumb.getvalue()).decode(),
                "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
            }
        ],
    }
    *_, find, image_path, surface_html = inspect.load_sample(api.client(), "synth-64", 2)
    assert dict(api.requests[0].url.params)["original"] == "true"
    assert find is False and inspect.open_image(image_path).size == (112, 96)
    assert 'data-width="112" data-height="96" data-box="10,12,40,44"' in surface_html


def test_the_samples_route_sends_the_original_image_on_request(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", demo_train_items=4)
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    with TestClient(app) as client:
        plain = client.get("/api/datasets/synth-64/samples?limit=1", headers=headers).json()["items"][0]
        assert plain["image"] is None
        item = client.get("/api/datasets/synth-64/samples?limit=1&original=true", headers=headers).json()["items"][0]
    assert item["image"].startswith("data:image/png;base64,")
    assert render.image_from_data_url(item["image"]).size == (112, 112)  # the synthetic canvas, unscaled
