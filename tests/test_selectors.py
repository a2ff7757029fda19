import pytest
import torch

from reference import entropy_threshold, forking_tokens_mask, mask_from_threshold
from tre_cli.losses.ppo import aggregate, policy_loss
from tre_cli.losses.selectors import kl_cov_loss, kl_cov_penalty_mask, kl_cov_scores, top_count, top_tokens_mask

F64 = torch.float64
PAD = 99.0  # a padded position's score: would win every selection if padding were not ignored


def test_top_count_rounding():
    assert top_count(10, 0.2) == 2
    assert top_count(14, 0.2) == 2  # int() truncates 2.8
    assert top_count(4, 0.2) == 1  # at least one token when any is valid
    assert top_count(1, 0.002) == 1
    assert top_count(999, 0.002) == 1
    assert top_count(1000, 0.002) == 2
    assert top_count(100, 0.29) == 28  # float artefact of int(0.29 * 100), as in the released code
    assert top_count(5, 1.0) == 5
    assert top_count(0, 0.2) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            top_count(10, bad)


# ---------------------------------------------------------------------------- Forking-Tokens


ENTROPY = torch.tensor([[0.1, 0.9, 0.5, PAD], [0.3, 0.8, 0.2, 0.7]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def test_forking_group_selection_ignores_padding():
    # 7 valid tokens: 20% -> int(1.4) = 1 token, 50% -> int(3.5) = 3 tokens.
    assert forking_tokens_mask(ENTROPY, MASK, 0.2).tolist() == [[False, True, False, False], [False] * 4]
    assert forking_tokens_mask(ENTROPY, MASK, 0.5).tolist() == [
        [False, True, False, False],
        [False, True, False, True],
    ]
    assert forking_tokens_mask(ENTROPY, MASK, 1.0).tolist() == MASK.bool().tolist()


def test_forking_ties_keep_exact_count_row_major():
    entropy = torch.tensor([[0.5, 0.9, 0.5], [0.5, 0.1, 0.5]], dtype=F64)
    mask = torch.ones(2, 3)
    # 6 valid, 50% -> 3 tokens: the 0.9 and the two earliest of the four tied 0.5s.
    sel = forking_tokens_mask(entropy, mask, 0.5)
    assert sel.tolist() == [[True, True, True], [False, False, False]]
    # A threshold keeps every tied token instead.
    t = entropy_threshold(entropy, mask, 0.5)
    assert t.item() == 0.5
    assert mask_from_threshold(entropy, mask, t).tolist() == [[True, True, True], [True, False, True]]


def test_forking_threshold_equals_group_without_ties():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(6, 40, generator=g, dtype=F64) * 3
    mask = (torch.arange(40)[None, :] < torch.randint(1, 41, (6, 1), generator=g)).long()
    entropy[mask == 0] = PAD
    sel = forking_tokens_mask(entropy, mask, 0.2)
    assert sel.sum().item() == top_count(int(mask.sum()), 0.2)
    t = entropy_threshold(entropy, mask, 0.2)
    assert torch.equal(forking_tokens_mask(entropy, mask, 0.2, scope="global", threshold=t), sel)
    # Every kept token has at least the entropy of every dropped valid token.
    valid = mask.bool()
    assert entropy[sel].min() > entropy[valid & ~sel].max()


def test_forking_global_scope_differs_from_group():
    high = torch.tensor([[2.0, 3.0, 4.0, 5.0, 6.0]], dtype=F64)
    low = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=F64)
    ones = torch.ones(1, 5)
    # Group scope, each micro-batch its own group (the released code): 40% of each.
    assert forking_tokens_mask(high, ones, 0.4).tolist() == [[False, False, False, True, True]]
    assert forking_tokens_mask(low, ones, 0.4).tolist() == [[False, False, False, True, True]]
    # Global scope: 40% of the 10 tokens of the mini-batch, all from the high-entropy micro-batch.
    t = entropy_threshold(torch.cat([high, low], dim=1), torch.ones(1, 10), 0.4)
    assert t.item() == 3.0
    assert forking_tokens_mask(high, ones, 0.4, scope="global", threshold=t).tolist() == [
        [False, True, True, True, True]
    ]
    assert forking_tokens_mask(low, ones, 0.4, scope="global", threshold=t).tolist() == [[False] * 5]
    # The threshold can also be computed from the flat valid entropies of ragged micro-batches.
    flat = torch.cat([ENTROPY[MASK.bool()], low.flatten()])
    assert entropy_threshold(flat, torch.ones_like(flat), 0.25).item() == 0.7


def test_forking_empty_mask_selects_nothing():
    empty = torch.zeros_like(MASK)
    assert not forking_tokens_mask(ENTROPY, empty).any()
    t = entropy_threshold(ENTROPY, empty)
    assert t.item() == float("inf")
    assert not forking_tokens_mask(ENTROPY, empty, scope="global", threshold=t).any()


def test_forking_scope_errors():
    with pytest.raises(ValueError, match="unknown forking-tokens scope 'step'; choose one of: group, global"):
        forking_tokens_mask(ENTROPY, MASK, scope="step")
    with pytest.raises(ValueError, match="do not pass a threshold"):
        forking_tokens_mask(ENTROPY, MASK, scope="group", threshold=0.5)
    with pytest.raises(ValueError, match="needs the mini-batch threshold"):
        forking_tokens_mask(ENTROPY, MASK, scope="global")
    with pytest.raises(ValueError, match="does not match mask shape"):
        forking_tokens_mask(ENTROPY, MASK[:, :2])
    nan = ENTROPY.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        forking_tokens_mask(nan, MASK)


def test_forking_pg_loss_averaged_over_kept_tokens_only():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(2, 4, generator=g, dtype=F64) * 0.1 - 1).requires_grad_()
    entropy = ENTROPY.clone().requires_grad_()  # as if from the forward pass: must not get a gradient
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    pg = policy_loss(logp, logp.detach(), adv, MASK)
    kept = forking_tokens_mask(entropy, MASK, 0.5)
    loss = aggregate(pg.per_token, kept, "token-mean")
    # ratio = 1 on every token, so the per-token loss is -A; mean over the 3 kept tokens.
    assert loss.item() == pytest.approx(-(adv[0, 1] + adv[1, 1] + adv[1, 3]).item() / 3)
    loss.backward()
    assert torch.count_nonzero(logp.grad).item() == 3 and torch.all(logp.grad[~kept] == 0)
    assert entropy.grad is None


# ----------------------------------------------------------------------------------- KL-Cov


def kl_cov_case():
    # Valid tokens (row-major): A = [2, -2, 1, -1, 3, -3] (mean 0), logp = [-1, -3, -2, -2, -0.5, -3.5]
    # (mean -2) -> cov = A * (logp + 2) = [2, 2, 0, 0, 4.5, 4.5]. Padding is large in both.
    adv = torch.tensor([[2.0, -2.0, 1.0, PAD], [-1.0, 3.0, -3.0, PAD]], dtype=F64)
    logp = torch.tensor([[-1.0, -3.0, -2.0, PAD], [-2.0, -0.5, -3.5, PAD]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    return adv, logp, mask


def test_kl_cov_scores_by_hand():
    adv, logp, mask = kl_cov_case()
    cov = kl_cov_scores(adv, logp.requires_grad_(), mask)
    assert cov.tolist() == [[2.0, 2.0, 0.0, 0.0], [0.0, 4.5, 4.5, 0.0]]
    assert not cov.requires_grad


def test_kl_cov_selection_count_and_ties():
    adv, logp, mask = kl_cov_case()
    # Default 0.002 of 6 valid tokens -> max(1, 0) = 1: the first of the tied 4.5s.
    assert kl_cov_penalty_mask(adv, logp, mask).tolist() == [[False] * 4, [False, True, False, False]]
    # 50% -> 3: both 4.5s, then the earlier of the tied 2s.
    assert kl_cov_penalty_mask(adv, logp, mask, ratio=0.5).tolist() == [
        [True, False, False, False],
        [False, True, True, False],
    ]
    assert not kl_cov_penalty_mask(adv, logp, torch.zeros_like(mask)).any()


def test_kl_cov_count_on_random_batch():
    g = torch.Generator().manual_seed(2)
    B, T = 8, 160
    adv = torch.randn(B, T, generator=g, dtype=F64)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 5
    mask = torch.ones(B, T)
    mask[:, 125:] = 0  # 1000 valid tokens -> 2 selected at 0.002
    sel = kl_cov_penalty_mask(adv, logp, mask)
    assert sel.sum().item() == 2 and not sel[:, 125:].any()
    valid_cov = kl_cov_scores(adv, logp, mask)[mask.bool()]
    assert torch.equal(torch.sort(kl_cov_scores(adv, logp, mask)[sel]).values, torch.sort(valid_cov).values[-2:])


def test_kl_cov_loss_matches_released_formula_and_gradients():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 50
    adv = torch.randn(B, T, generator=g, dtype=F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=F64) * 0.2).requires_grad_()
    mask = torch.ones(B, T)
    mask[1, 30:] = 0
    ratio, beta = 0.1, 1.0
    sel = kl_cov_penalty_mask(adv, logp, mask, ratio)
    pg = policy_loss(logp, old, adv, mask, clip=None)
    per_token = kl_cov_loss(pg.per_token, logp, old, sel, beta)
    loss = aggregate(per_token, mask, "token-mean")

    # The released formula (verl's kl_cov policy loss), re-derived on the valid tokens.
    valid = mask.bool()
    a, lp = adv[valid], logp.detach()[valid]
    cov = (a - a.mean()) * (lp - lp.mean())
    top = torch.topk(cov, max(1, int(cov.numel() * ratio))).indices
    r = torch.exp(logp - old)
    ref = -adv * r
    flat_valid = valid.flatten().nonzero().squeeze(1)[top]
    rows, cols = flat_valid // T, flat_valid % T
    ref = ref.clone()
    ref[rows, cols] = ref[rows, cols] + beta * (logp - old)[rows, cols].abs()
    torch.testing.assert_close(per_token, ref)
    assert sel.sum().item() == top.numel() == 13  # int(130 * 0.1)

    loss.backward()
    n = mask.sum()
    expected_grad = (-adv * r.detach() + sel * beta * torch.sign(logp.detach() - old)) * mask / n
    torch.testing.assert_close(logp.grad, expected_grad)


def test_kl_cov_loss_on_clipped_surrogate_leaves_unselected_tokens():
    logp = torch.log(torch.tensor([[2.0, 2.0]], dtype=F64))
    old = torch.zeros(1, 2, dtype=F64)
    pg = policy_loss(logp, old, torch.tensor([[1.0, 1.0]], dtype=F64), torch.ones(1, 2))
    out = kl_cov_loss(pg.per_token, logp, old, torch.tensor([[True, False]]), beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[-1.2 + 0.5 * torch.log(torch.tensor(2.0)).item(), -1.2]], dtype=F64))
    with pytest.raises(ValueError, match="same shape"):
        kl_cov_loss(pg.per_token, logp, old, torch.tensor([[True]]))


def test_top_tokens_mask_generic():
    scores = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    assert top_tokens_mask(scores, torch.ones(2, 2), 0.5).tolist() == [[True, False], [False, True]]
