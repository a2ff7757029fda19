"""Figure 1: how each regularizer fares against Vanilla as the maximum response length T grows.

Two panels per (model, task), sharing the T axis: on the left each variant's score minus
Vanilla's, on the right Vanilla's own score (a second y-axis in one panel, each axis scaled to its
own lines, would lay Vanilla's line exactly on another's with two T values). Every method that
ran at two or more T beside Vanilla is drawn: the horizon sweep's Ent at several alphas, the
mechanism sweep's Ent, TRE-K and TRE-P.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

from tre_cli.losses.registry import BASE, baseline
from tre_cli.report.figures import (
    _legend_below,
    band_text,
    _suptitle,
    _title,
    method_color,
    shown_label,
    variant_order,
    variant_styles,
)
from tre_cli.report.records import NotEnoughData, RunRecord, Scale, _key_sort, group_cells, scale_for


@dataclass(frozen=True)
class Spread:
    """A value over seeds: their mean, minimum and maximum."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class HorizonLine:
    """One variant's delta to Vanilla against T: mean = the variant's mean score - Vanilla's mean
    score at that T. The spread, where the variant and Vanilla ran the same seeds (each once):
    min/max over seeds of (the variant's score - Vanilla's score of the same seed), as a sweep's
    seed fixes the initial samples, the data order and the evaluation's draws for every method;
    else (`paired` lacks that T): the variant's min/max over its seeds - Vanilla's mean."""

    method: str
    params: tuple[tuple[str, Any], ...]
    label: str
    color: str
    marker: str
    points: tuple[tuple[int, Spread], ...]  # (T, delta), by T
    paired: frozenset[int] = frozenset()  # the T whose spread is over per-seed differences


@dataclass(frozen=True)
class HorizonPanel:
    model: str
    task: str
    scale: Scale
    vanilla: tuple[tuple[int, Spread], ...]  # (T, Vanilla's score over its seeds), raw units
    lines: tuple[HorizonLine, ...]

    @property
    def horizons(self) -> list[int]:
        return sorted({t for line in self.lines for t, _ in line.points})


def horizon_data(records: Sequence[RunRecord], score: str = "final") -> list[HorizonPanel]:
    """Figure 1: per (model, task), each variant's delta to Vanilla at each T where both ran; a
    variant is drawn when it has two or more such T."""
    cells = group_cells(records, score)
    reference = baseline().name
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        here = {k: c for k, c in cells.items() if k.model == model and k.task == task and k.max_new_tokens is not None}
        vanilla_cells: dict[int, list] = {}
        for key, cell in here.items():
            if key.method == reference:
                vanilla_cells.setdefault(key.max_new_tokens, []).append(cell)
        vanilla_seeds = {t: [pair for c in cs for pair in zip(c.seeds, c.scores)] for t, cs in vanilla_cells.items()}
        # Vanilla's every run at T (its variants, if any, pooled: it has no parameters of its own).
        vanilla = {
            t: Spread(
                statistics.fmean(s for c in cs for s in c.scores),
                min(s for c in cs for s in c.scores),
                max(s for c in cs for s in c.scores),
                sum(c.n for c in cs),
            )
            for t, cs in vanilla_cells.items()
        }
        by_variant: dict[tuple, dict[int, Spread]] = {}
        paired: dict[tuple, set[int]] = {}
        for key, cell in here.items():
            if key.method in (reference, BASE) or key.max_new_tokens not in vanilla:
                continue
            t, variant = key.max_new_tokens, (key.method, key.params)
            differences = _paired(list(zip(cell.seeds, cell.scores)), vanilla_seeds[t])
            if differences is not None:
                spread = Spread(statistics.fmean(differences), min(differences), max(differences), len(differences))
                paired.setdefault(variant, set()).add(t)
            else:
                base = vanilla[t].mean
                spread = Spread(cell.mean - base, cell.low - base, cell.high - base, cell.n)
            by_variant.setdefault(variant, {})[t] = spread
        drawn = [v for v in variant_order(list(by_variant)) if len(by_variant[v]) >= 2]
        if not drawn:
            continue
        styles = variant_styles(drawn)
        lines = tuple(
            HorizonLine(
                method, params, shown_label(method, dict(params)), *styles[(method, params)],
                tuple(sorted(by_variant[(method, params)].items())), frozenset(paired.get((method, params), ())),
            )
            for method, params in drawn
        )
        horizons = {t for line in lines for t, _ in line.points}
        metrics = [r.eval_metric for r in records if r.model == model and r.task == task]
        panels.append(HorizonPanel(
            model, task, scale_for(task, metrics),
            tuple(sorted((t, v) for t, v in vanilla.items() if t in horizons)), lines,
        ))
    if not panels:
        raise NotEnoughData(
            "Figure 1 needs Vanilla and another method at two or more max_new_tokens (T) of one task; none found"
        )
    return panels


def _paired(variant: list[tuple[int | None, float]], vanilla: list[tuple[int | None, float]]) -> list[float] | None:
    """Per seed, the variant's score minus Vanilla's, when both ran the same seeds once each; else None."""
    seeds = [s for s, _ in variant]
    if None in seeds or len(set(seeds)) != len(seeds) or len(seeds) < 2:
        return None
    theirs = dict(vanilla)
    if len(theirs) != len(vanilla) or set(theirs) != set(seeds):
        return None
    return [score - theirs[seed] for seed, score in variant]


DODGE = 0.035  # log2 units: error bars of the variants side by side at each T, not on top of each other


def _t_axis(ax, horizons: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(horizons))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in horizons])
    if len(horizons) >= 2:
        ax.set_xlim(horizons[0] / 2**0.25, horizons[-1] * 2**0.25)
    ax.set_xlabel("max response length T (tokens)")
    ax.grid(True, alpha=0.3)


def _errorbar(ax, xs, spreads: Sequence[Spread], show, **style) -> None:
    means = [show(s.mean) for s in spreads]
    ax.errorbar(
        xs, means,
        yerr=[[m - show(s.low) for m, s in zip(means, spreads)], [show(s.high) - m for m, s in zip(means, spreads)]],
        capsize=3, markersize=5, linewidth=1.4, **style,
    )


def plot_horizon(panels: Sequence[HorizonPanel]):
    """Figure 1: per (model, task) a row of two panels: left, each variant's Δ to Vanilla against T
    (log2), error bars its min-max over seeds; right, Vanilla's own score against T, the same."""
    from matplotlib.figure import Figure

    short = baseline().display.short_label
    fig = Figure(figsize=(10.4, 3.6 * len(panels) + 0.9), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    several = len({p.model for p in panels}) > 1
    ns = []
    for (left, right), panel in zip(axes, panels):
        show = panel.scale.show
        unit = " (points)" if panel.scale.factor == 100 else ""
        horizons = panel.horizons
        left.axhline(0.0, color="black", linewidth=0.8, gid="zero")
        count = len(panel.lines)
        for index, line in enumerate(panel.lines):
            shift = 2 ** (DODGE * (index - (count - 1) / 2))
            _errorbar(
                left, [t * shift for t, _ in line.points], [s for _, s in line.points], show,
                color=line.color, marker=line.marker, label=line.label,
            )
            ns += [s.n for _, s in line.points]
        _t_axis(left, horizons)
        left.set_ylabel(f"Δ {panel.scale.header} to {short}{unit}")
        left.set_title(_title(panel.model, panel.task, several, f": each variant minus {short}"))
        _errorbar(
            right, [t for t, _ in panel.vanilla], [s for _, s in panel.vanilla], show,
            color=method_color(baseline().name), marker="s", linestyle="--",
            label=f"{short}'s own score (right panels)",
        )
        ns += [s.n for _, s in panel.vanilla]
        _t_axis(right, horizons)
        right.set_ylabel(f"{short} {panel.scale.header}")
        right.set_title(_title(panel.model, panel.task, several, f": {short}'s own score"))
        right.margins(y=0.25)
    _legend_below(fig)
    bars = band_text(ns, "error bars")
    kinds = frozenset(t in line.paired for panel in panels for line in panel.lines for t, s in line.points if s.n > 1)
    if kinds:
        left = {
            frozenset({True}): f"each seed's score less {short}'s of the same seed",
            frozenset({False}): f"the variant's seeds less {short}'s mean",
        }.get(kinds, f"per seed less {short}'s same seed where both ran the same seeds, else less its mean")
        bars += f"; left: {left}; points side by side at each T"
    _suptitle(fig, f"Figure 1: each regularizer against {short} as the response budget T grows\n{bars}", panels)
    return fig
