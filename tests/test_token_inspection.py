"""Inspection records are consistent with the rollout, the divergence module and the CLI table."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vopd.cli import main
from vopd.config import InspectConfig
from vopd.models import load_model_and_processor
from vopd.token_inspection import inspect_sample


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    picture = Image.new("RGB", (112, 112), (230, 230, 230))
    ImageDraw.Draw(picture).ellipse([40, 40, 52, 52], fill=(30, 170, 60))
    return picture


def config(tiny_model_dir, **overrides) -> InspectConfig:
    values = {
        "model": str(tiny_model_dir),
        "question": "What color is the shape inside the box?",
        "options": ["red", "green", "blue", "yellow"],
        "bbox": (34, 34, 58, 58),
        "max_new_tokens": 6,
        "show_topk": 5,
        "divergence": {"alpha": 0.3, "topk": 0},
    }
    values.update(overrides)
    return InspectConfig.model_validate(values)


def test_records_are_consistent(tiny_model_dir, loaded, image) -> None:
    result = inspect_sample(config(tiny_model_dir), image, loaded=loaded)
    assert result.tokens and result.alpha == 0.3
    assert "red bounding box" in result.student_prompt and result.student_prompt == result.teacher_prompt
    for record in result.tokens:
        # greedy: the chosen token is the student's argmax, so it heads the student's top-k
        assert record.student_in_topk and record.student_top[0].token_id == record.token_id
        assert record.student_top[0].prob == pytest.approx(record.student_prob, rel=1e-5)
        assert record.argmax_agree == (record.student_top[0].token_id == record.teacher_top[0].token_id)
        assert [t.rank for t in record.student_top] == list(range(1, 6))
        probs = [t.prob for t in record.student_top]
        assert probs == sorted(probs, reverse=True)
        assert record.student_tail_mass == pytest.approx(1 - sum(probs), abs=1e-5)
        assert record.divergence >= 0 and record.forward_kl >= 0 and record.reverse_kl >= 0
        assert 0 <= record.jsd <= torch.log(torch.tensor(2.0)).item() + 1e-6
    mean = sum(r.divergence for r in result.tokens) / len(result.tokens)
    assert result.mean_divergence == pytest.approx(mean, rel=1e-5)


def test_divergences_match_the_divergence_module(tiny_model_dir, loaded, image) -> None:
    """Recompute the student and teacher logits independently and compare per-token values."""
    from vopd.data import Sample
    from vopd.divergence import token_divergence
    from vopd.models import encode_prompts
    from vopd.rollout import RolloutBatch, response_logits
    from vopd.token_inspection import _png_bytes
    from vopd.views import student_view, teacher_view, to_messages

    cfg = config(tiny_model_dir)
    result = inspect_sample(cfg, image, loaded=loaded)
    sample = Sample(id="s", question=cfg.question, options=cfg.options, bbox=cfg.bbox, image_bytes=_png_bytes(image))
    ids = torch.tensor([[r.token_id for r in result.tokens]])
    batch = RolloutBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(ids.shape), torch.tensor([False]))
    logits = []
    for view in (student_view(sample, cfg.views), teacher_view(sample, cfg.views)):
        prompts = encode_prompts(loaded.processor, [to_messages(view)])
        with torch.no_grad():
            logits.append(response_logits(loaded.model, prompts, batch)[0])
    expected = token_divergence(logits[0], logits[1], alpha=0.3, topk=0)
    got = torch.tensor([r.divergence for r in result.tokens])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_box_outside_the_image_is_refused(tiny_model_dir, loaded, image) -> None:
    with pytest.raises(ValueError, match="outside"):
        inspect_sample(config(tiny_model_dir, bbox=(100, 100, 130, 130)), image, loaded=loaded)


def test_inspect_cli_prints_a_table(tiny_model_dir, image, tmp_path, capsys) -> None:
    path = tmp_path / "img.png"
    image.save(path)
    code = main(
        [
            "inspect",
            "--model",
            str(tiny_model_dir),
            "--image",
            str(path),
            "--question",
            "Which color?",
            "--options",
            "red,green,blue,yellow",
            "--bbox",
            "34,34,58,58",
            "--max_new_tokens",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "student:" in out and "teacher:" in out and "p_S" in out
    assert (
        main(["inspect", "--model", str(tiny_model_dir), "--image", str(path), "--question", "q", "--bbox", "1,2,3"])
        == 2
    )


def test_without_a_box_the_search_chooses_the_teachers_crop(tiny_model_dir, loaded, image, monkeypatch) -> None:
    """No box: the teacher's crop is the search's choice (here the window the scorer prefers), the student sees the
    plain image and question, and the result says where the crop came from."""
    import vopd.evidence as evidence

    def prefer_the_shape(loaded, views, options, *, max_new_tokens, model=None, engine=None):  # share of green pixels
        shares = []
        for view in views:
            pixels = view.image.convert("RGB").resize((28, 28))
            green = sum(
                1 for x in range(28) for y in range(28) if pixels.getpixel((x, y))[1] > 150 > pixels.getpixel((x, y))[0]
            )
            shares.append(green / 784)
        return shares

    monkeypatch.setattr(evidence, "view_confidences", prefer_the_shape)
    result = inspect_sample(config(tiny_model_dir, bbox=None, views={"search_windows": [0.25]}), image, loaded=loaded)
    assert result.evidence is not None and result.evidence.source == "search"
    assert result.evidence.confidence > 0.1
    x0, y0, x1, y1 = result.evidence.box
    assert x0 <= 46 < x1 and y0 <= 46 < y1  # holds the green circle's centre
    assert "red bounding box" not in result.student_prompt and result.student_prompt == result.teacher_prompt
    given = inspect_sample(config(tiny_model_dir), image, loaded=loaded)
    assert given.evidence is not None and (given.evidence.source, given.evidence.confidence) == ("given", None)
    assert given.evidence.box == (34, 34, 58, 58)
    # A box given (a dataset sample's own, say) is set aside when the search is asked for by name.
    asked = inspect_sample(
        config(tiny_model_dir, views={"evidence": "search", "search_windows": [0.25]}), image, loaded=loaded
    )
    assert asked.evidence is not None and asked.evidence.source == "search"
    assert asked.evidence.box == result.evidence.box and asked.student_prompt == result.student_prompt


def test_inspect_cli_without_bbox_prints_the_searched_crop(tiny_model_dir, image, tmp_path, capsys) -> None:
    path = tmp_path / "image.png"
    image.save(path)
    argv = ["inspect", "--model", str(tiny_model_dir), "--image", str(path), "--question", "What color is it?"]
    assert main([*argv, "--options", "red,green", "--max_new_tokens", "3", "--views.search_windows", "[0.5]"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("teacher's crop: [") and "(search, confidence " in out


def test_a_token_holding_part_of_a_character_reads_as_its_bytes(loaded) -> None:
    from vopd.token_inspection import token_text

    tokenizer = loaded.processor.tokenizer
    partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert partial and not any("\ufffd" in token_text(tokenizer, i) for i in partial)
    for text in ("€", "é", "日"):  # characters the tiny vocabulary holds only as single bytes
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert "".join(token_text(tokenizer, i) for i in ids) == "".join(f"<0x{b:02X}>" for b in text.encode())
    assert [token_text(tokenizer, i) for i in tokenizer.encode("A\n", add_special_tokens=False)] == ["A", "\n"]
