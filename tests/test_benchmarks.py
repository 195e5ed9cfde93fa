"""The paper's suites: each loader on a tiny fixture in the suite's published layout, the errors a user meets, the
paper-style numbers, and an end-to-end evaluation (library and CLI) on the shipped tiny model."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import vopd
from vopd.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    evaluate_benchmark,
    get_benchmark,
    load_benchmark,
    summarize_benchmark,
)
from vopd.cli import main
from vopd.config import EvalConfig, ViewConfig
from vopd.views import full_view

TINY_BASE = Path(vopd.__file__).parent / "assets" / "tiny-base"
SMALL_VIEWS = {"max_pixels": 112 * 112}  # keep the tiny model's prompts short on a CPU


def _image(path: Path | None, size: tuple[int, int], color: str) -> bytes:
    image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- fixtures in the published layouts
VSTAR_ROWS = [
    (
        "direct_attributes/sa_1.jpg",
        "What is the color of the cup?",
        ["red", "blue", "green", "white"],
        "B",
        "direct_attributes",
    ),
    (
        "direct_attributes/sa_2.jpg",
        "What is the material of the glove?",
        ["rubber", "cotton", "kevlar", "leather"],
        "A",
        "direct_attributes",
    ),
    (
        "direct_attributes/sa_3.jpg",
        "What is the color of the dog?",
        ["black", "brown", "white", "golden"],
        "D",
        "direct_attributes",
    ),
    (
        "relative_position/sa_4.jpg",
        "Is the cat on the left or right side of the car?",
        ["left", "right"],
        "B",
        "relative_position",
    ),
    (
        "relative_position/sa_5.jpg",
        "Is the lamp on the left or right side of the bed?",
        ["right", "left"],
        "A",
        "relative_position",
    ),
]


def write_vstar(folder: Path) -> Path:
    """craigwu/vstar_bench: subtask folders of images and test_questions.jsonl whose text carries the options."""
    lines = []
    for index, (image, question, options, label, category) in enumerate(VSTAR_ROWS):
        _image(folder / image, (320, 240), ["red", "blue", "green", "white", "black"][index])
        lettered = "\n".join(f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options))
        text = f"{question}\n{lettered}\nAnswer with the option's letter from the given choices directly."
        lines.append(
            json.dumps({"question_id": index, "image": image, "text": text, "category": category, "label": label})
        )
    (folder / "test_questions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


HRBENCH_QUESTIONS = [  # (question, options in cycle 0, answer index, category)
    ("What is the number above the entrance?", ["27B", "37B", "27D", "27E"], 0, "single"),
    ("Which building is taller, the red or the blue one?", ["red", "blue", "same", "neither"], 1, "cross"),
]


def write_hrbench(folder: Path, resolution: str = "4k", *, parquet: bool = False) -> Path:
    """DreamMr/HR-Bench: one TSV, base64 images, each question once per cycle with its options rotated.

    The second row of each question names the first row's index instead of repeating the image, as VLMEvalKit TSVs
    may do."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    rows = []
    index = 0
    for number, (question, options, answer, category) in enumerate(HRBENCH_QUESTIONS):
        encoded = base64.b64encode(_image(None, (400, 300), ["navy", "olive"][number])).decode()
        first = index
        for cycle in range(4):
            rotated = options[-cycle:] + options[:-cycle] if cycle else list(options)
            letter = "ABCD"[rotated.index(options[answer])]
            image = str(first) if cycle == 1 else encoded
            rows.append([index, question, letter, category, *rotated, cycle, image])
            index += 1
    if parquet:
        import pandas as pd

        path = folder / f"hr_bench_{resolution}.parquet"
        pd.DataFrame(rows, columns=header).to_parquet(path)
        return path
    path = folder / f"hr_bench_{resolution}.tsv"
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


MME_ENTRIES = [  # (id, image, question, choices, truth, task, subtask, category)
    (
        "Perception/Autonomous_Driving/Objects_Identify/0000",
        "AutonomousDriving/nuScenes/a.jpg",
        "What are objects to the front of the ego car?",
        ["many cars and one truck", "many pedestrians", "one bicycle", "nothing", "All the above answers are wrong."],
        "A",
        "Perception",
        "Autonomous_Driving",
        "Objects_Identify",
    ),
    (
        "perception/monitoring/Vehicle/counting/0310",
        "monitoring_images/b.jpg",
        "What is the number of buses?",
        ["13", "90", "77", "6", "The image does not feature the buses"],
        "E",
        "Perception",
        "Monitoring",
        "Vehicle/counting",
    ),
    (
        "perception/monitoring/Person/attribute_color/0001",
        "monitoring_images/c.jpg",
        "What color is the coat?",
        ["red", "blue", "black", "white", "The image does not feature the person"],
        "C",
        "Perception",
        "Monitoring",
        "Person/attribute_color",
    ),
    (
        "reasoning/diagram_and_table/diagram/0020",
        "diagram_and_table/d.webp",
        "Which category has the highest value?",
        ["Center Console Boats", "Deck Boats", "Jet Skis", "Pontoon Boats", "The image does not feature the number."],
        "C",
        "Reasoning",
        "Diagram and Table",
        "diagram",
    ),
]


def write_mme_realworld(folder: Path, file_name: str = "MME_RealWorld.json") -> Path:
    """yifanzhang114/MME-RealWorld: one JSON list; images in folders beside it."""
    entries = []
    for number, (item_id, image, question, choices, truth, task, subtask, category) in enumerate(MME_ENTRIES):
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (360, 270), ["teal", "maroon", "gray", "orange"][number]).save(folder / image)
        entries.append(
            {
                "Question_id": item_id,
                "Question Type": "Multiple Choice",
                "Image": image,
                "Text": question,
                "Answer choices": [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)],
                "Ground truth": truth,
                "Task": task,
                "Subtask": subtask,
                "Category": category,
            }
        )
    (folder / file_name).write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- loaders
def test_vstar_loader_reads_the_jsonl_and_its_images(tmp_path) -> None:
    items = load_benchmark("vstar", write_vstar(tmp_path / "vstar"))
    assert [item.sample.id for item in items] == ["0", "1", "2", "3", "4"]
    first = items[0].sample
    assert first.question == "What is the color of the cup?"
    assert first.options == ["red", "blue", "green", "white"] and first.answer == "blue"
    assert first.bbox is None and first.image_path == tmp_path / "vstar" / "direct_attributes" / "sa_1.jpg"
    assert [item.sample.answer for item in items] == ["blue", "rubber", "golden", "right", "right"]
    assert [item.category for item in items] == ["direct_attributes"] * 3 + ["relative_position"] * 2
    assert "Answer with" not in "".join(item.sample.question for item in items)


def test_vstar_annotation_folders_rotate_the_correct_first_option(tmp_path) -> None:
    folder = tmp_path / "vstar"
    for index, (subtask, options) in enumerate(
        [
            ("direct_attributes", ["purple", "red", "blue", "white"]),
            ("direct_attributes", ["metal", "wood", "glass", "paper"]),
            ("relative_position", ["left", "right"]),
        ]
    ):
        _image(folder / subtask / f"sa_{index}.jpg", (64, 48), "gray")
        (folder / subtask / f"sa_{index}.json").write_text(
            json.dumps(
                {"target_object": ["x"], "bbox": [[1, 2, 3, 4]], "question": f"Question {index}?", "options": options}
            )
        )
    items = load_benchmark("V*", folder)
    assert [item.category for item in items] == ["direct_attributes", "direct_attributes", "relative_position"]
    assert [item.sample.answer for item in items] == ["purple", "metal", "left"]  # the annotation's first option
    assert all(
        sorted(item.sample.options) == sorted(options)
        for item, options in zip(
            items,
            [["purple", "red", "blue", "white"], ["metal", "wood", "glass", "paper"], ["left", "right"]],
            strict=True,
        )
    )
    again = load_benchmark("vstar", folder)
    assert [item.sample.options for item in again] == [item.sample.options for item in items]  # deterministic


@pytest.mark.parametrize("parquet", [False, True])
def test_hrbench_loader_decodes_base64_cycles_and_categories(tmp_path, parquet) -> None:
    write_hrbench(tmp_path / "hr", "4k", parquet=parquet)
    items = load_benchmark("hrbench-4k", tmp_path / "hr")
    assert len(items) == 8
    assert [item.category for item in items] == ["FSP"] * 4 + ["FCP"] * 4
    assert [item.groups["cycle"] for item in items] == ["0", "1", "2", "3"] * 2
    assert {item.sample.answer for item in items[:4]} == {"27B"} and {item.sample.answer for item in items[4:]} == {
        "blue"
    }
    assert items[1].sample.options == ["27E", "27B", "37B", "27D"]
    assert items[1].sample.image_bytes == items[0].sample.image_bytes  # the index reference resolved
    assert items[0].sample.bbox is None and items[0].sample.load_image().size == (400, 300)


def test_hrbench_8k_reads_its_own_file(tmp_path) -> None:
    write_hrbench(tmp_path / "hr", "4k")
    with pytest.raises(BenchmarkError, match=r"hr_bench_8k\.tsv"):
        load_benchmark("hrbench-8k", tmp_path / "hr")
    write_hrbench(tmp_path / "hr", "8k")
    assert len(load_benchmark("HR-Bench 8K".replace(" ", "-"), tmp_path / "hr")) == 8


def test_mme_realworld_loader_strips_choice_letters_and_keeps_tasks(tmp_path) -> None:
    items = load_benchmark("mme-realworld", write_mme_realworld(tmp_path / "mme"))
    assert len(items) == 4
    first = items[0].sample
    assert first.options[0] == "many cars and one truck" and first.answer == "many cars and one truck"
    assert items[1].sample.answer == "The image does not feature the buses"  # (E) is a real option
    assert [item.category for item in items] == [
        "Perception/Autonomous_Driving",
        "Perception/Monitoring",
        "Perception/Monitoring",
        "Reasoning/Diagram and Table",
    ]
    assert [item.groups["task"] for item in items] == ["Perception"] * 3 + ["Reasoning"]
    assert items[2].groups["fine_category"] == "Perception/Monitoring/person/attribute"
    assert first.image_path == tmp_path / "mme" / "AutonomousDriving" / "nuScenes" / "a.jpg"
    # The JSON file itself is accepted too (e.g. a Lite split's file with the same question format).
    assert len(load_benchmark("mme-rw", tmp_path / "mme" / "MME_RealWorld.json")) == 4


def test_registry_names_and_aliases() -> None:
    assert set(BENCHMARKS) >= {"vstar", "hrbench-4k", "hrbench-8k", "mme-realworld"}
    for alias, name in [
        ("V*", "vstar"),
        ("vstar_bench", "vstar"),
        ("HRBench4K", "hrbench-4k"),
        ("hr_bench_8k", "hrbench-8k"),
        ("MME-RealWorld", "mme-realworld"),
        ("mme_realworld", "mme-realworld"),
    ]:
        assert get_benchmark(alias).name == name
    with pytest.raises(
        BenchmarkError, match="unknown benchmark 'mmbench'; known benchmarks: vstar, zoombench, hrbench-4k"
    ):
        get_benchmark("mmbench")


# ----------------------------------------------------------------------------- errors
def test_missing_files_name_what_was_expected_where(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match=rf"expected test_questions\.jsonl in {empty}"):
        load_benchmark("vstar", empty)
    with pytest.raises(BenchmarkError, match=rf"expected hr_bench_4k\.tsv or HRBench4K\.tsv.* in {empty}"):
        load_benchmark("hrbench-4k", empty)
    with pytest.raises(BenchmarkError, match=rf"expected MME_RealWorld\.json in {empty}"):
        load_benchmark("mme-realworld", empty)
    with pytest.raises(BenchmarkError, match="data folder not found"):
        load_benchmark("mme-realworld", tmp_path / "nowhere")


def test_bad_rows_are_listed_with_their_line(tmp_path) -> None:
    folder = write_vstar(tmp_path / "vstar")
    lines = (folder / "test_questions.jsonl").read_text().splitlines()
    bad_label = json.loads(lines[0]) | {"label": "F"}
    missing_image = json.loads(lines[1]) | {"image": "direct_attributes/gone.jpg"}
    (folder / "test_questions.jsonl").write_text(
        "\n".join([json.dumps(bad_label), json.dumps(missing_image), *lines[2:]]) + "\n"
    )
    with pytest.raises(BenchmarkError) as caught:
        load_benchmark("vstar", folder)
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "line 1: answer: letter 'F' is beyond the 4 options" in message
    assert "line 2: image: file not found" in message and "gone.jpg" in message

    mme = write_mme_realworld(tmp_path / "mme")
    entries = json.loads((mme / "MME_RealWorld.json").read_text())
    entries[0]["Answer choices"][1] = "B) no parenthesis"
    del entries[1]["Ground truth"]
    (mme / "MME_RealWorld.json").write_text(json.dumps(entries))
    with pytest.raises(BenchmarkError) as caught:
        load_benchmark("mme-realworld", mme)
    assert "missing field(s) Ground truth" in str(caught.value)

    hr = tmp_path / "hr"
    hr.mkdir()
    (hr / "hr_bench_4k.tsv").write_text("index\tquestion\tanswer\n0\tq\tA\n")
    with pytest.raises(BenchmarkError, match="missing column"):
        load_benchmark("hrbench-4k", hr)


def test_eval_config_takes_a_dataset_or_a_benchmark_with_its_data() -> None:
    assert EvalConfig(model="m", dataset="d.jsonl").benchmark is None
    config = EvalConfig(model="m", benchmark="vstar", data="/data/vstar")
    assert config.dataset is None and config.data == "/data/vstar"
    for bad, message in [
        ({}, "give a dataset, or a benchmark"),
        ({"dataset": "d", "benchmark": "vstar", "data": "x"}, "not both"),
        ({"benchmark": "vstar"}, "needs data"),
        ({"dataset": "d", "data": "x"}, "together with benchmark"),
    ]:
        with pytest.raises(ValueError, match=message):
            EvalConfig(model="m", **bad)


# ----------------------------------------------------------------------------- counting
def _record(category: str, correct: bool, **groups: str) -> dict:
    return {
        "category": category,
        "groups": groups,
        "full_correct": correct,
        "full_choice": "A" if correct else None,
        "full_p_correct": 1.0 if correct else 0.0,
    }


def test_hrbench_reports_the_mean_over_cycles_as_vlmevalkit_does() -> None:
    # Cycle 0: FSP 2/2, FCP 0/2 (all 0.5); cycle 1: FSP 1/2, FCP 1/1 (all 2/3, an unbalanced cycle).
    records = [
        _record("FSP", True, cycle="0"),
        _record("FSP", True, cycle="0"),
        _record("FCP", False, cycle="0"),
        _record("FCP", False, cycle="0"),
        _record("FSP", True, cycle="1"),
        _record("FSP", False, cycle="1"),
        _record("FCP", True, cycle="1"),
    ]
    summary = summarize_benchmark(get_benchmark("hrbench-4k"), records)
    assert summary["reported"] == pytest.approx(
        {"FSP": (1.0 + 0.5) / 2, "FCP": (0.0 + 1.0) / 2, "Overall": (0.5 + 2 / 3) / 2}
    )
    assert summary["accuracy"] == pytest.approx(4 / 7)  # the plain mean over every row
    assert summary["categories"]["FSP"] == {"n": 4, "correct": 3, "accuracy": 0.75}
    assert summary["breakdowns"]["cycle"]["1"]["n"] == 3
    assert summary["unanswered"] == 3


def test_vstar_and_mme_report_micro_overall_and_their_groups() -> None:
    vstar = [_record("direct_attributes", i < 3) for i in range(4)] + [_record("relative_position", True)]
    reported = summarize_benchmark(get_benchmark("vstar"), vstar)["reported"]
    assert reported == pytest.approx({"Attribute": 0.75, "Spatial": 1.0, "Overall": 0.8})
    mme = [
        _record("Perception/Monitoring", True, task="Perception"),
        _record("Perception/Monitoring", False, task="Perception"),
        _record("Reasoning/Diagram and Table", True, task="Reasoning"),
    ]
    summary = summarize_benchmark(get_benchmark("mme-realworld"), mme)
    assert summary["reported"] == pytest.approx({"Perception": 0.5, "Reasoning": 1.0, "Overall": 2 / 3})
    assert summary["breakdowns"]["task"]["Perception"]["n"] == 2


def test_full_view_fits_a_large_benchmark_image_to_max_pixels(tmp_path) -> None:
    write_hrbench(tmp_path / "hr")
    sample = load_benchmark("hrbench-4k", tmp_path / "hr")[0].sample
    view = full_view(sample, ViewConfig(max_pixels=100 * 100))
    assert view.image.width * view.image.height <= 100 * 100
    assert "Only focus" not in view.text and "A. 27B" in view.text  # plain question, no hint


# ----------------------------------------------------------------------------- end to end on the tiny model
@pytest.fixture(scope="module")
def tiny_base():
    from vopd.config import RuntimeConfig
    from vopd.models import load_model_and_processor

    return load_model_and_processor(str(TINY_BASE), RuntimeConfig(device="cpu", dtype="float32"))


@pytest.mark.parametrize(
    ("name", "writer"), [("vstar", write_vstar), ("hrbench-4k", write_hrbench), ("mme-realworld", write_mme_realworld)]
)
def test_evaluation_counts_add_up_on_the_tiny_model(tiny_base, tmp_path, name, writer) -> None:
    folder = tmp_path / "suite"
    folder.mkdir()
    writer(folder)
    out = tmp_path / "records.jsonl"
    config = EvalConfig(
        model=str(TINY_BASE),
        benchmark=name,
        data=str(folder),
        output=str(out),
        batch_size=3,
        max_new_tokens=3,
        views=SMALL_VIEWS,
    )
    result = evaluate_benchmark(config, loaded=tiny_base)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = result.summary
    assert summary["benchmark"] == name and result.n == summary["n"] == len(records) == len(result.records)
    assert sum(stats["n"] for stats in summary["categories"].values()) == summary["n"]
    assert sum(stats["correct"] for stats in summary["categories"].values()) == summary["correct"]
    for groups in summary["breakdowns"].values():
        assert sum(stats["n"] for stats in groups.values()) == summary["n"]
    assert summary["accuracy"] == result.full_accuracy == sum(r["full_correct"] for r in records) / len(records)
    for category, stats in summary["categories"].items():
        mine = [r for r in records if r["category"] == category]
        assert stats["accuracy"] == sum(r["full_correct"] for r in mine) / len(mine)
    for record in records:
        assert record["full_correct"] == (
            record["full_choice"] is not None
            and record["options"]["ABCDE".index(record["full_choice"])] == record["answer"]
        )
        assert "crop_correct" not in record
    assert result.crop_accuracy != result.crop_accuracy  # NaN: there is no crop on these suites


def test_cli_eval_on_a_benchmark_prints_a_table_then_one_json_line(tmp_path, capsys) -> None:
    folder = write_vstar(tmp_path / "vstar")
    code = main(
        [
            "eval",
            "--model",
            str(TINY_BASE),
            "--benchmark",
            "vstar",
            "--data",
            str(folder),
            "--limit",
            "4",
            "--max_new_tokens",
            "3",
            "--views.max_pixels",
            str(112 * 112),
            "--runtime.device",
            "cpu",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["n"] == 4 and summary["categories"]["direct_attributes"]["n"] == 3
    table = "\n".join(lines[:-1])
    assert "category" in table and "accuracy" in table
    assert any(line.startswith("direct_attributes") and line.split()[1] == "3" for line in lines)
    assert any(line.startswith("relative_position") and line.split()[1] == "1" for line in lines)
    assert any(line.startswith("overall") and line.split()[1] == "4" for line in lines)


def test_cli_benchmark_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["eval", "--model", str(TINY_BASE), "--benchmark", "mmbench", "--data", str(tmp_path)]) == 2
    assert "known benchmarks: vstar" in capsys.readouterr().err
    assert main(["eval", "--model", str(TINY_BASE), "--benchmark", "vstar", "--data", str(tmp_path)]) == 2
    assert "expected test_questions.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(TINY_BASE), "--benchmark", "vstar"]) == 2
    assert "needs data" in capsys.readouterr().err
