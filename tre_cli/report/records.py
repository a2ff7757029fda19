"""Runs as the report sees them: RunRecords (from run directories, results stores or W&B), cells
(the seeds of one configuration), variants, labels and the scale a task's scores show in.

What the report knows of a method comes from the registry (losses/registry.py); a method name
it does not know (a run of a newer or older tre) still shows, under its own name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from tre_cli import metrics as M
from tre_cli.losses.registry import BASE, METHODS, Method, baseline, ordered

SMOOTHING = 0.8  # Figure 3's smoothing factor (the paper's caption)
TASK_ORDER = ("math", "countdown", "hh")
TASK_LABELS = {"math": "MATH", "countdown": "Countdown", "hh": "HH"}
SCORES = ("final", "best")

OUTPUT_TABLES = ("table1.md", "table1.csv", "table1.tex")
MECHANISM_TABLES = ("mechanism.md", "mechanism.csv")
FIGURES = ("fig1_horizon", "fig3_pmax", "fig4_hparam", "fig_mechanism")


class NotEnoughData(ValueError):
    """A figure's data is missing; the report skips that figure with this one-line reason."""


def main_variant(method: str) -> dict[str, Any]:
    """The parameters of the method's Table 1 (and Figure 3) variant; {} when it has none."""
    return METHODS[method].main_variant if method in METHODS else {}


def in_table1(method: str) -> bool:
    return METHODS[method].display.in_table1 if method in METHODS else True


def _is_reference(method: str) -> bool:
    """Base and the baseline: bold in the table, no delta."""
    return method in (BASE, baseline().name)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRecord:
    """One run, reduced to what the report needs."""

    source: str  # run directory, results-store line or W&B URL
    # The model, with its estimator when that is not GAE ("testbed · GRPO", see `setup`): runs
    # under another advantage estimator are another setup, with their own columns and Vanilla.
    model: str
    task: str
    method: str
    params: tuple[tuple[str, Any], ...]  # sorted (name, value), None values dropped
    max_new_tokens: int | None
    seed: int | None
    status: str
    final_eval: float | None
    best_eval: float | None
    eval_metric: str | None
    # Per-step curves: (metric key, ((step, value), ...)) for each key of metrics.CURVES the run
    # logged, in that order; see curve().
    curves: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()
    # (entity, project, mode) the run logged to, so a report can follow its runs to W&B.
    wandb: tuple[str | None, str, str] | None = None
    tail_k: int | None = None  # the run's metrics.tail_k (what actor/tail_mass counts as the tail)
    tail_p: float | None = None  # the run's metrics.tail_p (rollout/tail_draws' threshold)
    estimator: str = "gae"  # ppo.estimator; runs recorded before it: GAE

    def score(self, which: str = "final") -> float | None:
        return self.final_eval if which == "final" else self.best_eval

    def curve(self, key: str) -> tuple[tuple[int, float], ...]:
        """(step, value) of one metric, by step; () when the run did not log it."""
        return dict(self.curves).get(key, ())

    @property
    def p_max(self) -> tuple[tuple[int, float], ...]:
        return self.curve(M.P_MAX)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name) if isinstance(config, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# how a report names each advantage estimator beside the model.
ESTIMATOR_LABELS = {"gae": "GAE", "grpo": "GRPO", "dr-grpo": "Dr. GRPO", "rloo": "RLOO"}


def setup(model: str, estimator: str) -> str:
    """A report's name for (model, estimator): the model alone under GAE (the paper's setup)."""
    if estimator == "gae":
        return model
    return f"{model} · {ESTIMATOR_LABELS.get(estimator, estimator)}"


def params_key(params: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
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
    elif method in METHODS:
        params = METHODS[method].identity(params)
    task = result.get("task") or _section(config, "task").get("name")
    model = result.get("model") or _section(config, "model").get("name")
    if not task or not model:
        raise ValueError(f"{run.get('path')}: the run names no task or model")
    seed = result.get("seed", _section(config, "run").get("seed"))
    # Base (an evaluation of an untrained model) has no estimator: it belongs to the model's GAE setup.
    estimator = "gae" if method == BASE else str(_section(config, "ppo").get("estimator") or "gae")
    max_new_tokens = _section(config, "rollout").get("max_new_tokens")
    wandb_section = _section(_section(config, "run"), "wandb")
    wandb = None
    if wandb_section.get("project") and wandb_section.get("mode") in ("online", "offline"):
        wandb = (wandb_section.get("entity"), str(wandb_section["project"]), str(wandb_section["mode"]))
    metrics_section = _section(config, "metrics")
    return RunRecord(
        source=str(run.get("path")),
        model=setup(str(model), estimator),
        task=str(task),
        method=str(method),
        params=params_key(params),
        max_new_tokens=int(max_new_tokens) if max_new_tokens is not None else None,
        seed=int(seed) if seed is not None else None,
        status=str(result.get("status", "finished")) if run.get("result") else "running",
        final_eval=_finite(result.get("final_eval")),
        best_eval=_finite(result.get("best_eval")),
        eval_metric=result.get("eval_metric") or _section(config, "eval").get("metric"),
        curves=read_curves(run.get("metrics") or ()),
        wandb=wandb,
        tail_k=_int_or_none(metrics_section.get("tail_k")),
        tail_p=_finite(metrics_section.get("tail_p")),
        estimator=estimator,
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def read_curves(
    lines: Iterable[Mapping[str, Any]], keys: Sequence[str] = M.CURVES
) -> tuple[tuple[str, tuple[tuple[int, float], ...]], ...]:
    """metrics.jsonl's lines -> per key, its finite values by step (a step logged twice: the last)."""
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    for line in lines:
        if "step" not in line:
            continue
        for key in keys:
            value = _finite(line.get(key))
            if value is not None:
                points[key][int(line["step"])] = value
    return tuple((key, tuple(sorted(by_step.items()))) for key, by_step in points.items() if by_step)


_SKIP_DIRS = {"checkpoints", "wandb", "__pycache__"}


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
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


def load_local_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every run under the given run directories and results-store directories, once each.

    A store line whose run directory is gone still counts (it carries the result and the config);
    only its per-step curves are missing.
    """
    from tre_cli.tracking import read_results, read_run

    runs: dict[str, dict[str, Any]] = {}
    stores: list[Path] = []
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


def usable_records(runs: Iterable[Mapping[str, Any]], score: str = "final") -> tuple[list[RunRecord], list[str]]:
    """The finished runs with a score, and one line per kind of run left out."""
    if score not in SCORES:
        raise ValueError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    records = [record_from_run(run) for run in runs]
    if not records:
        raise ValueError("no runs found (pass run directories, results-store directories, or --wandb ENTITY/PROJECT)")
    kept, notes = [], []
    unfinished: dict[str, int] = {}
    no_score = 0
    for record in records:
        if record.status != "finished":
            unfinished[record.status] = unfinished.get(record.status, 0) + 1
        elif record.score(score) is None:
            no_score += 1
        else:
            kept.append(record)
    if unfinished:
        notes.append(
            "left out runs not finished: " + ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items()))
        )
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
    max_new_tokens: int | None
    method: str
    params: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Cell:
    """The seeds of one configuration: mean and spread of their scores."""

    key: CellKey
    scores: tuple[float, ...]
    seeds: tuple[int | None, ...]

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def spread_kind(self) -> str | None:
        return "std" if self.n >= 3 else "range" if self.n == 2 else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.scores) if self.n >= 3 else None

    @property
    def low(self) -> float:
        return min(self.scores)

    @property
    def high(self) -> float:
        return max(self.scores)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.key.params)


def group_cells(records: Iterable[RunRecord], score: str = "final") -> dict[CellKey, Cell]:
    grouped: dict[CellKey, list[RunRecord]] = {}
    for record in records:
        key = CellKey(record.model, record.task, record.max_new_tokens, record.method, record.params)
        grouped.setdefault(key, []).append(record)
    return {
        key: Cell(key, tuple(r.score(score) for r in runs), tuple(r.seed for r in runs))
        for key, runs in grouped.items()
    }


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _matches(params: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(k in params and _same(params[k], v) for k, v in wanted.items())


def pick_variant(cells: Sequence[Cell], wanted: Mapping[str, Any]) -> tuple[Cell | None, bool]:
    """The cell whose params match `wanted`; among several, the one at the method's registry
    defaults, then the one with most seeds. Returns (cell, exact); when nothing matches, the best
    other variant with exact=False (the caller says so in a note)."""
    if not cells:
        return None, False
    exact = [cell for cell in cells if _matches(cell.params, wanted)]
    candidates = exact or list(cells)
    method = candidates[0].key.method
    defaults = METHODS[method].defaults if method in METHODS else {}

    def preference(cell: Cell) -> tuple[bool, int, str]:
        # The string keeps the choice stable when everything else ties.
        return (_matches(cell.params, defaults), cell.n, json.dumps(cell.key.params, default=str))

    return max(candidates, key=preference), bool(exact)


def _format_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variant_label(method: str, params: Mapping[str, Any]) -> str:
    """'TRE-K (K=2)'; a parameter off its default is named too, so two variants never share a label."""
    entry: Method | None = METHODS.get(method)
    if entry is None:
        return method
    variant = entry.display.variant_params
    shown = [f"{entry.param(k).shown}={_format_param(params[k])}" for k in variant if k in params]
    defaults = entry.defaults
    shown += [
        f"{entry.param(k).shown}={_format_param(v)}"
        for k, v in sorted(params.items())
        if k not in variant and k in defaults and not _same(v, defaults[k])
    ]
    return f"{entry.display.label} ({', '.join(shown)})" if shown else entry.display.label


def _key_sort(key: tuple[str, str]) -> tuple[str, int, str]:
    model, task = key
    return (model, TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def _sort_tasks(tasks: Iterable[str]) -> list[str]:
    return sorted(set(tasks), key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def _sort_methods(methods: Iterable[str]) -> list[str]:
    return ordered(methods)


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def _t_sort(t: int | None) -> int:
    return -1 if t is None else t


def main_horizon(cells: Iterable[Cell], model: str, task: str) -> int | None:
    """The T of (model, task) at which most trained methods ran; ties go to the longer T."""
    methods_at: dict[int | None, set] = {}
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


def _task_metric(task: str) -> str:
    """The metric when no result names one: the task's own (its tasks/<task>.yaml)."""
    from tre_cli.tasks import TASKS, task_metric

    return task_metric(task) if task in TASKS else "score"


def scale_for(task: str, metrics: Iterable[str | None]) -> Scale:
    named = [m for m in metrics if m]
    metric = max(set(named), key=named.count) if named else _task_metric(task)
    if metric.lower().startswith("pass@") or metric.lower() in ("accuracy", "acc"):
        return Scale(metric, 100.0, 2)
    return Scale(metric, 1.0, 4)


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table as CSV text: a header row, then the rows with None as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()
