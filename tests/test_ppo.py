import math

import pytest
import torch

from tre_cli.losses.ppo import (
    AGG_MODES,
    aggregate,
    gae,
    masked_mean,
    place_terminal_reward,
    policy_loss,
    value_loss,
    whiten,
)

F64 = torch.float64


def right_padded_mask(lengths, width):
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(F64)


# ------------------------------------------------------------------------------------------- GAE


def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per sequence, over its response tokens only; the value after the end is 0."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = adv + values * right_padded_mask(lengths, T)
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 1.0), (1.0, 0.5), (0.5, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 7, 2]
    B, T = len(lengths), 7
    mask = right_padded_mask(lengths, T)
    values = torch.randn(B, T, generator=g, dtype=F64)
    # Dense random rewards (not only terminal) so every term of the recursion is exercised;
    # padding carries garbage that must be ignored.
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    rewards_clean = rewards * mask
    exp_adv, exp_ret = gae_loop(rewards_clean, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_terminal_reward_gamma_lambda_one_is_reward_minus_value():
    # With gamma = lam = 1 and one terminal reward, A_t = R - V_t and the return is R everywhere.
    lengths = [3, 5, 1]
    mask = right_padded_mask(lengths, 5)
    scores = torch.tensor([1.0, 0.0, -2.0], dtype=F64)
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    adv, ret = gae(place_terminal_reward(scores, mask), values, mask)
    torch.testing.assert_close(adv, (scores[:, None] - values) * mask)
    torch.testing.assert_close(ret, scores[:, None] * mask)


def test_gae_has_no_graph():
    values = torch.randn(2, 3, dtype=F64, requires_grad=True)
    adv, ret = gae(torch.zeros(2, 3, dtype=F64), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


def test_place_terminal_reward():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    r = place_terminal_reward(torch.tensor([0.5, -1.0, 2.0]), mask)
    assert r.tolist() == [[0, 0, 0.5, 0], [-1.0, 0, 0, 0], [0, 0, 0, 2.0]]


def test_place_terminal_reward_rejects_empty_row_and_bad_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        place_terminal_reward(torch.ones(2), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="scores must be"):
        place_terminal_reward(torch.ones(3), torch.ones(2, 4))


def test_whiten_masked():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=F64) * 5 + 3
    mask = right_padded_mask([6, 2, 4], 6)
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean().item()) < 1e-12
    assert abs(vals.std(unbiased=True).item() - 1) < 1e-6
    assert torch.all(w[mask == 0] == 0)
    # Same as whitening only the valid values by hand.
    v = x[mask.bool()]
    torch.testing.assert_close(vals, (v - v.mean()) / torch.sqrt(v.var(unbiased=True) + 1e-8))
    # shift_mean=False rescales but keeps the mean.
    kept = whiten(x, mask, shift_mean=False)[mask.bool()]
    torch.testing.assert_close(kept.mean(), v.mean())


def test_whiten_degenerate_masks_are_finite():
    x = torch.tensor([[3.0, 4.0]], dtype=F64)
    assert whiten(x, torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]
    assert whiten(x, torch.tensor([[0, 0]])).tolist() == [[0.0, 0.0]]


# ------------------------------------------------------------------------------ policy loss


def one_token_case(logp_new, logp_old, adv, clip=0.2, c=3.0):
    lp = torch.tensor([[logp_new]], dtype=F64, requires_grad=True)
    out = policy_loss(lp, torch.tensor([[logp_old]], dtype=F64), torch.tensor([[adv]], dtype=F64),
                      torch.ones(1, 1), clip=clip, clip_ratio_c=c)
    loss = aggregate(out.per_token, torch.ones(1, 1))
    loss.backward()
    return out, loss, lp.grad.item()


@pytest.mark.parametrize(
    "ratio,adv,exp_loss,exp_grad,clipped,lower",
    [
        # A > 0: inside the trust region the loss is -A r with gradient -A r.
        (1.1, 2.0, -2.2, -2.2, 0, 0),
        # A > 0, ratio far above 1 + clip: loss capped at -A (1 + clip), no gradient.
        (2.0, 2.0, -2.4, 0.0, 1, 0),
        # A > 0, ratio far below 1 - clip: the unclipped -A r is the larger loss, kept with gradient.
        (0.5, 2.0, -1.0, -1.0, 0, 0),
        # A < 0, ratio below 1 - clip: capped at -A (1 - clip) = 0.8, no gradient.
        (0.5, -1.0, 0.8, 0.0, 1, 0),
        # A < 0, ratio between 1 + clip and c: plain -A r with gradient -A r.
        (2.0, -1.0, 2.0, 2.0, 0, 0),
        # A < 0, ratio > c = 3: dual clip caps the loss at c |A| = 3, no gradient.
        (10.0, -1.0, 3.0, 0.0, 0, 1),
        # A = 0: zero loss, zero gradient, no dual clip (A < 0 only).
        (10.0, 0.0, 0.0, 0.0, 0, 0),
    ],
)
def test_dual_clip_single_token(ratio, adv, exp_loss, exp_grad, clipped, lower):
    out, loss, grad = one_token_case(math.log(ratio), 0.0, adv)
    assert loss.item() == pytest.approx(exp_loss, abs=1e-12)
    assert out.per_token.item() == pytest.approx(exp_loss, abs=1e-12)
    assert grad == pytest.approx(exp_grad, abs=1e-12)
    assert out.metrics["actor/pg_clipfrac"].item() == clipped
    assert out.metrics["actor/pg_clipfrac_lower"].item() == lower
    assert out.metrics["actor/ppo_kl"].item() == pytest.approx(-math.log(ratio))


def test_dual_clip_batch_metrics_and_padding():
    # Four valid tokens and one padded token whose garbage must not count anywhere.
    logp = torch.log(torch.tensor([[1.1, 2.0, 0.5], [10.0, 1.0, 50.0]], dtype=F64)).requires_grad_()
    old = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([[2.0, 2.0, -1.0], [-1.0, 1.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = policy_loss(logp, old, adv, mask)
    expected = torch.tensor([[-2.2, -2.4, 0.8], [3.0, -1.0, 21.0]], dtype=F64)
    torch.testing.assert_close(out.per_token, expected)
    loss = aggregate(out.per_token, mask)
    assert loss.item() == pytest.approx((-2.2 - 2.4 + 0.8 + 3.0 - 1.0) / 5)
    assert out.metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert out.metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    kl = -(math.log(1.1) + math.log(2.0) + math.log(0.5) + math.log(10.0)) / 5
    assert out.metrics["actor/ppo_kl"].item() == pytest.approx(kl)
    loss.backward()
    # Only the unclipped tokens (1.1 with A=2; 1.0 with A=1) carry gradient: d(-A r)/dlogp = -A r / n.
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.2 / 5, 0, 0], [0, -1.0 / 5, 0]], dtype=F64))
    assert all(not v.requires_grad for v in out.metrics.values())


def test_policy_loss_unclipped_and_no_dual_clip():
    logp = torch.log(torch.tensor([[2.0, 10.0]], dtype=F64))
    adv = torch.tensor([[2.0, -1.0]], dtype=F64)
    raw = policy_loss(logp, torch.zeros(1, 2, dtype=F64), adv, torch.ones(1, 2), clip=None)
    torch.testing.assert_close(raw.per_token, torch.tensor([[-4.0, 10.0]], dtype=F64))
    assert raw.metrics["actor/pg_clipfrac"].item() == 0
    no_dual = policy_loss(logp, torch.zeros(1, 2, dtype=F64), adv, torch.ones(1, 2), clip_ratio_c=None)
    torch.testing.assert_close(no_dual.per_token, torch.tensor([[-2.4, 10.0]], dtype=F64))
    assert no_dual.metrics["actor/pg_clipfrac_lower"].item() == 0


def test_policy_loss_matches_formula_on_random_inputs():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 9
    logp = (torch.randn(B, T, generator=g, dtype=F64) * 0.5 - 1)
    old = logp + torch.randn(B, T, generator=g, dtype=F64) * 0.6
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = right_padded_mask([9, 3, 6, 1], T)
    out = policy_loss(logp, old, adv, mask, clip=0.2, clip_ratio_c=3.0)
    r = torch.exp(logp - old)
    l1, l2 = -adv * r, -adv * r.clamp(0.8, 1.2)
    ref = torch.maximum(l1, l2)
    ref = torch.where(adv < 0, torch.minimum(ref, -3.0 * adv), ref)
    torch.testing.assert_close(out.per_token, ref)
    torch.testing.assert_close(aggregate(out.per_token, mask), (ref * mask).sum() / mask.sum())
    assert 0 < out.metrics["actor/pg_clipfrac"].item() < 1


def test_policy_loss_extreme_ratio_stays_finite():
    out = policy_loss(torch.tensor([[0.0]]), torch.tensor([[-200.0]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    loss = aggregate(out.per_token, torch.ones(1, 1))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.2)
    assert out.metrics["actor/ppo_kl"].item() == -20.0


def test_policy_loss_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(x, x, x, torch.ones(1, 2), clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=r"clip must be in \(0, 1\)"):
        policy_loss(x, x, x, torch.ones(1, 2), clip=1.5)
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(x, torch.zeros(2, 2), x, torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask shape"):
        policy_loss(x, x, x, torch.ones(1, 3))


def test_policy_loss_empty_mask_is_zero_with_gradient():
    logp = torch.zeros(2, 3, requires_grad=True)
    out = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    loss = aggregate(out.per_token, torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logp.grad == 0)
    assert all(math.isfinite(v.item()) for v in out.metrics.values())


# ------------------------------------------------------------------------------ aggregation


LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 3 + 10 + 6 + 7 + 8) / 7),
        ("seq-mean-token-sum", (6 + 10 + 21) / 3),
        ("seq-mean-token-mean", (2 + 10 + 7) / 3),
        ("seq-mean-token-sum-norm", (1 + 2 + 3 + 10 + 6 + 7 + 8) / 4.0),  # the normaliser: 4 (the width)
    ],
)
def test_aggregate_modes_by_hand(mode, expected):
    x = LOSS.clone().requires_grad_()
    out = aggregate(x, MASK, mode, norm=4.0)
    assert out.item() == pytest.approx(expected)
    out.backward()
    assert torch.all(x.grad[MASK == 0] == 0) and torch.all(x.grad[MASK == 1] > 0)


def test_aggregate_seq_mean_skips_empty_rows():
    mask = MASK.clone()
    mask[1] = 0
    assert aggregate(LOSS, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 7) / 2)
    assert aggregate(LOSS, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 21) / 2)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_empty_mask_is_zero_with_gradient(mode):
    x = LOSS.clone().requires_grad_()
    out = aggregate(x, torch.zeros_like(MASK), mode, norm=4.0)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(x.grad == 0)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'token-sum'; choose one of: token-mean"):
        aggregate(LOSS, MASK, "token-sum")
    with pytest.raises(ValueError, match="'seq-mean-token-sum-norm' needs a constant normaliser > 0, got None"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(LOSS, MASK[:, :2], "token-mean")


def test_masked_mean():
    assert masked_mean(LOSS, MASK).item() == pytest.approx(37 / 7)
    assert masked_mean(LOSS, torch.zeros_like(MASK)).item() == 0.0


# ------------------------------------------------------------------------------ value loss


def test_value_loss_clipping_by_hand():
    # clip = 0.5 around old values 0; returns 2.
    v = torch.tensor([[0.2, 1.0, -1.0, 3.0]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=F64)
    ret = torch.full((1, 4), 2.0, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = value_loss(v, old, ret, mask, clip=0.5)
    # token 0: inside the clip range -> (0.2-2)^2 = 3.24
    # token 1: v=1 clipped to 0.5 -> max(1, 2.25) = 2.25 (clipped term larger, no gradient)
    # token 2: v=-1 clipped to -0.5 -> max(9, 6.25) = 9 (unclipped larger, gradient flows)
    # token 3: padding (v=3 clipped to 0.5 -> 2.25), not counted
    expected = 0.5 * torch.tensor([[3.24, 2.25, 9.0, 2.25]], dtype=F64)
    torch.testing.assert_close(out.per_token, expected)
    loss = aggregate(out.per_token, mask)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 2.25 + 9.0) / 3)
    assert out.metrics["critic/vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[(0.2 - 2) / 3, 0.0, (-1 - 2) / 3, 0.0]], dtype=F64))


def test_value_loss_unclipped_and_aggregation_mode():
    v = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=F64)
    ret = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = value_loss(v, torch.zeros_like(v), ret, mask, clip=None)
    assert aggregate(out.per_token, mask, "seq-mean-token-sum").item() == pytest.approx(((0.5 + 4.5) + 2.0) / 2)
    assert out.metrics["critic/vf_clipfrac"].item() == 0
    with pytest.raises(ValueError, match="value clip must be > 0"):
        value_loss(v, v, ret, mask, clip=0.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_shares_of_a_split_add_up_to_the_whole(mode):
    from tre_cli.losses.ppo import aggregate_share

    gen = torch.Generator().manual_seed(4)
    per_token = torch.randn(7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 1, 4, 0, 6, 2, 8])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).double()
    whole = aggregate(per_token, mask, mode, norm=9.0)
    total_tokens, total_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    parts = [slice(0, 3), slice(3, 4), slice(4, 7)]
    shared = sum(aggregate_share(per_token[s], mask[s], mode, total_tokens, total_seqs, norm=9.0) for s in parts)
    assert torch.allclose(shared, whole)
    g_whole, = torch.autograd.grad(whole, per_token)
    g_shared, = torch.autograd.grad(shared, per_token)
    assert torch.allclose(g_whole, g_shared)


def test_micro_batches_cover_each_row_once_within_the_budget_and_group_long_rows():
    from tre_cli.trainer.step import micro_batches

    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 20, (1,), generator=generator))
        lengths = torch.randint(1, 64, (n + 3,), generator=generator)
        rows = torch.randperm(n + 3, generator=generator)[:n]
        prompt_width = int(torch.randint(1, 40, (1,), generator=generator))
        budget = int(torch.randint(1, 1500, (1,), generator=generator))
        chunks = list(micro_batches(rows, lengths, prompt_width, budget, "length"))
        in_order = list(micro_batches(rows, lengths, prompt_width, budget))  # ppo.micro_batch_order "rows"
        seen = torch.cat([chunk for chunk, _ in chunks])
        assert sorted(seen.tolist()) == sorted(rows.tolist())
        for chunk, width in chunks:
            assert width == int(lengths[chunk].max())
            assert len(chunk) == 1 or len(chunk) * (prompt_width + width) <= budget
        assert torch.equal(torch.cat([chunk for chunk, _ in in_order]), rows)
        assert all(len(c) * (prompt_width + w) <= budget or len(c) == 1 for c, w in in_order)
        if len(chunks) == 1:
            assert torch.equal(chunks[0][0], rows)  # one micro-batch keeps the order
        else:  # the same chunk sizes as in row order, never more padded tokens
            ours = sum(len(c) * (prompt_width + w) for c, w in chunks)
            per = max(1, budget // (prompt_width + int(lengths[rows].max())))
            plain = sum(len(c) * (prompt_width + w) for c, w in in_order)
            assert sorted(len(c) for c, _ in chunks) == sorted(len(rows[i:i + per]) for i in range(0, n, per))
            assert ours <= plain, trial
            widths = [w for _, w in chunks]
            assert widths == sorted(widths, reverse=True)
