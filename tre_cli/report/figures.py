"""Figures 3 and 4: their data from the run records, and their plots; what every figure shares
(smoothing, curves over seeds, variant colours, the grid of panels, the legend).

Figures are built on `matplotlib.figure.Figure` directly, never pyplot: no display and no global
state, so plotting works headless and the functions can be tested on the Figure they return.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

from tre_cli import metrics as M
from tre_cli.losses.registry import METHODS, baseline
from tre_cli.losses.registry import label as method_label
from tre_cli.report.records import (
    SMOOTHING,
    Cell,
    CellKey,
    NotEnoughData,
    RunRecord,
    Scale,
    _format_param,
    _key_sort,
    _same,
    _sort_tasks,
    group_cells,
    main_horizon,
    pick_variant,
    scale_for,
    task_label,
    variant_label,
)
from tre_cli.tracking import model_label


def ema_smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing (W&B's "Exponential moving average"): a debiased EMA.

    last = weight * last + (1 - weight) * y, shown as last / (1 - weight ** n) after n points, so
    the first point is itself rather than pulled towards 0. Non-finite values pass through without
    entering the average; a constant series is returned as it is (as TensorBoard does).
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if len(set(finite)) <= 1:
        return values
    last, count, out = 0.0, 0, []
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        last = last * weight + (1.0 - weight) * value
        count += 1
        out.append(last / (1.0 - weight**count))
    return out


@dataclass(frozen=True)
class Curve:
    """One variant's metric against the step: each seed EMA-smoothed, then the mean over seeds and
    the band from the seeds' minimum to their maximum at each step."""

    label: str
    color: str
    steps: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]  # min over seeds
    high: tuple[float, ...]  # max over seeds
    n: int  # seeds
    marker: str = ""


@dataclass(frozen=True)
class PmaxPanel:
    model: str
    task: str
    max_new_tokens: int | None
    curves: tuple[Curve, ...]


def seed_curve(
    label: str, color: str, runs: Sequence[RunRecord], weight: float, key: str = M.P_MAX, marker: str = ""
) -> Curve:
    """Each seed's `key` curve smoothed on its own (as W&B shows it), then averaged step by step,
    with the seeds' min-max band; runs that did not log `key` are left out (n counts the others)."""
    per_step: dict[int, list[float]] = {}
    logged = [run for run in runs if run.curve(key)]
    for run in logged:
        points = run.curve(key)
        for step, value in zip((s for s, _ in points), ema_smooth([v for _, v in points], weight)):
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    return Curve(
        label, color, tuple(steps),
        tuple(statistics.fmean(per_step[s]) for s in steps),
        tuple(min(per_step[s]) for s in steps),
        tuple(max(per_step[s]) for s in steps),
        len(logged),
        marker,
    )


def band_text(ns: Sequence[int], what: str = "band") -> str:
    """'band: min-max over 3 seeds' ('2-3 seeds' when the counts differ, and a word on the curves of
    one seed, which have none); 'one seed per curve: no band' when nothing has several seeds."""
    several = sorted({n for n in ns if n > 1})
    if not several:
        return f"one seed per curve: no {what}" if ns else ""
    seeds = str(several[0]) if len(several) == 1 else f"{several[0]}-{several[-1]}"
    single = " (one seed: none)" if any(n == 1 for n in ns) else ""
    return f"{what}: min-max over {seeds} seeds{single}"


# --------------------------------------------------------------------------- variants


def cell_key(record: RunRecord) -> CellKey:
    return CellKey(record.model, record.task, record.max_new_tokens, record.method, record.params)


OTHER_COLOR = "#7f7f7f"
MARKERS = ("o", "s", "^", "D", "v", "P")


def method_color(method: str) -> str:
    shown = METHODS[method].display if method in METHODS else None
    if shown is not None and shown.figure3_color:
        return shown.figure3_color
    if shown is not None and shown.color:
        return shown.color
    return shown.figure4.color if shown is not None and shown.figure4 else OTHER_COLOR


def _shade(color: str, index: int, count: int) -> str:
    """The method's colour for its only variant; for several, darker to lighter shades of it."""
    if count <= 1:
        return color
    import colorsys

    from matplotlib.colors import to_hex, to_rgb

    hue, _, saturation = colorsys.rgb_to_hls(*to_rgb(color))
    lightness = 0.28 + 0.42 * index / (count - 1)
    return to_hex(colorsys.hls_to_rgb(hue, lightness, saturation))


def shown_label(method: str, params: dict[str, Any]) -> str:
    """A variant's legend label: 'Vanilla' for the baseline, else method and parameters."""
    entry = METHODS.get(method)
    if entry is not None and entry.display.baseline:
        return entry.display.short_label or entry.display.label
    return variant_label(method, params)


def variant_order(variants: Sequence[tuple[str, tuple[tuple[str, Any], ...]]]):
    """(method, params) in the registry's order of methods; within a method, larger alpha first."""
    rows = {name: m.display.row for name, m in METHODS.items()}

    def key(variant):
        method, params = variant
        values = dict(params)
        alpha = values.get("alpha")
        return (rows.get(method, len(rows) + 1), method, -float(alpha) if isinstance(alpha, (int, float)) else 0.0,
                str(params))

    return sorted(dict.fromkeys(variants), key=key)


def variant_styles(variants: Sequence[tuple[str, tuple[tuple[str, Any], ...]]]) -> dict[Any, tuple[str, str]]:
    """(method, params) -> (colour, marker): a method's colour (Figure 3's where it has one), in
    shades when it has several variants, and a marker of each variant's own, so that two lines
    that coincide (TRE-K's and TRE-P's tails) still read as two."""
    ordered_variants = variant_order(variants)
    markers = {variant: MARKERS[index % len(MARKERS)] for index, variant in enumerate(ordered_variants)}
    styles = {}
    for method in dict.fromkeys(m for m, _ in ordered_variants):
        own = [v for v in ordered_variants if v[0] == method]
        for index, variant in enumerate(own):
            styles[variant] = (_shade(method_color(method), index, len(own)), markers[variant])
    return styles


def pmax_data(records: Sequence[RunRecord], weight: float = SMOOTHING) -> list[PmaxPanel]:
    """Figure 3: per (model, task), smoothed P_max against step for Vanilla, TRE-K, TRE-P at the
    task's main T (mean over seeds, min-max band)."""
    cells = group_cells(records)
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        horizon = main_horizon(cells.values(), model, task)
        curves = []
        for entry in (m for m in METHODS.values() if m.display.figure3_color):
            method, color = entry.name, entry.display.figure3_color
            candidates = [
                c for k, c in cells.items()
                if k.model == model and k.task == task and k.max_new_tokens == horizon and k.method == method
            ]
            with_pmax = [c for c in candidates if any(r.p_max for r in records if cell_key(r) == c.key)]
            cell, _ = pick_variant(with_pmax, entry.main_variant)
            if cell is None:
                continue
            runs = [r for r in records if cell_key(r) == cell.key and r.p_max]
            name = entry.display.short_label if entry.display.baseline else variant_label(method, cell.params)
            curves.append(seed_curve(name, color, runs, weight))
        if len(curves) >= 2:
            panels.append(PmaxPanel(model, task, horizon, tuple(curves)))
    if not panels:
        raise NotEnoughData("Figure 3 needs actor/p_max logs of Vanilla and TRE-K or TRE-P for one task; none found")
    return panels


@dataclass(frozen=True)
class Point:
    label: str
    family: str  # the method (its points share a colour and a legend entry)
    mean: float
    low: float  # error bar: mean ± std when n >= 3, min-max when n = 2, none when n = 1
    high: float
    n: int
    main: bool = False  # the method's Table 1 variant (Figure 4 adds to Table 1 only with others)


@dataclass(frozen=True)
class HparamPanel:
    model: str
    task: str
    max_new_tokens: int | None
    scale: Scale
    vanilla: float
    points: tuple[Point, ...]


def _point(label: str, family: str, cell: Cell, main: bool = False) -> Point:
    if cell.spread_kind == "std":
        low, high = cell.mean - cell.std, cell.mean + cell.std
    else:
        low, high = cell.low, cell.high
    return Point(label, family, cell.mean, low, high, cell.n, main)


def hparam_data(records: Sequence[RunRecord], score: str = "final") -> list[HparamPanel]:
    """Figure 4: per (model, task) at the main T, every K of TRE-K, every P of TRE-P, and Min-Ent,
    against Vanilla."""
    cells = group_cells(records, score)
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        horizon = main_horizon(cells.values(), model, task)
        here = [c for k, c in cells.items() if k.model == model and k.task == task and k.max_new_tokens == horizon]
        vanilla, _ = pick_variant([c for c in here if c.key.method == baseline().name], {})
        if vanilla is None:
            continue
        points = []
        for entry in (m for m in METHODS.values() if m.display.figure4):
            param = entry.display.figure4.param
            of_method = [c for c in here if c.key.method == entry.name and (param is None or param in c.params)]
            if param is None:  # one point: the method's main variant
                cell, _ = pick_variant(of_method, entry.main_variant)
                if cell is not None:
                    points.append(_point(entry.display.label, entry.name, cell))
                continue
            others = {k: v for k, v in entry.main_variant.items() if k != param}
            for value in sorted({c.params[param] for c in of_method}):
                cell, _ = pick_variant(
                    [c for c in of_method if _same(c.params[param], value)], {param: value, **others}
                )
                main = _same(value, entry.param(param).default)
                points.append(_point(f"{entry.param(param).shown}={_format_param(value)}", entry.name, cell, main))
        if len(points) >= 2 and not all(p.main for p in points):  # more than Table 1 shows
            metrics = [r.eval_metric for r in records if r.model == model and r.task == task]
            panels.append(HparamPanel(model, task, horizon, scale_for(task, metrics), vanilla.mean, tuple(points)))
    if not panels:
        raise NotEnoughData(
            "Figure 4 needs Vanilla and two or more of TRE-K (by K), TRE-P (by P), Min-Ent, beyond K=2 and P=0.99, "
            "for one task; none found"
        )
    return panels


def _grid(keys: Sequence[tuple[str, str]], width: float = 4.6, height: float = 3.4):
    """A Figure with one panel per (model, task): a row per model and a column per task when every
    pair has data, else the panels in reading order, three to a row (no empty panels)."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(m for m, _ in sorted(keys, key=_key_sort)))
    tasks = _sort_tasks(t for _, t in keys)
    if len(keys) == len(models) * len(tasks):
        rows, cols = len(models), len(tasks)
        places = {(m, t): (i, j) for i, m in enumerate(models) for j, t in enumerate(tasks)}
    else:
        ordered = sorted(keys, key=_key_sort)
        cols = min(3, len(ordered))
        rows = math.ceil(len(ordered) / cols)
        places = {key: divmod(n, cols) for n, key in enumerate(ordered)}
    fig = Figure(figsize=(width * cols, height * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    used = set(places.values())
    for i in range(rows):
        for j in range(cols):
            if (i, j) not in used:
                axes[i][j].set_visible(False)
    return fig, {key: axes[i][j] for key, (i, j) in places.items()}, len(models) > 1


def _legend_below(fig) -> None:
    """One legend for the whole figure, under the panels, where it can hide no data."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="outside lower center",
            ncol=math.ceil(len(seen) / math.ceil(len(seen) / 6)),  # rows of equal length, at most 6 wide
            fontsize=9,
            frameon=False,
        )


def _suptitle(fig, text: str, panels: Sequence[Any]) -> None:
    """The figure's title (with one model, the model after its first line); a second line is the
    caption (the smoothing, what a band is)."""
    models = list(dict.fromkeys(panel.model for panel in panels))
    title, _, caption = text.partition("\n")
    title += f" ({model_label(models[0])})" if len(models) == 1 else ""
    fig.suptitle(title + (f"\n{caption}" if caption else ""), fontsize=11 if caption else None)


def _title(model: str, task: str, several_models: bool, suffix: str = "") -> str:
    return (f"{model_label(model)}: " if several_models else "") + task_label(task) + suffix


def plot_pmax(panels: Sequence[PmaxPanel], weight: float = SMOOTHING):
    """Figure 3: smoothed P_max against step; a min-max band over seeds where there are several."""
    from matplotlib.ticker import MaxNLocator

    fig, axes, several = _grid([(p.model, p.task) for p in panels])
    for panel in panels:
        ax = axes[(panel.model, panel.task)]
        for curve in panel.curves:
            ax.plot(curve.steps, curve.mean, color=curve.color, label=f"{curve.label}, n={curve.n}")
            if curve.n > 1:
                ax.fill_between(curve.steps, curve.low, curve.high, color=curve.color, alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel("P_max (mean top-1 probability)")
        ax.grid(True, alpha=0.3)
        ax.legend(
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=len(panel.curves),
            frameon=False,
            columnspacing=1.0,
            handlelength=1.5,
        )
        ax.set_title(_title(panel.model, panel.task, several, f" (T={panel.max_new_tokens})"))
    band = band_text([curve.n for panel in panels for curve in panel.curves])
    caption = f"each seed EMA-smoothed ({weight:g}), then the mean over seeds" + (f"; {band}" if band else "")
    _suptitle(fig, f"Figure 3: P_max against the training step\n{caption}", panels)
    return fig


def plot_hparam(panels: Sequence[HparamPanel]):
    """Figure 4: each K, each P and Min-Ent as a point (error bar: the seeds' spread), Vanilla dashed red."""
    fig, axes, several = _grid([(p.model, p.task) for p in panels], width=5.2)
    for panel in panels:
        ax = axes[(panel.model, panel.task)]
        xs = list(range(len(panel.points)))
        for family in dict.fromkeys(p.family for p in panel.points):
            chosen = [(x, p) for x, p in zip(xs, panel.points) if p.family == family]
            if not chosen:
                continue
            show = panel.scale.show
            ax.errorbar(
                [x for x, _ in chosen],
                [show(p.mean) for _, p in chosen],
                yerr=[
                    [show(p.mean) - show(p.low) for _, p in chosen],
                    [show(p.high) - show(p.mean) for _, p in chosen],
                ],
                fmt="o",
                color=METHODS[family].display.figure4.color,
                capsize=3,
                markersize=7,
                label=method_label(family),
            )
            for x, p in chosen:
                ax.annotate(
                    panel.scale.text(p.mean),
                    (x, show(p.high)),
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                    fontsize=7,
                )
        ax.axhline(panel.scale.show(panel.vanilla), color="red", linestyle="--", label=baseline().display.label)
        ax.set_xticks(xs, [p.label for p in panel.points])
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_ylabel(panel.scale.header)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
        # Vanilla's value goes in the title: next to its line it collides with the points' labels.
        ax.set_title(
            _title(
                panel.model,
                panel.task,
                several,
                f" (T={panel.max_new_tokens}), {baseline().display.short_label} {panel.scale.text(panel.vanilla)}",
            )
        )
    _legend_below(fig)
    _suptitle(fig, "Figure 4: trust region size K, nucleus mass P and Min-Ent against Vanilla", panels)
    return fig
