"""Per-token estimators of KL(pi || pi_ref) from the log-probs of sampled tokens, for the KL loss
against a frozen reference policy (verl's `actor.use_kl_loss`, `kl_loss_type`).

With d = logprob - ref_logprob (log pi(a) - log pi_ref(a) of the sampled token a):

    k1          d                                    unbiased for KL(pi || pi_ref) when a ~ pi
    abs         |d|
    mse         0.5 * d^2                            (Schulman's k2; second-order in d)
    low_var_kl  exp(-d) + d - 1, clamped to [-10, 10] (Schulman's k3; unbiased, >= 0, verl's default)

The expectation over a ~ pi of k1 and of low_var_kl (unclamped) is exactly KL(pi || pi_ref);
tests/test_kl.py checks that against the full-vocabulary definition. The reference log-probs
carry no gradient. The paper uses no KL term (`ppo.kl_coef = 0`, and then no reference model is
loaded); these exist for runs that ask for one.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("low_var_kl", "k1", "abs", "mse")
# verl's bound on low_var_kl, which keeps one very unlikely token from dominating the loss.
LOW_VAR_KL_BOUND = 10.0


def kl_estimate(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate (same shape as `logprob`; differentiable in `logprob` only)."""
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ in shape")
    diff = logprob - ref_logprob.detach()
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "low_var_kl":
        return torch.clamp(torch.exp(-diff) + diff - 1.0, min=-LOW_VAR_KL_BOUND, max=LOW_VAR_KL_BOUND)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of: {', '.join(KL_ESTIMATORS)}")
