"""The rest of the paper's evaluation list: each suite read from a tiny fixture built here in its published layout,
asked with the official prompt, scored per suite as the paper's script does; the crop condition and its gap where a
suite ships crops or boxes; the optional judge against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vopd
from vopd.benchmarks import (
    BenchmarkError,
    evaluate_benchmark,
    get_benchmark,
    load_benchmark,
    summarize_benchmark,
)
from vopd.cli import main
from vopd.config import EvalConfig, JudgeConfig
from vopd.scoring import JUDGE_KEY_ENV

TINY_BASE = Path(vopd.__file__).parent / "assets" / "tiny-base"
SMALL_VIEWS = {"max_pixels": 112 * 112}


def _jpeg(size: tuple[int, int], color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _struct(data: bytes) -> dict[str, object]:
    """Hugging Face's image column: a struct of bytes and path."""
    return {"bytes": data, "path": None}


def _write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------- writers, one per published layout
def write_zoombench(folder: Path) -> Path:
    rows = [
        {
            "id": f"z{i}",
            "query": question,
            "response": answer,
            "image": _struct(_jpeg((320, 240), color)),
            "crop_image": _struct(_jpeg((64, 48), "white")),
        }
        for i, (question, answer, color) in enumerate(
            [
                ("What number is written on the sign?", "42", "red"),
                ("What colour is the small flag?", "blue", "green"),
                ("Which letter is on the door? (A) K (B) M", "B", "navy"),
            ]
        )
    ]
    _write_parquet(folder / "data" / "test.parquet", rows)
    return folder


MME_LMMS_ROWS = [  # (question, options, answer, category, l2-category)
    ("How many cars?", ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) none"], "B", "Perception/Monitoring", "counting"),
    ("Which is larger?", ["(A) left", "(B) right", "(C) same", "(D) none", "(E) n/a"], "A", "Reasoning/OCR", "ocr"),
]


def write_mme_lmms(folder: Path) -> Path:
    """yifanzhang114/MME-RealWorld(-CN/-lite)-Lmms-eval: data/*.parquet with base64 images in ``bytes``."""
    rows = [
        {
            "index": i,
            "question": question,
            "bytes": base64.b64encode(_jpeg((300, 200), "gray")).decode(),
            "multi-choice options": options,
            "answer": answer,
            "category": category,
            "l2-category": l2,
        }
        for i, (question, options, answer, category, l2) in enumerate(MME_LMMS_ROWS)
    ]
    _write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    return folder


def write_mmstar(folder: Path) -> Path:
    rows = [
        {
            "index": 0,
            "question": "Which object is red?\nOptions: A: the cup, B: the ball, C: the box, D: the hat",
            "answer": "B",
            "category": "coarse perception",
            "l2_category": "image scene",
            "image": _jpeg((200, 200), "red"),
        },
        {
            "index": 1,
            "question": "How many apples are there?\nOptions: A: 1, B: 2, C: 3, D: 4",
            "answer": "D",
            "category": "math",
            "l2_category": "numeric commonsense",
            "image": _jpeg((200, 200), "green"),
        },
    ]
    _write_parquet(folder / "mmstar.parquet", rows)
    return folder


POPE_ROWS = [("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes"), ("random", "no"), ("random", "yes")]


def _pope_row(position: int, split: str, answer: str) -> dict[str, object]:
    return {
        "id": str(position),
        "question_id": str(position + 1),
        "question": f"Is there a dog in the image number {position}?",
        "answer": answer,
        "image_source": f"COCO_val2014_{position:012d}",
        "image": _struct(_jpeg((160, 120), "olive")),
        "category": split,
    }


def write_pope_full(folder: Path) -> Path:
    """lmms-lab/POPE's Full config: one set of shards per split."""
    for split in ("adversarial", "popular", "random"):
        rows = [_pope_row(i, s, a) for i, (s, a) in enumerate(POPE_ROWS) if s == split]
        _write_parquet(folder / "Full" / f"{split}-00000-of-00001.parquet", rows)
    return folder


def write_pope_default(folder: Path) -> Path:
    """lmms-lab/POPE's default config: data/test-*.parquet holding all three splits, told apart by ``category``."""
    rows = [_pope_row(i, s, a) for i, (s, a) in enumerate(POPE_ROWS)]
    _write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    return folder


def write_cvbench(folder: Path) -> Path:
    def row(idx: int, kind: str, task: str, prompt: str, choices: list[str], answer: str) -> dict[str, object]:
        return {
            "idx": idx,
            "type": kind,
            "task": task,
            "image": _struct(_jpeg((240, 180), "purple")),
            "question": prompt.split(" Select")[0],
            "prompt": prompt,
            "choices": choices,
            "answer": answer,
            "source": "ADE20K" if kind == "2D" else "Omni3D",
        }

    _write_parquet(
        folder / "test_2d.parquet",
        [
            row(0, "2D", "Count", "How many chairs are in the image? Select from the following choices.\n"
                "(A) 3\n(B) 2\n(C) 0", ["3", "2", "0"], "(B)"),
            row(1, "2D", "Relation", "Is the lamp left of the bed? (A) yes (B) no", ["yes", "no"], "(A)"),
        ],
    )  # fmt: skip
    _write_parquet(
        folder / "test_3d.parquet",
        [row(0, "3D", "Depth", "Which is closer to the camera? (A) table (B) sofa", ["table", "sofa"], "(A)")],
    )
    return folder


def write_mmvp(folder: Path) -> Path:
    """MMVP/MMVP: Questions.csv and the images named by index under 'MMVP Images/'."""
    rows = [
        (1, "Is the door open or closed?", "(a) Open (b) Closed", "(a)"),
        (2, "Is the door open or closed?", "(a) Open (b) Closed", "(b)"),
        (3, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"),
        (4, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)"),
    ]
    (folder / "MMVP Images").mkdir(parents=True, exist_ok=True)
    with (folder / "Questions.csv").open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for index, question, options, answer in rows:
            writer.writerow([index, question, options, answer])
            (folder / "MMVP Images" / f"{index}.jpg").write_bytes(_jpeg((150, 150), "brown"))
    return folder


def write_visualprobe(folder: Path) -> Path:
    """Mini-o3/VisualProbe_{Easy,Medium,Hard}: each a folder with val.json and its images."""
    for level, answers in (("Easy", ["red", "7"]), ("Medium", ["a kite"]), ("Hard", ["north"])):
        split = folder / f"VisualProbe_{level}"
        (split / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for number, answer in enumerate(answers):
            name = f"images/{level.lower()}_{number}.jpg"
            (split / name).write_bytes(_jpeg((200, 150), "gray"))
            records.append(
                {"images": [f"VisualProbe_{level}/{name}"], "problem": f"<image>\nWhat is item {number}?",
                 "solution": answer}
            )  # fmt: skip
        (split / "val.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


def write_vstar_annotations(folder: Path) -> Path:
    """V*'s per-subtask folders: image + annotation JSON with COCO-style boxes (x, y, width, height)."""
    for subtask, name, box in (
        ("direct_attributes", "sa_1", [[10, 20, 30, 40]]),
        ("direct_attributes", "sa_2", [[50, 60, 20, 20], [100, 10, 10, 30]]),
        ("relative_position", "sa_3", [[5, 5, 50, 50]]),
    ):
        (folder / subtask).mkdir(parents=True, exist_ok=True)
        (folder / subtask / f"{name}.jpg").write_bytes(_jpeg((200, 150), "teal"))
        record = {"target_object": ["x"], "bbox": box, "question": f"What colour is {name}?", "options": ["a", "b"]}
        (folder / subtask / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


WRITERS = {
    "zoombench": write_zoombench,
    "mme-realworld": write_mme_lmms,
    "mme-realworld-cn": write_mme_lmms,
    "mme-realworld-lite": write_mme_lmms,
    "mmstar": write_mmstar,
    "pope-adversarial": write_pope_full,
    "pope-random": write_pope_default,
    "cv-bench": write_cvbench,
    "mmvp": write_mmvp,
    "visualprobe": write_visualprobe,
}


# ----------------------------------------------------------------------------- loaders and official prompts
def test_zoombench_reads_queries_answers_and_the_shipped_crops(tmp_path) -> None:
    items = load_benchmark("zoombench", write_zoombench(tmp_path))
    assert [item.reference for item in items] == ["42", "blue", "B"]
    assert all(item.scoring == "open" and item.has_crop for item in items)
    assert items[0].prompt == "What number is written on the sign?"  # the query, asked as written
    assert items[0].sample.load_crop().size == (64, 48) and items[0].sample.load_image().size == (320, 240)


def test_mme_realworld_lmms_parquet_gets_the_official_english_and_chinese_prompts(tmp_path) -> None:
    folder = write_mme_lmms(tmp_path)
    english = load_benchmark("mme-realworld", folder)
    assert [item.sample.answer for item in english] == ["2", "left"]
    assert english[0].category == "Perception/Monitoring" and english[1].groups["task"] == "Reasoning"
    assert english[0].prompt == (
        "How many cars? The choices are listed below:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) none\n"
        "Select the best answer to the above multiple-choice question based on the image. Respond with only the "
        "letter (A, B, C, D, or E) of the correct option.\nThe best answer is: "
    )
    chinese = load_benchmark("mme-realworld-cn", folder)
    assert chinese[0].prompt.startswith("How many cars? 选项如下所示:\n(A) 1")
    assert chinese[0].prompt.endswith("最佳答案为： ")
    assert len(load_benchmark("mme-realworld-lite", folder)) == 2


def test_mme_realworld_json_layout_also_gets_the_official_prompt(tmp_path) -> None:
    from tests.test_benchmarks import write_mme_realworld

    items = load_benchmark("mme-realworld", write_mme_realworld(tmp_path))
    assert items[0].prompt.startswith("What are objects to the front of the ego car? The choices are listed below:\n")
    assert "(E) All the above answers are wrong." in items[0].prompt


def test_mmstar_options_are_read_from_the_question(tmp_path) -> None:
    items = load_benchmark("mmstar", write_mmstar(tmp_path))
    assert items[0].sample.options == ["the cup", "the ball", "the box", "the hat"]
    assert items[0].sample.answer == "the ball" and items[1].sample.answer == "4"
    assert items[0].prompt.endswith("D: the hat") and items[1].groups == {"l2_category": "numeric commonsense"}


@pytest.mark.parametrize("writer", [write_pope_full, write_pope_default])
def test_pope_splits_from_either_config(tmp_path, writer) -> None:
    folder = writer(tmp_path)
    adversarial = load_benchmark("pope-adversarial", folder)
    assert [item.reference for item in adversarial] == ["yes", "no"]
    assert adversarial[0].prompt.endswith("?\nAnswer the question using a single word or phrase.")
    assert len(load_benchmark("pope-popular", folder)) == 1 and len(load_benchmark("pope_random", folder)) == 2
    assert all(item.scoring == "yesno" for item in adversarial)


def test_cvbench_reads_both_dimensions(tmp_path) -> None:
    items = load_benchmark("cv-bench", write_cvbench(tmp_path))
    assert [(item.groups["type"], item.sample.answer_letter) for item in items] == [
        ("2D", "B"),
        ("2D", "A"),
        ("3D", "A"),
    ]
    assert items[0].prompt.startswith("How many chairs") and items[0].category == "2D/Count"


def test_mmvp_reads_the_csv_and_pairs(tmp_path) -> None:
    items = load_benchmark("mmvp", write_mmvp(tmp_path))
    assert [item.sample.answer for item in items] == ["Open", "Closed", "Right", "Left"]
    assert items[0].prompt == "Is the door open or closed? (a) Open (b) Closed"
    assert [item.groups["pair"] for item in items] == ["0", "0", "1", "1"] and items[0].scoring == "ab"


def test_visualprobe_reads_three_levels(tmp_path) -> None:
    items = load_benchmark("visualprobe", write_visualprobe(tmp_path))
    assert [item.category for item in items] == ["Easy", "Easy", "Medium", "Hard"]
    assert items[0].prompt == "What is item 0?" and items[2].reference == "a kite"


def test_vstar_annotation_boxes_become_the_crop_condition(tmp_path) -> None:
    items = load_benchmark("vstar", write_vstar_annotations(tmp_path))
    boxes = {item.sample.id: item.sample.bbox for item in items}
    assert boxes["direct_attributes/sa_1"] == (10, 20, 40, 60)
    assert boxes["direct_attributes/sa_2"] == (50, 10, 110, 80)  # the union of both targets
    assert all(item.has_crop for item in items)
    assert items[0].prompt.endswith("\n(B) " + items[0].sample.options[1] + "\n"
                                    "Answer with the option's letter from the given choices directly.")  # fmt: skip


def test_hrbench_official_prompt(tmp_path) -> None:
    from tests.test_benchmarks import write_hrbench

    write_hrbench(tmp_path)
    item = load_benchmark("hrbench-4k", tmp_path)[0]
    assert item.prompt == (
        "What is the number above the entrance? Select from the following choices.\n(A) 27B\n(B) 37B\n(C) 27D\n(D) 27E"
    )


def test_missing_layouts_name_what_was_expected(tmp_path) -> None:
    for name, expected in (
        ("zoombench", "data/test.parquet"),
        ("mmstar", "mmstar.parquet"),
        ("pope-popular", "no POPE parquet files"),
        ("cv-bench", "test_2d.parquet"),
        ("mmvp", "Questions.csv"),
        ("visualprobe", "val.json"),
    ):
        with pytest.raises(BenchmarkError, match=expected):
            load_benchmark(name, tmp_path)


def test_bad_rows_are_listed(tmp_path) -> None:
    write_pope_full(tmp_path)
    _write_parquet(tmp_path / "Full" / "popular-00000-of-00001.parquet", [{**_pope_row(0, "popular", "maybe")}])
    with pytest.raises(BenchmarkError, match="row 0: answer: expected yes or no"):
        load_benchmark("pope-popular", tmp_path)


# ----------------------------------------------------------------------------- per-suite numbers
def _record(category: str, correct: bool, **extra: object) -> dict[str, object]:
    return {"category": category, "full_correct": correct, "full_choice": extra.pop("choice", "A"), **extra}


def test_pope_reports_accuracy_precision_recall_f1_and_yes_ratio() -> None:
    # references: yes, yes, yes, no, no; replies: yes (tp), no (fn), yes (tp), yes (fp), no (tn)
    records = [
        _record("random", True, reference="yes", choice="yes"),
        _record("random", False, reference="yes", choice="no"),
        _record("random", True, reference="yes", choice="yes"),
        _record("random", False, reference="no", choice="yes"),
        _record("random", True, reference="no", choice="no"),
    ]
    reported = summarize_benchmark(get_benchmark("pope-random"), records)["reported"]
    precision, recall = 2 / 3, 2 / 3
    assert reported == pytest.approx(
        {"Accuracy": 0.6, "Precision": precision, "Recall": recall, "F1": 2 / 3, "Yes ratio": 0.6}
    )


def test_cvbench_is_the_mean_of_2d_and_3d_not_of_all_questions() -> None:
    records = [
        _record("2D/Count", True, groups={"type": "2D"}),
        _record("2D/Count", True, groups={"type": "2D"}),
        _record("2D/Count", True, groups={"type": "2D"}),
        _record("3D/Depth", False, groups={"type": "3D"}),
    ]
    summary = summarize_benchmark(get_benchmark("cv-bench"), records)
    assert summary["reported"] == pytest.approx({"2D": 1.0, "3D": 0.0, "Overall": 0.5})
    assert summary["accuracy"] == 0.75


def test_visualprobe_is_the_mean_of_its_levels_and_mmvp_counts_pairs() -> None:
    records = [_record("Easy", True), _record("Easy", True), _record("Medium", False), _record("Hard", True)]
    assert summarize_benchmark(get_benchmark("visualprobe"), records)["reported"] == pytest.approx(
        {"Easy": 1.0, "Medium": 0.0, "Hard": 1.0, "Average": 2 / 3}
    )
    pairs = [
        _record("all", True, groups={"pair": "0"}),
        _record("all", True, groups={"pair": "0"}),
        _record("all", True, groups={"pair": "1"}),
        _record("all", False, groups={"pair": "1"}),
    ]
    assert summarize_benchmark(get_benchmark("mmvp"), pairs)["reported"] == pytest.approx(
        {"Questions": 0.75, "Pairs": 0.5}
    )


def test_gap_is_measured_on_the_items_that_have_crops() -> None:
    records = [
        _record("a", False, crop_correct=True),
        _record("a", True, crop_correct=True),
        _record("a", True),  # no crop: counts in accuracy, not in the gap
    ]
    summary = summarize_benchmark(get_benchmark("zoombench"), records)
    assert summary["crop"]["n"] == 2 and summary["crop"]["full_accuracy"] == 0.5
    assert summary["crop_accuracy"] == 1.0 and summary["gap"] == 0.5
    assert summary["accuracy"] == pytest.approx(2 / 3)
    plain = summarize_benchmark(get_benchmark("mmvp"), [_record("all", True, groups={"pair": "0"})])
    assert plain["crop_accuracy"] is None and plain["gap"] is None and "crop" not in plain
    json.dumps(plain, allow_nan=False)  # a suite without crops leaves no NaN in the JSON


# ----------------------------------------------------------------------------- end to end on the tiny model
@pytest.fixture(scope="module")
def tiny_base():
    from vopd.config import RuntimeConfig
    from vopd.models import load_model_and_processor

    return load_model_and_processor(str(TINY_BASE), RuntimeConfig(device="cpu", dtype="float32"))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_new_suite_evaluates_on_the_tiny_model(tiny_base, tmp_path, name) -> None:
    folder = WRITERS[name](tmp_path / "suite")
    config = EvalConfig(
        model=str(TINY_BASE), benchmark=name, data=str(folder), batch_size=4, max_new_tokens=3, views=SMALL_VIEWS
    )
    result = evaluate_benchmark(config, loaded=tiny_base)
    summary, records = result.summary, result.records
    assert summary["n"] == len(records) == len(load_benchmark(name, folder)) and summary["scorer"] == "rule"
    assert sum(stats["n"] for stats in summary["categories"].values()) == summary["n"]
    assert summary["accuracy"] == sum(r["full_correct"] for r in records) / len(records)
    assert summary["reported"]
    for record in records:  # every verdict is the rule's verdict on the stored reply
        from vopd.scoring import score_reply

        verdict = score_reply(record["scoring"], record["full_text"], options=record["options"],
                              reference=record["reference"])  # fmt: skip
        assert verdict.correct == record["full_correct"] and verdict.prediction == record["full_choice"]
    if name == "zoombench":
        assert all(r["crop_correct"] is not None for r in records)
        crop = sum(r["crop_correct"] for r in records) / len(records)
        assert result.crop_accuracy == summary["crop_accuracy"] == crop
        assert result.gap == pytest.approx(crop - result.full_accuracy)
    else:
        assert summary["crop_accuracy"] is None


def test_the_crop_condition_shows_the_crop_and_the_official_prompt(tiny_base, tmp_path, monkeypatch) -> None:
    """The crop answers see the shipped crop image (64 x 48 here, upscaled by no one) and the same official query."""
    import vopd.benchmarks as benchmarks

    seen = []
    real = benchmarks.generate_answers

    def spy(loaded, views, options, *, max_new_tokens, engine=None):
        assert engine is None  # engine auto decodes with transformers on a CPU
        seen.extend((view.image.size, view.text) for view in views)
        return real(loaded, views, options, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(benchmarks, "generate_answers", spy)
    folder = write_zoombench(tmp_path)
    config = EvalConfig(model=str(TINY_BASE), benchmark="zoombench", data=str(folder), max_new_tokens=2,
                        views={"max_pixels": 160 * 120})  # fmt: skip
    evaluate_benchmark(config, loaded=tiny_base)
    assert seen[:3] == [((160, 120), q) for q in [i.prompt for i in load_benchmark("zoombench", folder)]]
    assert [size for size, _ in seen[3:]] == [(64, 48)] * 3
    seen.clear()
    evaluate_benchmark(config.model_copy(update={"crops": False, "prompt": "project"}), loaded=tiny_base)
    assert len(seen) == 3  # no crop pass; the project's own format has no options for a free-form query
    assert seen[0][1] == "What number is written on the sign?"


def test_vstar_boxes_give_a_crop_accuracy_and_gap_on_the_tiny_model(tiny_base, tmp_path) -> None:
    folder = write_vstar_annotations(tmp_path)
    config = EvalConfig(model=str(TINY_BASE), benchmark="vstar", data=str(folder), max_new_tokens=2, views=SMALL_VIEWS)
    result = evaluate_benchmark(config, loaded=tiny_base)
    assert result.summary["crop"]["n"] == 3
    assert result.gap == pytest.approx(result.crop_accuracy - result.summary["crop"]["full_accuracy"])


def test_cli_json_carries_full_crop_and_gap(tmp_path, capsys) -> None:
    folder = write_zoombench(tmp_path / "zoom")
    code = main(
        ["eval", "--model", str(TINY_BASE), "--benchmark", "zoombench", "--data", str(folder), "--max_new_tokens", "2",
         "--views.max_pixels", str(112 * 112), "--runtime.device", "cpu"]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "zoombench" and summary["crop"]["n"] == 3
    assert summary["gap"] == pytest.approx(summary["crop_accuracy"] - summary["full_accuracy"])
    assert any(line.startswith("crop") for line in lines[:-1])


# ----------------------------------------------------------------------------- the judge, against a fake server
class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that says Yes exactly when the reference answer is 'yes'."""

    requests: list[dict[str, object]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][0]["content"]
        if "fail" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        verdict = "Yes" if "The answer is: yes\n" in prompt else "No."
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_judge():
    _FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_judge_and_rules_are_both_reported_with_their_agreement(tiny_base, tmp_path, fake_judge, monkeypatch) -> None:
    monkeypatch.setenv(JUDGE_KEY_ENV, "judge-secret")
    folder = write_pope_default(tmp_path)
    judge = JudgeConfig(url=fake_judge, model="judge-model", max_tokens=8)
    config = EvalConfig(model=str(TINY_BASE), benchmark="pope-random", data=str(folder), max_new_tokens=2,
                        views=SMALL_VIEWS, judge=judge)  # fmt: skip
    result = evaluate_benchmark(config, loaded=tiny_base)
    records, summary = result.records, result.summary
    assert summary["scorer"] == "rule+judge"
    assert [r["full_judge"] for r in records] == [r["reference"] == "yes" for r in records]
    combined = [bool(r["full_correct"]) or r["full_judge"] for r in records]
    assert summary["judge"]["accuracy"] == sum(combined) / len(records)
    assert summary["judge"]["judge_alone_accuracy"] == 0.5  # random split: one yes, one no
    agree = [bool(r["full_correct"]) == r["full_judge"] for r in records]
    assert summary["judge"]["agreement"] == sum(agree) / len(agree) and summary["judge"]["errors"] == 0
    assert summary["accuracy"] == sum(r["full_correct"] for r in records) / len(records)  # the rules stay the default
    assert set(summary["judge"]["reported"]) == {"Accuracy", "Precision", "Recall", "F1", "Yes ratio"}
    sent = _FakeJudge.requests
    assert len(sent) == 2 and all(r["path"] == "/v1/chat/completions" for r in sent)
    assert all(r["auth"] == "Bearer judge-secret" for r in sent)
    body = sent[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert "Directly give me your output." in body["messages"][0]["content"]
    assert "judge-secret" not in json.dumps(config.model_dump())  # the key never enters the config


def test_a_failing_judge_is_counted_as_errors_not_as_yes(fake_judge) -> None:
    from vopd.scoring import JudgeClient

    client = JudgeClient(url=fake_judge, model="m", retries=1, workers=2)
    verdicts = client.judge(["q fail", "q", "q"], ["x", "yes", "no"], ["a", "b", "c"])
    assert verdicts == [None, True, False]
    assert len(_FakeJudge.requests) == 2 + 2  # the failing prompt tried twice (one retry)


def test_cli_takes_the_judge_by_dotted_flags_and_prints_both_scorers(tmp_path, fake_judge, capsys) -> None:
    folder = write_pope_full(tmp_path / "pope")
    code = main(
        ["eval", "--model", str(TINY_BASE), "--benchmark", "pope_adv", "--data", str(folder), "--max_new_tokens", "2",
         "--views.max_pixels", str(112 * 112), "--runtime.device", "cpu", "--judge.url", fake_judge,
         "--judge.model", "judge-model"]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["scorer"] == "rule+judge" and summary["judge"]["judge_alone_accuracy"] == 0.5
    assert any(line.startswith("judge: accuracy") for line in lines[:-1])
    assert len(_FakeJudge.requests) == 2
