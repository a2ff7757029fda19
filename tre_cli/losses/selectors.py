"""Token selectors of the baselines: Forking-Tokens (Wang et al., 2025) and KL-Cov (Cui et al.,
2025). Pure torch; every score they rank by is detached, so a selection is never differentiated.

Shared rules (all selectors):
- Only tokens inside `mask` are candidates; padding is never selected.
- Count: `top_count(n_valid, ratio) = max(1, int(ratio * n_valid))` tokens when any token is valid
  (so at least one), 0 otherwise. This is the released KL-Cov rule (`int` truncates, including
  float artefacts such as int(0.29 * 100) == 28); Forking-Tokens uses the same rule.
- Ties: exactly `top_count` tokens are kept; among tokens whose scores tie at the boundary the
  earliest in row-major order (lower row, then lower position) wins. The selection therefore
  depends on batch order only through ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol
from collections.abc import Sequence

import torch

from tre_cli.losses.selection_groups import check_groups

COUNT_ROUNDINGS = ("floor", "ceil")


def top_count(n_valid: int, ratio: float, rounding: str = "floor") -> int:
    """Number of tokens a top-`ratio` selection keeps out of `n_valid` (see module docstring).

    rounding="ceil" is the released Forking-Tokens rule, `int(ratio * n_valid + 0.9999)`: up,
    except within 1e-4 of an integer, which absorbs float artefacts (15 * 0.2 is
    3.0000000000000004 and keeps 3)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio}")
    if rounding not in COUNT_ROUNDINGS:
        raise ValueError(f"unknown count rounding {rounding!r}; choose one of: {', '.join(COUNT_ROUNDINGS)}")
    if n_valid <= 0:
        return 0
    if rounding == "ceil":
        return max(1, int(ratio * n_valid + 0.9999))
    return max(1, int(ratio * n_valid))


def _valid_scores(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape != mask.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match mask shape {tuple(mask.shape)}")
    flat_idx = mask.reshape(-1).bool().nonzero().squeeze(1)
    values = scores.detach().reshape(-1)[flat_idx]
    if torch.isnan(values).any():
        raise ValueError("selection scores contain NaN on valid tokens")
    return flat_idx, values


def top_tokens_mask(scores: torch.Tensor, mask: torch.Tensor, ratio: float, rounding: str = "floor") -> torch.Tensor:
    """Bool mask of the top `top_count(n_valid, ratio, rounding)` valid tokens by score (ties: row-major)."""
    flat_idx, values = _valid_scores(scores, mask)
    count = top_count(values.numel(), ratio, rounding)
    # A stable descending sort keeps equal scores in their original (row-major) order.
    order = torch.sort(values, descending=True, stable=True).indices[:count]
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    selected[flat_idx[order]] = True
    return selected.reshape(scores.shape)


# ---------------------------------------------------------------------------------------------
# KL-Cov
# ---------------------------------------------------------------------------------------------


def kl_cov_scores(advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token cov = (A - mean A) * (logp - mean logp), the means over the valid tokens;
    detached, computed in at least float32, 0 outside the mask."""
    if not (advantages.shape == logprob.shape == mask.shape):
        raise ValueError(
            f"advantages {tuple(advantages.shape)}, logprob {tuple(logprob.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    dtype = torch.promote_types(torch.promote_types(advantages.dtype, logprob.dtype), torch.float32)
    a = advantages.detach().to(dtype)
    lp = logprob.detach().to(dtype)
    w = mask.to(dtype)
    n = w.sum().clamp(min=1)
    a_mean = (a * w).sum() / n
    lp_mean = (lp * w).sum() / n
    return (a - a_mean) * (lp - lp_mean) * w


def kl_cov_penalty_mask(
    advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor, ratio: float = 0.002
) -> torch.Tensor:
    """KL-Cov selection: the bool [B, T] mask of the `max(1, int(ratio * n_valid))` valid tokens
    with the largest cov(A, logp) (`kl_cov_scores`); ties: row-major.

    ratio: the paper's text says the top 20% (0.2); the released code that produced its numbers
    uses 0.2% (0.002), which is the default here. The released code selects over the tokens of
    each micro-batch on each GPU: call this per micro-batch for the same behaviour.
    """
    return top_tokens_mask(kl_cov_scores(advantages, logprob, mask), mask, ratio)


def kl_cov_loss(
    pg_per_token: torch.Tensor,
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    select_mask: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """Per-token KL-Cov loss: pg_per_token + beta * |logp - logp_old| on the selected tokens,
    pg_per_token unchanged elsewhere. Aggregate it over the response mask as usual.

    Which surrogate goes in is the caller's choice: the project reference says the clipped PPO
    loss (`policy_loss(...).per_token`); verl's released `kl_cov` policy loss uses the unclipped
    -A * ratio (`policy_loss(..., clip=None)`) on every token.
    """
    if not (pg_per_token.shape == logprob.shape == old_logprob.shape == select_mask.shape):
        raise ValueError("pg_per_token, logprob, old_logprob and select_mask must have the same shape")
    penalty = beta * (logprob - old_logprob.detach()).abs()
    return torch.where(select_mask.bool(), pg_per_token + penalty, pg_per_token)


# ---------------------------------------------------------------------------------------------
# Within selection groups (losses/selection_groups.py): what the strategies below choose by
# ---------------------------------------------------------------------------------------------


def forking_tokens_in_groups(entropy: torch.Tensor, mask: torch.Tensor, groups: Sequence[torch.Tensor],
                             top_ratio: float = 0.2, rounding: str = "ceil") -> torch.Tensor:
    """Bool [B, T]: in each group of rows, its `top_count(n_valid, top_ratio, rounding)`
    highest-entropy valid tokens (ties: the group's row order, then position)."""
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} does not match mask shape {tuple(mask.shape)}")
    check_groups(groups, entropy.shape[0])
    selected = torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device)
    for rows in groups:
        selected[rows] = top_tokens_mask(entropy[rows], mask[rows], top_ratio, rounding=rounding)
    return selected


def kl_cov_in_groups(advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor,
                     groups: Sequence[torch.Tensor], ratio: float = 0.002) -> torch.Tensor:
    """Bool [B, T]: in each group of rows, KL-Cov's top-`ratio` tokens by cov(A, logp), the
    covariance's means taken over that group's valid tokens."""
    if not (advantages.shape == logprob.shape == mask.shape):
        raise ValueError("advantages, logprob and mask must have the same shape")
    check_groups(groups, mask.shape[0])
    selected = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    for rows in groups:
        selected[rows] = kl_cov_penalty_mask(advantages[rows], logprob[rows], mask[rows], ratio)
    return selected


# ---------------------------------------------------------------------------------------------
# Selectors as strategies: what the actor loss (losses/actor.py) calls
# ---------------------------------------------------------------------------------------------


class Shaped(NamedTuple):
    """A selector's say on one micro-batch's actor loss: the per-token surrogate, the mask and
    the mini-batch total it is aggregated over, and the selector's metrics (detached, 0-dim)."""

    per_token: torch.Tensor
    mask: torch.Tensor
    total: float
    metrics: dict[str, torch.Tensor]


class SelectionInput(Protocol):
    """What a selector reads of a micro-batch (losses.actor.PPOBatch has it)."""

    mask: torch.Tensor
    old_logprob: torch.Tensor
    advantages: torch.Tensor
    tokens: float
    selected: torch.Tensor | None
    selected_total: float | None


class TokenSelector(Protocol):
    """A method's choice of tokens, made before each update over the whole mini-batch: `choose`
    gets the current policy's entropies and log-probs of every sequence of the mini-batch (a
    no-grad pass), their advantages and mask, and the groups of rows to select within
    (losses/selection_groups.py; `scope` says which); its mask comes back, cut per micro-batch,
    as `batch.selected`, and `shape` applies it to a micro-batch's surrogate."""

    scope: str  # one of losses/registry.py SELECTION_SCOPES

    def choose(self, entropy: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               groups: Sequence[torch.Tensor]) -> torch.Tensor:
        ...

    def shape(self, per_token: torch.Tensor, logprob: torch.Tensor, batch: SelectionInput) -> Shaped:
        ...


def _selected(batch: SelectionInput, name: str) -> torch.Tensor:
    if batch.selected is None or batch.selected_total is None:
        raise ValueError(f"{name}: the batch has no selected tokens; call choose() before the update")
    return batch.selected


@dataclass(frozen=True)
class ForkingTokens:
    """The policy-gradient loss averaged over the top `top_ratio` highest-entropy tokens of each
    selection group only, chosen before each update from the current policy's entropies. The
    registry builds it from the method's parameters (their defaults are there)."""

    top_ratio: float
    scope: str
    count_rounding: str

    def choose(self, entropy: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               groups: Sequence[torch.Tensor]) -> torch.Tensor:
        return forking_tokens_in_groups(entropy, mask, groups, self.top_ratio, self.count_rounding)

    def shape(self, per_token: torch.Tensor, logprob: torch.Tensor, batch: SelectionInput) -> Shaped:
        kept = _selected(batch, type(self).__name__)
        kept_frac = kept.float().sum() / batch.mask.sum().clamp(min=1)
        return Shaped(per_token, kept.float(), float(batch.selected_total), {"actor/forking_kept_frac": kept_frac})


@dataclass(frozen=True)
class KLCov:
    """beta * |logp - logp_old| added on the top `ratio` tokens by cov(A, logp) of each selection
    group, chosen before each update from the current policy's log-probs. The registry builds it
    from the method's parameters (their defaults are there)."""

    ratio: float
    beta: float
    scope: str

    def choose(self, entropy: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               groups: Sequence[torch.Tensor]) -> torch.Tensor:
        return kl_cov_in_groups(advantages, logprob, mask, groups, self.ratio)

    def shape(self, per_token: torch.Tensor, logprob: torch.Tensor, batch: SelectionInput) -> Shaped:
        chosen = _selected(batch, type(self).__name__)
        penalised = kl_cov_loss(per_token, logprob, batch.old_logprob, chosen, beta=self.beta)
        selected_frac = chosen.float().sum() / batch.mask.sum().clamp(min=1)
        return Shaped(penalised, batch.mask, batch.tokens, {"actor/klcov_selected_frac": selected_frac})
