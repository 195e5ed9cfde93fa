"""Evaluation: answer parsing, accuracies and records on known cases, and the CLI's JSON line."""

from __future__ import annotations

import json

import pytest

from vopd.answering import Answer, is_correct, normalize_answer, parse_choice
from vopd.cli import main
from vopd.config import EvalConfig
from vopd.data import Sample
from vopd.evaluate import evaluate, summarize

OPTIONS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        ("Answer: C", 2),
        ("answer: d", 3),
        ("The answer is (A).", 0),
        ("(D) yellow", 3),
        ("C. blue", 2),
        ("It is green.", 1),
        ("blue", 2),
        ("Answer: E", None),  # out of range
        ("red or blue", None),  # names two options
        ("I cannot tell", None),
        ("", None),
        ("A dog is green", 1),  # an article 'A' is not an answer when an option is named
    ],
)
def test_parse_choice(text: str, expected: int | None) -> None:
    assert parse_choice(text, OPTIONS) == expected


def test_free_form_normalisation() -> None:
    assert normalize_answer("The  Red car!") == normalize_answer("red car") == "red car"
    assert normalize_answer("a, b") == "b"


def test_correctness_and_summary_on_a_hand_built_case() -> None:
    image = b"unused"  # Sample checks consistency, not decodability
    samples = [
        Sample(id=str(i), question="q", options=OPTIONS, answer=OPTIONS[i % 4], bbox=(0, 0, 4, 4), image_bytes=image)
        for i in range(4)
    ]
    full = [Answer("Answer: A", 0, [0.7, 0.1, 0.1, 0.1])] * 4  # right only for sample 0
    crop = [Answer(f"Answer: {'ABCD'[i]}", i, None) for i in range(4)]  # always right
    records = []
    for sample, f, c in zip(samples, full, crop, strict=True):
        records.append(
            {
                "id": sample.id,
                "full_correct": is_correct(sample, f),
                "full_choice": "A",
                "full_p_correct": f.option_probs[sample.answer_index],
                "crop_correct": is_correct(sample, c),
                "crop_choice": "ABCD"[c.choice],
                "crop_p_correct": None,
            }
        )
    summary = summarize(records)
    assert summary["full_accuracy"] == 0.25 and summary["crop_accuracy"] == 1.0 and summary["gap"] == 0.75
    assert summary["n"] == 4 and summary["full_letters"] == {"A": 4}
    assert summary["full_p_correct"] == pytest.approx((0.7 + 0.1 * 3) / 4)
    free = Sample(id="f", question="q", answer="Red car", bbox=(0, 0, 4, 4), image_bytes=image)
    assert is_correct(free, Answer("a red car.", None, None))
    assert not is_correct(free, Answer("blue car", None, None))


def test_evaluate_on_the_tiny_model_is_self_consistent(tiny_model_dir, tmp_path) -> None:
    from tests.test_trainer import write_dataset

    data = write_dataset(tmp_path / "data", count=5)
    out = tmp_path / "records.jsonl"
    result = evaluate(
        EvalConfig(model=str(tiny_model_dir), dataset=str(data), output=str(out), batch_size=3, max_new_tokens=4)
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.n == len(records) == 5
    assert result.full_accuracy == sum(r["full_correct"] for r in records) / 5
    assert result.crop_accuracy == sum(r["crop_correct"] for r in records) / 5
    assert result.gap == pytest.approx(result.crop_accuracy - result.full_accuracy)
    for record in records:
        assert record["full_correct"] == (
            record["full_choice"] is not None and "ABCD".index(record["full_choice"]) == OPTIONS.index(record["answer"])
        )


def test_eval_cli_ends_with_one_json_line(tiny_model_dir, tmp_path, capsys) -> None:
    from tests.test_trainer import write_dataset

    data = write_dataset(tmp_path / "data", count=3)
    code = main(["eval", "--model", str(tiny_model_dir), "--dataset", str(data), "--max_new_tokens", "3"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert {"full_accuracy", "crop_accuracy", "gap", "n"} <= summary.keys() and summary["n"] == 3
    assert summary["engine"] == "hf"  # engine auto on a CPU: transformers


def test_answers_from_an_engines_top_k_read_what_it_holds(tiny_model_dir) -> None:
    """The vllm engine's answers come from each position's top k (``answer_from_topk``): the letter mass present in
    the top k at the first letter, and the entropy of the top k plus one tail bucket."""
    import math

    from vopd.answering import _letter_token_ids, answer_from_topk
    from vopd.config import RuntimeConfig
    from vopd.models import load_model_and_processor

    loaded = load_model_and_processor(tiny_model_dir, RuntimeConfig(device="cpu", dtype="float32"))
    letters = _letter_token_ids(loaded.processor.tokenizer, 4)
    a, b = letters[0][0], letters[1][0]
    prefix = loaded.processor.tokenizer.encode("Answer:", add_special_tokens=False)
    word, end = prefix[0], loaded.eos_token_ids[0]
    assert not {a, b, end} & set(prefix)
    # "Answer:" first (its first token at 0.5, the letter A at 0.2 beside it), then the letter B, then the end.
    top = [{word: 0.5, a: 0.2}] + [{token: 1.0} for token in prefix[1:]] + [{b: 0.6, a: 0.3, word: 0.05}, {end: 1.0}]
    answer = answer_from_topk(loaded, [*prefix, b, end], top, ["red", "green", "blue", "yellow"])
    assert answer.option_probs == pytest.approx([0.3, 0.6, 0.0, 0.0])  # read at B, the first letter generated
    assert answer.choice == 1
    tail = 0.3  # outside the top k at the first position, counted as one outcome
    expected = -(0.5 * math.log(0.5) + 0.2 * math.log(0.2) + tail * math.log(tail))
    assert answer.first_token_entropy == pytest.approx(expected)
    no_letter = answer_from_topk(loaded, [word, end], [top[0], top[-1]], ["red", "green"])
    assert no_letter.option_probs is None
    assert answer_from_topk(loaded, [word, end], [top[0], top[-1]], None).choice is None


def test_reasoning_before_the_answer_is_not_read_as_the_answer() -> None:
    from vopd.answering import _without_reasoning, parse_choice

    text = _without_reasoning("<think>\nMaybe A, maybe C.\n</think>\n\nB")
    assert text == "B" and parse_choice(text, ["red", "green", "blue"]) == 1
    assert _without_reasoning(" C ") == "C"


def test_box_free_items_report_full_oracle_crop_and_searched_crop(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A `synth --no-box` set: full = the plain image, crop = the hidden box (the oracle), searched = the crop the
    model's own search chose, with how often it held the hidden box's centre."""
    from vopd.synth import SynthConfig, generate_dataset
    from vopd.views import teacher_view

    data = generate_dataset(tmp_path / "nb", SynthConfig(n=4, seed=3, no_box=True))
    calls = []
    from vopd import answering
    from vopd import evaluate as evaluate_module
    from vopd import evidence as evidence_module

    original_generate = answering.generate_answers

    def spy(loaded, views, options, *, max_new_tokens, engine=None):
        assert engine is None  # engine auto decodes with transformers on a CPU
        calls.append([view.text for view in views])
        return original_generate(loaded, views, options, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(evaluate_module, "generate_answers", spy)  # the full, crop and searched answers
    monkeypatch.setattr(evidence_module, "generate_answers", spy)  # the search's own answers on each window
    config = EvalConfig(model=str(tiny_model_dir), dataset=str(data), max_new_tokens=4, views={"search_windows": [0.5]})
    result = evaluate(config)
    summary = result.summary
    assert {"searched_accuracy", "searched_confidence", "searched_centre_hit", "searched_iou"} <= set(summary)
    assert 0.0 <= summary["searched_centre_hit"] <= 1.0 and 0.0 <= summary["searched_confidence"] <= 1.0
    assert all("red bounding box" not in text for batch in calls for text in batch)  # no box, no hint anywhere
    record = result.records[0]
    x0, y0, x1, y1 = record["searched_box"]
    assert (x1 - x0, y1 - y0) == (56, 56)

    # The crop condition is the hidden box's crop, exactly.
    from vopd.data import load_dataset
    from vopd.evaluate import oracle_sample

    sample = load_dataset(data)[0]
    oracle = oracle_sample(sample, config.views)
    assert oracle is not None and oracle.search_box == sample.hidden_bbox
    assert teacher_view(oracle, config.views).image.size == (48, 48)  # the 24 px box, upscaled 2x
    without = EvalConfig(model=str(tiny_model_dir), dataset=str(data), max_new_tokens=4, searched_crop=False)
    assert "searched_accuracy" not in evaluate(without).summary
