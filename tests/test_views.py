"""Student and teacher views: the red box at the right pixels, crops equal to the region, sizes as configured."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vopd.cli import main
from vopd.config import PAPER_HINT, ViewConfig
from vopd.data import Sample
from vopd.views import (
    MULTIPLE_CHOICE_INSTRUCTION,
    format_question,
    full_view,
    student_view,
    teacher_view,
    to_messages,
    write_view_pairs,
)

RED = (255, 0, 0)


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 200, size=(height, width, 3), dtype=np.uint8)  # no pure red
    return Image.fromarray(pixels, "RGB")


def make_sample(image: Image.Image, bbox: tuple[float, float, float, float] | None, **fields: object) -> Sample:
    values: dict[str, object] = {"id": "s", "question": "What is inside?", "options": ["cat", "dog"], "answer": "dog"}
    values.update(fields)
    return Sample(bbox=bbox, image_bytes=encode(image), **values)


def red_mask(image: Image.Image) -> np.ndarray:
    return np.all(np.asarray(image) == RED, axis=-1)  # (H, W)


def outline_mask(height: int, width: int, left: int, top: int, right: int, bottom: int, line: int) -> np.ndarray:
    """Pixels of a rectangle outline whose outer edge is [left, right] x [top, bottom] inclusive."""
    mask = np.zeros((height, width), dtype=bool)
    mask[top : bottom + 1, left : right + 1] = True
    mask[top + line : bottom + 1 - line, left + line : right + 1 - line] = False
    return mask


def test_format_question_lists_options_hint_and_instruction() -> None:
    sample = make_sample(Image.new("RGB", (8, 8)), (0, 0, 4, 4), options=["red", "green", "blue"], answer="green")
    assert format_question(sample, PAPER_HINT) == (
        f"What is inside?\nA. red\nB. green\nC. blue\n{PAPER_HINT}\n{MULTIPLE_CHOICE_INSTRUCTION}"
    )
    free_form = make_sample(Image.new("RGB", (8, 8)), (0, 0, 4, 4), options=None, answer="a cat")
    assert format_question(free_form, "") == "What is inside?"
    assert format_question(free_form, "Look closely.") == "What is inside?\nLook closely."


def test_student_box_is_drawn_in_red_just_outside_the_box() -> None:
    sample = make_sample(Image.new("RGB", (100, 80), "white"), (20, 30, 50, 60))
    view = student_view(sample, ViewConfig(box_width=2))
    assert view.image.size == (100, 80)
    # box columns 20..49 and rows 30..59 stay untouched; the 2-pixel line sits around them
    np.testing.assert_array_equal(red_mask(view.image), outline_mask(80, 100, 18, 28, 51, 61, 2))
    assert view.text.endswith(f"{PAPER_HINT}\n{MULTIPLE_CHOICE_INSTRUCTION}")


def test_box_on_the_image_border_moves_inward_to_stay_visible() -> None:
    sample = make_sample(Image.new("RGB", (40, 30), "white"), (0, 0, 10, 10))
    view = student_view(sample, ViewConfig(box_width=3, box_color=(0, 0, 255)))
    blue = np.all(np.asarray(view.image) == (0, 0, 255), axis=-1)
    np.testing.assert_array_equal(blue, outline_mask(30, 40, 0, 0, 12, 12, 3))


def test_downscale_to_max_pixels_scales_the_box_and_line() -> None:
    sample = make_sample(Image.new("RGB", (200, 100), "white"), (40, 20, 120, 60))
    view = student_view(sample, ViewConfig(max_pixels=5000, box_width=4))
    assert view.image.size == (100, 50)  # sqrt(5000 / 20000) = 0.5
    # box becomes (20, 10, 60, 30) and the 4-pixel line 2 pixels
    np.testing.assert_array_equal(red_mask(view.image), outline_mask(50, 100, 18, 8, 61, 31, 2))


def test_no_box_when_disabled_and_full_view_has_neither_box_nor_hint() -> None:
    sample = make_sample(Image.new("RGB", (60, 40), "white"), (5, 5, 20, 20))
    assert not red_mask(student_view(sample, ViewConfig(draw_box=False)).image).any()
    plain = full_view(sample, ViewConfig())
    assert not red_mask(plain.image).any() and plain.image.size == (60, 40)
    assert PAPER_HINT not in plain.text and plain.text.endswith(MULTIPLE_CHOICE_INSTRUCTION)


def test_teacher_crop_equals_the_box_region() -> None:
    image = noise_image(64, 48)
    sample = make_sample(image, (10, 5, 30, 25))
    view = teacher_view(sample, ViewConfig(upscale=1.0, min_crop_side=1))
    np.testing.assert_array_equal(np.asarray(view.image), np.asarray(image)[5:25, 10:30])
    assert view.text == student_view(sample, ViewConfig()).text


def test_fractional_box_crop_covers_every_touched_pixel() -> None:
    image = noise_image(64, 48)
    view = teacher_view(make_sample(image, (10.5, 5.2, 20.1, 25.7)), ViewConfig(upscale=1.0, min_crop_side=1))
    np.testing.assert_array_equal(np.asarray(view.image), np.asarray(image)[5:26, 10:21])


@pytest.mark.parametrize(
    ("settings", "expected_size"),
    [
        ({"upscale": 2.0, "min_crop_side": 1}, (20, 40)),
        ({"upscale": 2.0, "min_crop_side": 28}, (28, 56)),  # shorter side raised, aspect kept
        ({"upscale": 2.0, "min_crop_side": 1, "max_crop_side": 30}, (15, 30)),  # longer side capped
        ({"upscale": 3.0, "min_crop_side": 28, "max_crop_side": 30}, (15, 30)),  # the cap wins over the minimum
    ],
)
def test_teacher_upscale_and_side_limits(settings: dict[str, float], expected_size: tuple[int, int]) -> None:
    sample = make_sample(noise_image(64, 48), (10, 5, 20, 25))  # a 10 x 20 box
    assert teacher_view(sample, ViewConfig(**settings)).image.size == expected_size


def test_upscaled_crop_still_shows_the_region() -> None:
    image = Image.new("RGB", (64, 48), "white")
    image.paste((0, 0, 200), (10, 10, 20, 20))  # a blue square filling the box
    view = teacher_view(make_sample(image, (10, 10, 20, 20)), ViewConfig(upscale=4.0))
    assert view.image.size == (40, 40)
    assert view.image.getpixel((20, 20)) == (0, 0, 200)


@pytest.mark.parametrize(
    ("bbox", "region"),
    [
        ((0, 0, 10, 10), (0, 0, 15, 15)),  # padding of 5 clamped at the top-left corner
        ((54, 38, 64, 48), (49, 33, 64, 48)),  # and at the bottom-right corner
        ((20, 20, 30, 30), (15, 15, 35, 35)),  # inside the image: padded on every side
    ],
)
def test_padding_is_clamped_to_the_image(bbox: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> None:
    image = noise_image(64, 48, seed=1)
    view = teacher_view(make_sample(image, bbox), ViewConfig(padding=0.5, upscale=1.0, min_crop_side=1))
    left, top, right, bottom = region
    np.testing.assert_array_equal(np.asarray(view.image), np.asarray(image)[top:bottom, left:right])


def test_precomputed_crop_is_used_as_is() -> None:
    crop = noise_image(7, 5, seed=2)
    sample = Sample(id="c", question="q", image_bytes=encode(noise_image(30, 30)), crop_bytes=encode(crop))
    view = teacher_view(sample, ViewConfig(upscale=3.0, min_crop_side=28))
    np.testing.assert_array_equal(np.asarray(view.image), np.asarray(crop))
    assert not red_mask(student_view(sample, ViewConfig()).image).any()  # no box to draw


def test_to_messages_is_one_user_turn_with_image_then_text() -> None:
    view = student_view(make_sample(Image.new("RGB", (16, 16)), (2, 2, 8, 8)), ViewConfig())
    (message,) = to_messages(view)
    assert message["role"] == "user"
    assert message["content"] == [{"type": "image", "image": view.image}, {"type": "text", "text": view.text}]


# --------------------------------------------------------------------------- writing pairs and the CLI
@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    noise_image(64, 48).save(tmp_path / "images" / "a.png")
    records = [
        {
            "id": "set/one",
            "image": "images/a.png",
            "question": "Which?",
            "options": ["x", "y"],
            "answer": "A",
            "bbox": [20, 20, 30, 30],
        },
        {"id": "two", "image": "images/a.png", "question": "What?", "bbox": [0, 0, 16, 8]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_write_view_pairs_writes_pngs_and_an_index(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = {"views.padding": 0.5, "upscale": 1.0, "min-crop-side": 1}
    assert write_view_pairs(dataset, out, overrides=overrides) == 2
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["set/one", "two"]
    assert rows[0]["student"] == "set_one_student.png" and rows[0]["answer"] == "x"
    assert Image.open(out / "set_one_student.png").size == (64, 48)
    assert Image.open(out / "set_one_teacher.png").size == (20, 20)  # 10 px box + 5 px padding each side
    assert Image.open(out / "two_teacher.png").size == (24, 12)  # clamped at the top-left corner
    assert "set_one_teacher.png" in (out / "index.html").read_text()


def test_write_view_pairs_refuses_unknown_settings(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown view setting 'views.zoom'"):
        write_view_pairs(dataset, tmp_path / "out", overrides={"views.zoom": 2})


def test_cli_views_writes_pngs(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-out"
    assert main(["views", str(dataset), "--out", str(out), "--padding", "0.25", "--limit", "1"]) == 0
    assert sorted(path.name for path in out.glob("*.png")) == ["set_one_student.png", "set_one_teacher.png"]
    assert "wrote 1 student/teacher pairs" in capsys.readouterr().out


def test_cli_views_reports_bad_settings_and_bad_data(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["views", str(dataset), "--out", str(tmp_path / "o"), "--bogus", "1"]) == 2
    assert "unknown view setting 'bogus'" in capsys.readouterr().err
    assert main(["views", str(dataset), "--out", str(tmp_path / "o"), "--views.upscale", "-1"]) == 2
    assert "upscale" in capsys.readouterr().err
    dataset.write_text(dataset.read_text() + '{"question": ""}\n')
    assert main(["views", str(dataset), "--out", str(tmp_path / "o")]) == 2
    assert "line 3, field question" in capsys.readouterr().err
