"""The actor and critic losses of one micro-batch, composed from the pieces of losses/.

    actor:  dual-clip surrogate (ppo.policy_loss) -> the method's token selector, if any
            (Forking-Tokens: aggregate over the kept tokens; KL-Cov: penalise the top-cov tokens)
            -> aggregate over the mini-batch (ppo.aggregate_share) - alpha x the aggregated bonus
    critic: clipped value loss (ppo.value_loss) -> aggregate over the mini-batch

Pure functions of tensors: per-token statistics (`TokenStats`, from the policy's logits) or the
critic's values, and a `PPOBatch` in; the loss and its metrics out. A micro-batch's loss is its
share of the whole mini-batch's, so the gradients accumulated over the micro-batches are the
mini-batch's (see `aggregate_share`). Which method it is enters only through `ActorObjective`,
built from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

import torch

from tre_cli import metrics as M
from tre_cli.losses.kl import kl_estimate
from tre_cli.losses.ppo import aggregate_share, masked_mean, policy_loss, value_loss
from tre_cli.losses.registry import get_method
from tre_cli.losses.selectors import TokenSelector
from tre_cli.losses.stats import RegionSpec, TokenStats


@dataclass(frozen=True)
class PPOBatch:
    """One micro-batch of response tokens ([b, R] tensors on one device) and the totals of the
    mini-batch it belongs to (what every micro-batch's share divides by)."""

    mask: torch.Tensor  # float 0/1: the response tokens
    old_logprob: torch.Tensor  # the policy's log-probs before this step's updates
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    tokens: float  # response tokens in the mini-batch
    seqs: float  # sequences of the mini-batch with at least one response token
    # A selector's choice made before the update (Forking-Tokens' kept tokens), and its
    # mini-batch total; None for methods without one.
    selected: torch.Tensor | None = None
    selected_total: float | None = None
    # The frozen reference policy's log-probs, for the KL loss (ppo.kl_coef > 0); else None.
    ref_logprob: torch.Tensor | None = None


@dataclass(frozen=True)
class ActorObjective:
    """What the actor minimises, from the method's registry entry and the PPO settings."""

    clip: float
    dual_clip_c: float | None
    loss_agg: str
    alpha: float = 0.0
    bonus: Callable[[TokenStats], torch.Tensor] | None = None
    region: RegionSpec | None = None
    selector: TokenSelector | None = None
    # + kl_coef x KL(pi || pi_ref) (verl's use_kl_loss; the paper: 0) with this estimator.
    kl_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    # the upper clip range (clip-higher); None: `clip`.
    clip_high: float | None = None
    # the constant of loss_agg "seq-mean-token-sum-norm" (the max response length).
    agg_norm: float | None = None

    @staticmethod
    def of(method: str, params: Mapping[str, Any], *, clip: float, dual_clip_c: float | None,
           loss_agg: str, kl_coef: float = 0.0, kl_loss_type: str = "low_var_kl", clip_high: float | None = None,
           agg_norm: float | None = None) -> ActorObjective:
        entry = get_method(method)
        problem = entry.loss_agg_problem(loss_agg)
        if problem:
            raise ValueError(f"ppo.loss_agg {problem}")
        return ActorObjective(clip=clip, dual_clip_c=dual_clip_c, loss_agg=loss_agg, alpha=entry.alpha(params),
                              bonus=entry.bonus, region=entry.region(params), selector=entry.selector(params),
                              kl_coef=kl_coef, kl_loss_type=kl_loss_type, clip_high=clip_high, agg_norm=agg_norm)


class LossOutput(NamedTuple):
    """A micro-batch's loss (backward it) and its metrics (detached 0-dim tensors, to be averaged
    over micro-batches weighted by their response tokens)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def actor_loss(stats: TokenStats, batch: PPOBatch, objective: ActorObjective) -> LossOutput:
    """The actor's share of the mini-batch loss: surrogate (shaped by the selector) - alpha x bonus."""
    mask = batch.mask
    pg = policy_loss(stats.logprob, batch.old_logprob, batch.advantages, mask, clip=objective.clip,
                     clip_ratio_c=objective.dual_clip_c, clip_high=objective.clip_high)
    norm = objective.agg_norm
    per_token, agg_mask, agg_total = pg.per_token, mask, batch.tokens
    selector_metrics: dict[str, torch.Tensor] = {}
    if objective.selector is not None:
        per_token, agg_mask, agg_total, selector_metrics = objective.selector.shape(pg.per_token, stats.logprob, batch)
    loss = aggregate_share(per_token, agg_mask, objective.loss_agg, agg_total, batch.seqs, norm)
    if objective.alpha > 0:
        reg = aggregate_share(objective.bonus(stats), mask, objective.loss_agg, batch.tokens, batch.seqs, norm)
        loss = loss - objective.alpha * reg
    metrics = dict(selector_metrics)
    if objective.kl_coef > 0:
        if batch.ref_logprob is None:
            raise ValueError("a KL loss (ppo.kl_coef > 0) needs the reference policy's log-probs in the batch")
        kld = kl_estimate(stats.logprob, batch.ref_logprob, objective.kl_loss_type)
        loss = loss + objective.kl_coef * aggregate_share(kld, mask, objective.loss_agg, batch.tokens, batch.seqs,
                                                          norm)
        metrics["actor/kl_loss"] = masked_mean(kld.detach(), mask)
    for key, value in ((M.P_MAX, stats.p_max), (M.ENTROPY, stats.entropy),
                       ("actor/min_entropy", stats.min_entropy)):
        metrics[key] = masked_mean(value.detach(), mask)
    if stats.tail_mass is not None:
        metrics[M.TAIL_MASS] = masked_mean(stats.tail_mass, mask)
    if objective.region is not None:
        metrics[M.REGION_SIZE] = masked_mean(stats.region_size, mask)
        metrics["actor/tre_local_entropy"] = masked_mean(stats.region_entropy.detach(), mask)
    if objective.bonus is not None:
        metrics[M.REGULARIZER] = masked_mean(objective.bonus(stats).detach(), mask)
    metrics["actor/pg_loss"] = masked_mean(pg.per_token.detach(), mask)
    metrics.update(pg.metrics)
    return LossOutput(loss, metrics)


def critic_loss(values: torch.Tensor, batch: PPOBatch, *, clip: float | None, loss_agg: str,
                scale: float, agg_norm: float | None = None) -> LossOutput:
    """The critic's share of the mini-batch loss: the clipped value loss (times `scale`:
    ppo.critic_loss_coef), aggregated like the actor's."""
    mask = batch.mask
    vl = value_loss(values, batch.old_values, batch.returns, mask, clip=clip, scale=scale)
    loss = aggregate_share(vl.per_token, mask, loss_agg, batch.tokens, batch.seqs, agg_norm)
    metrics = {
        "critic/vf_loss": masked_mean(vl.per_token.detach(), mask),
        "critic/vf_clipfrac": vl.metrics["critic/vf_clipfrac"],
        "critic/values": masked_mean(values.detach(), mask),
    }
    return LossOutput(loss, metrics)
