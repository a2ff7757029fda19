"""`tre report`: finished runs -> the paper's Table 1 (with deltas to Vanilla) and Figures 1, 3, 4.

Runs come from run directories, results stores (`results.jsonl`) or a W&B project, all read by
tracking.py into one shape (read_run's dict) and turned here into `RunRecord`s.

A *cell* is every finished run of one (model, task, max_new_tokens T, method, method params): the
seeds of one configuration. Its score is the mean over seeds of the final eval score (or the best,
`score="best"`), with the spread: the sample standard deviation when n >= 3, min-max when n = 2.

Table 1 picks per (model, task) the T at which most methods ran (ties: the longer T, the task's
main setting; the other T values are Figure 1's horizon runs), and per method its main variant
(TRE-K K=2, TRE-P P=0.99, Ent alpha=0.001); a note names every choice. As in the paper, deltas
are to Vanilla of the same (model, task, T), and best (bold) and second best (underlined) are
ranked among every method but Base.

Figures are built on `matplotlib.figure.Figure` directly, never pyplot: no display and no global
state, so plotting works headless and the functions can be tested on the Figure they return.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tre_cli.losses.registry import METHODS

SMOOTHING = 0.8  # Figure 3's smoothing factor (the paper's caption)
BASE = "base"  # a `tre eval` of the untrained model: no training, not ranked, no delta
METHOD_ORDER = ("base", "vanilla", "ent", "forking-tokens", "kl-cov", "tre-k", "tre-p", "min-ent")
METHOD_LABELS = {
    "base": "Base",
    "vanilla": "Vanilla (PPO)",
    "ent": "Ent",
    "forking-tokens": "Forking-Tokens",
    "kl-cov": "KL-Cov",
    "tre-k": "TRE-K",
    "tre-p": "TRE-P",
    "min-ent": "Min-Ent",
}
# The parameters that tell a method's variants apart in labels (others show only when off their default).
VARIANT_PARAMS = {"ent": ("alpha",), "tre-k": ("k",), "tre-p": ("p",), "min-ent": ("alpha",)}
PARAM_SYMBOLS = {"alpha": "α", "k": "K", "p": "P"}
# Table 1 and Figure 3 show these variants (the paper's Section 6).
MAIN_VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "ent": {"alpha": 0.001},
    "tre-k": {"k": 2},
    "tre-p": {"p": 0.99},
    "min-ent": {"alpha": 0.001},
}
TASK_ORDER = ("math", "countdown", "hh")
TASK_LABELS = {"math": "MATH", "countdown": "Countdown", "hh": "HH"}
# The metric when a result does not name one (eval.metric null: the task's own).
TASK_METRICS = {"math": "pass@1", "countdown": "pass@1", "hh": "reward"}
FIGURE3_METHODS = (("vanilla", "Vanilla", "#d62728"), ("tre-k", "TRE-K", "#1f77b4"), ("tre-p", "TRE-P", "#d4a017"))
SCORES = ("final", "best")
NOT_IN_TABLE1 = frozenset({"min-ent"})  # the paper's Table 1 has no Min-Ent: it is Figure 4's K = 1 boundary

OUTPUT_TABLES = ("table1.md", "table1.csv", "table1.tex")
FIGURES = ("fig1_horizon", "fig3_pmax", "fig4_hparam")


class NotEnoughData(ValueError):
    """A figure's data is missing; the report skips that figure with this one-line reason."""


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRecord:
    """One run, reduced to what the report needs."""

    source: str  # run directory, results-store line or W&B URL
    model: str
    task: str
    method: str
    params: Tuple[Tuple[str, Any], ...]  # sorted (name, value), None values dropped
    max_new_tokens: Optional[int]
    seed: Optional[int]
    status: str
    final_eval: Optional[float]
    best_eval: Optional[float]
    eval_metric: Optional[str]
    p_max: Tuple[Tuple[int, float], ...] = ()  # (step, actor/p_max)
    # (entity, project, mode) the run logged to, so a report can follow its runs to W&B.
    wandb: Optional[Tuple[Optional[str], str, str]] = None

    def score(self, which: str = "final") -> Optional[float]:
        return self.final_eval if which == "final" else self.best_eval

    @property
    def param_dict(self) -> Dict[str, Any]:
        return dict(self.params)


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name) if isinstance(config, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def params_key(params: Optional[Mapping[str, Any]]) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((str(k), v) for k, v in (params or {}).items() if v is not None))


def record_from_run(run: Mapping[str, Any]) -> RunRecord:
    """A RunRecord from tracking.read_run's dict (or read_wandb_project's); result None = still running."""
    result = run.get("result") or {}
    config = run.get("config") or result.get("config") or {}
    method_section = _section(config, "method")
    method = result.get("method") or method_section.get("name")
    if not method:
        raise ValueError(f"{run.get('path')}: the run names no method (neither result.json nor config.yaml)")
    params = result.get("params")
    if params is None:
        params = {k: v for k, v in method_section.items() if k != "name"}
    if method == BASE:  # an untrained model: the config's method (and its params) played no part
        params = {}
    task = result.get("task") or _section(config, "task").get("name")
    model = result.get("model") or _section(config, "model").get("name")
    if not task or not model:
        raise ValueError(f"{run.get('path')}: the run names no task or model")
    seed = result.get("seed", _section(config, "run").get("seed"))
    max_new_tokens = _section(config, "rollout").get("max_new_tokens")
    wandb_section = _section(_section(config, "run"), "wandb")
    wandb = None
    if wandb_section.get("project") and wandb_section.get("mode") in ("online", "offline"):
        wandb = (wandb_section.get("entity"), str(wandb_section["project"]), str(wandb_section["mode"]))
    p_max = tuple(
        (int(m["step"]), float(m["actor/p_max"]))
        for m in run.get("metrics") or ()
        if "step" in m and _finite(m.get("actor/p_max")) is not None
    )
    return RunRecord(
        source=str(run.get("path")),
        model=str(model),
        task=str(task),
        method=str(method),
        params=params_key(params),
        max_new_tokens=int(max_new_tokens) if max_new_tokens is not None else None,
        seed=int(seed) if seed is not None else None,
        status=str(result.get("status", "finished")) if run.get("result") else "running",
        final_eval=_finite(result.get("final_eval")),
        best_eval=_finite(result.get("best_eval")),
        eval_metric=result.get("eval_metric") or _section(config, "eval").get("metric"),
        p_max=p_max,
        wandb=wandb,
    )


_SKIP_DIRS = {"checkpoints", "wandb", "__pycache__"}


def _walk(root: Path) -> Tuple[List[Path], List[Path]]:
    """(run directories, results stores) under root; a run directory is not searched further."""
    run_dirs, stores = [], []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        if "results.jsonl" in files:
            stores.append(here)
        if "config.yaml" in files:
            run_dirs.append(here)
            subdirs[:] = []
        else:
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
    return run_dirs, stores


def load_local_runs(paths: Sequence[Path]) -> List[Dict[str, Any]]:
    """Every run under the given run directories and results-store directories, once each.

    A store line whose run directory is gone still counts (it carries the result and the config);
    only its P_max curve is missing.
    """
    from tre_cli.tracking import read_results, read_run

    runs: Dict[str, Dict[str, Any]] = {}
    stores: List[Path] = []
    for path in map(Path, paths):
        if path.is_file() and path.name == "results.jsonl":
            stores.append(path.parent)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"no such run or results directory: {path}")
        found_dirs, found_stores = _walk(path)
        for run_dir in found_dirs:
            runs.setdefault(str(run_dir.resolve()), read_run(run_dir))
        stores.extend(found_stores)
    for store in dict.fromkeys(s.resolve() for s in stores):
        for line in read_results(store):
            run_dir = Path(line["run_dir"])
            run_dir = run_dir if run_dir.is_absolute() else store / run_dir
            key = str(run_dir.resolve())
            if key in runs:
                if runs[key]["result"] is None:  # the store has the end the run directory lacks
                    runs[key]["result"] = line
                continue
            if (run_dir / "config.yaml").is_file():
                runs[key] = read_run(run_dir)
                runs[key]["result"] = runs[key]["result"] or line
            else:
                runs[key] = {"path": key, "config": line.get("config") or {}, "metrics": [], "eval": [], "result": line}
    return list(runs.values())


def usable_records(runs: Iterable[Mapping[str, Any]], score: str = "final") -> Tuple[List[RunRecord], List[str]]:
    """The finished runs with a score, and one line per kind of run left out."""
    if score not in SCORES:
        raise ValueError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    records = [record_from_run(run) for run in runs]
    if not records:
        raise ValueError("no runs found (pass run directories, results-store directories, or --wandb ENTITY/PROJECT)")
    kept, notes = [], []
    unfinished: Dict[str, int] = {}
    no_score = 0
    for record in records:
        if record.status != "finished":
            unfinished[record.status] = unfinished.get(record.status, 0) + 1
        elif record.score(score) is None:
            no_score += 1
        else:
            kept.append(record)
    if unfinished:
        notes.append("left out runs not finished: " + ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items())))
    if no_score:
        notes.append(f"left out {no_score} finished run(s) without an eval score")
    if not kept:
        raise ValueError(f"none of the {len(records)} runs found is finished with an eval score ({'; '.join(notes)})")
    return kept, notes


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class CellKey:
    model: str
    task: str
    max_new_tokens: Optional[int]
    method: str
    params: Tuple[Tuple[str, Any], ...]


@dataclass(frozen=True)
class Cell:
    """The seeds of one configuration: mean and spread of their scores."""

    key: CellKey
    scores: Tuple[float, ...]
    seeds: Tuple[Optional[int], ...]

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def spread_kind(self) -> Optional[str]:
        return "std" if self.n >= 3 else "range" if self.n == 2 else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.scores) if self.n >= 3 else None

    @property
    def low(self) -> float:
        return min(self.scores)

    @property
    def high(self) -> float:
        return max(self.scores)

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self.key.params)


def group_cells(records: Iterable[RunRecord], score: str = "final") -> Dict[CellKey, Cell]:
    grouped: Dict[CellKey, List[RunRecord]] = {}
    for record in records:
        key = CellKey(record.model, record.task, record.max_new_tokens, record.method, record.params)
        grouped.setdefault(key, []).append(record)
    return {
        key: Cell(key, tuple(r.score(score) for r in runs), tuple(r.seed for r in runs))
        for key, runs in grouped.items()
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _matches(params: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(k in params and _same(params[k], v) for k, v in wanted.items())


def pick_variant(cells: Sequence[Cell], wanted: Mapping[str, Any]) -> Tuple[Optional[Cell], bool]:
    """The cell whose params match `wanted`; among several, the one at the method's registry
    defaults, then the one with most seeds. Returns (cell, exact); when nothing matches, the best
    other variant with exact=False (the caller says so in a note)."""
    if not cells:
        return None, False
    exact = [cell for cell in cells if _matches(cell.params, wanted)]
    candidates = exact or list(cells)
    method = candidates[0].key.method
    defaults = dict(METHODS[method].defaults) if method in METHODS else {}

    def preference(cell: Cell) -> Tuple[bool, int, str]:
        # The string keeps the choice stable when everything else ties.
        return (_matches(cell.params, defaults), cell.n, json.dumps(cell.key.params, default=str))

    return max(candidates, key=preference), bool(exact)


def _format_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variant_label(method: str, params: Mapping[str, Any]) -> str:
    """'TRE-K (K=2)'; a parameter off its default is named too, so two variants never share a label."""
    shown = [f"{PARAM_SYMBOLS.get(k, k)}={_format_param(params[k])}" for k in VARIANT_PARAMS.get(method, ()) if k in params]
    defaults = METHODS[method].defaults if method in METHODS else {}
    shown += [
        f"{PARAM_SYMBOLS.get(k, k)}={_format_param(v)}"
        for k, v in sorted(params.items())
        if k not in VARIANT_PARAMS.get(method, ()) and k in defaults and not _same(v, defaults[k])
    ]
    name = METHOD_LABELS.get(method, method)
    return f"{name} ({', '.join(shown)})" if shown else name


def _sort_tasks(tasks: Iterable[str]) -> List[str]:
    return sorted(set(tasks), key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def _sort_methods(methods: Iterable[str]) -> List[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def model_label(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def _t_sort(t: Optional[int]) -> int:
    return -1 if t is None else t


def main_horizon(cells: Iterable[Cell], model: str, task: str) -> Optional[int]:
    """The T of (model, task) at which most trained methods ran; ties go to the longer T."""
    methods_at: Dict[Optional[int], set] = {}
    for cell in cells:
        if cell.key.model == model and cell.key.task == task and cell.key.method != BASE:
            methods_at.setdefault(cell.key.max_new_tokens, set()).add(cell.key.method)
    if not methods_at:
        return None
    return max(methods_at, key=lambda t: (len(methods_at[t]), _t_sort(t)))


# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """How a task's scores are shown: pass@k in percent with 2 decimals, rewards as they are."""

    metric: str
    factor: float
    decimals: int

    @property
    def header(self) -> str:
        if self.factor == 100.0:
            return f"{self.metric.replace('pass', 'Pass')} (%)"
        return "Reward" if self.metric in ("reward", "mean_reward") else self.metric

    def show(self, value: float) -> float:
        return value * self.factor

    def text(self, value: float, signed: bool = False) -> str:
        return f"{self.show(value):+.{self.decimals}f}" if signed else f"{self.show(value):.{self.decimals}f}"


def scale_for(task: str, metrics: Iterable[Optional[str]]) -> Scale:
    named = [m for m in metrics if m]
    metric = max(set(named), key=named.count) if named else TASK_METRICS.get(task, "score")
    if metric.lower().startswith("pass@") or metric.lower() in ("accuracy", "acc"):
        return Scale(metric, 100.0, 2)
    return Scale(metric, 1.0, 4)


# --------------------------------------------------------------------------- Table 1


@dataclass(frozen=True)
class Column:
    model: str
    task: str
    max_new_tokens: Optional[int]
    scale: Scale

    @property
    def label(self) -> str:
        return f"{model_label(self.model)} {task_label(self.task)} {self.scale.header}"


@dataclass(frozen=True)
class TableCell:
    cell: Cell
    delta: Optional[float]  # mean - Vanilla's mean (raw units); None for Base, Vanilla, or without Vanilla
    rank: Optional[int]  # 1 best, 2 second best, else None


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    cells: Tuple[Optional[TableCell], ...]  # one per column


@dataclass(frozen=True)
class Table1:
    columns: Tuple[Column, ...]
    rows: Tuple[Row, ...]
    score: str
    notes: Tuple[str, ...] = field(default_factory=tuple)


def _rank(values: Dict[int, float]) -> Dict[int, int]:
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
    notes: List[str] = []
    pairs = sorted({(c.model, c.task) for c in cells}, key=_key_sort)
    columns: List[Column] = []
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

    methods = _sort_methods(c.method for c in cells if c.method not in NOT_IN_TABLE1)
    chosen: Dict[str, List[Optional[Cell]]] = {}
    variant_notes: Dict[str, List[str]] = {}
    for method in methods:
        picked: List[Optional[Cell]] = []
        for column in columns:
            candidates = [
                c for k, c in cells.items()
                if k.method == method and k.model == column.model and k.task == column.task and k.max_new_tokens == column.max_new_tokens
            ]
            if method == BASE and not candidates:  # an eval of the base model at another T still gives context
                candidates = [c for k, c in cells.items() if k.method == BASE and k.model == column.model and k.task == column.task]
            wanted = MAIN_VARIANTS.get(method, {})
            cell, exact = pick_variant(candidates, wanted)
            picked.append(cell)
            if cell is None:
                continue
            text = variant_label(method, cell.params)
            where = f"{model_label(column.model)} {task_label(column.task)}"
            if wanted and not exact:
                variant_notes.setdefault(method, []).append(f"{text} in {where} (its main variant {variant_label(method, wanted)} has no runs)")
            elif text not in variant_notes.get(method, []):
                variant_notes.setdefault(method, []).append(text)
            if method == BASE and cell.key.max_new_tokens != column.max_new_tokens:
                notes.append(f"Base in {where} was evaluated at T={cell.key.max_new_tokens}, not T={column.max_new_tokens}")
        if any(picked):
            chosen[method] = picked
    used = [text for m, texts in variant_notes.items() for text in texts if text != METHOD_LABELS.get(m, m)]
    if used:
        notes.insert(0, "variants shown: " + "; ".join(used))

    rows: List[Row] = []
    row_cells: List[List[Optional[TableCell]]] = [[None] * len(columns) for _ in chosen]
    for j, column in enumerate(columns):
        vanilla = chosen.get("vanilla", [None] * len(columns))[j]
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
            delta = None if method in (BASE, "vanilla") or vanilla is None else cell.mean - vanilla.mean
            row_cells[i][j] = TableCell(cell, delta, ranks.get(i))
    for (method, _), cells_of_row in zip(chosen.items(), row_cells):
        rows.append(Row(method, METHOD_LABELS.get(method, method), tuple(cells_of_row)))
    left_out = _sort_methods(c.method for c in cells if c.method in NOT_IN_TABLE1)
    if left_out:
        notes.append(f"{', '.join(METHOD_LABELS.get(m, m) for m in left_out)}: in Figure 4, not in Table 1 (as in the paper)")
    if "vanilla" not in chosen:
        notes.append("no Vanilla runs: no deltas")
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
    rank: Optional[int]


def cell_text(table_cell: Optional[TableCell], scale: Scale) -> Optional[CellText]:
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
        label = f"**{row.label}**" if row.method in (BASE, "vanilla") else row.label
        lines.append("| " + " | ".join([label, *texts]) + " |")
    notes = "".join(f"\n- {note}" for note in table.notes)
    return "**Table 1.** Main results.\n\n" + "\n".join(lines) + "\n" + notes + "\n"


CSV_COLUMNS = (
    "model", "task", "max_new_tokens", "metric", "unit", "method", "variant", "params", "n", "seeds",
    "mean", "std", "min", "max", "delta_to_vanilla", "rank",
)


def table_rows(table: Table1) -> List[List[Any]]:
    """Table 1 in long form (one line per shown cell, values in the shown unit): CSV and W&B."""
    out = []
    for row in table.rows:
        for column, table_cell in zip(table.columns, row.cells):
            if table_cell is None:
                continue
            cell, scale = table_cell.cell, column.scale

            def number(value: Optional[float]) -> Optional[float]:
                return None if value is None else round(scale.show(value), 6)

            out.append([
                column.model, column.task, column.max_new_tokens, scale.metric, "%" if scale.factor == 100 else "",
                row.method, variant_label(row.method, cell.params), json.dumps(cell.params, sort_keys=True),
                cell.n, " ".join(str(s) for s in cell.seeds), number(cell.mean), number(cell.std),
                number(cell.low), number(cell.high), number(table_cell.delta), table_cell.rank,
            ])
    return out


def render_csv(table: Table1) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in table_rows(table):
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


_LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


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
    models: List[Tuple[str, int]] = []
    for column in columns:
        if models and models[-1][0] == column.model:
            models[-1] = (column.model, models[-1][1] + 1)
        else:
            models.append((column.model, 1))
    lines.append(" & " + " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{latex_escape(model_label(m))}}}" for m, n in models) + " \\\\")
    rules, start = [], 2
    for _, n in models:
        rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append("Method & " + " & ".join(latex_escape(f"{task_label(c.task)} {c.scale.header}") for c in columns) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        texts = []
        for column, table_cell in zip(columns, row.cells):
            text = cell_text(table_cell, column.scale)
            if text is None:
                texts.append("--")
                continue
            value = f"\\textbf{{{text.value}}}" if text.rank == 1 else f"\\underline{{{text.value}}}" if text.rank == 2 else text.value
            extra = _join(text.spread, text.delta, text.n)
            texts.append(value + (f" {{\\scriptsize {latex_escape(extra)}}}" if extra else ""))
        label = latex_escape(row.label)
        label = f"\\textbf{{{label}}}" if row.method in (BASE, "vanilla") else label
        lines.append(label + " & " + " & ".join(texts) + " \\\\")
        if row.method == BASE:
            lines.append("\\midrule")
    caption = "Main results. " + " ".join(note.rstrip(".") + "." for note in table.notes)
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{latex_escape(caption)}}}", "\\label{tab:main}", "\\end{table}"]
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


# --------------------------------------------------------------------------- smoothing


def ema_smooth(values: Sequence[float], weight: float = SMOOTHING) -> List[float]:
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


# --------------------------------------------------------------------------- figure data


def _key_sort(key: Tuple[str, str]) -> Tuple[str, int, str]:
    model, task = key
    return (model, TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


@dataclass(frozen=True)
class HorizonPanel:
    model: str
    task: str
    scale: Scale
    vanilla: Tuple[Tuple[int, float], ...]  # (T, Vanilla mean) in raw units
    deltas: Tuple[Tuple[float, Tuple[Tuple[int, float], ...]], ...]  # (alpha, ((T, Ent - Vanilla), ...)), alpha descending


def horizon_data(records: Sequence[RunRecord], score: str = "final") -> List[HorizonPanel]:
    """Figure 1: per (model, task), Ent's delta to Vanilla at each T, per alpha."""
    cells = group_cells(records, score)
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        vanilla = {
            k.max_new_tokens: c.mean for k, c in cells.items()
            if k.model == model and k.task == task and k.method == "vanilla" and k.max_new_tokens is not None
        }
        by_alpha: Dict[float, Dict[int, float]] = {}
        for key, cell in cells.items():
            if key.model == model and key.task == task and key.method == "ent" and key.max_new_tokens in vanilla:
                alpha = cell.params.get("alpha")
                if alpha is not None:
                    by_alpha.setdefault(float(alpha), {})[key.max_new_tokens] = cell.mean - vanilla[key.max_new_tokens]
        horizons = {t for points in by_alpha.values() for t in points}
        if len(horizons) < 2:
            continue
        metrics = [r.eval_metric for r in records if r.model == model and r.task == task]
        panels.append(HorizonPanel(
            model, task, scale_for(task, metrics),
            tuple(sorted((t, v) for t, v in vanilla.items() if t in horizons)),
            tuple((alpha, tuple(sorted(points.items()))) for alpha, points in sorted(by_alpha.items(), reverse=True)),
        ))
    if not panels:
        raise NotEnoughData("Figure 1 needs Vanilla and Ent runs at two or more max_new_tokens (T) of one task; none found")
    return panels


@dataclass(frozen=True)
class Curve:
    label: str
    color: str
    steps: Tuple[int, ...]
    mean: Tuple[float, ...]
    low: Tuple[float, ...]
    high: Tuple[float, ...]
    n: int


@dataclass(frozen=True)
class PmaxPanel:
    model: str
    task: str
    max_new_tokens: Optional[int]
    curves: Tuple[Curve, ...]


def _curve(label: str, color: str, runs: Sequence[RunRecord], weight: float) -> Curve:
    # Each seed smoothed on its own (as W&B shows it), then averaged step by step.
    per_step: Dict[int, List[float]] = {}
    for run in runs:
        points = sorted(dict(run.p_max).items())
        for step, value in zip((s for s, _ in points), ema_smooth([v for _, v in points], weight)):
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    return Curve(
        label, color, tuple(steps),
        tuple(statistics.fmean(per_step[s]) for s in steps),
        tuple(min(per_step[s]) for s in steps),
        tuple(max(per_step[s]) for s in steps),
        len(runs),
    )


def pmax_data(records: Sequence[RunRecord], weight: float = SMOOTHING) -> List[PmaxPanel]:
    """Figure 3: per (model, task), smoothed P_max against step for Vanilla, TRE-K, TRE-P at the
    task's main T (mean over seeds, min-max band)."""
    cells = group_cells(records)
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        horizon = main_horizon(cells.values(), model, task)
        curves = []
        for method, name, color in FIGURE3_METHODS:
            candidates = [
                c for k, c in cells.items()
                if k.model == model and k.task == task and k.max_new_tokens == horizon and k.method == method
            ]
            with_pmax = [
                c for c in candidates
                if any(r.p_max for r in records if CellKey(r.model, r.task, r.max_new_tokens, r.method, r.params) == c.key)
            ]
            cell, _ = pick_variant(with_pmax, MAIN_VARIANTS.get(method, {}))
            if cell is None:
                continue
            runs = [r for r in records if CellKey(r.model, r.task, r.max_new_tokens, r.method, r.params) == cell.key and r.p_max]
            label = variant_label(method, cell.params) if method != "vanilla" else name
            curves.append(_curve(label, color, runs, weight))
        if len(curves) >= 2:
            panels.append(PmaxPanel(model, task, horizon, tuple(curves)))
    if not panels:
        raise NotEnoughData("Figure 3 needs actor/p_max logs of Vanilla and TRE-K or TRE-P for one task; none found")
    return panels


@dataclass(frozen=True)
class Point:
    label: str
    family: str  # "K", "P" or "Min-Ent"
    mean: float
    low: float  # error bar: mean ± std when n >= 3, min-max when n = 2, none when n = 1
    high: float
    n: int


@dataclass(frozen=True)
class HparamPanel:
    model: str
    task: str
    max_new_tokens: Optional[int]
    scale: Scale
    vanilla: float
    points: Tuple[Point, ...]


def _point(label: str, family: str, cell: Cell) -> Point:
    if cell.spread_kind == "std":
        low, high = cell.mean - cell.std, cell.mean + cell.std
    else:
        low, high = cell.low, cell.high
    return Point(label, family, cell.mean, low, high, cell.n)


def hparam_data(records: Sequence[RunRecord], score: str = "final") -> List[HparamPanel]:
    """Figure 4: per (model, task) at the main T, every K of TRE-K, every P of TRE-P, and Min-Ent,
    against Vanilla."""
    cells = group_cells(records, score)
    panels = []
    for model, task in sorted({(c.model, c.task) for c in cells}, key=_key_sort):
        horizon = main_horizon(cells.values(), model, task)
        here = [c for k, c in cells.items() if k.model == model and k.task == task and k.max_new_tokens == horizon]
        vanilla, _ = pick_variant([c for c in here if c.key.method == "vanilla"], {})
        if vanilla is None:
            continue
        points = []
        for method, param, family in (("tre-k", "k", "K"), ("tre-p", "p", "P")):
            of_method = [c for c in here if c.key.method == method and param in c.params]
            for value in sorted({c.params[param] for c in of_method}):
                cell, _ = pick_variant([c for c in of_method if _same(c.params[param], value)], {param: value, **{k: v for k, v in MAIN_VARIANTS[method].items() if k != param}})
                points.append(_point(f"{family}={_format_param(value)}", family, cell))
        min_ent, _ = pick_variant([c for c in here if c.key.method == "min-ent"], MAIN_VARIANTS["min-ent"])
        if min_ent is not None:
            points.append(_point("Min-Ent", "Min-Ent", min_ent))
        if len(points) >= 2 and any(p.label not in ("K=2", "P=0.99") for p in points):  # more than Table 1 shows
            metrics = [r.eval_metric for r in records if r.model == model and r.task == task]
            panels.append(HparamPanel(model, task, horizon, scale_for(task, metrics), vanilla.mean, tuple(points)))
    if not panels:
        raise NotEnoughData(
            "Figure 4 needs Vanilla and two or more of TRE-K (by K), TRE-P (by P), Min-Ent, beyond K=2 and P=0.99, for one task; none found"
        )
    return panels


# --------------------------------------------------------------------------- plotting


def _grid(keys: Sequence[Tuple[str, str]], width: float = 4.6, height: float = 3.4):
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
    seen: Dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(len(seen), 6), fontsize=9, frameon=False)


def _suptitle(fig, text: str, panels: Sequence[Any]) -> None:
    models = list(dict.fromkeys(panel.model for panel in panels))
    fig.suptitle(text + (f" ({model_label(models[0])})" if len(models) == 1 else ""))


def _title(model: str, task: str, several_models: bool, suffix: str = "") -> str:
    return (f"{model_label(model)}: " if several_models else "") + task_label(task) + suffix


ALPHA_COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b")


def plot_horizon(panels: Sequence[HorizonPanel]):
    """Figure 1: Δ (Ent - Vanilla) against T (log2) per alpha; Vanilla's score on a twin axis."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes, several = _grid([(p.model, p.task) for p in panels])
    for panel in panels:
        ax = axes[(panel.model, panel.task)]
        unit = " (points)" if panel.scale.factor == 100 else ""
        ax.axhline(0.0, color="black", linewidth=0.8, gid="zero")
        for index, (alpha, points) in enumerate(panel.deltas):
            ax.plot(
                [t for t, _ in points], [panel.scale.show(d) for _, d in points],
                marker="o", color=ALPHA_COLORS[index % len(ALPHA_COLORS)], label=f"Ent α={_format_param(alpha)}",
            )
        ax.set_xscale("log", base=2)
        horizons = sorted({t for _, points in panel.deltas for t, _ in points})
        ax.xaxis.set_major_locator(FixedLocator(horizons))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in horizons])
        ax.set_xlabel("max response length T (tokens)")
        ax.set_ylabel(f"Δ to Vanilla{unit}")
        ax.grid(True, alpha=0.3)
        twin = ax.twinx()
        twin.plot(
            [t for t, _ in panel.vanilla], [panel.scale.show(v) for _, v in panel.vanilla],
            linestyle="--", color="grey", marker="s", markersize=4, label="Vanilla (right axis)",
        )
        twin.set_ylabel(f"Vanilla {panel.scale.header}", color="grey")
        twin.tick_params(axis="y", colors="grey")
        ax.set_title(_title(panel.model, panel.task, several))
    _legend_below(fig)
    _suptitle(fig, "Figure 1: entropy regularization against the generation budget T", panels)
    return fig


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
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(panel.curves), frameon=False, columnspacing=1.0, handlelength=1.5)
        ax.set_title(_title(panel.model, panel.task, several, f" (T={panel.max_new_tokens})"))
    band = "; band: min-max over seeds" if any(curve.n > 1 for panel in panels for curve in panel.curves) else ""
    _suptitle(fig, f"Figure 3: P_max, EMA smoothing {weight:g}{band}", panels)
    return fig


FAMILY_COLORS = {"K": "#1f77b4", "P": "#d4a017", "Min-Ent": "#7f7f7f"}


def plot_hparam(panels: Sequence[HparamPanel]):
    """Figure 4: each K, each P and Min-Ent as a point (error bar: the seeds' spread), Vanilla dashed red."""
    fig, axes, several = _grid([(p.model, p.task) for p in panels], width=5.2)
    for panel in panels:
        ax = axes[(panel.model, panel.task)]
        xs = list(range(len(panel.points)))
        for family in ("K", "P", "Min-Ent"):
            chosen = [(x, p) for x, p in zip(xs, panel.points) if p.family == family]
            if not chosen:
                continue
            show = panel.scale.show
            ax.errorbar(
                [x for x, _ in chosen], [show(p.mean) for _, p in chosen],
                yerr=[[show(p.mean) - show(p.low) for _, p in chosen], [show(p.high) - show(p.mean) for _, p in chosen]],
                fmt="o", color=FAMILY_COLORS[family], capsize=3, markersize=7,
                label={"K": "TRE-K", "P": "TRE-P", "Min-Ent": "Min-Ent"}[family],
            )
            for x, p in chosen:
                ax.annotate(panel.scale.text(p.mean), (x, show(p.high)), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
        ax.axhline(panel.scale.show(panel.vanilla), color="red", linestyle="--", label="Vanilla (PPO)")
        ax.set_xticks(xs, [p.label for p in panel.points])
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_ylabel(panel.scale.header)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
        # Vanilla's value goes in the title: next to its line it collides with the points' labels.
        ax.set_title(_title(panel.model, panel.task, several, f" (T={panel.max_new_tokens}), Vanilla {panel.scale.text(panel.vanilla)}"))
    _legend_below(fig)
    _suptitle(fig, "Figure 4: trust region size K, nucleus mass P and Min-Ent against Vanilla", panels)
    return fig


# --------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> Path:
    from tre_cli.tracking import atomic_write_text

    return atomic_write_text(path, text)


def save_figure(fig, out_dir: Path, stem: str) -> List[Path]:
    """PNG and SVG, each written beside its final name and renamed into place."""
    written = []
    for suffix, options in ((".png", {"dpi": 150}), (".svg", {})):
        final = out_dir / f"{stem}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{stem}.", suffix=suffix)
        os.close(fd)
        try:
            # "tight" as well as the constrained layout: a title wider than its panel can push a label off the canvas.
            fig.savefig(tmp, format=suffix[1:], bbox_inches="tight", pad_inches=0.1, **options)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(final)
    return written


@dataclass
class Report:
    table: Table1
    written: List[Path] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # one line per figure left out
    notes: List[str] = field(default_factory=list)
    figures: Dict[str, Any] = field(default_factory=dict)  # stem -> matplotlib Figure


FIGURE_BUILDERS: Mapping[str, Callable[[Sequence[RunRecord], str], Any]] = {
    "fig1_horizon": lambda records, score: plot_horizon(horizon_data(records, score)),
    "fig3_pmax": lambda records, score: plot_pmax(pmax_data(records)),
    "fig4_hparam": lambda records, score: plot_hparam(hparam_data(records, score)),
}


def write_report(runs: Sequence[Mapping[str, Any]], out_dir: Path, score: str = "final") -> Report:
    """Table 1 (Markdown, CSV, LaTeX) and Figures 1, 3, 4 (PNG, SVG) into out_dir.

    Everything is computed before the first file is written, so bad input leaves nothing behind;
    a figure without its data is skipped with one line saying why.
    """
    records, notes = usable_records(runs, score)
    table = build_table1(records, score)
    texts = {"table1.md": render_markdown(table), "table1.csv": render_csv(table), "table1.tex": render_latex(table)}
    report = Report(table, notes=notes)
    for stem, build in FIGURE_BUILDERS.items():
        try:
            report.figures[stem] = build(records, score)
        except NotEnoughData as reason:
            report.skipped.append(f"{stem}: skipped: {reason}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        report.written.append(_write_text(out_dir / name, text))
    for stem, fig in report.figures.items():
        report.written.extend(save_figure(fig, out_dir, stem))
    return report


def wandb_payload(report: Report) -> Tuple[Dict[str, Tuple[List[str], List[List[Any]]]], Dict[str, Path]]:
    """What `tracking.log_report_to_wandb` logs: Table 1 in long form and every PNG written."""
    tables = {"table1": (list(CSV_COLUMNS), table_rows(report.table))}
    images = {path.stem: path for path in report.written if path.suffix == ".png"}
    return tables, images


def wandb_target(
    runs: Sequence[Mapping[str, Any]], wandb_project: Optional[str], log: Optional[bool]
) -> Optional[Tuple[Optional[str], str, str]]:
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
        raise ValueError("--log-wandb: the runs logged to no W&B project (wandb mode disabled); pass --wandb ENTITY/PROJECT")
    return max(set(known), key=known.count)
