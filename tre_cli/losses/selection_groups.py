"""Where Forking-Tokens and KL-Cov choose their tokens: fixed groups of sequences.

The released code selects within each micro-batch on each GPU: `ppo_micro_batch_size_per_gpu`
sequences (8 for MATH, 16 for Countdown and HH in its 1.5B scripts; 4 / 16 / 8 for 7B), mixed
across prompts by its length balancing across GPUs. In tre the micro-batch is a memory knob
(`ppo.micro_batch_tokens`), and a memory knob must never change the algorithm, so the selection
group is its own setting, the `scope` parameter (losses/registry.py `SELECTION_SCOPES`):

- scope "group" (the released behaviour): the mini-batch's sequences are shuffled with a seed
  of the run, step and mini-batch (mixing prompts, as the released length balancing does), cut
  into consecutive groups of `ppo.selection_group_size` sequences (the last may be smaller), and
  each group selects its own top fraction.
- scope "global": the whole mini-batch (one optimizer update) is one group.

This module forms the groups; selectors.py selects within them (forking_tokens_in_groups,
kl_cov_in_groups).

The trainer computes the scores of every sequence of the mini-batch in a no-grad pass first
(the policy does not change within a mini-batch), so groups never depend on how the update
splits the mini-batch into micro-batches.

Counts: Forking-Tokens keeps `top_count(n, 0.2, rounding)` tokens of a group's n response
tokens; the released code rounds up (`int(0.2 * n + 0.9999)`), tre's earlier rule rounded down
(`method.count_rounding`). KL-Cov keeps `max(1, int(ratio * n))` (the released rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def selection_groups(n_rows: int, group_size: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices 0..n_rows-1 in a seeded shuffle, cut into consecutive groups of `group_size`
    (None: one group of all rows). Depends only on n_rows, group_size and the generator."""
    if n_rows < 1:
        return []
    if group_size is not None and group_size < 1:
        raise ValueError(f"selection group size must be >= 1, got {group_size}")
    order = torch.randperm(n_rows, generator=generator)
    if group_size is None or group_size >= n_rows:
        return [order]
    return list(order.split(group_size))


def check_groups(groups: Sequence[torch.Tensor], n_rows: int) -> None:
    """Raise unless `groups` cover rows 0..n_rows-1, each exactly once."""
    rows = torch.cat(list(groups)) if groups else torch.empty(0, dtype=torch.long)
    if rows.numel() != n_rows or not torch.equal(rows.sort().values, torch.arange(n_rows)):
        raise ValueError("selection groups must cover every row exactly once")

