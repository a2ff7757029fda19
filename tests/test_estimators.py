"""issue 21: the critic-free advantage estimators, the constant-normalised aggregation, clip-higher
and the alpha controller, each against a brute-force float64 plain-loop definition."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tre_cli.losses.alpha_control import AlphaController, next_alpha
from tre_cli.losses.estimators import (
    CRITIC_FREE,
    GRPO_EPS,
    group_advantages,
    needs_critic,
    outcome_advantages,
    uniform_groups,
)
from tre_cli.losses.ppo import aggregate, aggregate_share, policy_loss

F64 = torch.float64


# ---------------------------------------------------------------------------- brute force


def brute_advantage(scores: list[float], groups: list[int], estimator: str) -> list[float]:
    """Each row's advantage by definition (verl's GRPO and RLOO; Dr. GRPO: GRPO without the std)."""
    out = []
    for i, r in enumerate(scores):
        mine = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        n = len(mine)
        if n == 1:  # no baseline: mean 0, std 1 (verl), so GRPO divides by 1 + eps
            out.append(r / (1 + GRPO_EPS) if estimator == "grpo" else r)
            continue
        mean = sum(mine) / n
        if estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in mine) / (n - 1))
            out.append((r - mean) / (std + GRPO_EPS))
        elif estimator == "dr-grpo":
            out.append(r - mean)
        else:  # rloo: r minus the mean of the other n - 1
            out.append(r - (sum(mine) - r) / (n - 1))
    return out


def brute_policy_loss(logp, old, adv, clip_low, clip_high, c):
    """Per token, a plain loop: max(-A r, -A clip(r, 1 - low, 1 + high)), dual-clipped for A < 0."""
    out = [[0.0] * len(row) for row in logp]
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            a = adv[b][t]
            r = math.exp(max(-20.0, min(20.0, logp[b][t] - old[b][t])))
            clipped = min(max(r, 1 - clip_low), 1 + clip_high)
            loss = max(-a * r, -a * clipped)
            if a < 0 and c is not None:
                loss = min(loss, -a * c)
            out[b][t] = loss
    return out


# Groups with ties, an all-equal group, a group of one, unequal sizes, rows of a group apart.
SCORES = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 1.0, 0.0, 0.7, 0.3, 0.3, 2.0, -1.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 2]


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_group_advantages_match_the_definition(estimator):
    got = group_advantages(torch.tensor(SCORES, dtype=F64), torch.tensor(GROUPS), estimator)
    expected = torch.tensor(brute_advantage(SCORES, GROUPS, estimator), dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(got[4:8] == 0)  # an all-equal group: no signal from any estimator


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_group_advantages_random_groups(estimator):
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.0, 0.1, 1.0, rng.random()]) for _ in range(n)]
        groups = [rng.randrange(6) for _ in range(n)]
        got = group_advantages(torch.tensor(scores, dtype=F64), torch.tensor(groups), estimator)
        torch.testing.assert_close(got, torch.tensor(brute_advantage(scores, groups, estimator), dtype=F64),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_outcome_advantages_are_on_every_response_token_and_zero_on_padding(estimator):
    lengths = [3, 1, 5, 2, 4, 4]
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    scores, groups = [1.0, 0.0, 0.0, 0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1]
    got = outcome_advantages(torch.tensor(scores, dtype=F64), torch.tensor(groups), mask, estimator)
    per_row = brute_advantage(scores, groups, estimator)
    for b, length in enumerate(lengths):
        for t in range(5):
            assert got[b, t].item() == pytest.approx(per_row[b] if t < length else 0.0, abs=1e-12)


def test_estimator_names_and_errors():
    assert needs_critic("gae") and not any(needs_critic(e) for e in CRITIC_FREE)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        needs_critic("ppo")
    with pytest.raises(ValueError, match="'gae' is not a critic-free estimator"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), "gae")
    with pytest.raises(ValueError, match="must both be"):
        group_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long), "grpo")


def test_uniform_groups_are_the_groups_whose_rewards_are_all_equal():
    got = uniform_groups(torch.tensor(SCORES, dtype=F64), torch.tensor(GROUPS)).tolist()
    expected = [len({SCORES[j] for j in range(len(SCORES)) if GROUPS[j] == GROUPS[i]}) == 1
                for i in range(len(SCORES))]
    assert got == expected
    assert got[4:8] == [True] * 4 and got[12]  # the all-equal group, and the group of one


# ---------------------------------------------------------------------------- aggregation


def test_seq_mean_token_sum_norm_is_the_masked_sum_over_a_constant():
    gen = torch.Generator().manual_seed(2)
    per_token = torch.randn(6, 8, generator=gen, dtype=F64, requires_grad=True)
    lengths = [8, 1, 3, 0, 5, 2]
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    norm = 48.0
    brute = sum(per_token[b, t].item() for b in range(6) for t in range(lengths[b])) / norm
    whole = aggregate(per_token, mask, "seq-mean-token-sum-norm", norm=norm)
    assert whole.item() == pytest.approx(brute, rel=1e-12)
    # No division by token or sequence counts: a micro-batch's share is its own sum / norm.
    share = aggregate_share(per_token[:2], mask[:2], "seq-mean-token-sum-norm", 999.0, 999.0, norm=norm)
    assert share.item() == pytest.approx(sum(per_token[b, t].item() for b in range(2)
                                             for t in range(lengths[b])) / norm, rel=1e-12)
    grad, = torch.autograd.grad(whole, per_token)
    torch.testing.assert_close(grad, mask / norm)


# ---------------------------------------------------------------------------- clip-higher


@pytest.mark.parametrize("clip_low,clip_high,c", [(0.2, 0.28, 3.0), (0.1, 0.5, None), (0.2, 0.2, 3.0),
                                                  (0.3, 0.05, 3.0)])
def test_clip_higher_matches_the_definition(clip_low, clip_high, c):
    gen = torch.Generator().manual_seed(11)
    B, T = 5, 9
    logp = torch.randn(B, T, generator=gen, dtype=F64) * 0.5 - 1
    old = logp + torch.randn(B, T, generator=gen, dtype=F64) * 0.4
    adv = torch.randn(B, T, generator=gen, dtype=F64)
    mask = (torch.arange(T)[None, :] < torch.tensor([9, 3, 6, 1, 7])[:, None]).to(F64)
    out = policy_loss(logp, old, adv, mask, clip=clip_low, clip_ratio_c=c, clip_high=clip_high)
    brute = torch.tensor(brute_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), clip_low, clip_high, c),
                         dtype=F64)
    torch.testing.assert_close(out.per_token, brute, rtol=1e-12, atol=1e-12)


def test_clip_higher_moves_only_the_upper_bound():
    one = torch.ones(1, 1, dtype=F64)
    old = torch.zeros(1, 1, dtype=F64)
    up = torch.log(torch.tensor([[1.25]], dtype=F64))  # r = 1.25, A = +1: clipped at 1.2, not at 1.28
    assert policy_loss(up, old, one, one, clip=0.2).per_token.item() == pytest.approx(-1.2)
    higher = policy_loss(up, old, one, one, clip=0.2, clip_high=0.28)
    assert higher.per_token.item() == pytest.approx(-1.25) and higher.metrics["actor/pg_clipfrac"].item() == 0
    down = torch.log(torch.tensor([[0.7]], dtype=F64))  # r = 0.7, A = -1: the lower bound 0.8 holds
    assert policy_loss(down, old, -one, one, clip=0.2, clip_high=0.28).per_token.item() == pytest.approx(0.8)
    # clip_high None is the symmetric clip, bit for bit.
    a = policy_loss(up, old, one, one, clip=0.2).per_token
    b = policy_loss(up, old, one, one, clip=0.2, clip_high=None).per_token
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="clip_high must be > 0"):
        policy_loss(up, old, one, one, clip=0.2, clip_high=0.0)


# ---------------------------------------------------------------------------- the alpha controller


def brute_next_alpha(alpha, entropy, target, step, alpha_max):
    if entropy < target:
        alpha += step
    elif entropy > target:
        alpha -= step
    return max(0.0, min(alpha, alpha_max))


def test_next_alpha_is_the_rule():
    rng = random.Random(3)
    for _ in range(500):
        args = (rng.choice([0.0, rng.random() * 0.02]), rng.choice([0.5, rng.random()]), 0.5,
                rng.random() * 0.005, rng.choice([0.0, 0.01, 0.02]))
        assert next_alpha(*args) == brute_next_alpha(*args)
    assert next_alpha(0.0, 2.0, 1.0, 0.1, 1.0) == 0.0  # never below 0
    assert next_alpha(0.95, 0.0, 1.0, 0.1, 1.0) == 1.0  # never above alpha_max
    assert next_alpha(0.3, 1.0, 1.0, 0.1, 1.0) == 0.3  # on target: unchanged


def synthetic_entropy_run(controller: AlphaController, steps: int, entropy: float = 1.2,
                          seed: int = 0) -> tuple[list[float], list[float]]:
    """A toy policy whose entropy relaxes (10% a step, with noise) towards a level that is low
    without a bonus (0.2) and rises with alpha (0.2 + 80 alpha): the regime the controller is for.
    Returns (entropies, alphas) per step."""
    rng = random.Random(seed)
    entropies, alphas = [], []
    for _ in range(steps):
        alpha = controller.applied  # what the step trains with
        entropy = entropy + 0.1 * (0.2 + 80.0 * alpha - entropy) + rng.gauss(0.0, 0.003)
        entropies.append(entropy)
        alphas.append(alpha)
        controller.update(entropy)
    return entropies, alphas


def test_target_controller_reaches_and_holds_the_target():
    target = 0.6
    controller = AlphaController(0.0, "target", target, step=2e-4, alpha_max=0.01)
    entropies, alphas = synthetic_entropy_run(controller, 600)
    first = next(i for i, h in enumerate(entropies) if h < target)
    assert first < 50  # it comes down to the target
    held = entropies[100:]
    assert max(abs(h - target) for h in held) < 0.1 * target  # and stays within 10%
    assert abs(sum(held) / len(held) - target) < 0.02
    assert all(0.0 <= a <= 0.01 for a in alphas) and max(alphas) > 0
    # Without the controller (alpha 0 fixed) the same system falls far below the target.
    fixed, _ = synthetic_entropy_run(AlphaController(0.0), 600)
    assert fixed[-1] < 0.5 * target


def test_controller_state_resumes_exactly():
    def fresh():
        return AlphaController(0.001, "target", 0.6, step=2e-4, alpha_max=0.01)

    whole, _ = synthetic_entropy_run(fresh(), 120, seed=5)
    first = fresh()
    entropies, _ = synthetic_entropy_run(first, 60, seed=5)
    saved = dict(first.state_dict())
    resumed = fresh()
    resumed.load_state_dict(saved)
    assert resumed.alpha == first.alpha != 0.001
    # The toy system's own state (its entropy and noise) continues as it was.
    rng = random.Random(5)
    for _ in range(60):
        rng.gauss(0.0, 0.003)
    rest = []
    entropy = entropies[-1]
    for _ in range(60):
        entropy = entropy + 0.1 * (0.2 + 80.0 * resumed.applied - entropy) + rng.gauss(0.0, 0.003)
        rest.append(entropy)
        resumed.update(entropy)
    assert entropies + rest == whole


def test_the_bonus_applies_only_while_the_entropy_is_below_the_target():
    """Skywork-OR1's controller applies the entropy loss only below the target: after a step at or
    above it the next trains with alpha 0, whatever alpha the rule keeps; the first step (no
    entropy measured yet) applies it; the last entropy is part of the saved state."""
    controller = AlphaController(0.004, "target", 1.0, step=0.001, alpha_max=0.01)
    assert controller.applied == 0.004
    controller.update(0.5)  # below: alpha rises and applies
    assert controller.alpha == pytest.approx(0.005) and controller.applied == controller.alpha
    controller.update(1.5)  # above: alpha falls, and nothing applies until the entropy is back below
    assert controller.alpha == pytest.approx(0.004) and controller.applied == 0.0
    controller.update(1.0)  # on target: not below, still 0
    assert controller.applied == 0.0
    again = AlphaController(0.004, "target", 1.0, step=0.001, alpha_max=0.01)
    again.load_state_dict(controller.state_dict())
    assert again.applied == 0.0 and again.alpha == controller.alpha
    controller.update(0.9)
    assert controller.applied == controller.alpha > 0
    assert AlphaController(0.003).applied == 0.003  # fixed: always its alpha


def test_fixed_controller_never_moves_and_target_needs_a_target():
    fixed = AlphaController(0.003)
    assert not fixed.adapts and fixed.update(0.0) == 0.003 and fixed.update(100.0) == 0.003
    with pytest.raises(ValueError, match="needs a target entropy"):
        AlphaController(0.0, "target")
    with pytest.raises(ValueError, match="unknown alpha control 'pid'"):
        AlphaController(0.0, "pid")
