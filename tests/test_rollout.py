"""Student rollouts: masks after the end token, suppressed tokens, behaviour log-probs, determinism."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from vopd.config import ViewConfig
from vopd.data import Sample
from vopd.models import encode_prompts, load_model_and_processor
from vopd.rollout import _mask_after_end, response_logits, sample_rollouts
from vopd.views import student_view, to_messages


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(loaded):
    samples = [
        Sample(
            id=str(i),
            question="What color is the shape?",
            options=["red", "blue"],
            bbox=(10, 10, 40, 40),
            image_bytes=_png_bytes(Image.new("RGB", (112 + 28 * i, 112), (200, 40 * i, 90))),
        )
        for i in range(3)
    ]
    return encode_prompts(loaded.processor, [to_messages(student_view(s, ViewConfig())) for s in samples])


def test_mask_after_end_keeps_the_end_token_and_pads_the_rest() -> None:
    ids = torch.tensor([[5, 9, 7, 7], [5, 6, 6, 6], [9, 1, 9, 2]])
    batch = _mask_after_end(ids, torch.full((3, 4), -0.5), eos_token_ids=[9], pad_token_id=0)
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.response_ids.tolist() == [[5, 9, 0, 0], [5, 6, 6, 6], [9, 0, 0, 0]]
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.behaviour_logprobs[0, 2] == 0 and batch.lengths.tolist() == [2, 4, 1]


def rollout(loaded, prompts, **overrides):
    kwargs = {
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "eos_token_ids": loaded.eos_token_ids,
        "pad_token_id": loaded.pad_token_id,
        "suppressed_token_ids": loaded.suppressed_token_ids,
        "seed": 3,
    }
    kwargs.update(overrides)
    return sample_rollouts(loaded.model, prompts, **kwargs)


def test_behaviour_logprobs_match_a_scoring_forward_pass(loaded, prompts) -> None:
    batch = rollout(loaded, prompts)
    logits = response_logits(loaded.model, prompts, batch)  # (N, R, V)
    logits[..., loaded.suppressed_token_ids] = float("-inf")
    scored = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask
    torch.testing.assert_close(scored[mask], batch.behaviour_logprobs[mask], atol=2e-4, rtol=1e-4)


def test_temperature_enters_the_behaviour_distribution(loaded, prompts) -> None:
    hot = rollout(loaded, prompts, temperature=2.0)
    logits = response_logits(loaded.model, prompts, hot)
    logits[..., loaded.suppressed_token_ids] = float("-inf")
    scored = torch.log_softmax(logits.float() / 2.0, -1).gather(-1, hot.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(
        scored[hot.response_mask], hot.behaviour_logprobs[hot.response_mask], atol=2e-4, rtol=1e-4
    )


def test_seeded_sampling_is_reproducible_and_never_emits_suppressed_tokens(loaded, prompts) -> None:
    first, second = rollout(loaded, prompts, seed=11), rollout(loaded, prompts, seed=11)
    assert torch.equal(first.response_ids, second.response_ids)
    others = [rollout(loaded, prompts, seed=s).response_ids for s in range(12, 16)]
    assert any(not torch.equal(first.response_ids, other) for other in others)
    emitted = torch.cat([first.response_ids.flatten()] + [o.flatten() for o in others])
    assert not torch.isin(emitted, torch.tensor(loaded.suppressed_token_ids)).any()


def test_greedy_is_argmax(loaded, prompts) -> None:
    batch = rollout(loaded, prompts, temperature=0.0, max_new_tokens=4)
    logits = response_logits(loaded.model, prompts, batch)
    logits[..., loaded.suppressed_token_ids] = float("-inf")
    argmax = logits.argmax(-1)
    assert torch.equal(argmax[batch.response_mask], batch.response_ids[batch.response_mask])


def test_a_row_seed_samples_the_same_response_in_any_batch(loaded) -> None:
    """Per-row seeds: a prompt's rollout depends on its own seed, not on the rows that share its batch."""
    samples = [
        Sample(
            id=str(i),
            question="What color is the shape?",
            options=["red", "blue"],
            bbox=(10, 10, 40, 40),
            image_bytes=_png_bytes(Image.new("RGB", (112, 112), (200, 40 * i, 90))),
        )
        for i in range(4)
    ]
    conversations = [to_messages(student_view(s, ViewConfig())) for s in samples]
    whole = rollout(loaded, encode_prompts(loaded.processor, conversations), seed=None, row_seeds=[101, 102, 103, 104])
    pair = rollout(loaded, encode_prompts(loaded.processor, conversations[2:]), seed=None, row_seeds=[103, 104])
    swapped = rollout(
        loaded, encode_prompts(loaded.processor, conversations[2:][::-1]), seed=None, row_seeds=[104, 103]
    )
    width = pair.response_ids.shape[1]
    assert torch.equal(whole.response_ids[2:, :width], pair.response_ids)
    assert torch.equal(swapped.response_ids.flip(0), pair.response_ids)
    torch.testing.assert_close(whole.behaviour_logprobs[2:, :width], pair.behaviour_logprobs, atol=1e-5, rtol=1e-5)
    other = rollout(loaded, encode_prompts(loaded.processor, conversations[2:]), seed=None, row_seeds=[7, 8])
    assert not torch.equal(other.response_ids, pair.response_ids)
    assert not torch.isin(whole.response_ids, torch.tensor(loaded.suppressed_token_ids)).any()


class _TinyLM(torch.nn.Module):
    """A stand-in whose output layer and config can be made to break the logits = hidden @ head.T assumption."""

    def __init__(self, head: torch.nn.Module, **config: float) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = head
        self.config = type("Config", (), config)()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(x))


def test_the_head_is_bypassed_only_where_logits_are_hidden_states_times_its_weight(loaded) -> None:
    """The shipped Qwen2-VL's head is set aside (its forward returns hidden states) and put back; a head with a bias,
    one that is not a Linear, or logits scaled after the head are refused with the reason."""
    from vopd.rollout import head_bypass_refusal, head_bypassed

    model = loaded.model
    original = model.get_output_embeddings()
    assert head_bypass_refusal(model) is None
    with head_bypassed(model) as head:
        assert head is original and model.get_output_embeddings() is not original
    assert model.get_output_embeddings() is original

    assert "bias" in head_bypass_refusal(_TinyLM(torch.nn.Linear(4, 9)))
    assert "not a plain Linear" in head_bypass_refusal(_TinyLM(torch.nn.Sequential(torch.nn.Linear(4, 9))))
    capped = _TinyLM(torch.nn.Linear(4, 9, bias=False), final_logit_softcapping=30.0)
    assert "final_logit_softcapping=30.0" in head_bypass_refusal(capped)
    assert head_bypass_refusal(_TinyLM(torch.nn.Linear(4, 9, bias=False), logit_scale=1.0)) is None
    with pytest.raises(ValueError, match="has a bias"), head_bypassed(_TinyLM(torch.nn.Linear(4, 9))):
        pass


def test_rollouts_sampled_in_inference_mode_can_enter_autograd(tiny_model_dir, prompts) -> None:
    """generate runs under torch.inference_mode; what it returns must still be usable by the loss's backward."""
    trainable = load_model_and_processor(tiny_model_dir, trainable=True)
    batch = sample_rollouts(
        trainable.model,
        prompts,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        eos_token_ids=trainable.eos_token_ids,
        pad_token_id=trainable.pad_token_id,
        suppressed_token_ids=trainable.suppressed_token_ids,
        row_seeds=[1, 2, 3],
    )
    assert not any(t.is_inference() for t in (batch.response_ids, batch.response_mask, batch.behaviour_logprobs))
    assert trainable.model.training  # put back in training mode
    logits = response_logits(trainable.model, prompts, batch)
    chosen = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    weighted = torch.where(batch.response_mask, (chosen - batch.behaviour_logprobs).exp() * chosen, 0.0)
    weighted.sum().backward()  # the mask, ids and behaviour log-probs are saved for the backward
    assert any(p.grad is not None for p in trainable.model.parameters())


# ----------------------------------------------------------------------------- the engine switch


def test_auto_engine_samples_with_transformers_on_cpu() -> None:
    from vopd.config import RolloutConfig
    from vopd.rollout import resolve_engine_name

    name, why = resolve_engine_name(RolloutConfig(), torch.device("cpu"))
    assert name == "hf" and "cpu" in why


def test_auto_engine_takes_vllm_on_cuda_when_installed(monkeypatch) -> None:
    from vopd import rollout
    from vopd.config import RolloutConfig

    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    assert rollout.resolve_engine_name(RolloutConfig(), torch.device("cuda"))[0] == "vllm"
    # An engine per training process under ddp and fsdp.
    assert rollout.resolve_engine_name(RolloutConfig(), torch.device("cuda"), "ddp")[0] == "vllm"
    assert rollout.resolve_engine_name(RolloutConfig(), torch.device("cuda"), "fsdp")[0] == "vllm"
    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    name, why = rollout.resolve_engine_name(RolloutConfig(), torch.device("cuda"))
    assert name == "hf" and "not installed" in why


def test_vllm_engine_without_vllm_names_the_extra(monkeypatch) -> None:
    from vopd import rollout
    from vopd.config import RolloutConfig

    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match=r"vllm extra.*rollout\.engine: hf"):
        rollout.resolve_engine_name(RolloutConfig(engine="vllm"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"engine vllm: vLLM is not installed.*or set engine: hf"):
        rollout.resolve_engine("vllm", torch.device("cpu"), setting="engine")  # an evaluation's setting
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    assert rollout.resolve_engine_name(RolloutConfig(engine="vllm"), torch.device("cuda"), "fsdp")[0] == "vllm"


def test_trainer_with_vllm_asked_and_missing_fails_before_training(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from tests.test_trainer import make_config, write_dataset
    from vopd import rollout
    from vopd.trainer import OPDTrainer

    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    config = make_config(tiny_model_dir, write_dataset(tmp_path / "data", count=2), tmp_path / "run")
    config.rollout.engine = "vllm"
    with pytest.raises(ValueError, match="pip install 'vision-opd-studio\\[vllm\\]'"):
        OPDTrainer(config)


def test_hf_engine_step_reports_rollout_speed_and_no_sync(tiny_model_dir, tmp_path) -> None:
    from tests.test_trainer import make_config, write_dataset
    from vopd.trainer import OPDTrainer

    config = make_config(tiny_model_dir, write_dataset(tmp_path / "data", count=2), tmp_path / "run", batch_size=2)
    trainer = OPDTrainer(config)
    assert trainer.engine.name == "hf" and trainer.engine.samples_with_the_student
    metrics = trainer.train_step()
    assert metrics["rollout/tokens_per_s"] > 0 and metrics["rollout/sync_s"] == 0.0
    assert "rollout/logprob_diff_max" not in metrics  # the hf engine's behaviour log-probs are the student's own
    result = trainer.train()  # the run's records name the engine auto resolved to (text, beside the step's numbers)
    assert result.last_metrics["rollout/engine"] == "hf"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(record["rollout/engine"] == "hf" for record in records)
