"""Advantage estimators: GAE with a critic (the paper) or outcome advantages from each prompt's
group of rollouts without one (GRPO, Dr. GRPO, RLOO), as pure torch functions.

A critic-free estimator scores a sequence by its reward alone and gives every response token of
the sequence the same advantage; the baseline is the prompt's group of `ppo.rollouts_per_prompt`
sequences (rows with the same group id):

- `grpo` (verl's `compute_grpo_outcome_advantage`): A = (r - mean) / (std + eps), std unbiased
  (torch.std), eps 1e-6.
- `dr-grpo` (Dr. GRPO; verl with `norm_adv_by_std_in_grpo=False`): A = r - mean.
- `rloo` (verl's `compute_rloo_outcome_advantage`): A = r * n/(n-1) - mean * n/(n-1), i.e. r minus
  the mean of the other n - 1 rewards of its group.

A group of one sequence has no baseline: as verl, its mean is 0 and its std 1 (the advantage is
r). The config refuses `ppo.rollouts_per_prompt` 1 with a critic-free estimator, so a run never
meets one; the functions keep verl's convention for callers that do. The functions compute no
gradient (scores are data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config reads the names below without torch
    import torch

ESTIMATORS = ("gae", "grpo", "dr-grpo", "rloo")
CRITIC_FREE = ("grpo", "dr-grpo", "rloo")
# The loss aggregation each estimator's recipe uses when no config layer above the presets sets
# ppo.loss_agg (and the method allows it): Dr. GRPO's constant-normalised sequence sum.
OWN_LOSS_AGG = {"dr-grpo": "seq-mean-token-sum-norm"}

GRPO_EPS = 1e-6


def needs_critic(estimator: str) -> bool:
    """Whether the estimator takes values from a critic (only GAE does)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    return estimator not in CRITIC_FREE


def _groups(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse, counts): each row's group position and each group's size."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores and group_ids must both be [N]; got {tuple(scores.shape)} and "
                         f"{tuple(group_ids.shape)}")
    import torch

    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, estimator: str,
                     eps: float = GRPO_EPS) -> torch.Tensor:
    """[N] sequence scores and [N] group ids (the prompt each row answers) -> [N] advantages of
    a critic-free estimator (see the module docstring), in the scores' dtype."""
    import torch

    if estimator not in CRITIC_FREE:
        raise ValueError(f"group_advantages: {estimator!r} is not a critic-free estimator "
                         f"({', '.join(CRITIC_FREE)})")
    inverse, counts = _groups(scores, group_ids)
    n_groups = counts.shape[0]
    sums = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    n = counts.to(scores.dtype)
    single = counts == 1
    mean = torch.where(single, torch.zeros_like(sums), sums / n)
    if estimator == "rloo":
        factor = torch.where(single, torch.ones_like(n), n / (n - 1).clamp(min=1))
        return scores * factor[inverse] - (mean * factor)[inverse]
    centered = scores - mean[inverse]
    if estimator == "dr-grpo":
        return centered
    squares = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, (scores - (sums / n)[inverse]) ** 2)
    std = torch.where(single, torch.ones_like(sums), torch.sqrt(squares / (n - 1).clamp(min=1)))
    return centered / (std[inverse] + eps)


def outcome_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                       estimator: str) -> torch.Tensor:
    """[B, T] token advantages: each row's group advantage on every response token (mask 1), 0
    on padding."""
    if mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(f"mask must be [N, T] with N = {scores.shape[0]}; got {tuple(mask.shape)}")
    return group_advantages(scores, group_ids, estimator)[:, None] * mask.to(scores.dtype)


def uniform_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: the rows whose group's rewards are all equal (DAPO's dynamic sampling drops
    them: every critic-free advantage of such a group is 0)."""
    import torch

    inverse, counts = _groups(scores, group_ids)
    n_groups = counts.shape[0]
    high = torch.full((n_groups,), -torch.inf, dtype=scores.dtype, device=scores.device)
    low = torch.full((n_groups,), torch.inf, dtype=scores.dtype, device=scores.device)
    high = high.scatter_reduce(0, inverse, scores, reduce="amax")
    low = low.scatter_reduce(0, inverse, scores, reduce="amin")
    return (high == low)[inverse]
