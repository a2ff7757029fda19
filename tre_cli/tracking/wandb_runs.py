"""W&B, the mirror of the local files (the only module of tre that imports wandb, lazily: mode
"disabled" never imports it): a tracked job's W&B run (started and finished for the Tracker),
a W&B project read back in read_run's shape (`tre report --wandb`), and a report logged as a
run of its own."""

from __future__ import annotations

import logging
import numbers
import secrets
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli import metrics as M
from tre_cli.config import RunConfig, to_dict
from tre_cli.io import atomic_write_text
from tre_cli.metrics import CURVES
from tre_cli.tracking.run_dir import PathLike

log = logging.getLogger("tre")

WANDB_ID_FILE = "wandb_run_id"


# --------------------------------------------------------------------------- a tracked job's run


def start_wandb_run(config: RunConfig, run_dir: Path) -> Any | None:
    """The W&B run mirroring the job in `run_dir`, or None (mode "disabled"; wandb not installed,
    with a warning). Its id is kept in run_dir/wandb_run_id, so a resumed job continues it."""
    settings = config.run.wandb
    if settings.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: logging to %s only (pip install wandb)", run_dir)
        return None
    id_file = run_dir / WANDB_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(6)
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        mode=settings.mode,
        group=settings.group,
        dir=str(run_dir),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        config=to_dict(config),
        tags=[config.task.name, config.method.name],
        settings=wandb.Settings(console="off", silent=True, disable_git=True),
    )


def finish_wandb_run(run: Any, result: Any | None, status: str) -> None:
    """The job's result in the run's summary (when it has one), then the run finished."""
    if result is not None:
        for key in ("final_eval", "best_eval", "steps_done", "status", "method"):  # method: BASE for tre eval
            run.summary[key] = getattr(result, key)
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
        {"step": int(row["_step"]), M.EVAL_SCORE: row[M.EVAL_SCORE]}
        for row in run.scan_history(keys=["_step", M.EVAL_SCORE])
    ]
    scores = [
        record[M.EVAL_SCORE]
        for record in evals
        if isinstance(record[M.EVAL_SCORE], numbers.Real) and record["step"] > 0
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
