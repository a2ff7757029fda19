"""The Tracker: one job's metrics and evaluations to its run directory (always) and W&B (when
enabled), then its RunResult to result.json and the results store."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli import metrics as M
from tre_cli import __version__
from tre_cli.config import RunConfig, to_dict, with_overrides
from tre_cli.io import append_line, atomic_write_text, read_jsonl, truncate_jsonl_after
from tre_cli.losses.registry import BASE
from tre_cli.tracking.results import STATUSES, RunResult, append_result, path_from_store, results_store_dir
from tre_cli.tracking.run_dir import PathLike, RunDir, create_run_dir, default_run_dir, open_run_dir
from tre_cli.tracking.wandb_runs import finish_wandb_run, start_wandb_run

log = logging.getLogger("tre")


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
        numbers_ = {M.EVAL_SCORE: _as_number(M.EVAL_SCORE, score)}
        for key, value in (extra or {}).items():
            full = key if key.startswith("eval/") else f"eval/{key}"
            numbers_[full] = _as_number(full, value)
        record = {
            "step": int(step),
            "time": time.time(),
            M.EVAL_SCORE: numbers_[M.EVAL_SCORE],
            "eval/metric": str(metric),
            "eval/n_prompts": int(n_prompts),
            "eval/n_samples": int(n_samples),
            **{k: v for k, v in numbers_.items() if k != M.EVAL_SCORE},
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
            scores = [record[M.EVAL_SCORE] for record in evals if not math.isnan(record[M.EVAL_SCORE])]
            final = max(evals, key=lambda record: record["step"]) if evals else None
            if steps_done is None:
                steps_done = self._last_step if self._last_step is not None else 0
            store = self._store_dir or results_store_dir(self.config, self.run_dir.path)
            self.result = RunResult(
                run_dir=path_from_store(self.run_dir.path, store),
                method=method or self.config.method.name,
                task=self.config.task.name,
                model=self.config.model.name,
                seed=self.config.run.seed,
                params={} if method == BASE else self.config.method.params,
                steps_done=int(steps_done),
                final_eval=final[M.EVAL_SCORE] if final else None,
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

    # ---- the W&B mirror (tracking/wandb_runs.py)

    def _start_wandb(self) -> None:
        self._wandb_run = start_wandb_run(self.config, self.run_dir.path)

    def _finish_wandb(self, status: str) -> None:
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            finish_wandb_run(run, self.result, status)
