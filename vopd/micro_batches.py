"""Forwards by token budget: a micro-batch's rollout rows grouped so that no forward holds more than a set number of
tokens (``runtime.max_tokens_per_micro_batch``, the official run's ``ppo_max_token_len_per_gpu``).

A micro-batch is sampled whole; its responses then have very different lengths (a letter, or 1024 tokens of
reasoning), and one forward over all of them is right-padded to the longest. Sorting the rows by length and packing
them greedily into groups whose padded size (rows x (prompt + the group's longest response)) stays within the budget
bounds each forward's activations and drops most of the padding. The loss is a sum over tokens divided by the whole
step's token count, so summing the groups' gradients gives the undivided micro-batch's gradient (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vopd.rollout import RolloutBatch


def token_budget_groups(prompt_tokens: int, response_lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """Row indices grouped so that ``len(group) x (prompt_tokens + longest response in group)`` <= ``budget``.

    Rows are taken longest first and a group is closed when the next row would overflow it, so the groups are few
    and each is padded to little more than its own rows. A row longer than the budget alone forms its own group.
    ``budget`` None: one group of every row, in order.
    """
    rows = list(range(len(response_lengths)))
    if budget is None or not rows:
        return [rows] if rows else []
    order = sorted(rows, key=lambda row: (-int(response_lengths[row]), row))
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0  # prompt + the current group's longest response (its first row's, by the order)
    for row in order:
        if not current:
            current, width = [row], prompt_tokens + int(response_lengths[row])
        elif (len(current) + 1) * width <= budget:
            current.append(row)
        else:
            groups.append(current)
            current, width = [row], prompt_tokens + int(response_lengths[row])
    groups.append(current)
    return groups


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """``groups`` split (the largest first, in halves) until there are ``count`` of them: ranks that shard the weights
    must run the same number of forwards. Splitting only shrinks groups, so the budget still holds. ``count`` must not
    exceed the number of rows."""
    groups = [list(group) for group in groups]
    if count > sum(len(group) for group in groups):
        raise ValueError(f"cannot make {count} groups of {sum(len(group) for group in groups)} rows")
    while len(groups) < count:
        largest = max(range(len(groups)), key=lambda index: len(groups[index]))
        group = groups.pop(largest)
        half = len(group) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


def select_rollout(rollout: RolloutBatch, rows: Sequence[int]) -> RolloutBatch:
    """The rollout's ``rows``, right-padded only to their own longest response (the trailing padding they all share
    is dropped: it is masked, and no earlier position attends to it)."""
    index = torch.tensor(list(rows), dtype=torch.long, device=rollout.response_ids.device)
    mask = rollout.response_mask.index_select(0, index)
    length = max(int(mask.sum(dim=1).max()) if mask.numel() else 0, 1)
    return RolloutBatch(
        response_ids=rollout.response_ids.index_select(0, index)[:, :length],
        response_mask=mask[:, :length],
        behaviour_logprobs=rollout.behaviour_logprobs.index_select(0, index)[:, :length],
        truncated=rollout.truncated.index_select(0, index),
    )


def padded_tokens(prompt_mask: torch.Tensor, rollout: RolloutBatch) -> tuple[int, int]:
    """(real tokens, tokens the forward computes) of one forward over prompts with ``prompt_mask`` and ``rollout``:
    their difference is the right- and left-padding the forward spends compute and activations on."""
    real = int(prompt_mask.sum()) + int(rollout.response_mask.sum())
    computed = prompt_mask.shape[0] * (prompt_mask.shape[1] + rollout.response_ids.shape[1])
    return real, computed
