"""The mechanism figure: where each bonus puts the policy's probability, per step.

Per (model, task, T) a row of panels against the training step: P_max (the top-1 probability,
Figure 3's quantity), the tail mass (the policy's mass outside its top-k tokens: where a global
entropy bonus pushes probability, where a trust-region bonus has no gradient) and the tail draws
per response (sampled tokens of probability below metrics.tail_p: the risk that compounds with the
response length). One line per variant (method and parameters) of Vanilla, Ent, TRE-K and TRE-P:
each seed EMA-smoothed as Figure 3 is, then the mean over seeds with a min-max band.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

from tre_cli import metrics as M
from tre_cli.losses.registry import METHODS, baseline, horizon_method, ordered
from tre_cli.report.figures import (
    Curve,
    _legend_below,
    _suptitle,
    _title,
    band_text,
    seed_curve,
    shown_label,
    variant_order,
    variant_styles,
)
from tre_cli.report.records import SMOOTHING, NotEnoughData, RunRecord, _key_sort, _t_sort

# The panels of a row, left to right.
PANELS = (M.P_MAX, M.TAIL_MASS, M.TAIL_DRAWS_PER_RESPONSE)
# The figure is drawn when the runs logged at least one of these (P_max alone is Figure 3).
NEEDED = (M.TAIL_MASS, M.TAIL_DRAWS_PER_RESPONSE)
LOG_SCALE = (M.TAIL_MASS,)  # ~1e-4..1e-2 on the testbed: a log axis shows both ends
LOG_RATIO = 5.0  # ... where the panel's values span that ratio; a narrower span reads better linear


def _spans_decades(curves: Sequence[Curve]) -> bool:
    values = [v for curve in curves for v in (*curve.low, *curve.high)]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_RATIO


def mechanism_methods() -> list[str]:
    """Vanilla, the horizon-swept method (Ent) and the trust-region methods of Figure 3."""
    names = {baseline().name, horizon_method().name} | {m.name for m in METHODS.values() if m.display.figure3_color}
    return ordered(names)


@dataclass(frozen=True)
class MechanismRow:
    model: str
    task: str
    max_new_tokens: int | None
    panels: tuple[tuple[str, tuple[Curve, ...]], ...]  # (metric key, one curve per variant)


@dataclass(frozen=True)
class MechanismFigure:
    rows: tuple[MechanismRow, ...]
    metrics: tuple[str, ...]  # the panels drawn (PANELS' keys some run logged)
    missing: tuple[str, ...]  # PANELS' keys no run logged: no column
    tail_k: int | None  # the runs' metrics.tail_k, when they agree
    tail_p: float | None
    weight: float


def _agreed(values) -> object | None:
    found = {v for v in values if v is not None}
    return found.pop() if len(found) == 1 else None


def mechanism_data(
    records: Sequence[RunRecord], weight: float = SMOOTHING, metrics: Sequence[str] = PANELS
) -> MechanismFigure:
    """Per (model, task, T) with two or more variants of mechanism_methods() logging a tail metric:
    one curve per variant and metric (mean over seeds of each seed's EMA, min-max band)."""
    methods = set(mechanism_methods())
    chosen = [r for r in records if r.method in methods]
    logged = [key for key in metrics if any(r.curve(key) for r in chosen)]
    if not any(key in logged for key in NEEDED):
        raise NotEnoughData(
            f"the mechanism figure needs {' or '.join(NEEDED)} logs (older runs did not write them) "
            f"of Vanilla, Ent, TRE-K or TRE-P; none found"
        )
    rows = []
    places = sorted(
        {(r.model, r.task, r.max_new_tokens) for r in chosen},
        key=lambda p: (*_key_sort((p[0], p[1])), _t_sort(p[2])),
    )
    for model, task, horizon in places:
        here = [r for r in chosen if (r.model, r.task, r.max_new_tokens) == (model, task, horizon)]
        variants = variant_order([(r.method, r.params) for r in here if any(r.curve(k) for k in NEEDED)])
        if len(variants) < 2:
            continue
        styles = variant_styles(variants)
        panels = []
        for key in logged:
            curves = []
            for method, params in variants:
                runs = [r for r in here if (r.method, r.params) == (method, params)]
                curve = seed_curve(shown_label(method, dict(params)), styles[(method, params)][0], runs, weight, key,
                                   styles[(method, params)][1])
                if curve.n:
                    curves.append(curve)
            panels.append((key, tuple(curves)))
        rows.append(MechanismRow(model, task, horizon, tuple(panels)))
    if not rows:
        raise NotEnoughData(
            "the mechanism figure needs two or more variants of Vanilla, Ent, TRE-K, TRE-P with "
            f"{' or '.join(NEEDED)} logs at one (model, task, T); none found"
        )
    return MechanismFigure(
        tuple(rows), tuple(logged), tuple(k for k in metrics if k not in logged),
        _agreed(r.tail_k for r in chosen), _agreed(r.tail_p for r in chosen), weight,
    )


def axis_label(key: str, tail_k: int | None = None, tail_p: float | None = None) -> str:
    if key == M.P_MAX:
        return "P_max (mean top-1 probability)"
    if key == M.TAIL_MASS:
        return f"tail mass (outside the top {tail_k or 'k'} tokens)"
    if key in (M.TAIL_DRAWS, M.TAIL_DRAWS_PER_RESPONSE):
        threshold = f"p < {tail_p:g}" if tail_p else "p < tail_p"
        return M.LABELS[key] + f" ({threshold})"
    return M.LABELS.get(key, key)


def plot_mechanism(data: MechanismFigure):
    """One row of panels per (model, task, T), one column per metric; one legend under them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = len(data.metrics)
    fig = Figure(figsize=(4.7 * cols, 3.3 * len(data.rows) + 1.0), layout="constrained")
    axes = fig.subplots(len(data.rows), cols, squeeze=False)
    several = len({row.model for row in data.rows}) > 1
    ns = []
    for row_axes, row in zip(axes, data.rows):
        for ax, (key, curves) in zip(row_axes, row.panels):
            for curve in curves:
                ax.plot(curve.steps, curve.mean, color=curve.color, label=curve.label, linewidth=1.6,
                        marker=curve.marker, markersize=3, markevery=max(1, len(curve.steps) // 6))
                if curve.n > 1:
                    ax.fill_between(curve.steps, curve.low, curve.high, color=curve.color, alpha=0.18, linewidth=0)
                ns.append(curve.n)
            if key in LOG_SCALE and _spans_decades(curves):
                ax.set_yscale("log")
            elif key in LOG_SCALE:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("training step")
            ax.set_ylabel(axis_label(key, data.tail_k, data.tail_p), fontsize=9)
            ax.grid(True, alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
            ax.set_title(_title(row.model, row.task, several, f", T={row.max_new_tokens}: {M.LABELS[key]}"),
                         fontsize=10)
    _legend_below(fig)
    band = band_text(ns)
    caption = f"each seed EMA-smoothed ({data.weight:g}), then the mean over seeds" + (f"; {band}" if band else "")
    if data.missing:
        caption += f"; not logged by these runs: {', '.join(data.missing)}"
    _suptitle(fig, f"The mechanism: where each bonus puts the policy's probability\n{caption}", data.rows)
    return fig
