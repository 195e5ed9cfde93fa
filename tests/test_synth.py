"""The synthetic fine-detail benchmark: determinism, geometry, pixels, balance, files and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from vopd.cli import main
from vopd.synth import (
    BOX_CLEARANCE,
    COLOR_OPTIONS,
    INK,
    NO_BOX_TARGET_COLOR,
    NO_BOX_TARGET_SIZE,
    PALETTE,
    SHAPE_OPTIONS,
    SynthConfig,
    generate_dataset,
    generate_item,
    generate_items,
    plan_item,
)

PALETTE_NAMES = list(PALETTE)
PALETTE_RGB = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.int32)  # (7, 3)


def nearest_palette(pixels: np.ndarray, max_distance: float = 40.0) -> np.ndarray:
    """Index into PALETTE_NAMES of each pixel's colour, or -1 for pixels far from every shape colour."""
    flat = pixels.reshape(-1, 3).astype(np.int32)  # (P, 3)
    distance = np.linalg.norm(flat[:, None, :] - PALETTE_RGB[None, :, :], axis=-1)  # (P, 7)
    index = distance.argmin(axis=1)
    index[distance.min(axis=1) > max_distance] = -1
    return index.reshape(pixels.shape[:-1])


def png_bytes_by_name(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / "images").glob("*.png"))}


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    config = SynthConfig(n=6, seed=7, question="both")
    first = generate_dataset(tmp_path / "a", config)
    second = generate_dataset(tmp_path / "b", config)
    assert first.read_bytes() == second.read_bytes()
    images_a, images_b = png_bytes_by_name(tmp_path / "a"), png_bytes_by_name(tmp_path / "b")
    assert len(images_a) == 6
    assert images_a == images_b


def test_item_does_not_depend_on_dataset_size() -> None:
    small = list(generate_items(SynthConfig(n=5, seed=3)))
    large = SynthConfig(n=50, seed=3)
    for index, (image, record) in enumerate(small):
        other_image, other_record = generate_item(large, index)
        assert record == other_record
        assert np.array_equal(np.asarray(image), np.asarray(other_image))
    # Out-of-order generation gives the same item too.
    assert generate_item(large, 4)[1] == small[4][1]


def test_different_seeds_differ() -> None:
    image_0, record_0 = generate_item(SynthConfig(n=1, seed=0), 0)
    image_1, record_1 = generate_item(SynthConfig(n=1, seed=1), 0)
    assert record_0["bbox"] != record_1["bbox"] or record_0["answer"] != record_1["answer"]
    assert not np.array_equal(np.asarray(image_0), np.asarray(image_1))


# --------------------------------------------------------------------------- geometry and pixels
@pytest.mark.parametrize("question", ["color", "shape"])
def test_target_alone_in_box_and_distractors_clear(question: str) -> None:
    config = SynthConfig(n=40, seed=11, question=question)
    for index in range(config.n):
        scene = plan_item(config, index)
        x0, y0, x1, y1 = scene.bbox
        assert x1 - x0 == y1 - y0 == config.box_size
        assert min(x0, y0) >= 0 and max(x1, y1) <= config.size
        tx0, ty0, tx1, ty1 = scene.target.extent
        assert x0 <= tx0 and tx1 < x1 and y0 <= ty0 and ty1 < y1
        assert config.target_size[0] <= scene.target.radius <= config.target_size[1]
        assert config.distractors[0] <= len(scene.distractors) <= config.distractors[1]
        for shape in scene.distractors:
            dx0, dy0, dx1, dy1 = shape.extent
            assert dx0 >= 0 and dy0 >= 0 and dx1 < config.size and dy1 < config.size
            clear = (
                dx1 < x0 - BOX_CLEARANCE
                or dx0 >= x1 + BOX_CLEARANCE
                or dy1 < y0 - BOX_CLEARANCE
                or dy0 >= y1 + BOX_CLEARANCE
            )
            assert clear, f"item {index}: distractor {shape} touches the box {scene.bbox}"


def test_crop_holds_only_the_target_in_its_color() -> None:
    config = SynthConfig(n=24, seed=5, question="both")
    for index in range(config.n):
        image, record = generate_item(config, index)
        scene = plan_item(config, index)
        x0, y0, x1, y1 = record["bbox"]
        crop = np.asarray(image)[y0:y1, x0:x1]  # (box, box, 3)
        labels = nearest_palette(crop)
        shape_pixels = labels >= 0
        target_label = PALETTE_NAMES.index(scene.target.color)
        assert set(np.unique(labels[shape_pixels]).tolist()) == {target_label}
        # The target is a few dozen pixels (radius 5-7), never a speck nor the whole crop.
        assert 20 <= shape_pixels.sum() <= (2 * scene.target.radius + 1) ** 2
        # Outside the target's extent the crop is background only.
        tx0, ty0, tx1, ty1 = scene.target.extent
        outside = shape_pixels.copy()
        outside[ty0 - y0 : ty1 - y0 + 1, tx0 - x0 : tx1 - x0 + 1] = False
        assert not outside.any()


def test_answer_is_the_color_at_the_target_centre() -> None:
    config = SynthConfig(n=20, seed=2)
    for image, record in generate_items(config):
        assert record["options"] == list(COLOR_OPTIONS)
        x0, y0, x1, y1 = record["bbox"]
        centre = np.asarray(image)[(y0 + y1) // 2, (x0 + x1) // 2]  # (3,)
        assert tuple(int(v) for v in centre) == PALETTE[record["answer"]]


def test_background_is_light_and_distractors_use_every_color() -> None:
    config = SynthConfig(n=30, seed=9)
    colors_seen: Counter[str] = Counter()
    for index in range(config.n):
        image, _ = generate_item(config, index)
        scene = plan_item(config, index)
        colors_seen.update(shape.color for shape in scene.distractors)
        corner = np.asarray(image)[:2, :2].reshape(-1, 3)
        covered = any(s.extent[0] <= 1 and s.extent[1] <= 1 for s in scene.distractors)
        if not covered:
            assert corner.min() >= 185
    assert set(colors_seen) == set(PALETTE)


def test_answers_balanced_for_any_n() -> None:
    for n in (1, 7, 41, 100):
        config = SynthConfig(n=n, seed=4)
        letters = Counter(plan_item(config, index).answer_index for index in range(n))
        for letter in range(4):
            assert abs(letters[letter] - n / 4) <= 1, (n, letters)
    # Balanced, but not a fixed cycle: the letter sequence is shuffled within blocks.
    sequence = [plan_item(SynthConfig(n=40, seed=4), index).answer_index for index in range(40)]
    assert sequence != [index % 4 for index in range(40)]


def test_shape_question_and_mixed_kinds() -> None:
    config = SynthConfig(n=16, seed=1, question="shape")
    answers = Counter()
    for index in range(config.n):
        _, record = generate_item(config, index)
        scene = plan_item(config, index)
        assert record["options"] == list(SHAPE_OPTIONS)
        assert record["question"].startswith("What shape")
        assert record["answer"] == scene.target.kind
        answers[record["answer"]] += 1
    assert set(answers) == set(SHAPE_OPTIONS)

    mixed = [generate_item(SynthConfig(n=16, question="both"), index)[1] for index in range(16)]
    kinds = Counter(tuple(record["options"]) for record in mixed)
    assert kinds == {COLOR_OPTIONS: 8, SHAPE_OPTIONS: 8}


def test_drawn_shapes_differ_by_kind() -> None:
    """The four shapes must be distinguishable in pixels, or the shape question is unanswerable."""
    config = SynthConfig(n=40, seed=6, question="shape", target_size=(7, 7))
    masks: dict[str, np.ndarray] = {}
    for index in range(config.n):
        image, record = generate_item(config, index)
        x0, y0, x1, y1 = record["bbox"]
        masks.setdefault(record["answer"], nearest_palette(np.asarray(image)[y0:y1, x0:x1]) >= 0)
    assert set(masks) == set(SHAPE_OPTIONS)
    for first in SHAPE_OPTIONS:
        for second in SHAPE_OPTIONS:
            if first < second:
                assert (masks[first] != masks[second]).sum() >= 10, (first, second)


def test_backgrounds_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, tint in (("a.png", (60, 90, 40)), ("b.jpg", (20, 20, 120))):
        pixels = (rng.integers(0, 80, size=(90, 150, 3)) + np.array(tint)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / name)
    (photos / "notes.txt").write_text("not an image")

    config = SynthConfig(n=8, seed=0, backgrounds=str(photos))
    plain = SynthConfig(n=8, seed=0)
    used = set()
    for index in range(config.n):
        image, record = generate_item(config, index)
        scene = plan_item(config, index)
        used.add(Path(scene.background_file).name)
        assert image.size == (config.size, config.size)
        # Same geometry and answers as without photos; only the pixels behind the shapes change.
        assert record == generate_item(plain, index)[1]
        assert not np.array_equal(np.asarray(image), np.asarray(generate_item(plain, index)[0]))
        x0, y0, x1, y1 = record["bbox"]
        centre = np.asarray(image)[(y0 + y1) // 2, (x0 + x1) // 2]
        assert tuple(int(v) for v in centre) == PALETTE[record["answer"]]
    assert used == {"a.png", "b.jpg"}


def test_bad_configs_are_refused_with_clear_messages(tmp_path: Path) -> None:
    cases = {
        "MIN must not exceed MAX": {"distractors": "20,12"},
        "must not exceed the canvas size": {"box_size": 200},
        "does not fit inside": {"target_size": (5, 12)},
        "holds no images": {"backgrounds": str(tmp_path)},
        "is not a folder": {"backgrounds": str(tmp_path / "missing")},
        "expected MIN,MAX": {"target_size": "5"},
        "Extra inputs": {"colour": "red"},
    }
    for expected, fields in cases.items():
        with pytest.raises(ValidationError, match=expected):
            SynthConfig(n=4, **fields)
    assert SynthConfig(n=1, distractors="3, 4").distractors == (3, 4)


# --------------------------------------------------------------------------- files and CLI
def test_dataset_files_and_format(tmp_path: Path) -> None:
    data_path = generate_dataset(tmp_path / "bench", SynthConfig(n=9, seed=2, question="both"))
    assert data_path == tmp_path / "bench" / "data.jsonl"
    records = [json.loads(line) for line in data_path.read_text().splitlines()]
    assert [record["id"] for record in records] == [f"syn-{index:05d}" for index in range(1, 10)]
    for record in records:
        assert set(record) == {"id", "image", "question", "options", "answer", "bbox"}
        assert record["answer"] in record["options"]
        with Image.open(data_path.parent / record["image"]) as image:
            assert image.size == (112, 112) and image.mode == "RGB"
    readme = (tmp_path / "bench" / "README.md").read_text()
    assert "--question both" in readme and "--seed 2" in readme
    assert not list((tmp_path / "bench").glob("*.tmp"))

    from vopd.data import load_dataset

    samples = load_dataset(data_path)
    assert [sample.id for sample in samples] == [record["id"] for record in records]
    assert [sample.answer for sample in samples] == [record["answer"] for record in records]


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli"
    argv = ["synth", "--output", str(output), "--n", "8", "--seed", "5", "--distractors", "2,4", "--size", "96"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(output / "data.jsonl") in printed
    assert "A=2 B=2 C=2 D=2" in printed
    assert main(argv) == 0  # regenerating in place gives the same bytes as the library call
    expected = generate_dataset(tmp_path / "lib", SynthConfig(n=8, seed=5, distractors=(2, 4), size=96))
    assert (output / "data.jsonl").read_bytes() == expected.read_bytes()
    assert png_bytes_by_name(output) == png_bytes_by_name(tmp_path / "lib")

    # The README's command reproduces the dataset.
    readme = (output / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("vopd synth"))
    assert "--distractors 2,4" in command and "--size 96" in command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--distractors", "9,3"], "MIN must not exceed MAX"),
        (["--box-size", "500"], "must not exceed the canvas size"),
        (["--target-size", "4,20"], "does not fit inside"),
    ],
)
def test_cli_errors_are_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status = main(["synth", "--output", str(tmp_path / "x"), "--n", "3", *argv])
    error = capsys.readouterr().err
    assert status == 2
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_empty_backgrounds_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    status = main(["synth", "--output", str(tmp_path / "x"), "--n", "3", "--backgrounds", str(tmp_path / "empty")])
    assert status == 2
    assert "holds no images" in capsys.readouterr().err


# --------------------------------------------------------------------------- the box-free world (--no-box)
def test_no_box_question_names_a_unique_target_and_answers_are_balanced() -> None:
    config = SynthConfig(n=80, seed=3, no_box=True)
    letters: Counter[int] = Counter()
    radii: Counter[int] = Counter()
    for index in range(config.n):
        scene = plan_item(config, index)
        _, record = generate_item(config, index)
        assert scene.target.color == NO_BOX_TARGET_COLOR
        assert record["question"] == f"What shape is the {NO_BOX_TARGET_COLOR} object?"
        assert all(d.color in PALETTE for d in scene.distractors)  # the only black object: no box needed
        assert all(5 <= d.radius <= 7 for d in scene.distractors)  # same clutter as the box world
        assert config.distractors[0] <= len(scene.distractors) <= config.distractors[1]
        assert record["options"] == list(SHAPE_OPTIONS)
        assert record["answer"] == scene.target.kind == SHAPE_OPTIONS[scene.answer_index]
        assert "bbox" not in record and record["hidden_bbox"] == list(scene.bbox)  # the box: evaluation only
        x0, y0, x1, y1 = scene.bbox
        cx, cy = scene.target.center
        assert x0 < cx - scene.target.radius and cx + scene.target.radius < x1 - 1  # the target fits its box
        assert y0 < cy - scene.target.radius and cy + scene.target.radius < y1 - 1
        letters[scene.answer_index] += 1
        radii[scene.target.radius] += 1
    assert all(abs(letters[letter] - config.n / 4) <= 1 for letter in range(4))
    assert set(radii) == set(range(NO_BOX_TARGET_SIZE[0], NO_BOX_TARGET_SIZE[1] + 1))  # small and large targets


def test_no_box_target_is_drawn_black_at_the_hidden_box_centre_and_nothing_else_is() -> None:
    config = SynthConfig(n=6, seed=5, no_box=True)
    for index in range(config.n):
        image, record = generate_item(config, index)
        pixels = np.asarray(image).astype(np.int32)
        x0, y0, x1, y1 = record["hidden_bbox"]
        assert (pixels[(y0 + y1) // 2, (x0 + x1) // 2] == INK[NO_BOX_TARGET_COLOR]).all()
        dark = (np.abs(pixels - np.array(INK[NO_BOX_TARGET_COLOR])).max(axis=-1) < 10).nonzero()
        assert dark[0].size > 0
        assert (x0 <= dark[1]).all() and (dark[1] < x1).all() and (y0 <= dark[0]).all() and (dark[0] < y1).all()


def test_no_box_target_size_is_a_setting_that_must_fit_the_box() -> None:
    small = SynthConfig(n=40, seed=1, no_box=True, no_box_target_size="5,6")
    assert {plan_item(small, index).target.radius for index in range(small.n)} == {5, 6}
    with pytest.raises(ValidationError, match="does not fit inside a 24 px box"):
        SynthConfig(n=1, no_box=True, no_box_target_size=(5, 12))
    SynthConfig(n=1, no_box_target_size=(5, 12))  # only the box-free world draws it


def test_no_box_keeps_the_box_world_unchanged_and_refuses_shape_questions() -> None:
    boxed = plan_item(SynthConfig(n=1, seed=9), 0)
    assert plan_item(SynthConfig(n=1, seed=9, no_box=True), 0).bbox == boxed.bbox  # same geometry stream
    with pytest.raises(ValidationError, match="leave question unset"):
        SynthConfig(n=1, no_box=True, question="shape")


def test_cli_no_box_writes_hidden_boxes_and_its_own_regeneration_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["synth", "--output", str(tmp_path / "nb"), "--n", "8", "--seed", "2", "--no-box"]) == 0
    assert "A=2 B=2 C=2 D=2" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "nb" / "data.jsonl").read_text().splitlines()]
    assert all("hidden_bbox" in r and "bbox" not in r for r in records)
    readme = (tmp_path / "nb" / "README.md").read_text()
    assert "--no-box" in readme and "hidden_bbox" in readme
