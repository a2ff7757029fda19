"""The actor and critic losses (losses/actor.py) composed without a model, against brute-force
float64 definitions: alpha = 0 is plain PPO, a bonus is subtracted with weight alpha,
Forking-Tokens averages over the kept tokens only, KL-Cov penalises only the chosen tokens, and
micro-batch shares add up to the mini-batch's loss."""

from __future__ import annotations

import math

import pytest
import torch

import brute
from tre_cli import metrics as M
from tre_cli.losses.actor import ActorObjective, PPOBatch, actor_loss, critic_loss
from tre_cli.losses.registry import METHODS
from tre_cli.losses.selectors import ForkingTokens, KLCov
from tre_cli.losses.stats import token_stats

F64 = torch.float64
B, T, V = 3, 5, 11
LENGTHS = (5, 2, 4)
CLIP, DUAL = 0.2, 3.0


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(F64)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    # Old log-probs near the new ones, some far enough to clip; advantages of both signs.
    old = (logp + torch.randn(B, T, generator=g, dtype=F64) * 0.3) * mask
    adv = torch.randn(B, T, generator=g, dtype=F64) * mask
    return logits, tokens, mask, old, adv


def batch_of(mask, old, adv, selected=None, tokens=None, seqs=None, selected_total=None, ref=None):
    zeros = torch.zeros_like(mask)
    total = float(mask.sum()) if tokens is None else tokens
    n_seqs = float((mask.sum(-1) > 0).sum()) if seqs is None else seqs
    if selected_total is None and selected is not None:
        selected_total = float(selected.sum())
    return PPOBatch(mask=mask, old_logprob=old, advantages=adv, old_values=zeros, returns=zeros, tokens=total,
                    seqs=n_seqs, selected=selected, selected_total=selected_total, ref_logprob=ref)


def choose(obj, logits, tokens, mask, adv, groups=None):
    """The selector's choice before the update, over the rows in `groups` (default: one group)."""
    stats = token_stats(logits.detach(), tokens)
    groups = [torch.arange(logits.shape[0])] if groups is None else groups
    return obj.selector.choose(stats.entropy, stats.logprob, adv, mask, groups)


def objective(method: str, loss_agg: str = "token-mean", **params) -> ActorObjective:
    resolved = METHODS[method].resolve_params(params)
    return ActorObjective.of(method, resolved, clip=CLIP, dual_clip_c=DUAL, loss_agg=loss_agg)


def run_actor(logits, tokens, batch, obj):
    leaf = logits.clone().requires_grad_(True)
    out = actor_loss(token_stats(leaf, tokens, obj.region), batch, obj)
    out.loss.backward()
    return out, leaf.grad


# ---------------------------------------------------------------------------- brute force


def brute_surrogate(logp, old, adv):
    """verl's dual-clip surrogate per token, written out."""
    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    return torch.where(adv < 0, torch.minimum(clipped, -adv * DUAL), clipped)


def brute_bonus(z, tokens, kind=None, k=0, p=0.0, stat="entropy"):
    """The per-token bonus [B, T] by its textbook formula (the brute-force region held fixed)."""
    rows = brute.stats(z.reshape(-1, V), tokens.reshape(-1), kind, k, p)
    logq = torch.log_softmax(z, -1)
    out = torch.zeros(B, T, dtype=F64)
    for n, row in enumerate(rows):
        b, t = divmod(n, T)
        if stat == "entropy":
            out[b, t] = -(logq[b, t].exp() * logq[b, t]).sum()
        elif stat == "min_entropy":
            out[b, t] = -logq[b, t].max()
        elif row["region_size"] > 1:
            local = torch.log_softmax(z[b, t, row["region"]], -1)
            out[b, t] = math.log(V) / math.log(row["region_size"]) * -(local.exp() * local).sum()
    return out


def brute_loss(logits, tokens, mask, old, adv, alpha=0.0, bonus=None, over=None, penalty=None):
    """(loss, d loss / d logits): token-mean surrogate over `over` (default the mask) plus an
    optional per-token penalty, minus alpha x the token-mean bonus over the mask."""
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, tokens[..., None]).squeeze(-1)
    per_token = brute_surrogate(logp, old, adv)
    if penalty is not None:
        per_token = per_token + penalty(logp)
    over = mask if over is None else over
    loss = (per_token * over).sum() / over.sum()
    if bonus is not None:
        loss = loss - alpha * (bonus(z) * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), z.grad


# ---------------------------------------------------------------------------- the actor


def test_vanilla_is_the_plain_dual_clip_surrogate():
    logits, tokens, mask, old, adv = case()
    out, grad = run_actor(logits, tokens, batch_of(mask, old, adv), objective("vanilla"))
    ref_loss, ref_grad = brute_loss(logits, tokens, mask, old, adv)
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert M.REGULARIZER not in out.metrics and M.REGION_SIZE not in out.metrics


@pytest.mark.parametrize("method, params", [("ent", {}), ("tre-k", {"k": 3}), ("tre-p", {"p": 0.9}), ("min-ent", {})])
def test_alpha_zero_equals_plain_ppo(method, params):
    logits, tokens, mask, old, adv = case(1)
    batch = batch_of(mask, old, adv)
    vanilla, vanilla_grad = run_actor(logits, tokens, batch, objective("vanilla"))
    zero, zero_grad = run_actor(logits, tokens, batch, objective(method, alpha=0.0, **params))
    assert torch.equal(zero.loss.detach(), vanilla.loss.detach())
    assert torch.equal(zero_grad, vanilla_grad)
    # The statistic is still logged, so a run with alpha = 0 is a control for the same quantity.
    assert M.REGULARIZER in zero.metrics


@pytest.mark.parametrize(
    "method, params, brute_args",
    [
        ("ent", {}, dict(stat="entropy")),
        ("min-ent", {}, dict(stat="min_entropy")),
        ("tre-k", {"k": 3}, dict(kind="k", k=3, stat="region")),
        ("tre-p", {"p": 0.9}, dict(kind="p", p=0.9, stat="region")),
    ],
)
def test_bonus_is_subtracted_with_weight_alpha(method, params, brute_args):
    logits, tokens, mask, old, adv = case(2)
    alpha = 0.3
    out, grad = run_actor(logits, tokens, batch_of(mask, old, adv), objective(method, alpha=alpha, **params))
    ref_loss, ref_grad = brute_loss(logits, tokens, mask, old, adv, alpha,
                                    bonus=lambda z: brute_bonus(z, tokens, **brute_args))
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    bonus = brute_bonus(logits, tokens, **brute_args)
    assert out.metrics[M.REGULARIZER].item() == pytest.approx(((bonus * mask).sum() / mask.sum()).item())


def test_forking_tokens_averages_over_kept_tokens_only():
    logits, tokens, mask, old, adv = case(3)
    obj = objective("forking-tokens", top_ratio=0.3)
    kept = choose(obj, logits, tokens, mask, adv)
    assert int(kept.sum()) == math.ceil(0.3 * mask.sum())  # the released rounding, over 11 response tokens
    entropy = token_stats(logits).entropy
    assert entropy[kept].min() >= entropy[mask.bool() & ~kept].max()  # the highest-entropy ones
    out, grad = run_actor(logits, tokens, batch_of(mask, old, adv, selected=kept), obj)
    ref_loss, ref_grad = brute_loss(logits, tokens, mask, old, adv, over=kept.to(F64))
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.all(grad[~kept] == 0) and torch.count_nonzero(grad[kept].abs().sum(-1)) > 0
    assert out.metrics["actor/forking_kept_frac"].item() == pytest.approx(kept.sum().item() / mask.sum().item())


def test_forking_tokens_needs_its_choice_before_the_update():
    logits, tokens, mask, old, adv = case(3)
    with pytest.raises(ValueError, match="call choose"):
        run_actor(logits, tokens, batch_of(mask, old, adv), objective("forking-tokens"))


def test_forking_tokens_chooses_within_each_group():
    logits, tokens, mask, _, adv = case(4)
    obj = objective("forking-tokens", top_ratio=0.5)
    groups = [torch.tensor([2, 0]), torch.tensor([1])]
    kept = choose(obj, logits, tokens, mask, adv, groups)
    assert [int(kept[g].sum()) for g in groups] == [math.ceil(0.5 * (LENGTHS[2] + LENGTHS[0])),
                                                   math.ceil(0.5 * LENGTHS[1])]
    entropy = token_stats(logits).entropy
    for g in groups:
        k, m = kept[g], mask[g].bool()
        assert entropy[g][k].min() >= entropy[g][m & ~k].max()


def test_kl_cov_penalises_only_the_chosen_tokens():
    logits, tokens, mask, old, adv = case(5)
    ratio, beta = 0.25, 0.7
    obj = objective("kl-cov", ratio=ratio, beta=beta)
    selected = choose(obj, logits, tokens, mask, adv)
    out, grad = run_actor(logits, tokens, batch_of(mask, old, adv, selected=selected), obj)
    # The chosen tokens by definition: the top int(ratio * n) valid tokens by (A - mean A)(logp - mean logp).
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    valid = mask.bool()
    cov = torch.zeros(B, T, dtype=F64)
    cov[valid] = (adv[valid] - adv[valid].mean()) * (logp[valid] - logp[valid].mean())
    order = sorted(zip(*valid.nonzero(as_tuple=True)), key=lambda bt: -cov[bt].item())
    chosen = torch.zeros(B, T, dtype=torch.bool)
    for b, t in order[:max(1, int(ratio * int(mask.sum())))]:
        chosen[b, t] = True
    assert torch.equal(selected, chosen)
    ref_loss, ref_grad = brute_loss(logits, tokens, mask, old, adv,
                                    penalty=lambda lp: beta * (lp - old).abs() * chosen.to(F64))
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    _, vanilla_grad = run_actor(logits, tokens, batch_of(mask, old, adv), objective("vanilla"))
    torch.testing.assert_close(grad[~chosen], vanilla_grad[~chosen])  # the others: plain PPO
    assert not torch.allclose(grad[chosen], vanilla_grad[chosen])
    assert out.metrics["actor/klcov_selected_frac"].item() == pytest.approx(chosen.sum().item() / mask.sum().item())


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("method", ["tre-p", "kl-cov"])
def test_micro_batch_shares_add_up_to_the_mini_batch(method, loss_agg):
    logits, tokens, mask, old, adv = case(6)
    obj = objective(method, loss_agg, **({"alpha": 0.5} if method == "tre-p" else {"ratio": 0.3}))
    # KL-Cov's choice is made over the whole mini-batch before the update; each micro-batch gets its rows.
    selected = choose(obj, logits, tokens, mask, adv) if method == "kl-cov" else None
    whole, whole_grad = run_actor(logits, tokens, batch_of(mask, old, adv, selected=selected), obj)
    total, seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    shares, grads = [], []
    for part in (slice(0, 1), slice(1, 3)):
        part_selected = selected[part] if selected is not None else None
        batch = batch_of(mask[part], old[part], adv[part], selected=part_selected, tokens=total, seqs=seqs,
                         selected_total=float(selected.sum()) if selected is not None else None)
        out, grad = run_actor(logits[part], tokens[part], batch, obj)
        shares.append(out.loss.detach())
        grads.append(grad)
    torch.testing.assert_close(sum(shares), whole.loss.detach())
    torch.testing.assert_close(torch.cat(grads), whole_grad)


def test_method_and_aggregation_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match="ppo.loss_agg does not go with method 'forking-tokens'.*token-mean"):
        objective("forking-tokens", "seq-mean-token-mean")


def test_metrics_are_detached_scalars_named_by_namespace():
    logits, tokens, mask, old, adv = case(7)
    out, _ = run_actor(logits, tokens, batch_of(mask, old, adv), objective("tre-k", alpha=0.1))
    assert {M.P_MAX, M.ENTROPY, "actor/min_entropy", M.REGION_SIZE, "actor/tre_local_entropy",
            M.REGULARIZER, "actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower",
            "actor/ppo_kl"} == set(out.metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    assert out.metrics[M.REGION_SIZE].item() == 2.0  # K = 2, the default


# ---------------------------------------------------------------------------- the critic


def test_critic_loss_is_the_clipped_value_loss_aggregated_like_the_actor():
    g = torch.Generator().manual_seed(8)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(F64)
    old_values = torch.randn(B, T, generator=g, dtype=F64) * mask
    returns = torch.randn(B, T, generator=g, dtype=F64) * mask
    values = (old_values + torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    batch = PPOBatch(mask=mask, old_logprob=torch.zeros_like(mask), advantages=torch.zeros_like(mask),
                     old_values=old_values, returns=returns, tokens=float(mask.sum()), seqs=float(B))
    out = critic_loss(values, batch, clip=0.5, loss_agg="seq-mean-token-mean", scale=0.5)
    clipped = old_values + (values.detach() - old_values).clamp(-0.5, 0.5)
    per_token = 0.5 * torch.maximum((values.detach() - returns) ** 2, (clipped - returns) ** 2)
    expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.metrics["critic/values"].item() == pytest.approx(((values.detach() * mask).sum() / mask.sum()).item())
    assert set(out.metrics) == {"critic/vf_loss", "critic/vf_clipfrac", "critic/values"}
    # ppo.critic_loss_coef (the released code: 1.0) scales the squared error, and its metric.
    doubled = critic_loss(values, batch, clip=0.5, loss_agg="seq-mean-token-mean", scale=1.0)
    torch.testing.assert_close(doubled.loss.detach(), 2 * expected)
    assert doubled.metrics["critic/vf_loss"].item() == pytest.approx(2 * out.metrics["critic/vf_loss"].item())


def test_kl_loss_adds_its_coefficient_times_the_estimator_mean():
    logits, tokens, mask, old, adv = case(9)
    ref = old.clone()  # any fixed reference log-probs
    plain, plain_grad = run_actor(logits, tokens, batch_of(mask, old, adv), objective("vanilla"))
    obj = ActorObjective.of("vanilla", {}, clip=CLIP, dual_clip_c=DUAL, loss_agg="token-mean", kl_coef=0.3,
                            kl_loss_type="low_var_kl")
    out, grad = run_actor(logits, tokens, batch_of(mask, old, adv, ref=ref), obj)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    log_ratio = ref - logp
    k3 = (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)  # Schulman's k3, as verl's low_var_kl
    kl = (k3 * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.detach(), plain.loss.detach() + 0.3 * kl)
    assert out.metrics["actor/kl_loss"].item() == pytest.approx(kl.item())
    assert not torch.allclose(grad, plain_grad)
    with pytest.raises(ValueError, match="reference policy"):
        run_actor(logits, tokens, batch_of(mask, old, adv), obj)


def test_selectors_are_strategies_built_by_the_registry():
    forking = METHODS["forking-tokens"]
    assert forking.selector(forking.resolve_params({"top_ratio": 0.1, "scope": "global"})) == ForkingTokens(
        0.1, "global", "ceil")
    kl_cov = METHODS["kl-cov"]
    assert kl_cov.selector(kl_cov.resolve_params({"ratio": 0.01, "beta": 2.0})) == KLCov(0.01, 2.0, "group")
    assert METHODS["tre-p"].selector({"p": 0.9}) is None
    logits, tokens, mask, old, adv = case(3)
    with pytest.raises(ValueError, match="call choose"):
        run_actor(logits, tokens, batch_of(mask, old, adv), objective("kl-cov"))
