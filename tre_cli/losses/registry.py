"""The methods: the one description of each, read by the config, the trainer, sweeps and reports.

A method is what a user picks on the command line. Its entry has two parts:
- the maths (`Method`): its typed parameters (default, range, symbol), the per-token bonus the
  actor maximises with weight alpha, the trust region that bonus lives in, the token selector it
  applies (a strategy object, see losses/selectors.py) and the loss aggregations it supports;
- its presentation (`Method.display`, a `Display`): its label, its place in the paper's Table 1
  and Figures 1, 3 and 4, its colours, and which method every delta is measured against.

Adding a regularizer on an existing per-token statistic is one `Method(...)` entry here and its
tests (tests/test_registry.py, tests/test_actor.py). A regularizer on a new per-token statistic
touches, besides:
- losses/stats.py: the field of `TokenStats` and its forward and backward in `_chunk_forward` /
  `_chunk_backward` (and its trust region in `RegionSpec` and losses/regions.py, if it has one);
- kernels/token_stats.py: on CUDA `token_stats` takes its outputs from the fused Triton kernels
  (kernels/__init__.py `fused_or_none`); compute the statistic there too, or after them from the
  logits as `token_stats` does for `tail_mass`, or send the calls that need it to the torch
  reference in `kernels.applies`;
- losses/actor.py: `actor_loss` logs the statistic's token mean (a key in tre_cli/metrics.py if
  the report reads it back);
- tests/brute.py: its brute-force definition, checked by tests/test_stats.py (and by
  tests/test_kernels.py against the kernels).

This module imports no torch: regions, selectors and bonuses are built on first use, so
`tre report`, `tre sweep --dry-run` and the config load without it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Mapping

if TYPE_CHECKING:
    import torch

    from tre_cli.losses.selectors import TokenSelector
    from tre_cli.losses.stats import RegionSpec, TokenStats

# The label of an evaluation of an untrained model (`tre eval`): Table 1's Base row. Not a method.
BASE = "base"
BASE_LABEL = "Base"


class ParamError(ValueError):
    """A method parameter that is unknown or out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Param:
    """One typed method parameter: its default, its range, and how labels show it."""

    name: str
    kind: type  # float, int, bool or str
    default: Any
    help: str
    symbol: str = ""  # in variant labels ("α", "K"); empty: the name
    minimum: float | None = None  # value >= minimum
    above: float | None = None  # value > above
    maximum: float | None = None  # value <= maximum
    choices: tuple[str, ...] = ()  # a str parameter's allowed values
    hint: str = ""  # said after a problem with a value: where to go instead
    optional: bool = False  # None is a value (the default "not set")
    # False: at its default the parameter is left out of a run's identity (report cells, labels),
    # so runs recorded before it existed share their cell with new runs at its default.
    identifies_at_default: bool = True

    def problem(self, value: Any) -> str | None:
        """What is wrong with a value of the right type ("must be in (0, 1]"), or None."""
        if value is None:
            return None if self.optional else "must be set"
        if self.choices and value not in self.choices:
            return "must be one of " + ", ".join(repr(c) for c in self.choices)
        if self.above is not None and self.maximum is not None:
            ok = self.above < value <= self.maximum
            return None if ok else f"must be in ({self.above:g}, {self.maximum:g}]"
        if self.minimum is not None:
            integer = "an integer " if self.kind is int else ""
            return None if value >= self.minimum else f"must be {integer}>= {self.minimum:g}"
        return None

    @property
    def shown(self) -> str:
        return self.symbol or self.name


@dataclass(frozen=True)
class Figure4:
    """A method's points in Figure 4: one per value of `param` (None: a single point)."""

    color: str
    param: str | None = None


@dataclass(frozen=True)
class Display:
    """How reports show a method: its label, its place in Table 1, its colours and the figures
    it appears in. Nothing here changes what a run trains."""

    label: str  # Table 1's row and the figures' legends
    row: int  # position in Table 1 (and in every list of methods a report shows)
    # Parameters that tell its variants apart in labels; their defaults are its Table 1 variant.
    variant_params: tuple[str, ...] = ()
    in_table1: bool = True
    # Deltas (Table 1, Figures 1 and 4) are to the baseline; exactly one method is it.
    baseline: bool = False
    short_label: str = ""  # the baseline's name where "label" is too long (Figure 3)
    # Figure 1: this method's delta to the baseline against T, one line per alpha.
    horizon_sweep: bool = False
    figure3_color: str | None = None
    figure4: Figure4 | None = None
    # Its colour where Figures 3 and 4 give it none (Figure 1, the mechanism figure).
    color: str | None = None


@dataclass(frozen=True)
class Method:
    """A method's maths (what it trains) and, in `display`, how reports show it."""

    name: str
    summary: str  # what it does, in one line (`tre methods`)
    display: Display
    params: tuple[Param, ...] = ()
    # The per-token quantity the actor maximises, weighted by the `alpha` parameter; with
    # alpha_control "target" its token mean is the entropy alpha is steered to hold.
    bonus: Callable[[TokenStats], torch.Tensor] | None = None
    # The trust region token_stats computes for the bonus, from the resolved parameters.
    region_of: Callable[[Mapping[str, Any]], RegionSpec] | None = None
    # The token selector (losses/selectors.py), from the resolved parameters.
    selector_of: Callable[[Mapping[str, Any]], TokenSelector] | None = None
    # The loss aggregations (ppo.loss_agg) the method is defined for; None: every one.
    loss_aggs: tuple[str, ...] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Parameter name -> default, in the registry's order."""
        return {p.name: p.default for p in self.params}

    @property
    def main_variant(self) -> dict[str, Any]:
        """The parameters that pick its Table 1 (and Figure 3) variant."""
        return {name: self.param(name).default for name in self.display.variant_params}

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise ParamError(name, f"is not a parameter of method '{self.name}' (its parameters: {self._own()})")

    def _own(self) -> str:
        return ", ".join(p.name for p in self.params) or "none"

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter, the given ones checked against their ranges, the others at their
        defaults (registry order); an unknown or out-of-range one is a ParamError naming it."""
        for name in given:
            self.param(name)
        resolved = {}
        for param in self.params:
            value = given.get(param.name, param.default)
            problem = param.problem(value)
            if problem:
                hint = f" ({param.hint})" if param.hint else ""
                raise ParamError(param.name, f"{problem}, got {value!r}{hint}")
            resolved[param.name] = value
        if resolved.get("alpha_control") == "target":
            if resolved.get("target_entropy") is None:
                raise ParamError("target_entropy", "must be set when alpha_control is 'target', got None")
            if resolved["alpha"] > resolved["alpha_max"]:
                raise ParamError("alpha", f"(the starting alpha) must be <= alpha_max ({resolved['alpha_max']:g}) "
                                          f"when alpha_control is 'target', got {resolved['alpha']!r}")
        return resolved

    def identity(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters that tell a run's variant apart: all but those that are at their
        default and marked `identifies_at_default=False`."""
        known = {p.name: p for p in self.params}
        return {k: v for k, v in params.items()
                if not (k in known and not known[k].identifies_at_default and v == known[k].default)}

    def region(self, params: Mapping[str, Any]) -> RegionSpec | None:
        """The trust region this method regularizes inside, from resolved parameters."""
        return self.region_of(params) if self.region_of is not None else None

    def selector(self, params: Mapping[str, Any]) -> TokenSelector | None:
        """The token selector strategy, from resolved parameters."""
        return self.selector_of(params) if self.selector_of is not None else None

    def alpha(self, params: Mapping[str, Any]) -> float:
        """The bonus weight (0 without a bonus)."""
        return float(params.get("alpha", 0.0)) if self.bonus is not None else 0.0

    def loss_agg_problem(self, loss_agg: str) -> str | None:
        """Why `loss_agg` does not go with this method, or None."""
        if self.loss_aggs is None or loss_agg in self.loss_aggs:
            return None
        needs = " or ".join(self.loss_aggs)
        return (f"does not go with method '{self.name}', which averages over the tokens it keeps "
                f"(it needs {needs}), got {loss_agg!r}")


# --------------------------------------------------------------------------- building blocks


def _top_k_region(params: Mapping[str, Any]) -> RegionSpec:
    from tre_cli.losses.stats import RegionSpec

    return RegionSpec.top_k(int(params["k"]))


def _top_p_region(params: Mapping[str, Any]) -> RegionSpec:
    from tre_cli.losses.stats import RegionSpec

    return RegionSpec.top_p(float(params["p"]), released_code_compat=bool(params.get("released_code_compat", False)))


def _forking_tokens(params: Mapping[str, Any]) -> TokenSelector:
    from tre_cli.losses.selectors import ForkingTokens

    return ForkingTokens(top_ratio=float(params["top_ratio"]), scope=str(params["scope"]),
                         count_rounding=str(params["count_rounding"]))


def _kl_cov(params: Mapping[str, Any]) -> TokenSelector:
    from tre_cli.losses.selectors import KLCov

    return KLCov(ratio=float(params["ratio"]), beta=float(params["beta"]), scope=str(params["scope"]))


# Where a token selector takes its top fraction (losses/selection_groups.py): within groups of
# ppo.selection_group_size sequences (the released code's per-GPU micro-batch), or over the whole
# mini-batch. The values of the `scope` parameter a user types.
SCOPE_GROUP = "group"
SCOPE_GLOBAL = "global"
SELECTION_SCOPES = (SCOPE_GROUP, SCOPE_GLOBAL)


def _scope(method: str) -> Param:
    return Param("scope", str, SCOPE_GROUP, f"{method}: where the top fraction is taken", choices=SELECTION_SCOPES)


def _alpha(default: float = 0.001) -> tuple[Param, ...]:
    """The bonus weight and its controller (losses/alpha_control.py): "fixed" keeps
    alpha; "target" moves it by alpha_step after each step towards holding the method's own
    regularized entropy (the bonus's token mean) at target_entropy, within [0, alpha_max]."""
    quiet = {"identifies_at_default": False}
    return (
        Param("alpha", float, default, "regularizer coefficient (alpha_control=target: its start)", symbol="α",
              minimum=0),
        Param("alpha_control", str, "fixed", "alpha: 'fixed', or 'target' (held at target_entropy)",
              choices=("fixed", "target"), **quiet),
        Param("target_entropy", float, None, "alpha_control=target: the bonus's token mean to hold",
              symbol="H*", minimum=0, optional=True, **quiet),
        Param("alpha_step", float, 1e-4, "alpha_control=target: alpha's change after each step", symbol="Δα",
              above=0, maximum=1, **quiet),
        Param("alpha_max", float, 0.01, "alpha_control=target: alpha's upper bound", symbol="α_max", minimum=0,
              **quiet),
    )


def _fraction(name: str, default: float, help: str, symbol: str = "") -> Param:
    return Param(name, float, default, help, symbol=symbol, above=0, maximum=1)


# --------------------------------------------------------------------------- the methods


METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method(
            "vanilla",
            "PPO with no exploration term (alpha = 0).",
            Display("Vanilla (PPO)", row=1, baseline=True, short_label="Vanilla", figure3_color="#d62728"),
        ),
        Method(
            "ent",
            "PPO - alpha * entropy over the full vocabulary.",
            Display("Ent", row=2, variant_params=("alpha",), horizon_sweep=True, color="#2ca02c"),
            params=_alpha(),
            bonus=operator.attrgetter("entropy"),
        ),
        Method(
            "tre-k",
            "PPO - alpha * log|V|/log K * entropy of the softmax over the K largest logits (K >= 2; K = 1 is "
            "min-ent).",
            Display("TRE-K", row=5, variant_params=("k",), figure3_color="#1f77b4", figure4=Figure4("#1f77b4", "k")),
            # K = 1 would be a one-token region, whose regularizer is 0: a Vanilla run. The released
            # code's top_k = 1 is Min-Ent (-log max pi), which is method min-ent here.
            params=(*_alpha(), Param("k", int, 2, "TRE-K region size", symbol="K", minimum=2,
                                     hint="K = 1 is Min-Ent, -log max pi: use method min-ent")),
            bonus=operator.attrgetter("region_entropy"),
            region_of=_top_k_region,
        ),
        Method(
            "tre-p",
            "PPO - alpha * log|V|/log|N| * entropy inside the top-P nucleus N (0 when |N| = 1). "
            "released_code_compat: the released runtime's nucleus (top 256 only; bf16 logits, float32 mass).",
            Display("TRE-P", row=6, variant_params=("p",), figure3_color="#d4a017", figure4=Figure4("#d4a017", "p")),
            params=(
                *_alpha(),
                _fraction("p", 0.99, "TRE-P nucleus mass", symbol="P"),
                Param(
                    "released_code_compat",
                    bool,
                    False,
                    "TRE-P: the released runtime's nucleus (top 256 only; bf16 logits, float32 mass and P)",
                ),
            ),
            bonus=operator.attrgetter("region_entropy"),
            region_of=_top_p_region,
        ),
        Method(
            "min-ent",
            "PPO - alpha * min-entropy (-log max pi); the K = 1 boundary.",
            # The paper's Table 1 has no Min-Ent: it is Figure 4's K = 1 boundary.
            Display("Min-Ent", row=7, variant_params=("alpha",), in_table1=False, figure4=Figure4("#7f7f7f")),
            params=_alpha(),
            bonus=operator.attrgetter("min_entropy"),
        ),
        Method(
            "forking-tokens",
            "Policy-gradient loss only on the top 20% highest-entropy response tokens (per group of sequences).",
            Display("Forking-Tokens", row=3),
            params=(
                _fraction("top_ratio", 0.2, "Forking-Tokens: fraction of highest-entropy tokens kept"),
                _scope("Forking-Tokens"),
                # The count of kept tokens, "ceil" (the released code) or "floor".
                Param("count_rounding", str, "ceil", "Forking-Tokens: rounding of the kept-token count",
                      choices=("ceil", "floor")),
            ),
            selector_of=_forking_tokens,
            loss_aggs=("token-mean",),
        ),
        Method(
            "kl-cov",
            "Adds beta*|logp - logp_old| on the top-ratio tokens by cov(A, logp) (ratio 0.002 as in the released code; "
            "the paper says 20%).",
            Display("KL-Cov", row=4),
            params=(
                _fraction("ratio", 0.002, "KL-Cov: fraction of tokens penalised"),
                Param("beta", float, 1.0, "KL-Cov: penalty coefficient", minimum=0),
                _scope("KL-Cov"),
            ),
            selector_of=_kl_cov,
        ),
    )
}


# What `tre run` trains when no --method is given.
DEFAULT_METHOD = "tre-p"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def baseline() -> Method:
    """The method every delta is measured against (Vanilla PPO)."""
    return next(m for m in METHODS.values() if m.display.baseline)


def horizon_method() -> Method:
    """The method Figure 1 sweeps against T, as deltas to the baseline (Ent)."""
    return next(m for m in METHODS.values() if m.display.horizon_sweep)


def all_params() -> dict[str, Param]:
    """Every parameter any method has, by name (a name means the same parameter in every method)."""
    found: dict[str, Param] = {}
    for method in METHODS.values():
        for param in method.params:
            found.setdefault(param.name, param)
    return found


def ordered(names: Any) -> list[str]:
    """Method names (and Base) in Table 1's order; names not in the registry last, by name."""
    def key(name: str) -> tuple[int, str]:
        if name == BASE:
            return (0, name)
        return (METHODS[name].display.row if name in METHODS else len(METHODS) + 1, name)

    return sorted(set(names), key=key)


def label(name: str) -> str:
    """The display label of a method name (or Base); an unknown name stays itself."""
    if name == BASE:
        return BASE_LABEL
    return METHODS[name].display.label if name in METHODS else name
