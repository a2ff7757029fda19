"""`tre sweep`: a grid of `tre run` jobs from sweeps/<name>.yaml, run as Ray Tune trials.

ray is imported by tre_cli.cluster (below this package and the trainer), and only once a sweep
starts: the grid, the validation and `--dry-run` work without it. The flow:

    sweeps/<name>.yaml + preset + --task/--seeds/--set
      -> expand_grid(): one Trial (name, config values) per task x model x T x variant x seed
      -> plan_sweep(): every trial's RunConfig resolved and its task options checked BEFORE Ray
         starts (bad input is one line, and nothing is written)
      -> run_sweep(): a Tuner whose function trainable calls trainer.run(config, on_step=...) in the
         trial's process (no subprocess, no argv, no log parsing). Each trial's tre run directory
         is <out>/runs/<trial>; the results store is <out>/runs/results.jsonl.

Checkpoints: the trainer checkpoints the run directory itself; the Ray checkpoint that goes with
it only records where that run directory is. A retried trial (FailureConfig.max_failures) or a
trial of a resumed sweep (`--resume`, Tuner.restore) continues its run directory with
`run.resume`, so its metrics are those of an uninterrupted run. A run directory whose result.json
says "finished" is never trained again.

Layout of <out>:

    sweep.json      what was asked (name, preset, tasks, seeds, sets) and the trial list; --resume
                    checks that it is asked the same again
    runs/<trial>/   tre run directories (config.yaml, metrics.jsonl, checkpoints/, wandb/...)
    runs/results.jsonl   one line per finished (or failed) attempt; the last line per run wins
    ray/tune/       Ray Tune's experiment state (storage_path; --storage puts it elsewhere)
    .ray/           Ray's session files (temp dir), its token, W&B's caches: never /tmp or ~

Test hook: TRE_SWEEP_FAIL_ONCE_AT_STEP=N (read by the driver, passed to every trial) makes each
trial raise once right after step N (a marker file in its run directory makes it once), so
retries from a checkpoint can be tested without monkeypatching.

    spec.py         the sweep file's schema and presets -> SweepSpec
    grid.py         the trials and the plan (every trial's config resolved before anything runs), and
                    how many of its trials a cluster runs at once
    display.py      the live table of trials
    outcome.py      a trial's finished run, the sweep's tally, the fail-once test hook
    launch.py       the checks before Ray, the manifest, the environment; then the backend
    ray_backend.py  what a Tune trial does (the trainable) and the driver (through tre_cli.cluster.trials)
"""

from __future__ import annotations

from typing import Any

from tre_cli.sweep.display import STATUS_STYLES, SweepDisplay, TrialProgress, progress_counts, progress_table
from tre_cli.sweep.grid import (
    RUNS_DIR,
    SWEEP_FILE,
    PlannedTrial,
    SweepPlan,
    Trial,
    check_out_dir,
    default_out,
    expand_grid,
    plan_sweep,
    resume_command,
    select_tasks,
)
from tre_cli.sweep.launch import check_local_resources, run_sweep, temp_link_path
from tre_cli.sweep.outcome import FAIL_ONCE_ENV, SweepOutcome, fail_once_from_env
from tre_cli.sweep.spec import (
    BASE_VARIANT,
    SWEEP_KEYS,
    Resources,
    SweepSpec,
    Variant,
    available_sweeps,
    load_sweep,
    safe_name,
    sweep_path,
    sweeps_dir,
)

__all__ = [
    "BASE_VARIANT",
    "FAIL_ONCE_ENV",
    "RUNS_DIR",
    "STATUS_STYLES",
    "SWEEP_FILE",
    "SWEEP_KEYS",
    "PlannedTrial",
    "Resources",
    "SweepDisplay",
    "SweepOutcome",
    "SweepPlan",
    "SweepSpec",
    "Trial",
    "TrialProgress",
    "Variant",
    "available_sweeps",
    "check_local_resources",
    "check_out_dir",
    "default_out",
    "expand_grid",
    "fail_once_from_env",
    "load_sweep",
    "plan_sweep",
    "progress_counts",
    "progress_table",
    "resume_command",
    "run_sweep",
    "safe_name",
    "select_tasks",
    "sweep_path",
    "sweeps_dir",
    "temp_link_path",
]


def __getattr__(name: str) -> Any:
    # Tune state pickled by tre 0.1.0 names the callback tre_cli.sweep.SweepProgressCallback.
    if name == "SweepProgressCallback":
        from tre_cli.sweep.ray_backend import SweepProgressCallback

        return SweepProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
