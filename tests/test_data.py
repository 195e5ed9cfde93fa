"""Dataset reading and validation: every rule names the line and the field it refuses."""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from vopd.config import PAPER_HINT
from vopd.data import (
    DatasetError,
    DatasetIssue,
    Sample,
    letter_index,
    load_dataset,
    option_letter,
    validate_dataset,
)

IMAGE_SIZE = (40, 30)


def png_bytes(size: tuple[int, int] = IMAGE_SIZE, color: tuple[int, ...] = (10, 200, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes: decoding it would fail."""
    original = png_bytes((1, 1))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = b"IHDR" + header
    chunk = struct.pack(">I", len(header)) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return original[:8] + chunk + original[8 + 25 :]


def good_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "s1",
        "image": "images/a.png",
        "question": "What color is the shape inside the box?",
        "options": ["red", "green", "blue", "yellow"],
        "answer": "green",
        "bbox": [5, 6, 20, 18],
    }
    for key, value in changes.items():
        if value is ...:
            record.pop(key, None)
        else:
            record[key] = value
    return record


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    return tmp_path


def write_jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def only_issue(issues: list[DatasetIssue]) -> DatasetIssue:
    assert len(issues) == 1, issues
    return issues[0]


# --------------------------------------------------------------------------- valid data
def test_valid_jsonl_loads_with_letter_answer_normalized_and_default_ids(folder: Path) -> None:
    (folder / "images" / "crop.png").write_bytes(png_bytes((8, 6), (1, 2, 3)))
    path = write_jsonl(
        folder / "data.jsonl",
        [
            good_record(answer="C"),
            "",  # blank lines are skipped but still counted
            good_record(id=..., options=..., answer="a green square", crop_image="images/crop.png", bbox=...),
            good_record(id=7, image=..., image_base64=base64.b64encode(png_bytes((24, 20))).decode(), answer="b"),
        ],
    )
    first, second, third = load_dataset(path)
    assert first.answer == "blue" and first.answer_letter == "C" and first.answer_index == 2
    assert first.bbox == (5.0, 6.0, 20.0, 18.0)
    assert first.image_path == (folder / "images" / "a.png").resolve()
    assert first.load_image().size == IMAGE_SIZE and first.load_image().mode == "RGB"
    assert first.load_crop() is None

    assert second.id == "line-3" and second.options is None and second.answer == "a green square"
    assert second.answer_letter is None and second.bbox is None
    crop = second.load_crop()
    assert crop is not None and crop.size == (8, 6) and crop.getpixel((0, 0)) == (1, 2, 3)

    assert third.id == "7" and third.answer == "green" and third.image_path is None
    assert third.load_image().size == (24, 20)


def test_strip_answers_and_limit(folder: Path) -> None:
    path = write_jsonl(folder / "data.jsonl", [good_record(id=f"s{i}") for i in range(3)] + ["{broken"])
    samples = load_dataset(path, strip_answers=True, limit=2)
    assert [sample.id for sample in samples] == ["s0", "s1"]
    assert all(sample.answer is None for sample in samples)


def test_transparent_pixels_become_white(folder: Path) -> None:
    (folder / "images" / "a.png").write_bytes(png_bytes(mode="RGBA", color=(0, 0, 0, 0)))
    (sample,) = load_dataset(write_jsonl(folder / "data.jsonl", [good_record()]))
    assert sample.load_image().getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- one rule at a time
BAD_RECORDS: dict[str, tuple[dict[str, Any] | str, str, str]] = {
    # name: (line 2 of the file, field named, fragment of the message)
    "invalid json": ('{"question": "x",', "json", "invalid JSON"),
    "not an object": ("[1, 2]", "json", "JSON object"),
    "missing question": (good_record(id="s2", question=...), "question", "missing"),
    "empty question": (good_record(id="s2", question="   "), "question", "empty"),
    "missing image": (good_record(id="s2", image=...), "image", "missing"),
    "image not found": (good_record(id="s2", image="images/none.png"), "image", "not found"),
    "bad base64": (good_record(id="s2", image=..., image_base64="@@not base64@@"), "image_base64", "base64"),
    "bbox three numbers": (good_record(id="s2", bbox=[1, 2, 3]), "bbox", "4 numbers"),
    "bbox strings": (good_record(id="s2", bbox=["1", "2", "3", "4"]), "bbox", "4 numbers"),
    "bbox booleans": (good_record(id="s2", bbox=[True, 0, 3, 4]), "bbox", "4 numbers"),
    "bbox outside image": (good_record(id="s2", bbox=[30, 20, 41, 25]), "bbox", "outside the 40x30 image"),
    "bbox negative": (good_record(id="s2", bbox=[-1, 0, 5, 5]), "bbox", "outside"),
    "bbox inverted": (good_record(id="s2", bbox=[20, 10, 10, 20]), "bbox", "inverted"),
    "bbox zero area": (good_record(id="s2", bbox=[10, 10, 10, 20]), "bbox", "zero area"),
    "hidden_bbox inverted": (good_record(id="s2", hidden_bbox=[20, 10, 10, 20]), "hidden_bbox", "inverted"),
    "answer not an option": (good_record(id="s2", answer="purple"), "answer", "neither one of the options"),
    "answer letter out of range": (good_record(id="s2", answer="E"), "answer", "beyond the 4 options"),
    "one option": (good_record(id="s2", options=["red"], answer="red"), "options", "at least 2"),
    "options not strings": (good_record(id="s2", options=[1, 2]), "options", "list of strings"),
    "duplicate options": (good_record(id="s2", options=["red", "red"], answer="red"), "options", "distinct"),
    "parent escape": (good_record(id="s2", image="../outside.png"), "image", "'..'"),
    "absolute path": (good_record(id="s2", image="/etc/hosts"), "image", "absolute"),
    "crop not found": (good_record(id="s2", crop_image="images/none.png"), "crop_image", "not found"),
    "duplicate id": (good_record(id="s1"), "id", "duplicate id 's1' (first used on line 1)"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_each_rule_names_line_and_field(folder: Path, name: str) -> None:
    bad_line, field, fragment = BAD_RECORDS[name]
    (folder.parent / "outside.png").write_bytes(png_bytes())
    path = write_jsonl(folder / "data.jsonl", [good_record(), bad_line])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (2, field)
    assert fragment in issue.message
    with pytest.raises(DatasetError) as raised:
        load_dataset(path)
    assert f"line 2, field {field}: " in str(raised.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"this is not an image", "unreadable"),
        (png_bytes((40, 30))[:60], "truncated"),
    ],
)
def test_unreadable_and_truncated_images(folder: Path, content: bytes, fragment: str) -> None:
    (folder / "images" / "bad.png").write_bytes(content)
    path = write_jsonl(folder / "data.jsonl", [good_record(), good_record(id="s2", image="images/bad.png")])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (2, "image") and fragment in issue.message


def test_truncated_image_body_is_caught_by_full_decode(folder: Path) -> None:
    """A PNG cut inside its pixel data keeps a valid header; only decoding everything reveals it."""
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    (folder / "images" / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    path = write_jsonl(folder / "data.jsonl", [good_record(image="images/cut.png")])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (1, "image")


def test_pixel_limit_is_checked_from_the_header_before_decoding(folder: Path) -> None:
    (folder / "images" / "huge.png").write_bytes(png_with_header_size(10_000, 10_000))
    path = write_jsonl(folder / "data.jsonl", [good_record(image="images/huge.png")])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (1, "image")
    # "over the limit" rather than "truncated" proves the pixels were never decoded
    assert "10000x10000 = 100000000 pixels, over the limit of 50000000" in issue.message


def test_small_pixel_limit_refuses_an_ordinary_image(folder: Path) -> None:
    path = write_jsonl(folder / "data.jsonl", [good_record()])
    issue = only_issue(validate_dataset(path, max_image_pixels=1000))
    assert issue.field == "image" and "over the limit of 1000" in issue.message
    assert load_dataset(path, max_image_pixels=1200)  # 40 x 30 = 1200 is allowed


def test_symlink_resolving_outside_the_folder_is_refused(folder: Path) -> None:
    (folder.parent / "secret.png").write_bytes(png_bytes())
    (folder / "images" / "link.png").symlink_to(folder.parent / "secret.png")
    path = write_jsonl(folder / "data.jsonl", [good_record(image="images/link.png")])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (1, "image") and "outside the dataset folder" in issue.message


def test_all_problems_are_reported_together(folder: Path) -> None:
    path = write_jsonl(
        folder / "data.jsonl",
        [good_record(), "{oops", good_record(id="s3", bbox=[1, 2]), good_record(id="s4", question="", answer="Z")],
    )
    issues = validate_dataset(path)
    assert [(issue.line, issue.field) for issue in issues] == [(2, "json"), (3, "bbox"), (4, "question"), (4, "answer")]
    with pytest.raises(DatasetError) as raised:
        load_dataset(path)
    assert raised.value.issues == issues
    assert pickle.loads(pickle.dumps(raised.value)).issues == issues  # Celery ships exceptions between processes
    for issue in issues:
        assert f"line {issue.line}, field {issue.field}: {issue.message}" in str(raised.value)


def test_check_images_false_skips_decoding_but_not_paths(folder: Path) -> None:
    (folder / "images" / "bad.png").write_bytes(b"garbage")
    records = [good_record(image="images/bad.png"), good_record(id="s2", image="x.png")]
    path = write_jsonl(folder / "data.jsonl", records)
    issue = only_issue(validate_dataset(path, check_images=False))
    assert (issue.line, issue.field) == (2, "image")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.jsonl")
    assert only_issue(validate_dataset(tmp_path / "absent.jsonl")).field == "file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no samples" in only_issue(validate_dataset(empty)).message


# --------------------------------------------------------------------------- Sample and letters
def test_option_letters_round_trip_and_refuse_bad_input() -> None:
    assert [option_letter(i) for i in range(3)] == ["A", "B", "C"]
    assert letter_index("B") == 1 and letter_index(" d ") == 3
    for bad in ("", "AB", "1", "?"):
        with pytest.raises(ValueError):
            letter_index(bad)
    with pytest.raises(ValueError):
        option_letter(26)


def test_sample_validates_itself() -> None:
    image = png_bytes()
    sample = Sample(id="x", question="q", options=["A", "B"], answer="B", bbox=(0, 0, 1, 1), image_bytes=image)
    assert sample.answer == "B" and sample.answer_index == 1  # option text wins over the letter
    lettered = Sample(id="x", question="q", options=["u", "v"], answer="b", bbox=(0, 0, 1, 1), image_bytes=image)
    assert lettered.answer == "v"
    plain = Sample(id="x", question="q", image_bytes=image)  # a plain VQA item: its crop is searched for
    assert plain.bbox is None and plain.hidden_bbox is None and plain.search_box is None
    with pytest.raises(ValidationError, match="hidden_bbox"):
        Sample(id="x", question="q", hidden_bbox=(5, 0, 1, 1), image_bytes=image)
    with pytest.raises(ValidationError, match="exactly one of image_path and image_bytes"):
        Sample(id="x", question="q", bbox=(0, 0, 1, 1))
    with pytest.raises(ValidationError, match="inverted"):
        Sample(id="x", question="q", bbox=(5, 0, 1, 1), image_bytes=image)


# --------------------------------------------------------------------------- Parquet
def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_plain_columns(tmp_path: Path) -> None:
    rows = [
        {
            "id": "p1",
            "image": png_bytes(),
            "question": "Which?",
            "options": ["x", "y"],
            "answer": "B",
            "bbox": [1.0, 2.0, 10.0, 12.0],
        },
        {
            "id": "p2",
            "image": png_bytes((20, 20)),
            "question": "Free?",
            "options": None,
            "answer": "seven",
            "bbox": [0.0, 0.0, 20.0, 20.0],
        },
    ]
    first, second = load_dataset(write_parquet(tmp_path / "data.parquet", rows))
    assert (first.id, first.answer, first.answer_letter, first.bbox) == ("p1", "y", "B", (1.0, 2.0, 10.0, 12.0))
    assert first.load_image().size == IMAGE_SIZE and first.load_image().getpixel((0, 0)) == (10, 200, 30)
    assert (second.options, second.answer) == (None, "seven")


def test_parquet_vision_opd_layout_with_hf_structs_and_crop(tmp_path: Path) -> None:
    """images / bbox_images as lists of {"bytes", "path"} structs, the question inside a chat-style `problem`."""
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("images", pa.list_(image_struct)),
            ("bbox_images", pa.list_(image_struct)),
            ("problem", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ]
    )
    (tmp_path / "full.png").write_bytes(png_bytes((30, 30), (9, 9, 9)))
    rows = [
        {
            "images": [{"bytes": png_bytes(), "path": "ignored.png"}],
            "bbox_images": [{"bytes": png_bytes((6, 4), (200, 0, 0)), "path": None}],
            "problem": f"<image>What is written on the sign?\n\n{PAPER_HINT}",
            "reward_model": {"style": "rule", "ground_truth": "STOP"},
        },
        {  # path-only structs resolve against the parquet's folder
            "images": [{"bytes": None, "path": "full.png"}],
            "bbox_images": [{"bytes": None, "path": "full.png"}],
            "problem": "Count the dots.",
            "reward_model": {"style": "rule", "ground_truth": "3"},
        },
    ]
    first, second = load_dataset(write_parquet(tmp_path / "train.parquet", rows, schema))
    assert first.question == "What is written on the sign?"
    assert (first.id, first.answer, first.bbox, first.options) == ("line-1", "STOP", None, None)
    crop = first.load_crop()
    assert crop is not None and crop.size == (6, 4) and crop.getpixel((3, 2)) == (200, 0, 0)
    assert second.image_path == (tmp_path / "full.png").resolve() and second.load_image().getpixel((0, 0)) == (9, 9, 9)


def test_parquet_issues_name_row_and_column(tmp_path: Path) -> None:
    rows = [
        {"image": png_bytes(), "question": "ok", "bbox_2d": [1.0, 1.0, 5.0, 5.0]},
        {"image": png_bytes(), "question": "bad box", "bbox_2d": [5.0, 1.0, 1.0, 5.0]},
        {"image": b"not a png", "question": "bad image", "bbox_2d": [1.0, 1.0, 5.0, 5.0]},
    ]
    issues = validate_dataset(write_parquet(tmp_path / "data.parquet", rows))
    assert [(issue.line, issue.field) for issue in issues] == [(2, "bbox_2d"), (3, "image")]


def test_parquet_without_image_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", [{"question": "q", "bbox": [0.0, 0.0, 1.0, 1.0]}])
    issue = only_issue(validate_dataset(path))
    assert (issue.line, issue.field) == (0, "image") and "no image column" in issue.message


def test_parquet_chat_prompt_extra_info_answer_and_path_lists(tmp_path: Path) -> None:
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "c.png").write_bytes(png_bytes((5, 5), (0, 0, 255)))
    rows = [
        {
            "images": [png_bytes()],
            "teacher_images": ["crops/c.png"],
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>How many wheels?"},
            ],
            "extra_info": {"answer": "4"},
        }
    ]
    (sample,) = load_dataset(write_parquet(tmp_path / "train.parquet", rows))
    assert (sample.question, sample.answer) == ("How many wheels?", "4")
    assert sample.crop_path == (tmp_path / "crops" / "c.png").resolve()


def test_plain_vqa_jsonl_without_box_or_answer_loads_and_hidden_box_is_checked(tmp_path: Path) -> None:
    """A JSONL of plain VQA items (image, question, options; no box, no answer) loads: vopd.evidence finds the crop.
    ``hidden_bbox`` (evaluation only) is read, and checked against the image like a box."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    lines = [
        {"id": "p1", "image": "a.png", "question": "What color is the circle?", "options": ["red", "blue"]},
        {"id": "p2", "image": "a.png", "question": "q", "options": ["red", "blue"], "hidden_bbox": [0, 0, 4, 4]},
    ]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = load_dataset(path)
    assert [s.bbox for s in samples] == [None, None] and [s.answer for s in samples] == [None, None]
    assert samples[1].hidden_bbox == (0.0, 0.0, 4.0, 4.0)

    lines[1]["hidden_bbox"] = [0, 0, 4000, 4]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    issues = validate_dataset(path)
    assert [(issue.line, issue.field) for issue in issues] == [(2, "hidden_bbox")]
    assert "outside" in issues[0].message
