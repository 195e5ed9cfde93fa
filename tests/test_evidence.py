"""vopd.evidence: the search grid, the choice of the most confident window, the trainer's cache and its checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import vopd.evidence as evidence
from vopd.config import TrainConfig, ViewConfig
from vopd.data import Sample
from vopd.evidence import (
    Evidence,
    EvidenceCache,
    box_iou,
    candidate_windows,
    contains_centre,
    evidence_metrics,
    search_evidence,
)
from vopd.views import student_view, teacher_view

RED = (215, 35, 35)


def _image_with_target(centre: tuple[int, int], size: int = 112, radius: int = 6) -> bytes:
    """A light canvas with one red square (the target) and grey squares elsewhere."""
    image = Image.new("RGB", (size, size), (230, 230, 230))
    x, y = centre
    image.paste(RED, (x - radius, y - radius, x + radius + 1, y + radius + 1))
    for gx, gy in ((15, 15), (95, 20), (20, 95)):
        if max(abs(gx - x), abs(gy - y)) > 2 * radius:
            image.paste((90, 90, 90), (gx - radius, gy - radius, gx + radius + 1, gy + radius + 1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(centre: tuple[int, int], sample_id: str = "s", **fields) -> Sample:
    return Sample(
        id=sample_id,
        question="What color is the square?",
        options=["red", "green", "blue", "yellow"],
        image_bytes=_image_with_target(centre),
        **fields,
    )


def _red_share_scorer(calls: list[int]):
    """A stand-in for the teacher: confident in proportion to the share of target pixels in the view. It sees only
    what the real teacher sees (the view's pixels), so the search logic is tested without a trained model."""

    def score(loaded, views, options, *, max_new_tokens, model=None, engine=None):
        calls.append(len(views))
        values = []
        for view in views:
            pixels = np.asarray(view.image.convert("RGB"), dtype=np.int32)  # (H, W, 3)
            red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
            values.append(float(red.mean()))
        return values

    return score


# --------------------------------------------------------------------------- the grid
def test_grid_covers_two_zoom_levels_with_overlap() -> None:
    windows = candidate_windows(112, 112, ViewConfig())
    sides = sorted({w[2] - w[0] for w in windows})
    assert sides == [28.0, 56.0]  # 0.25 and 0.5 of the shorter side
    assert len([w for w in windows if w[2] - w[0] == 56]) == 9  # stride 28: 3 x 3
    assert len([w for w in windows if w[2] - w[0] == 28]) == 49  # stride 14: 7 x 7
    assert len(set(windows)) == len(windows)
    assert all(0 <= w[0] < w[2] <= 112 and 0 <= w[1] < w[3] <= 112 for w in windows)
    # Every 15 px target (radius 7, the synth world's largest) lies whole inside some small window, wherever it is.
    for cx in range(7, 105):
        assert any(w[0] <= cx - 7 and w[2] > cx + 7 for w in windows if w[2] - w[0] == 28 and w[1] == 0)


def test_grid_on_a_wide_image_reaches_the_far_edge() -> None:
    cfg = ViewConfig(search_windows=[0.5], search_overlap=0.0)
    windows = candidate_windows(300, 100, cfg)
    assert {w[2] - w[0] for w in windows} == {50.0}
    assert max(w[2] for w in windows) == 300 and max(w[3] for w in windows) == 100


@pytest.mark.parametrize(
    "settings",
    [{"search_windows": [0.0]}, {"search_windows": [1.5]}, {"search_windows": []}, {"search_overlap": 0.95}],
)
def test_search_settings_are_validated(settings: dict) -> None:
    with pytest.raises(ValidationError):
        ViewConfig(**settings)


def test_evidence_setting_is_validated_and_documented() -> None:
    with pytest.raises(ValidationError):
        ViewConfig(evidence="guess")
    assert ViewConfig().evidence == "auto"
    config = TrainConfig(model="m", dataset="d", steps=1, views={"evidence": "search", "search_refresh_steps": 7})
    assert config.views.search_refresh_steps == 7
    with pytest.raises(ValidationError):
        TrainConfig(model="m", dataset="d", steps=1, views={"search_refresh_steps": 0})


# --------------------------------------------------------------------------- choosing the crop
@pytest.mark.parametrize("strategy", ["grid", "zoom"])
@pytest.mark.parametrize("centre", [(30, 80), (84, 26), (56, 56), (100, 100)])
def test_search_picks_the_window_holding_the_target(
    monkeypatch: pytest.MonkeyPatch, strategy: str, centre: tuple[int, int]
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(evidence, "view_confidences", _red_share_scorer(calls))
    cfg = ViewConfig(search_strategy=strategy, search_batch_size=20)
    target = (centre[0] - 12, centre[1] - 12, centre[0] + 12, centre[1] + 12)
    sample = _sample(centre, hidden_bbox=target)
    (found,) = search_evidence(None, [sample], cfg, step=3)  # type: ignore[arg-type]
    assert contains_centre(found.box, target)
    assert found.box[2] - found.box[0] == 28  # the tighter window wins over the 56 px one holding the same target
    assert found.step == 3 and found.confidence > 0.1
    assert max(calls) <= 20  # scored in batches of search_batch_size
    assert sum(calls) == (58 if strategy == "grid" else 9 + 9)  # zoom: 9 windows, then 9 inside the best


def test_near_ties_go_to_the_smaller_window() -> None:
    boxes = [(0.0, 0.0, 56.0, 56.0), (0.0, 0.0, 28.0, 28.0), (28.0, 28.0, 56.0, 56.0)]
    assert evidence._best(boxes, [0.9, 0.8995, 0.5]) == (boxes[1], 0.8995)
    assert evidence._best(boxes, [0.9, 0.8, 0.5]) == (boxes[0], 0.9)


def test_search_scores_candidates_of_several_samples_together(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(evidence, "view_confidences", _red_share_scorer(calls))
    samples = [_sample((30, 30), "a"), _sample((80, 80), "b")]
    found = search_evidence(None, samples, ViewConfig(search_batch_size=64))  # type: ignore[arg-type]
    assert calls == [64, 52]  # 2 x 58 candidates in full batches
    assert contains_centre(found[0].box, (18, 18, 42, 42)) and contains_centre(found[1].box, (68, 68, 92, 92))


def test_metrics_against_a_known_box() -> None:
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    samples = [_sample((30, 30), "a", hidden_bbox=(18, 18, 42, 42)), _sample((80, 80), "b")]
    chosen = [Evidence((14, 14, 42, 42), 0.9, 0), Evidence((0, 0, 28, 28), 0.5, 0)]
    metrics = evidence_metrics(samples, chosen)
    assert metrics["evidence/confidence"] == pytest.approx(0.7)
    assert metrics["evidence/centre_hit"] == 1.0  # only the sample with a known box counts
    assert metrics["evidence/iou"] == pytest.approx(box_iou((14, 14, 42, 42), (18, 18, 42, 42)))


# --------------------------------------------------------------------------- views in search mode
def test_search_mode_views_plain_student_and_the_searched_crop_for_the_teacher() -> None:
    cfg = ViewConfig()
    sample = _sample((30, 80))
    student = student_view(sample, cfg)
    assert student.image.size == (112, 112) and "red bounding box" not in student.text  # no box, no hint
    assert student.image.tobytes() == sample.load_image().tobytes()
    with pytest.raises(ValueError, match="no searched box yet"):
        teacher_view(sample, cfg)
    chosen = sample.model_copy(update={"search_box": (14.0, 56.0, 42.0, 84.0)})
    teacher = teacher_view(chosen, cfg)
    assert teacher.image.size == (56, 56) and teacher.text == student.text
    boxed = sample.model_copy(update={"bbox": (18.0, 68.0, 42.0, 92.0)})
    assert "red bounding box" in student_view(boxed, cfg).text  # auto: a box means box mode
    assert student_view(boxed, ViewConfig(evidence="search")).text == student.text


# --------------------------------------------------------------------------- the trainer's cache
def test_cache_searches_once_and_again_after_refresh_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(evidence, "view_confidences", _red_share_scorer(calls))
    cache = EvidenceCache(ViewConfig(search_refresh_steps=5, search_strategy="zoom"))
    samples = [_sample((30, 80), "a"), _sample((84, 26), "b"), _sample((56, 56), "c", bbox=(44, 44, 68, 68))]
    resolved, chosen = cache.resolve(None, samples, step=0)  # type: ignore[arg-type]
    assert cache.searches == 2 and len(chosen) == 2  # the boxed sample is never searched
    assert resolved[2] is samples[2] and resolved[0].search_box == chosen[0].box
    cache.resolve(None, samples[:2], step=4)  # type: ignore[arg-type]
    assert cache.searches == 2  # cached
    _, again = cache.resolve(None, samples[:1], step=5)  # type: ignore[arg-type]
    assert cache.searches == 3 and again[0].step == 5  # refreshed once 5 steps old

    restored = EvidenceCache(cache.cfg)
    restored.load_state_dict(json.loads(json.dumps(cache.state_dict())))  # what a checkpoint holds
    assert restored.entries == cache.entries and restored.searches == 3


def _write_plain_dataset(folder: Path, count: int = 4) -> Path:
    """Plain VQA items: image, question, options; no box, no answer."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        centre = (20 + 20 * index, 90 - 15 * index)
        (folder / f"{index}.png").write_bytes(_image_with_target(centre))
        lines.append(
            {
                "id": f"p{index}",
                "image": f"{index}.png",
                "question": "What color is the square?",
                "options": ["red", "green", "blue", "yellow"],
            }
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_trainer_searches_box_free_samples_and_resumes_with_the_same_crops(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from vopd.trainer import OPDTrainer, latest_checkpoint

    dataset = _write_plain_dataset(tmp_path / "data")
    settings = {
        "model": str(tiny_model_dir),
        "dataset": str(dataset),
        "batch_size": 2,
        "lr": 1e-4,
        "save_every": 1,
        "rollout": {"num_rollouts": 1, "max_new_tokens": 3},
        "views": {"search_windows": [0.5], "search_refresh_steps": 2, "search_max_new_tokens": 2},
        "collapse_guard": {"enabled": False},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }
    full = OPDTrainer(TrainConfig(**settings, steps=3, output=str(tmp_path / "full")))
    full.train()
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["evidence/confidence"] <= 1.0 for m in metrics)
    # Steps 0-1 search all four; step 2 starts epoch 2: of its two samples, the one searched at step 0 is two steps
    # old (refreshed), the one searched at step 1 is not (cached).
    assert [m["evidence/searched"] for m in metrics] == [2.0, 2.0, 1.0]
    state = torch.load(latest_checkpoint(tmp_path / "full") / "trainer_state.pt", weights_only=False)
    assert len(state["evidence"]["entries"]) == 4

    first = OPDTrainer(TrainConfig(**settings, steps=2, output=str(tmp_path / "split")))
    first.train()
    resumed = OPDTrainer(TrainConfig(**settings, steps=3, output=str(tmp_path / "split")), resume=True)
    assert resumed.step == 2 and resumed.evidence.entries == first.evidence.entries
    resumed.train()
    assert resumed.evidence.entries == full.evidence.entries
    for name, tensor in full.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name


def test_cli_trains_on_a_plain_vqa_jsonl(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real-data path: a JSONL with image, question and options only trains through `vopd train`."""
    from vopd.cli import main

    dataset = _write_plain_dataset(tmp_path / "plain")
    argv = ["train", "--preset", "tiny-cpu", "--model", str(tiny_model_dir), "--dataset", str(dataset)]
    argv += ["--output", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--rollout.max_new_tokens", "3"]
    argv += ["--views.search_windows", "[0.5]", "--collapse_guard.enabled", "false"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["evidence/searched"] for m in metrics] == [2.0, 2.0] and all("evidence/confidence" in m for m in metrics)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["views"]["evidence"] == "auto"  # auto: no box, so the crop is searched for


def test_confidence_is_the_top_letters_mass_or_the_first_tokens_certainty() -> None:
    """view_confidences on a real model, checked against a forward pass of our own: the letter mass where the greedy
    answer names its letter, exp(-entropy) of the first token for an open question; the model's mode is restored."""
    from vopd.answering import _letter_token_ids
    from vopd.config import RuntimeConfig
    from vopd.models import load_model_and_processor
    from vopd.rollout import RolloutBatch, response_logits
    from vopd.tiny import shipped_base_model_dir
    from vopd.views import to_messages

    runtime = RuntimeConfig(device="cpu", dtype="float32")
    loaded = load_model_and_processor(shipped_base_model_dir(), runtime, trainable=True)
    view = student_view(_sample((40, 60)), ViewConfig())
    options = ["red", "green", "blue", "yellow"]
    loaded.model.train()
    multiple_choice, open_question = evidence.view_confidences(loaded, [view, view], [options, None], max_new_tokens=6)
    assert loaded.model.training  # put back as it was

    loaded.model.eval()
    with torch.no_grad():
        prompts = loaded.encode([to_messages(view)])
        ids = loaded.model.generate(
            **prompts,
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=loaded.pad_token_id,
            eos_token_id=loaded.eos_token_ids,
            suppress_tokens=loaded.suppressed_token_ids or None,
        )[0, prompts["input_ids"].shape[1] :]
        rollout = RolloutBatch(
            ids[None],
            torch.ones_like(ids[None], dtype=torch.bool),
            torch.zeros(1, len(ids)),
            torch.zeros(1, dtype=torch.bool),
        )
        logits = response_logits(loaded.model, prompts, rollout)[0]  # (R, V): row j predicts answer token j
    logits[:, loaded.suppressed_token_ids] = float("-inf")
    first = logits[0].softmax(-1)
    assert open_question == pytest.approx(float(torch.exp((first * first.clamp_min(1e-30).log()).sum())), rel=1e-4)
    groups = _letter_token_ids(loaded.processor.tokenizer, 4)
    letters = {token for group in groups for token in group}
    position = next((i for i, token in enumerate(ids.tolist()) if token in letters), None)
    assert position is not None  # the shipped base answers "Answer: X"
    probs = logits[position].softmax(-1)
    assert multiple_choice == pytest.approx(max(float(probs[list(g)].sum()) for g in groups if g), rel=1e-4)
    assert 0.25 <= multiple_choice <= 1.0 and 0.0 < open_question <= 1.0
