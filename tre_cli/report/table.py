"""Table 1: per (model, task) at its main T, each method's main variant, mean and spread over
seeds, the delta to the baseline and the best two marked; rendered for the terminal, Markdown,
CSV and LaTeX."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

from tre_cli.losses.registry import BASE, baseline
from tre_cli.losses.registry import label as method_label
from tre_cli.report.records import (
    csv_text,
    Cell,
    RunRecord,
    Scale,
    _is_reference,
    _key_sort,
    _sort_methods,
    _t_sort,
    group_cells,
    in_table1,
    main_horizon,
    main_variant,
    pick_variant,
    scale_for,
    task_label,
    variant_label,
)
from tre_cli.tracking import model_label


@dataclass(frozen=True)
class Column:
    model: str
    task: str
    max_new_tokens: int | None
    scale: Scale

    @property
    def label(self) -> str:
        return f"{model_label(self.model)} {task_label(self.task)} {self.scale.header}"


@dataclass(frozen=True)
class TableCell:
    cell: Cell
    delta: float | None  # mean - Vanilla's mean (raw units); None for Base, Vanilla, or without Vanilla
    rank: int | None  # 1 best, 2 second best, else None


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    cells: tuple[TableCell | None, ...]  # one per column


@dataclass(frozen=True)
class Table1:
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    score: str
    notes: tuple[str, ...] = field(default_factory=tuple)


def _rank(values: dict[int, float]) -> dict[int, int]:
    """Row index -> 1 (best) or 2 (second best) by the shown value; ties share a mark."""
    if len(values) < 2:
        return {}
    distinct = sorted(set(values.values()), reverse=True)
    marks = {distinct[0]: 1}
    if len(distinct) > 1:
        marks[distinct[1]] = 2
    return {row: marks[v] for row, v in values.items() if v in marks}


def build_table1(records: Sequence[RunRecord], score: str = "final") -> Table1:
    cells = group_cells(records, score)
    notes: list[str] = []
    pairs = sorted({(c.model, c.task) for c in cells}, key=_key_sort)
    columns: list[Column] = []
    for model, task in pairs:
        horizon = main_horizon(cells.values(), model, task)
        trained_at = {c.max_new_tokens for c in cells if c.model == model and c.task == task and c.method != BASE}
        if horizon is None:  # only Base results for this pair
            horizon = max((c.max_new_tokens for c in cells if c.model == model and c.task == task), key=_t_sort)
        others = sorted((t for t in trained_at if t != horizon), key=_t_sort)
        if others:
            notes.append(
                f"{model_label(model)} {task_label(task)}: T={horizon} (runs at T="
                f"{', '.join(str(t) for t in others)} are horizon runs: Figure 1)"
            )
        metrics = [r.eval_metric for r in records if r.model == model and r.task == task]
        columns.append(Column(model, task, horizon, scale_for(task, metrics)))

    methods = _sort_methods(c.method for c in cells if in_table1(c.method))
    chosen: dict[str, list[Cell | None]] = {}
    variant_notes: dict[str, list[str]] = {}
    for method in methods:
        picked: list[Cell | None] = []
        for column in columns:
            candidates = [
                c
                for k, c in cells.items()
                if k.method == method
                and k.model == column.model
                and k.task == column.task
                and k.max_new_tokens == column.max_new_tokens
            ]
            if method == BASE and not candidates:  # an eval of the base model at another T still gives context
                candidates = [
                    c
                    for k, c in cells.items()
                    if k.method == BASE and k.model == column.model and k.task == column.task
                ]
            wanted = main_variant(method)
            cell, exact = pick_variant(candidates, wanted)
            picked.append(cell)
            if cell is None:
                continue
            text = variant_label(method, cell.params)
            where = f"{model_label(column.model)} {task_label(column.task)}"
            if wanted and not exact:
                variant_notes.setdefault(method, []).append(
                    f"{text} in {where} (its main variant {variant_label(method, wanted)} has no runs)"
                )
            elif text not in variant_notes.get(method, []):
                variant_notes.setdefault(method, []).append(text)
            if method == BASE and cell.key.max_new_tokens != column.max_new_tokens:
                notes.append(
                    f"Base in {where} was evaluated at T={cell.key.max_new_tokens}, not T={column.max_new_tokens}"
                )
        if any(picked):
            chosen[method] = picked
    used = [text for m, texts in variant_notes.items() for text in texts if text != method_label(m)]
    if used:
        notes.insert(0, "variants shown: " + "; ".join(used))

    rows: list[Row] = []
    row_cells: list[list[TableCell | None]] = [[None] * len(columns) for _ in chosen]
    for j, column in enumerate(columns):
        vanilla = chosen.get(baseline().name, [None] * len(columns))[j]
        shown = {
            i: round(column.scale.show(picked[j].mean), column.scale.decimals)
            for i, (method, picked) in enumerate(chosen.items())
            if method != BASE and picked[j] is not None
        }
        ranks = _rank(shown)
        for i, (method, picked) in enumerate(chosen.items()):
            cell = picked[j]
            if cell is None:
                continue
            delta = None if _is_reference(method) or vanilla is None else cell.mean - vanilla.mean
            row_cells[i][j] = TableCell(cell, delta, ranks.get(i))
    for (method, _), cells_of_row in zip(chosen.items(), row_cells):
        rows.append(Row(method, method_label(method), tuple(cells_of_row)))
    left_out = _sort_methods(c.method for c in cells if not in_table1(c.method))
    if left_out:
        notes.append(f"{', '.join(method_label(m) for m in left_out)}: in Figure 4, not in Table 1 (as in the paper)")
    if baseline().name not in chosen:
        notes.append(f"no {baseline().display.short_label} runs: no deltas")
    spread_kinds = {tc.cell.spread_kind for row in rows for tc in row.cells if tc is not None}
    spread = []
    if "std" in spread_kinds:
        spread.append("± is the sample standard deviation over seeds")
    if "range" in spread_kinds:
        spread.append("[min, max] when n = 2")
    what = "final eval score (the last evaluation)" if score == "final" else "best eval score over the run"
    notes.append(
        f"score: {what}, mean over n seeds; (Δ) to Vanilla of the same model, task and T; "
        + ("; ".join(spread) + "; " if spread else "")
        + "bold: best, underlined: second best, among all methods but Base"
    )
    return Table1(tuple(columns), tuple(rows), score, tuple(notes))


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class CellText:
    value: str
    spread: str
    delta: str
    n: str
    rank: int | None


def cell_text(table_cell: TableCell | None, scale: Scale) -> CellText | None:
    if table_cell is None:
        return None
    cell = table_cell.cell
    if cell.spread_kind == "std":
        spread = f"±{scale.show(cell.std):.{scale.decimals}f}"
    elif cell.spread_kind == "range":
        spread = f"[{scale.text(cell.low)}, {scale.text(cell.high)}]"
    else:
        spread = ""
    delta = f"({scale.text(table_cell.delta, signed=True)})" if table_cell.delta is not None else ""
    return CellText(scale.text(cell.mean), spread, delta, f"n={cell.n}", table_cell.rank)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def render_markdown(table: Table1) -> str:
    header = ["Method", *(c.label for c in table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(table.columns)) + "|"]
    for row in table.rows:
        texts = []
        for column, table_cell in zip(table.columns, row.cells):
            text = cell_text(table_cell, column.scale)
            if text is None:
                texts.append("–")
                continue
            value = f"**{text.value}**" if text.rank == 1 else f"<u>{text.value}</u>" if text.rank == 2 else text.value
            texts.append(_join(value, text.spread, text.delta, text.n))
        label = f"**{row.label}**" if _is_reference(row.method) else row.label
        lines.append("| " + " | ".join([label, *texts]) + " |")
    notes = "".join(f"\n- {note}" for note in table.notes)
    return "**Table 1.** Main results.\n\n" + "\n".join(lines) + "\n" + notes + "\n"


CSV_COLUMNS = (
    "model", "task", "max_new_tokens", "metric", "unit", "method", "variant", "params", "n", "seeds",
    "mean", "std", "min", "max", "delta_to_vanilla", "rank",
)


def table_rows(table: Table1) -> list[list[Any]]:
    """Table 1 in long form (one line per shown cell, values in the shown unit): CSV and W&B."""
    out = []
    for row in table.rows:
        for column, table_cell in zip(table.columns, row.cells):
            if table_cell is None:
                continue
            cell, scale = table_cell.cell, column.scale

            def number(value: float | None) -> float | None:
                return None if value is None else round(scale.show(value), 6)

            out.append([
                column.model, column.task, column.max_new_tokens, scale.metric, "%" if scale.factor == 100 else "",
                row.method, variant_label(row.method, cell.params), json.dumps(cell.params, sort_keys=True),
                cell.n, " ".join(str(s) for s in cell.seeds), number(cell.mean), number(cell.std),
                number(cell.low), number(cell.high), number(table_cell.delta), table_cell.rank,
            ])
    return out


def render_csv(table: Table1) -> str:
    return csv_text(CSV_COLUMNS, table_rows(table))


_LATEX_SPECIALS = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
    return escaped.replace("α", r"$\alpha$").replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def render_latex(table: Table1) -> str:
    columns = table.columns
    lines = [
        "% Table 1 (tre report); needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\begin{tabular}{l" + "c" * len(columns) + "}",
        "\\toprule",
    ]
    models: list[tuple[str, int]] = []
    for column in columns:
        if models and models[-1][0] == column.model:
            models[-1] = (column.model, models[-1][1] + 1)
        else:
            models.append((column.model, 1))
    lines.append(
        " & " + " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{latex_escape(model_label(m))}}}" for m, n in models) + " \\\\"
    )
    rules, start = [], 2
    for _, n in models:
        rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append(
        "Method & " + " & ".join(latex_escape(f"{task_label(c.task)} {c.scale.header}") for c in columns) + " \\\\"
    )
    lines.append("\\midrule")
    for row in table.rows:
        texts = []
        for column, table_cell in zip(columns, row.cells):
            text = cell_text(table_cell, column.scale)
            if text is None:
                texts.append("--")
                continue
            value = (
                f"\\textbf{{{text.value}}}"
                if text.rank == 1
                else f"\\underline{{{text.value}}}"
                if text.rank == 2
                else text.value
            )
            extra = _join(text.spread, text.delta, text.n)
            texts.append(value + (f" {{\\scriptsize {latex_escape(extra)}}}" if extra else ""))
        label = latex_escape(row.label)
        label = f"\\textbf{{{label}}}" if _is_reference(row.method) else label
        lines.append(label + " & " + " & ".join(texts) + " \\\\")
        if row.method == BASE:
            lines.append("\\midrule")
    caption = "Main results. " + " ".join(note.rstrip(".") + "." for note in table.notes)
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{latex_escape(caption)}}}",
        "\\label{tab:main}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"


def render_rich(table: Table1):
    """Table 1 for the terminal: one rich table per model (narrow enough for a terminal), notes last."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    models = list(dict.fromkeys(column.model for column in table.columns))
    parts = []
    for number, model in enumerate(models, start=1):
        indices = [j for j, column in enumerate(table.columns) if column.model == model]
        last = number == len(models)
        out = Table(
            title=f"Table 1: {model_label(model)}",
            caption=escape("\n".join(table.notes)) if last else None,
            caption_justify="left",
        )
        out.add_column("Method", style="bold", no_wrap=True)
        for j in indices:
            out.add_column(f"{task_label(table.columns[j].task)}\n{table.columns[j].scale.header}", justify="right")
        for row in table.rows:
            if all(row.cells[j] is None for j in indices):
                continue
            texts = []
            for j in indices:
                table_cell, scale = row.cells[j], table.columns[j].scale
                text = cell_text(table_cell, scale)
                if text is None:
                    texts.append(Text("–", style="dim"))
                    continue
                rich_text = Text(text.value, style="bold" if text.rank == 1 else "underline" if text.rank == 2 else "")
                if text.spread:
                    rich_text.append(" " + text.spread, style="dim")
                if text.delta:
                    rich_text.append(" " + text.delta, style="green" if table_cell.delta >= 0 else "red")
                rich_text.append(f" {text.n}", style="dim")
                texts.append(rich_text)
            out.add_row(row.label, *texts)
        parts.append(out)
    return Group(*parts)
