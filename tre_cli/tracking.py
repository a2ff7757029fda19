"""Run directories, metric logs, checkpoints' places, the results store, and W&B.

This is the only module that imports wandb (lazily: mode "disabled" never imports it). The local
files are the source of truth; W&B is a mirror.

A run directory (never overwritten; a fresh run refuses a non-empty one):

    config.yaml         the resolved config, written first (run.out set to this directory)
    metrics.jsonl       one object per logged step: {"step", "time", "<namespace>/<name>": float...}
    eval.jsonl          one object per evaluation: {"step", "time", "eval/score", "eval/metric",
                        "eval/n_prompts", "eval/n_samples", "eval/...": float...}
    checkpoints/step_<N>/   written by the trainer through `io.atomic_dir(run_dir.checkpoint_dir(N))`
    result.json         the final RunResult
    wandb/              W&B's own files (offline runs sync with `wandb sync <run>/wandb/offline-run-*`)
    wandb_run_id        the W&B run id, so a resumed job continues the same W&B run

The results store is one append-only `results.jsonl` (default: in the run directory's parent), one
RunResult per line. A resumed run appends a new line for the same run_dir: the last line wins.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import numbers
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli import __version__
from tre_cli.config import RunConfig, dump_yaml, read_yaml_file, to_dict, with_overrides
from tre_cli.metrics import CURVES
from tre_cli.io import append_line, atomic_write_text, read_jsonl, truncate_jsonl_after
from tre_cli.losses.registry import BASE

log = logging.getLogger("tre")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
RESULT_FILE = "result.json"
RESULTS_STORE_FILE = "results.jsonl"
WANDB_ID_FILE = "wandb_run_id"
STATUSES = ("finished", "failed", "interrupted")
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")

PathLike = str | Path


# --------------------------------------------------------------------------- run directory


@dataclass(frozen=True)
class RunDir:
    """Where a run's files live; checkpoints are `checkpoints/step_<N>/`."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def result_file(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{int(step)}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for entry in self.checkpoints.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Delete all but the newest keep_last checkpoints; returns the deleted paths."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        doomed = [path for _, path in self.list_checkpoints()[:-keep_last]]
        for path in doomed:
            shutil.rmtree(path)
        return doomed


def model_label(model: str) -> str:
    """A model's short name: the last part of its hub id or path (tables, figures, trial names)."""
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def default_run_dir(config: RunConfig, root: PathLike = "runs", now: _dt.datetime | None = None) -> Path:
    """runs/<task>-<method>-<YYYYmmdd-HHMMSS>, or run.out when the config names one."""
    if config.run.out is not None:
        return Path(config.run.out)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.task.name}-{config.method.name}-{stamp}"


def create_run_dir(path: PathLike, config: RunConfig) -> RunDir:
    """Claim a fresh run directory and write its config.yaml first.

    An existing non-empty directory is refused; two processes claiming the same directory cannot
    both succeed (config.yaml is published with a hard link, which never replaces a file).
    """
    run_dir = RunDir(Path(path))
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise ValueError(f"run directory {run_dir.path} exists and is not a directory")
    if run_dir.path.is_dir() and any(run_dir.path.iterdir()):
        raise ValueError(
            f"run directory {run_dir.path} already exists and is not empty; pass another --out or resume it"
        )
    run_dir.path.mkdir(parents=True, exist_ok=True)
    config = with_overrides(config, {"run.out": str(run_dir.path)})
    tmp = dump_yaml(config, run_dir.path / f".{CONFIG_FILE}.{secrets.token_hex(4)}")
    try:
        os.link(tmp, run_dir.config_file)
    except FileExistsError:
        raise ValueError(f"run directory {run_dir.path} was claimed by another run") from None
    finally:
        tmp.unlink(missing_ok=True)
    return run_dir


def open_run_dir(path: PathLike) -> RunDir:
    """An existing run directory (to resume or read): it must hold a config.yaml."""
    run_dir = RunDir(Path(path))
    if not run_dir.config_file.is_file():
        raise FileNotFoundError(f"not a run directory (no {CONFIG_FILE}): {run_dir.path}")
    return run_dir


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunResult:
    """One finished (or failed, or interrupted) job: a line of the results store."""

    run_dir: str  # relative to the results store when inside it, else absolute
    method: str
    task: str
    model: str
    seed: int
    params: dict[str, Any]
    steps_done: int
    final_eval: float | None
    best_eval: float | None
    eval_metric: str | None
    wall_s: float
    status: str
    finished_at: str
    tre_version: str
    # The whole resolved config, so a report can group by anything (max_new_tokens for Figure 1).
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def results_store_dir(config: RunConfig, run_dir: PathLike) -> Path:
    return Path(config.run.results_store) if config.run.results_store else Path(run_dir).parent


def _path_from_store(run_dir: Path, store_dir: Path) -> str:
    # Relative when inside the store, so a copied or moved runs/ folder still reads back.
    run_abs, store_abs = run_dir.resolve(), store_dir.resolve()
    if run_abs.is_relative_to(store_abs):
        return str(run_abs.relative_to(store_abs))
    return str(run_abs)


def append_result(store_dir: PathLike, result: RunResult | Mapping[str, Any]) -> Path:
    path = Path(store_dir) / RESULTS_STORE_FILE
    append_line(path, result.to_dict() if isinstance(result, RunResult) else dict(result))
    return path


def read_results(store_dir: PathLike, latest_per_run: bool = True) -> list[dict[str, Any]]:
    """The results store's records; by default only the last one per run directory."""
    records = read_jsonl(Path(store_dir) / RESULTS_STORE_FILE)
    if not latest_per_run:
        return records
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest.pop(record["run_dir"], None)  # re-insert so the order is that of the last line
        latest[record["run_dir"]] = record
    return list(latest.values())


def read_run(run_dir: PathLike) -> dict[str, Any]:
    """A run directory's content: config (dict), metrics, eval, result (None while running), checkpoints."""
    run = open_run_dir(run_dir)
    result = json.loads(run.result_file.read_text(encoding="utf-8")) if run.result_file.exists() else None
    return {
        "path": str(run.path),
        "config": read_yaml_file(run.config_file, "run config") or {},
        "metrics": read_jsonl(run.metrics_file),
        "eval": read_jsonl(run.eval_file),
        "result": result,
        "checkpoints": [step for step, _ in run.list_checkpoints()],
    }


# --------------------------------------------------------------------------- tracker


def _as_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    checked = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or "/" not in key.strip("/"):
            raise ValueError(f"metric key {key!r} must be namespaced like 'actor/p_max'")
        checked[key] = _as_number(key, value)
    return checked


class Tracker:
    """Logs one job: local files always, W&B when enabled. Use as a context manager.

        with Tracker(config) as tracker:                       # a fresh run directory
            tracker.log({"reward/mean": 0.4}, step=1)
            tracker.log_eval(step=1, score=0.31, metric="pass@1", n_prompts=5000, n_samples=8)
        # leaving the block writes result.json and appends to the results store

    Resuming: Tracker(config, run_dir, resume_step=N) reopens the directory and drops every
    metrics/eval record after step N (the checkpoint's), so no step is repeated or lost.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: PathLike | None = None,
        *,
        resume_step: int | None = None,
        store_dir: PathLike | None = None,
    ) -> None:
        self.config = config
        self._requested_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
        self.resume_step = resume_step
        self.run_dir: RunDir | None = None
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._wandb_run = None
        self._last_step: int | None = None
        self._last_eval_step: int | None = None
        self._started = 0.0
        self.result: RunResult | None = None

    # ---- lifecycle

    def __enter__(self) -> Tracker:
        self._started = time.monotonic()
        if self.resume_step is None:
            self.run_dir = create_run_dir(self._requested_dir, self.config)
            self.config = with_overrides(self.config, {"run.out": str(self.run_dir.path)})
        else:
            self.run_dir = open_run_dir(self._requested_dir)
            self.truncate_after(self.resume_step)
            self._last_step = self.resume_step
            evals = read_jsonl(self.run_dir.eval_file)
            self._last_eval_step = max((int(record["step"]) for record in evals), default=None)
        self._start_wandb()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.result is None:
            if exc_type is None:
                status = "finished"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "interrupted"
            else:
                status = "failed"
            self.finish(status)
        return False

    @property
    def path(self) -> Path:
        if self.run_dir is None:
            raise RuntimeError("the tracker is not started; use it as a context manager")
        return self.run_dir.path

    # ---- logging

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One line of metrics.jsonl for `step` (steps strictly increase); mirrored to W&B."""
        checked = _check_metrics(metrics)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} was already logged (last step {self._last_step}); log each step once")
        append_line(self.run_dir.metrics_file, {"step": int(step), "time": time.time(), **checked})
        self._last_step = step
        if self._wandb_run is not None:
            self._wandb_run.log(checked, step=int(step))

    def log_eval(
        self,
        step: int,
        score: float,
        metric: str,
        n_prompts: int,
        n_samples: int,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """One line of eval.jsonl; extra metrics are namespaced under eval/."""
        if self._last_eval_step is not None and step <= self._last_eval_step:
            raise ValueError(f"step {step} was already evaluated (last eval step {self._last_eval_step})")
        numbers_ = {"eval/score": _as_number("eval/score", score)}
        for key, value in (extra or {}).items():
            full = key if key.startswith("eval/") else f"eval/{key}"
            numbers_[full] = _as_number(full, value)
        record = {
            "step": int(step),
            "time": time.time(),
            "eval/score": numbers_["eval/score"],
            "eval/metric": str(metric),
            "eval/n_prompts": int(n_prompts),
            "eval/n_samples": int(n_samples),
            **{k: v for k, v in numbers_.items() if k != "eval/score"},
        }
        append_line(self.run_dir.eval_file, record)
        self._last_eval_step = step
        if self._wandb_run is not None:
            # W&B merges values logged at the current step, so this may follow log() for the same step.
            self._wandb_run.log(numbers_, step=int(step))

    def has_eval(self, step: int) -> bool:
        """Whether eval.jsonl holds a record for `step`."""
        return any(int(record["step"]) == step for record in read_jsonl(self.run_dir.eval_file))

    def truncate_after(self, step: int) -> None:
        """Drop metrics and eval records after `step` (resuming from the checkpoint of `step`)."""
        dropped = truncate_jsonl_after(self.run_dir.metrics_file, step)
        dropped += truncate_jsonl_after(self.run_dir.eval_file, step)
        if dropped:
            log.info("resume: dropped %d log records after step %d in %s", dropped, step, self.run_dir.path)

    # ---- the end

    def finish(self, status: str = "finished", steps_done: int | None = None, method: str | None = None) -> RunResult:
        """Write result.json, append to the results store, close W&B. Idempotent.

        `method` labels the result instead of the config's method (registry.BASE: an evaluation of
        an untrained model, the Base row of Table 1)."""
        if self.result is not None:
            return self.result
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        try:
            evals = read_jsonl(self.run_dir.eval_file)
            if method != BASE:  # step 0 of a training run is the starting model (eval.before_train)
                evals = [record for record in evals if record["step"] > 0]
            scores = [record["eval/score"] for record in evals if not math.isnan(record["eval/score"])]
            final = max(evals, key=lambda record: record["step"]) if evals else None
            if steps_done is None:
                steps_done = self._last_step if self._last_step is not None else 0
            store = self._store_dir or results_store_dir(self.config, self.run_dir.path)
            self.result = RunResult(
                run_dir=_path_from_store(self.run_dir.path, store),
                method=method or self.config.method.name,
                task=self.config.task.name,
                model=self.config.model.name,
                seed=self.config.run.seed,
                params={} if method == BASE else self.config.method.params,
                steps_done=int(steps_done),
                final_eval=final["eval/score"] if final else None,
                best_eval=max(scores) if scores else None,
                eval_metric=final["eval/metric"] if final else self.config.eval.metric,
                wall_s=round(time.monotonic() - self._started, 3),
                status=status,
                finished_at=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                tre_version=__version__,
                config=to_dict(self.config),
            )
            atomic_write_text(self.run_dir.result_file, json.dumps(self.result.to_dict(), indent=2) + "\n")
            append_result(store, self.result)
        finally:
            self._finish_wandb(status)
        return self.result

    # ---- W&B (the only place it is imported)

    def _start_wandb(self) -> None:
        settings = self.config.run.wandb
        if settings.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: logging to %s only (pip install wandb)", self.run_dir.path)
            return
        id_file = self.run_dir.path / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            atomic_write_text(id_file, run_id + "\n")
        self._wandb_run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            group=settings.group,
            dir=str(self.run_dir.path),
            name=self.run_dir.path.name,
            id=run_id,
            resume="allow",
            config=to_dict(self.config),
            tags=[self.config.task.name, self.config.method.name],
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )

    def _finish_wandb(self, status: str) -> None:
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            if self.result is not None:
                for key in ("final_eval", "best_eval", "steps_done", "status", "method"):  # method: BASE for tre eval
                    run.summary[key] = getattr(self.result, key)
            run.finish(exit_code=0 if status == "finished" else 1)


# --------------------------------------------------------------------------- W&B projects (tre report)

# A W&B run's state as a RunResult status; a run still going has no final result.
_WANDB_STATES = {
    "finished": "finished",
    "failed": "failed",
    "crashed": "failed",
    "killed": "interrupted",
    "running": "running",
}


def wandb_run_to_run(run: Any, metric_keys: tuple[str, ...] = CURVES) -> dict[str, Any] | None:
    """A W&B public-API run in read_run's shape; None for a run that is not a tre job (a report).

    `result` is built from the config and the summary that Tracker writes (final_eval, best_eval,
    status); a run that died before writing them falls back on its eval/score history.
    """
    config = dict(run.config or {})
    method = config.get("method")
    if not isinstance(method, Mapping) or "name" not in method:
        return None
    summary = dict(run.summary_metrics or {})
    # One scan per key: scan_history(keys=[...]) keeps only the rows holding every key, so a run
    # that never logged one of them (an older tre) would lose all its curves.
    by_step: dict[int, dict[str, Any]] = {}
    for key in metric_keys:
        for row in run.scan_history(keys=["_step", key]):
            if row.get(key) is not None:
                by_step.setdefault(int(row["_step"]), {"step": int(row["_step"])})[key] = row[key]
    metrics = [by_step[step] for step in sorted(by_step)]
    evals = [
        {"step": int(row["_step"]), "eval/score": row["eval/score"]}
        for row in run.scan_history(keys=["_step", "eval/score"])
    ]
    scores = [
        record["eval/score"]
        for record in evals
        if isinstance(record["eval/score"], numbers.Real) and record["step"] > 0
    ]
    section = lambda name: config.get(name) if isinstance(config.get(name), Mapping) else {}  # noqa: E731
    result = {
        "run_dir": run.url,
        "method": summary.get("method") or method["name"],
        "task": section("task").get("name"),
        "model": section("model").get("name"),
        "seed": section("run").get("seed"),
        "params": {k: v for k, v in method.items() if k != "name" and v is not None},
        "final_eval": summary.get("final_eval", scores[-1] if scores else None),
        "best_eval": summary.get("best_eval", max(scores) if scores else None),
        "eval_metric": section("eval").get("metric"),
        "status": summary.get("status") or _WANDB_STATES.get(run.state, run.state),
        "config": config,
    }
    return {"path": run.url, "config": config, "metrics": metrics, "eval": evals, "result": result, "checkpoints": []}


def read_wandb_project(path: str, metric_keys: tuple[str, ...] = CURVES) -> list[dict[str, Any]]:
    """Every tre job of a W&B project ("ENTITY/PROJECT"), each in read_run's shape."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise ValueError(f"--wandb expects ENTITY/PROJECT, got {path!r}")
    try:
        import wandb
    except ImportError:
        raise ValueError("reading a W&B project needs wandb: pip install wandb") from None
    try:
        runs = list(wandb.Api().runs(path))
    except Exception as error:  # the public API raises several types (auth, 404, network)
        raise ValueError(f"cannot read W&B project {path}: {error}") from None
    return [record for record in (wandb_run_to_run(run, metric_keys) for run in runs) if record is not None]


def log_report_to_wandb(
    project: str,
    entity: str | None,
    mode: str,
    directory: PathLike,
    tables: Mapping[str, tuple[list[str], list[list[Any]]]],
    images: Mapping[str, PathLike],
) -> str | None:
    """Log a report's tables (name -> (columns, rows)) and images (name -> PNG) as one W&B run of
    job type "report"; returns its id, or None when wandb is not installed (a warning)."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: the report is not logged to W&B (pip install wandb)")
        return None
    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(directory),
        job_type="report",
        name="report",
        settings=wandb.Settings(console="off", silent=True, disable_git=True),
    )
    try:
        payload: dict[str, Any] = {
            name: wandb.Table(columns=list(columns), data=[list(row) for row in rows])
            for name, (columns, rows) in tables.items()
        }
        payload.update({name: wandb.Image(str(path)) for name, path in images.items()})
        run.log(payload)
        return run.id
    finally:
        run.finish()
