"""PPO building blocks as pure torch functions: GAE, the dual-clip surrogate, the clipped value
loss and the loss-aggregation modes.

Conventions: every tensor is [B, T] over the response tokens only, right-padded, with a response
mask that is 1 on response tokens (bool, int or float 0/1 are all accepted). Reductions divide by
the number of tokens in the mask, never by B*T, and an empty mask gives 0 (still attached to the
graph, so `backward()` works and yields zero gradients) instead of NaN.

Semantics follow verl's `core_algos.py` (the paper's released code is a fork of verl 0.4.0),
with deliberate differences, each documented where it applies:
- `gae` does not whiten the advantages; verl's `compute_gae_advantage_return` always does. Call
  `whiten(advantages, mask)` to reproduce the released code.
- `gae` skips positions outside the mask, as later verl releases do; the released fork's
  recursion ignores the mask. tre's trainer gives the same advantages either way.
- `policy_loss` clamps the log-ratio at +-20, as later verl releases do; the released fork does
  not clamp. The two differ only on tokens beyond |log ratio| 20 (see _LOG_RATIO_BOUND).
- `aggregate` ignores sequences whose mask row is empty in the seq-mean modes (verl gives NaN
  for "seq-mean-token-mean" there); on batches without empty rows the results are identical.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp() of a log-ratio beyond this overflows or underflows float32 to a useless value, and an
# overflowed ratio times A = 0 is NaN; later verl releases clamp at the same bound. The paper's
# released fork does not clamp: on a token with |log ratio| > 20 its `actor/ppo_kl` term is the
# unclamped log-ratio, and where A > 0 and the log-ratio is below -20 its loss term differs from
# this one by less than |A| e^-20 (a constant here, a gradient that small there). With the clip
# and the dual clip on (the released PPO loss) every other such token gives the same loss and
# gradient, one of the clips being active in both; without them (clip=None, the KL-Cov
# surrogate) its ratio stays e^+-20 here.
_LOG_RATIO_BOUND = 20.0


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # den == 0 only when num is a sum over nothing (== 0); dividing by 1 keeps the 0 and its graph.
    return num / torch.where(den > 0, den, torch.ones_like(den))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1; 0 for an empty mask."""
    w = _as_weights(mask, x)
    return _safe_div((x * w).sum(), w.sum())


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to zero mean and unit variance over the masked positions (as verl's
    `masked_whiten`: unbiased variance, rsqrt(var + eps)). Positions outside the mask are set to 0.
    With shift_mean=False the mean is added back (only the scale changes)."""
    w = _as_weights(mask, x)
    n = w.sum()
    mean = _safe_div((x * w).sum(), n)
    centered = (x - mean) * w
    # Unbiased (n - 1) as in verl; with fewer than 2 tokens the sum is 0, so the variance is 0.
    var = _safe_div((centered**2).sum(), (n - 1).clamp(min=0))
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * w


def place_terminal_reward(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sequence scores -> [B, T] token rewards: each score on its row's last response token
    (the last position where mask is 1), zeros elsewhere."""
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be [B] and mask [B, T]; got {tuple(scores.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"place_terminal_reward: rows {empty} have no response token to carry the reward")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores
    return rewards


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is
    the next position inside the mask (so masked positions are skipped, as in later verl
    releases) and the value after the last response token is 0 (the episode ends there).
    Returns (advantages, returns) with returns = advantages + values; both are 0 outside the
    mask.

    The paper's released fork (verl 0.4.0) takes t+1 as the next position whatever the mask: it
    discounts through holes in the mask and bootstraps from the values on padding after the
    response (its critic sets them to 0), and its returns are not masked. tre's trainer gives
    each response one contiguous mask from its first token and values of 0 after it, where the
    two recursions agree; this one stays right for masks with holes.

    Not whitened: the released code (verl's GAE) whitens the advantages over the whole batch
    afterwards; call `whiten(advantages, mask)` for that.
    """
    if token_rewards.shape != values.shape:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)} and values {tuple(values.shape)} differ in shape")
    w = _as_weights(mask, values)
    rewards = token_rewards.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = w[:, t]
        # Outside the mask the running quantities pass through unchanged to earlier tokens.
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * adv_t + (1 - m) * next_adv
        advantages[:, t] = adv_t * m
    returns = (advantages + values) * w
    return advantages, returns


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (verl's `agg_loss` modes).

    - "token-mean": sum over masked tokens / number of masked tokens.
    - "seq-mean-token-sum": per sequence the sum over its tokens, then the mean over sequences.
    - "seq-mean-token-mean": per sequence the mean over its tokens, then the mean over sequences.
    - "seq-mean-token-sum-norm" (Dr. GRPO): the sum over all masked tokens / `norm`, a constant
      (the trainer passes the max response length, rollout.max_new_tokens), with no division by
      token or sequence counts. verl divides each micro-batch's sum by the response width and
      then by its gradient-accumulation count; here micro-batches are a memory knob, so the
      mini-batch's sum / norm is the loss whatever the split.

    In the seq-mean modes a sequence whose mask row is empty (e.g. a token selector kept none of
    its tokens) is left out of the mean. An empty mask gives 0 with a graph (zero gradients).
    """
    w = _as_weights(mask, per_token)
    # An empty mask leaves a sum over nothing (0): dividing by 1 keeps the 0 and its graph.
    tokens = w.sum().clamp(min=1.0)
    seqs = (w.sum(dim=-1) > 0).to(per_token.dtype).sum().clamp(min=1.0)
    return _reduce(per_token, w, mode, tokens, seqs, norm)


def aggregate_share(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, total_tokens: float, total_seqs: float,
    norm: float | None = None,
) -> torch.Tensor:
    """One micro-batch's share of `aggregate` over a whole mini-batch, given the mini-batch's
    totals (`total_tokens` in the mask, `total_seqs` with at least one masked token). The shares
    of a split add up to the aggregate of the whole, so gradient accumulation is exact: a
    micro-batch with long responses weighs by its tokens, not by its count of sequences."""
    w = _as_weights(mask, per_token)
    return _reduce(per_token, w, mode, max(float(total_tokens), 1.0), max(float(total_seqs), 1.0), norm)


def _reduce(per_token: torch.Tensor, w: torch.Tensor, mode: str, tokens, seqs,
            norm: float | None = None) -> torch.Tensor:
    """The modes of `aggregate` and `aggregate_share`, given the token and sequence counts (>= 1)
    to divide by: the batch's own, or a whole mini-batch's; `norm`: the constant of
    "seq-mean-token-sum-norm"."""
    if mode == "seq-mean-token-sum-norm":
        if norm is None or not norm > 0:
            raise ValueError(f"loss aggregation {mode!r} needs a constant normaliser > 0, got {norm!r}")
        return (per_token * w).sum() / norm
    if mode == "token-mean":
        return (per_token * w).sum() / tokens
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq_sum = (per_token * w).sum(dim=-1)
        if mode == "seq-mean-token-mean":
            seq_sum = _safe_div(seq_sum, w.sum(dim=-1))
        return seq_sum.sum() / seqs
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of: {', '.join(AGG_MODES)}")


class PolicyLoss(NamedTuple):
    """`per_token`: the [B, T] surrogate loss (aggregate it with `aggregate` over the response mask,
    or over a token selector's mask); `metrics`: detached 0-dim tensors."""

    per_token: torch.Tensor
    metrics: dict[str, torch.Tensor]


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    clip_ratio_c: float | None = 3.0,
    clip_high: float | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate with dual-clip (Ye et al. 2020; verl's definition).

    With r = exp(logprob - old_logprob) (log-ratio clamped to +-20, see _LOG_RATIO_BOUND):
      clipped  = max(-A * r, -A * clip(r, 1 - clip, 1 + clip_high))
      per-token loss = clipped                     where A >= 0
                       min(clipped, -A * c)        where A < 0   (c = clip_ratio_c)
    so for A < 0 the loss never exceeds c * |A|, however large r grows. Where a bound is active
    the loss is a constant of logprob (zero gradient).

    `clip` is the lower range and `clip_high` the upper one (DAPO's clip-higher: e.g. 0.2 and
    0.28); clip_high=None is `clip` (the symmetric PPO clip). clip=None gives the unclipped
    surrogate -A * r everywhere (dual-clip off too): the surrogate verl's KL-Cov policy loss
    uses. clip_ratio_c=None turns only the dual clip off.

    Metrics (over `mask`): actor/pg_clipfrac (fraction where the clip(r) term is the larger
    loss), actor/pg_clipfrac_lower (fraction where the dual clip is active: A < 0 and
    clipped > c * |A|), actor/ppo_kl (mean of old_logprob - logprob, the k1 estimate of
    KL(old || new)).
    """
    if not (logprob.shape == old_logprob.shape == advantages.shape):
        raise ValueError(
            f"logprob {tuple(logprob.shape)}, old_logprob {tuple(old_logprob.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if clip is not None and not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    if clip_high is not None and not clip_high > 0:
        raise ValueError(f"clip_high must be > 0, got {clip_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip lower bound), got {clip_ratio_c}")
    advantages = advantages.detach()
    log_ratio = torch.clamp(logprob - old_logprob.detach(), -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    zero = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    if clip is None:
        per_token = unclipped
        clipfrac = lower_clipfrac = zero
    else:
        upper = clip if clip_high is None else clip_high
        clipped_ratio = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + upper)
        per_token = torch.maximum(unclipped, clipped_ratio)
        clipfrac = masked_mean((clipped_ratio > unclipped).to(logprob.dtype), mask)
        lower_clipfrac = zero
        if clip_ratio_c is not None:
            negative = advantages < 0
            dual_bound = -advantages * clip_ratio_c
            lower_clipfrac = masked_mean((negative & (per_token > dual_bound)).to(logprob.dtype), mask)
            per_token = torch.where(negative, torch.minimum(per_token, dual_bound), per_token)
    metrics = {
        "actor/pg_clipfrac": clipfrac.detach(),
        "actor/pg_clipfrac_lower": lower_clipfrac.detach(),
        "actor/ppo_kl": masked_mean(-log_ratio, mask).detach(),
    }
    return PolicyLoss(per_token, metrics)


class ValueLoss(NamedTuple):
    """`per_token`: [B, T] (already times `scale`), to be aggregated; `metrics`: detached."""

    per_token: torch.Tensor
    metrics: dict[str, torch.Tensor]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.5,
    scale: float = 0.5,
) -> ValueLoss:
    """Clipped value loss (verl / TRL): per token
    scale * max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2).
    clip=None gives the plain scale * (v - R)^2. Metric critic/vf_clipfrac: fraction of masked
    tokens where the clipped error is the larger one.

    scale: 0.5 is TRL's convention; the paper's released code (its verl fork) uses 1.0, which is
    what the trainer passes by default (`ppo.critic_loss_coef`)."""
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)} and returns "
            f"{tuple(returns.shape)} must have the same shape"
        )
    returns = returns.detach()
    err_unclipped = (values - returns) ** 2
    if clip is None:
        per_token = scale * err_unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        if clip <= 0:
            raise ValueError(f"value clip must be > 0 (or None for no clipping), got {clip}")
        old = old_values.detach()
        clipped_values = torch.clamp(values, old - clip, old + clip)
        err_clipped = (clipped_values - returns) ** 2
        per_token = scale * torch.maximum(err_unclipped, err_clipped)
        clipfrac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)
    return ValueLoss(per_token, {"critic/vf_clipfrac": clipfrac.detach()})
