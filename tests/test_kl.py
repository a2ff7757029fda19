"""KL estimators (tre_cli/losses/kl.py) against brute-force float64 definitions, and the KL loss
against a frozen reference policy in the trainer (issue 11, item 4)."""

from __future__ import annotations

import math

import pytest
import torch

from tre_cli.losses.kl import KL_ESTIMATORS, kl_estimate


def _brute(lp: float, ref: float, kind: str) -> float:
    d = lp - ref
    if kind == "k1":
        return d
    if kind == "abs":
        return abs(d)
    if kind == "mse":
        return 0.5 * d * d
    ratio = math.exp(ref - lp)  # pi_ref(a) / pi(a)
    return min(10.0, max(-10.0, ratio - math.log(ratio) - 1.0))


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_estimators_match_their_definitions(kind):
    gen = torch.Generator().manual_seed(1)
    lp = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 8
    ref = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 8
    lp[0, 0], ref[0, 0] = -0.1, -30.0  # exp(-d) huge: low_var_kl hits its clamp
    got = kl_estimate(lp, ref, kind)
    want = torch.tensor([[_brute(a, b, kind) for a, b in zip(r1, r2)] for r1, r2 in zip(lp.tolist(), ref.tolist())],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert kl_estimate(lp.float(), ref.float(), kind).dtype == torch.float32


def test_k1_and_low_var_kl_average_to_the_full_vocabulary_kl():
    """E_{a ~ pi} of k1 and of k3 (unclamped) is exactly KL(pi || pi_ref) = sum_a pi(a) log(pi(a) / pi_ref(a))."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        logits, noise = torch.randn(2, 50, generator=gen, dtype=torch.float64)
        ref_logits = logits + 0.7 * noise
        lp, ref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        assert kl_estimate(lp, ref, "low_var_kl").max() < 10  # below the clamp
        probs = lp.exp().tolist()
        kl = sum(p * (a - b) for p, a, b in zip(probs, lp.tolist(), ref.tolist()))
        for kind in ("k1", "low_var_kl"):
            expectation = float((lp.exp() * kl_estimate(lp, ref, kind)).sum())
            assert math.isclose(expectation, kl, rel_tol=1e-10), kind
        # mse (k2) agrees to second order only: close for nearby distributions.
        near = lp + 0.01 * (ref - lp)
        near = near - near.logsumexp(-1)
        kl_near = float((near.exp() * (near - lp)).sum())
        k2 = float((near.exp() * kl_estimate(near, lp, "mse")).sum())
        assert abs(k2 - kl_near) < 0.01 * kl_near


def test_gradient_flows_into_the_policy_only():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], requires_grad=True)
    kl_estimate(lp, ref, "low_var_kl").sum().backward()
    # d/dlp [exp(ref - lp) + lp - ref - 1] = 1 - exp(ref - lp)
    assert torch.allclose(lp.grad, 1 - torch.exp(ref.detach() - lp.detach()))
    assert ref.grad is None
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(lp, ref, "k9")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_estimate(lp, ref[:1], "k1")


# ------------------------------------------------------------------------------ in the trainer

OVERLAY = {"task": {"options": {"train_size": 32, "test_size": 8}}, "rollout": {"max_new_tokens": 12},
           "eval": {"metric": "pass@1"}}


def _parts(model_dir, out, kl_coef, kl_type="low_var_kl"):
    from tre_cli import trainer
    from tre_cli.config import resolve

    config = resolve(
        task="countdown", method="vanilla", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", "ppo.prompts_per_step=4", "ppo.rollouts_per_prompt=2", "ppo.mini_batch_prompts=4",
                   "ppo.micro_batch_tokens=256", "ppo.actor_lr=3e-3", f"ppo.kl_coef={kl_coef}",
                   f"ppo.kl_loss_type={kl_type}", "run.device=cpu", "run.wandb.mode=disabled"],
    )
    torch.manual_seed(0)
    return trainer.build(config)


def _kl_to(policy, reference, prompts):
    """Mean over every prompt position of the full-vocabulary KL(policy || reference)."""
    from tre_cli.rollout.base import left_pad

    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        lp = policy(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        ref = reference(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    per_position = (lp.exp() * (lp - ref)).sum(-1)
    return float((per_position * mask).sum() / mask.sum())


@pytest.mark.slow
def test_kl_loss_keeps_the_policy_near_the_reference(quick_testbed, tmp_path):
    from tre_cli import trainer

    free = _parts(quick_testbed, tmp_path / "free", 0.0)
    assert free.reference is None  # the paper: no reference model at kl_coef 0
    held = _parts(quick_testbed, tmp_path / "held", 1.0)
    assert held.reference is not None and not any(p.requires_grad for p in held.reference.parameters())
    start = {k: v.clone() for k, v in held.reference.state_dict().items()}
    metrics = [trainer.train_step(held, step) for step in (1, 2, 3)]
    for step in (1, 2, 3):
        trainer.train_step(free, step)
    assert all(math.isfinite(m["actor/kl_loss"]) and m["actor/kl_loss"] >= 0 for m in metrics)
    assert metrics[0]["actor/kl_loss"] < 1e-6 < metrics[-1]["actor/kl_loss"]  # equal at first, then apart
    assert "actor/kl_loss" not in trainer.train_step(free, 4)
    # The reference stays the starting weights.
    assert all(torch.equal(v, start[k]) for k, v in held.reference.state_dict().items())
    kl_free = _kl_to(free.policy, held.reference, held.test_prompts)
    kl_held = _kl_to(held.policy, held.reference, held.test_prompts)
    # Measured with the per-sequence sampling of issue 12: kl_held / kl_free = 0.51 here, and
    # 0.45-0.68 over run seeds 0-2 with the steps interleaved (before that sampling: below 0.5).
    assert kl_held < 0.85 * kl_free, (kl_held, kl_free)
