"""Forwards by token budget (``runtime.max_tokens_per_micro_batch``): rows grouped by length within the budget, the
step's gradient unchanged (the token-mean over the whole step), both the student's and the teacher's forwards within
it, and the padding each forward computes reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_trainer import make_config, write_dataset
from vopd.config import RuntimeConfig, ViewConfig
from vopd.data import load_dataset
from vopd.micro_batches import padded_tokens, select_rollout, split_to_count, token_budget_groups
from vopd.models import load_model_and_processor, select_rows, with_image_features
from vopd.rollout import RolloutBatch, response_logits
from vopd.trainer import OPDTrainer
from vopd.views import student_view, teacher_view, to_messages


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=8)


def test_rows_are_grouped_longest_first_within_the_budget() -> None:
    lengths = [5, 40, 12, 38, 1, 7]
    groups = token_budget_groups(10, lengths, 100)
    assert sorted(row for group in groups for row in group) == list(range(6))
    for group in groups:
        assert len(group) * (10 + max(lengths[row] for row in group)) <= 100
    assert groups[0] == [1, 3]  # the two longest: 2 x (10 + 40) = 100
    assert token_budget_groups(10, lengths, None) == [[0, 1, 2, 3, 4, 5]]
    assert token_budget_groups(10, [500, 3], 100) == [[0], [1]]  # a row over the budget runs alone
    assert token_budget_groups(10, [], 100) == []


def test_groups_are_split_to_a_common_count() -> None:
    groups = split_to_count([[0, 1, 2, 3], [4]], 4)
    assert len(groups) == 4 and sorted(row for group in groups for row in group) == [0, 1, 2, 3, 4]
    assert split_to_count([[0, 1]], 1) == [[0, 1]]
    with pytest.raises(ValueError, match="cannot make 3 groups of 2 rows"):
        split_to_count([[0, 1]], 3)


def test_a_rollout_group_is_padded_to_its_own_longest_response() -> None:
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rollout = RolloutBatch(
        response_ids=torch.arange(12).reshape(3, 4),
        response_mask=mask,
        behaviour_logprobs=-torch.ones(3, 4),
        truncated=torch.tensor([True, False, False]),
    )
    group = select_rollout(rollout, [2, 1])
    assert group.response_ids.tolist() == [[8, 9], [4, 5]]
    assert group.response_mask.tolist() == [[True, False], [True, True]]
    assert group.truncated.tolist() == [False, False]
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert padded_tokens(prompt_mask, group) == (5 + 3, 2 * (3 + 2))


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
@pytest.mark.parametrize("image_features", [False, True])
def test_selected_rows_score_as_the_whole_batch_does(family, image_features, tiny_model_dir, tiny_llava_dir, dataset):
    """``select_rows`` on every layout the trainer meets (pixels, flattened Qwen-VL patches, shared image features):
    the rows' logits equal those of the whole batch's forward."""
    folder = tiny_model_dir if family == "qwen2vl" else tiny_llava_dir
    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="float32"))
    samples = load_dataset(dataset)[:4]
    prompts = loaded.encode([to_messages(student_view(sample, ViewConfig())) for sample in samples])
    if image_features:
        prompts = with_image_features(loaded.model, prompts)
    generator = torch.Generator().manual_seed(0)
    rollout = RolloutBatch(
        response_ids=torch.randint(10, 200, (4, 5), generator=generator),
        response_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool(),
        behaviour_logprobs=torch.zeros(4, 5),
        truncated=torch.zeros(4, dtype=torch.bool),
    )
    with torch.no_grad():
        whole = response_logits(loaded.model, prompts, rollout)
        rows = [2, 0]
        selected = select_rows(prompts, rows)
        assert selected is not None
        group = select_rollout(rollout, rows)
        part = response_logits(loaded.model, selected, group)
    for place, row in enumerate(rows):
        kept = group.response_mask[place]
        torch.testing.assert_close(
            part[place][kept], whole[row, : group.response_ids.shape[1]][kept], rtol=1e-5, atol=1e-5
        )


def _step_gradients(trainer: OPDTrainer) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    gradients: dict[str, torch.Tensor] = {}
    take_step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        for name, parameter in trainer.student.named_parameters():
            if parameter.grad is not None:
                gradients[name] = parameter.grad.clone()
        return take_step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    return trainer.train_step(), gradients


def uneven_step_trainer(folder: Path, dataset: Path, output: Path, runtime: dict, *, end_every: int) -> OPDTrainer:
    """One step of 2 x 2 prompts x 3 rollouts whose responses end early and at different points (every
    ``end_every``-th ordinary token ends one), with a teacher that differs from the student beyond its view, so that
    the divergence is not a rounding residue: the step that padding, token budgets and packing must not change."""
    config = make_config(
        folder,
        dataset,
        output,
        steps=1,
        batch_size=2,
        grad_accum=2,
        collapse_guard={"enabled": False},
        rollout={"num_rollouts": 3, "max_new_tokens": 8},
        runtime={"device": "cpu", "dtype": "float32", **runtime},
    )
    trainer = OPDTrainer(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainer.teacher.frozen_copy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    vocab = trainer.student.get_output_embeddings().weight.shape[0]
    suppressed = set(trainer.loaded.suppressed_token_ids)
    trainer.loaded.eos_token_ids += [token for token in range(0, vocab, end_every) if token not in suppressed]
    return trainer


def budget_for_rows(trainer: OPDTrainer, rows: int) -> int:
    """A token budget with room for ``rows`` of a micro-batch's rows at the longest prompt (either view) and the
    longest response (8 tokens)."""
    widest = max(
        int(trainer._encode(trainer._conversations(trainer._samples_for(micro), view))["input_ids"].shape[1])
        for micro in (0, 1)
        for view in (student_view, teacher_view)
    )
    return rows * (widest + 8)


def assert_same_step(
    plain: tuple[dict[str, float], dict[str, torch.Tensor]], other: tuple[dict[str, float], dict[str, torch.Tensor]]
) -> None:
    """The same loss, metrics and gradient (fp32, 1e-5 relative)."""
    (plain_metrics, plain_grads), (other_metrics, other_grads) = plain, other
    for key in ("loss", "response_length", "divergence_mean", "argmax_agreement", "grad_norm"):
        assert other_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5), key
    assert plain_grads.keys() == other_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()) + 1e-12)


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_a_token_budget_step_has_the_fixed_splits_gradient(family, tiny_model_dir, tiny_llava_dir, dataset, tmp_path):
    """The same step with one forward per micro-batch and with forwards of at most a few rows (responses of varied
    lengths): the same loss, metrics and gradient; fewer padded tokens; every forward, the teacher's too, within it."""
    folder = tiny_model_dir if family == "qwen2vl" else tiny_llava_dir
    results = {}
    for budget in (None, 1):
        runtime = {"max_tokens_per_micro_batch": budget}
        trainer = uneven_step_trainer(folder, dataset, tmp_path / f"run-{budget}", runtime, end_every=2)
        if budget is not None:  # room for two of a micro-batch's rows at the longest response
            budget = budget_for_rows(trainer, 2)
            trainer.config.runtime.max_tokens_per_micro_batch = budget
        widths: list[int] = []

        def record(_module, args, _output, widths=widths) -> None:
            if not torch.is_inference_mode_enabled():  # sampling (generate, under inference mode) is not split
                widths.append(args[0].numel())

        for module in (trainer.student, trainer.teacher.frozen_copy):
            module.get_input_embeddings().register_forward_hook(record)
        results[budget is not None] = (*_step_gradients(trainer), widths, budget)
    (plain, plain_grads, _, _), (grouped, grouped_grads, widths, budget) = results[False], results[True]
    assert grouped["student_forwards"] > plain["student_forwards"] == 2
    assert grouped["padding_fraction"] < plain["padding_fraction"]
    assert max(widths) <= budget  # the student's and the teacher's forwards (sampling aside: it is not split)
    assert_same_step((plain, plain_grads), (grouped, grouped_grads))
