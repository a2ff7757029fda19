"""`tre report`: finished runs -> the paper's Table 1 (with deltas to Vanilla), Figures 1, 3, 4,
and the mechanism figure and table (P_max, tail mass and tail draws per variant).

Runs come from run directories, results stores (`results.jsonl`) or a W&B project, all read by
tre_cli.tracking into one shape (read_run's dict) and turned here into `RunRecord`s.

A *cell* is every finished run of one (model, task, max_new_tokens T, method, method params): the
seeds of one configuration. Its score is the mean over seeds of the final eval score (or the best,
`score="best"`), with the spread: the sample standard deviation when n >= 3, min-max when n = 2.

Table 1 picks per (model, task) the T at which most methods ran (ties: the longer T, the task's
main setting; the other T values are Figure 1's horizon runs), and per method its main variant
(TRE-K K=2, TRE-P P=0.99, Ent alpha=0.001); a note names every choice. As in the paper, deltas
are to Vanilla of the same (model, task, T), and best (bold) and second best (underlined) are
ranked among every method but Base.

    records.py          runs -> RunRecords (scores and per-step curves) -> cells, variants, labels, scales
    table.py            Table 1 and its four renderings
    figures.py          Figures 3, 4 and what the figures share (matplotlib Figures, never pyplot)
    horizon.py          Figure 1: each variant's delta to Vanilla against T, and Vanilla's own score
    mechanism.py        the mechanism figure: P_max, tail mass, tail draws against the step
    mechanism_table.py  the mechanism table (plain data: mechanism_table(); Markdown, CSV)
    here                writing it all (atomically) and what goes to W&B
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from tre_cli.io import atomic_path, atomic_write_text
from tre_cli.report.figures import (
    Curve,
    HparamPanel,
    PmaxPanel,
    Point,
    band_text,
    ema_smooth,
    hparam_data,
    plot_hparam,
    plot_pmax,
    pmax_data,
    seed_curve,
)
from tre_cli.report.horizon import HorizonLine, HorizonPanel, Spread, horizon_data, plot_horizon
from tre_cli.report.mechanism import MechanismFigure, MechanismRow, mechanism_data, mechanism_methods, plot_mechanism
from tre_cli.report.mechanism_table import (
    ABOVE,
    BELOW,
    MECHANISM_CSV_COLUMNS,
    OVERLAPS,
    TABLE_METRICS,
    MechanismEntry,
    Range,
    claims,
    find_entry,
    mechanism_rows,
    mechanism_table,
    render_mechanism_csv,
    render_mechanism_markdown,
)
from tre_cli.report.records import (
    FIGURES,
    MECHANISM_TABLES,
    OUTPUT_TABLES,
    SCORES,
    SMOOTHING,
    Cell,
    CellKey,
    NotEnoughData,
    RunRecord,
    Scale,
    group_cells,
    load_local_runs,
    main_horizon,
    pick_variant,
    record_from_run,
    scale_for,
    usable_records,
    variant_label,
)
from tre_cli.report.table import (
    CSV_COLUMNS,
    Column,
    Row,
    Table1,
    TableCell,
    build_table1,
    latex_escape,
    render_csv,
    render_latex,
    render_markdown,
    render_rich,
    table_rows,
)

__all__ = [
    "ABOVE", "BELOW", "CSV_COLUMNS", "FIGURES", "MECHANISM_CSV_COLUMNS", "MECHANISM_TABLES", "OUTPUT_TABLES",
    "OVERLAPS", "SCORES", "SMOOTHING", "TABLE_METRICS", "Cell", "CellKey", "Column", "Curve", "HorizonLine",
    "HorizonPanel", "HparamPanel", "MechanismEntry", "MechanismFigure", "MechanismRow", "NotEnoughData",
    "PmaxPanel", "Point", "Range", "Report", "Row", "RunRecord", "Scale", "Spread", "Table1", "TableCell",
    "band_text", "build_table1", "claims", "ema_smooth", "find_entry", "group_cells", "horizon_data",
    "hparam_data", "latex_escape", "load_local_runs", "main_horizon", "mechanism_data", "mechanism_methods",
    "mechanism_rows", "mechanism_table", "pick_variant", "plot_hparam", "plot_horizon", "plot_mechanism",
    "plot_pmax", "pmax_data", "record_from_run", "render_csv", "render_latex", "render_markdown",
    "render_mechanism_csv", "render_mechanism_markdown", "render_rich", "save_figure", "scale_for", "seed_curve",
    "table_rows", "usable_records", "variant_label", "wandb_payload", "wandb_target", "write_report",
]


def save_figure(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    """PNG and SVG, each written whole or not at all."""
    written = []
    for suffix, options in ((".png", {"dpi": 150}), (".svg", {})):
        final = out_dir / f"{stem}{suffix}"
        with atomic_path(final) as tmp:
            # "tight" as well as the constrained layout: a title wider than its panel can push a
            # label off the canvas.
            fig.savefig(tmp, format=suffix[1:], bbox_inches="tight", pad_inches=0.1, **options)
        written.append(final)
    return written


@dataclass
class Report:
    table: Table1
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per figure left out
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # stem -> matplotlib Figure
    mechanism: list[MechanismEntry] = field(default_factory=list)  # the mechanism table's data


FIGURE_BUILDERS: Mapping[str, Callable[[Sequence[RunRecord], str], Any]] = {
    "fig1_horizon": lambda records, score: plot_horizon(horizon_data(records, score)),
    "fig3_pmax": lambda records, score: plot_pmax(pmax_data(records)),
    "fig4_hparam": lambda records, score: plot_hparam(hparam_data(records, score)),
    "fig_mechanism": lambda records, score: plot_mechanism(mechanism_data(records)),
}


def write_report(runs: Sequence[Mapping[str, Any]], out_dir: Path, score: str = "final") -> Report:
    """Table 1 (Markdown, CSV, LaTeX), the mechanism table (Markdown, CSV), Figures 1, 3, 4 and the
    mechanism figure (PNG, SVG) into out_dir.

    Everything is computed before the first file is written, so bad input leaves nothing behind;
    a figure without its data is skipped with one line saying why.
    """
    records, notes = usable_records(runs, score)
    table = build_table1(records, score)
    texts = {"table1.md": render_markdown(table), "table1.csv": render_csv(table), "table1.tex": render_latex(table)}
    report = Report(table, notes=notes)
    try:
        report.mechanism = mechanism_table(records, score)
        texts["mechanism.md"] = render_mechanism_markdown(report.mechanism, records, score)
        texts["mechanism.csv"] = render_mechanism_csv(report.mechanism)
    except NotEnoughData as reason:
        report.skipped.append(f"mechanism: skipped: {reason}")
    for stem, build in FIGURE_BUILDERS.items():
        try:
            report.figures[stem] = build(records, score)
        except NotEnoughData as reason:
            report.skipped.append(f"{stem}: skipped: {reason}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        report.written.append(atomic_write_text(out_dir / name, text))
    for stem, fig in report.figures.items():
        report.written.extend(save_figure(fig, out_dir, stem))
    return report


def wandb_payload(report: Report) -> tuple[dict[str, tuple[list[str], list[list[Any]]]], dict[str, Path]]:
    """What `tracking.log_report_to_wandb` logs: Table 1 and the mechanism table in long form and
    every PNG written."""
    tables = {"table1": (list(CSV_COLUMNS), table_rows(report.table))}
    if report.mechanism:
        tables["mechanism"] = (list(MECHANISM_CSV_COLUMNS), mechanism_rows(report.mechanism))
    images = {path.stem: path for path in report.written if path.suffix == ".png"}
    return tables, images


def wandb_target(
    runs: Sequence[Mapping[str, Any]], wandb_project: str | None, log: bool | None
) -> tuple[str | None, str, str] | None:
    """Where the report goes on W&B as (entity, project, mode), or None for nowhere.

    log None (the default): to the --wandb project, or to the runs' own project when they all
    logged online to one. log True: the same, else the runs' most common project in its mode
    (offline: under the report directory). log False: nowhere.
    """
    if log is False:
        return None
    if wandb_project:
        entity, _, project = wandb_project.partition("/")
        return (entity or None, project, "online")
    targets = [record_from_run(run).wandb for run in runs]
    if not log:
        return targets[0] if targets and targets[0] and targets[0][2] == "online" and len(set(targets)) == 1 else None
    known = [t for t in targets if t is not None]
    if not known:
        raise ValueError(
            "--log-wandb: the runs logged to no W&B project (wandb mode disabled); pass --wandb ENTITY/PROJECT"
        )
    return max(set(known), key=known.count)
