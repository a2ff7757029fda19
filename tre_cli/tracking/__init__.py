"""Run directories, metric logs, checkpoints' places, the results store, and W&B.

The local files are the source of truth; W&B is a mirror. By concern:

    run_dir.py     a run directory: its files, claiming and opening one, reading it back (read_run)
    results.py     the results store (RunResult, results.jsonl)
    tracker.py     the Tracker: one job's logs, its result, its W&B mirror
    wandb_runs.py  W&B (the only module importing wandb, lazily): a job's run, a project read
                   back for `tre report --wandb`, a report logged as a run

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

from tre_cli.tracking.results import (
    RESULTS_STORE_FILE,
    STATUSES,
    RunResult,
    append_result,
    read_results,
    results_store_dir,
)
from tre_cli.tracking.run_dir import (
    CONFIG_FILE,
    EVAL_FILE,
    METRICS_FILE,
    RESULT_FILE,
    RunDir,
    create_run_dir,
    default_run_dir,
    model_label,
    open_run_dir,
    read_run,
)
from tre_cli.tracking.tracker import Tracker
from tre_cli.tracking.wandb_runs import WANDB_ID_FILE, log_report_to_wandb, read_wandb_project, wandb_run_to_run

__all__ = [
    "CONFIG_FILE",
    "EVAL_FILE",
    "METRICS_FILE",
    "RESULTS_STORE_FILE",
    "RESULT_FILE",
    "STATUSES",
    "WANDB_ID_FILE",
    "RunDir",
    "RunResult",
    "Tracker",
    "append_result",
    "create_run_dir",
    "default_run_dir",
    "log_report_to_wandb",
    "model_label",
    "open_run_dir",
    "read_results",
    "read_run",
    "read_wandb_project",
    "results_store_dir",
    "wandb_run_to_run",
]
