"""Methods and regularizers by name.

A *regularizer* turns per-token statistics into the bonus that the actor maximises
(total loss per token = surrogate - alpha * bonus). A *method* is what a user picks on the
command line: a regularizer, optionally a token selector (Forking-Tokens, KL-Cov), and their
default parameters. The trainer knows a method only through this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from tre_cli.losses.stats import RegionSpec


@dataclass(frozen=True)
class Regularizer:
    name: str
    # Field of `TokenStats` that is the per-token bonus (None: no bonus).
    bonus_field: Optional[str]
    summary: str


REGULARIZERS: Mapping[str, Regularizer] = {
    r.name: r
    for r in (
        Regularizer("none", None, "no regularizer"),
        Regularizer("ent", "entropy", "full-vocabulary entropy H(pi)"),
        Regularizer("tre-k", "region_entropy", "scaled entropy of the softmax over the top-K logits"),
        Regularizer("tre-p", "region_entropy", "scaled entropy of the softmax over the top-P nucleus"),
        Regularizer("min-ent", "min_entropy", "min-entropy -log max pi (unscaled)"),
    )
}


@dataclass(frozen=True)
class Method:
    name: str
    regularizer: str
    selector: Optional[str]  # None, "forking-tokens" or "kl-cov"
    defaults: Mapping[str, object] = field(default_factory=dict)
    summary: str = ""

    def region(self, params: Mapping[str, object]) -> Optional[RegionSpec]:
        """The trust region this method regularizes inside, from resolved parameters."""
        if self.regularizer == "tre-k":
            return RegionSpec.top_k(int(params["k"]))
        if self.regularizer == "tre-p":
            return RegionSpec.top_p(float(params["p"]), released_code_compat=bool(params.get("released_code_compat", False)))
        return None


METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method("vanilla", "none", None, {}, "PPO with no exploration term (alpha = 0)."),
        Method("ent", "ent", None, {"alpha": 0.001}, "PPO - alpha * entropy over the full vocabulary."),
        Method(
            "tre-k", "tre-k", None, {"alpha": 0.001, "k": 2},
            "PPO - alpha * log|V|/log K * entropy of the softmax over the K largest logits.",
        ),
        Method(
            "tre-p", "tre-p", None, {"alpha": 0.001, "p": 0.99, "released_code_compat": False},
            "PPO - alpha * log|V|/log|N| * entropy inside the top-P nucleus N (0 when |N| = 1).",
        ),
        Method("min-ent", "min-ent", None, {"alpha": 0.001}, "PPO - alpha * min-entropy (-log max pi); the K = 1 boundary."),
        Method(
            "forking-tokens", "none", "forking-tokens", {"top_ratio": 0.2, "scope": "group", "count_rounding": "ceil"},
            "Policy-gradient loss only on the top 20% highest-entropy response tokens (per group of sequences).",
        ),
        Method(
            "kl-cov", "none", "kl-cov", {"ratio": 0.002, "beta": 1.0, "scope": "group"},
            "Adds beta*|logp - logp_old| on the top-ratio tokens by cov(A, logp) (ratio 0.002 as in the released code; the paper says 20%).",
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
