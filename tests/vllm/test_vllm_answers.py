"""Greedy answers from the vllm engine against transformers' on the shipped tiny model: evaluation (the crop and
the evidence search's windows included), ``vopd eval --engine vllm``.

What is compared: the answer text token for token (so the parsed choice and the accuracy), the option-letter
probabilities and the evidence search's confidences within ``PROB_TOLERANCE``, the chosen windows exactly. vLLM
gives its top 20 log-probs per position, transformers the full distribution; both in fp32 after the same token mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vopd.config import EvalConfig
from vopd.evaluate import evaluate
from vopd.models import LoadedModel
from vopd.synth import SynthConfig, generate_dataset

# fp32 on both sides (kernels differ in summation order only), and what the top 20 leave out: the letters of a
# four-option question sit in the top 20 of the tiny model's vocabulary whenever it answers with a letter.
PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth"), SynthConfig(n=12, seed=5))


def eval_config(model: Path, dataset: Path, **overrides: Any) -> EvalConfig:
    values: dict[str, Any] = {
        "model": str(model),
        "dataset": str(dataset),
        "batch_size": 6,
        "max_new_tokens": 6,
        "searched_crop": True,  # the evidence search decodes with the same engine
        "views": {"search_windows": [0.5], "search_max_new_tokens": 4},
        "vllm": {"max_model_len": 1024},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }
    values.update(overrides)
    return EvalConfig.model_validate(values)


def test_greedy_answers_equal_transformers(engine: Any, loaded: LoadedModel, tiny_base: Path, synth: Path) -> None:
    engine.sync(loaded.model, everything=True)  # the shared engine back at the base weights (other tests train it)
    config = eval_config(tiny_base, synth)
    hf = evaluate(config.model_copy(update={"engine": "hf"}), loaded=loaded)
    vllm = evaluate(config, loaded=loaded, engine=engine)
    assert (hf.summary["engine"], vllm.summary["engine"]) == ("hf", "vllm")
    worst = 0.0
    for ours, theirs in zip(hf.records, vllm.records, strict=True):
        for condition in ("full", "crop", "searched"):
            assert ours[f"{condition}_text"] == theirs[f"{condition}_text"], (condition, ours["id"])
            assert ours[f"{condition}_correct"] == theirs[f"{condition}_correct"]
            worst = max(worst, abs(ours[f"{condition}_p_correct"] - theirs[f"{condition}_p_correct"]))
        assert ours["searched_box"] == theirs["searched_box"]
        worst = max(worst, abs(ours["searched_confidence"] - theirs["searched_confidence"]))
    assert worst < PROB_TOLERANCE, worst
    for key in ("full_accuracy", "crop_accuracy", "searched_accuracy", "n"):
        assert hf.summary[key] == vllm.summary[key], key
    # Not a trivial agreement: the model answers with letters, with some right and some wrong.
    assert 0.0 < hf.summary["full_accuracy"] < 1.0 or 0.0 < hf.summary["crop_accuracy"] < 1.0
    assert all(record["full_choice"] is not None for record in hf.records)


def test_vopd_eval_with_the_vllm_engine(tiny_base: Path, synth: Path, tmp_path: Path, capsys) -> None:
    """The CLI's --engine vllm: an engine of the evaluation's own (made, synced, closed), the summary naming it."""
    from vopd.cli import main

    records = tmp_path / "records.jsonl"
    arguments = ["eval", "--model", str(tiny_base), "--dataset", str(synth), "--output", str(records)]
    settings = ["--max_new_tokens", "6", "--limit", "6", "--runtime.device", "cpu", "--runtime.dtype", "float32"]
    assert main([*arguments, *settings, "--engine", "vllm", "--vllm.max_model_len", "1024"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "vllm" and summary["n"] == 6
    with_vllm = [json.loads(line) for line in records.read_text().splitlines()]
    assert main([*arguments, *settings, "--engine", "hf"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["engine"] == "hf"
    with_hf = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["full_text"] for r in with_vllm] == [r["full_text"] for r in with_hf]
    assert [r["crop_text"] for r in with_vllm] == [r["crop_text"] for r in with_hf]
