"""A sweep's trials on Ray Tune (through tre_cli.cluster.trials, which holds the Ray calls);
the launcher (launch.py) imports this module once the environment Ray reads is set.

`drive` starts or joins a cluster and runs a Tuner whose function trainable (`train_trial`) calls
trainer.run in the trial's process (no subprocess, no argv, no log parsing); Tune's trial events
reach the live display through cluster.trials.TrialEvents.

Checkpoints: the trainer checkpoints the run directory itself; the Ray checkpoint that goes with
it only records where that run directory is. A retried trial (FailureConfig.max_failures) or a
trial of a resumed sweep (Tuner.restore) continues its run directory with `run.resume`, so its
metrics are those of an uninterrupted run. A run directory whose result.json says "finished" is
never trained again.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from tre_cli import metrics as M
from tre_cli.cluster import trials
# Tune state saved before the Ray calls moved to tre_cli.cluster names these two here.
from tre_cli.cluster.trials import TrialEvents as SweepProgressCallback  # noqa: F401
from tre_cli.cluster.trials import trial_name as _trial_name  # noqa: F401
from tre_cli.config import from_dict, to_dict, with_overrides
from tre_cli.sweep.display import SweepDisplay, TrialProgress
from tre_cli.sweep.grid import RUNS_DIR, PlannedTrial, SweepPlan, concurrency_limit
from tre_cli.sweep.outcome import FAIL_ONCE_ENV, FAIL_ONCE_MARKER, SweepOutcome, finished_result
from tre_cli.sweep.spec import PathLike, Resources


def _pointer_file(directory: PathLike) -> Path:
    return Path(directory) / "tre_run.json"


def train_trial(trial_config: dict[str, Any]) -> None:
    """Ray Tune's function trainable: one tre run, resumed where a previous attempt left it."""
    import torch
    from rich.console import Console

    from tre_cli import trainer

    spec = trial_config["trial"]
    name = spec["name"]
    run_dir = Path(spec["run_dir"])
    torch.set_num_threads(max(1, int(spec.get("cpus", 1))))
    config = from_dict(spec["config"], f"trial {name}")
    steps = config.ppo.steps

    finished = finished_result(run_dir)
    if finished is not None:  # a resumed sweep whose trial had finished before Tune saved that
        trials.report({"step": finished["steps_done"], "steps": steps, M.EVAL_SCORE: finished.get("final_eval")})
        return

    console = Console(stderr=True, force_terminal=False, width=200)
    if spec.get("kind") == "eval":
        _set_aside_failed_attempt(run_dir)
        result = trainer.evaluate_model(config, console=console)
        trials.report({"step": 0, "steps": 0, M.EVAL_SCORE: result.final_eval})
        return

    with trials.restored_checkpoint() as directory:
        recorded = None if directory is None else Path(
            json.loads(_pointer_file(directory).read_text(encoding="utf-8"))["run_dir"])
    if recorded is not None and recorded != run_dir:
        raise ValueError(f"trial {name}: its Ray checkpoint points at {recorded}, not {run_dir}")
    # A run directory with a config is an earlier attempt of this trial (a fresh sweep refuses a
    # non-empty --out); it may have crashed before its first checkpoint, which resume handles too.
    if recorded is not None or (run_dir / "config.yaml").is_file():
        config = with_overrides(config, {"run.resume": str(run_dir)})

    fail_at = spec.get("fail_once_at_step")

    def on_step(step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        payload = {**metrics, "step": step, "steps": steps}
        if checkpoint_dir is None:
            trials.report(payload)
        else:
            import tempfile

            # Ray copies the directory into its storage during report(); ours holds one pointer.
            with tempfile.TemporaryDirectory(dir=run_dir, prefix=".ray-checkpoint-") as pointer_dir:
                _pointer_file(pointer_dir).write_text(json.dumps({"run_dir": str(run_dir), "step": step}))
                trials.report(payload, Path(pointer_dir))
        if fail_at is not None and step == int(fail_at) and not (run_dir / FAIL_ONCE_MARKER).exists():
            (run_dir / FAIL_ONCE_MARKER).write_text(f"{step}\n")
            raise RuntimeError(f"{FAIL_ONCE_ENV}={fail_at}: trial {name} fails once after step {step} (a test hook)")

    trainer.run(config, on_step=on_step, console=console, workers_gpu=spec.get("workers_gpu"))


def _set_aside_failed_attempt(run_dir: Path) -> None:
    """An evaluation has no checkpoint to continue: a failed attempt's directory moves to
    runs/.attempts/ (kept for its error, skipped by `tre report`) and the evaluation starts over."""
    if run_dir.exists() and any(run_dir.iterdir()):
        attempts = run_dir.parent / ".attempts"
        attempts.mkdir(parents=True, exist_ok=True)
        os.rename(run_dir, attempts / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def trial_param(planned: PlannedTrial, resources: Resources, fail_once_at_step: int | None) -> dict[str, Any]:
    """What Tune's param space holds for one trial: plain data only (it is pickled and restored)."""
    reserved = trial_resources(planned, resources)
    return {
        "name": planned.trial.name,
        "run_dir": str(planned.run_dir),
        "cpus": reserved.cpu,
        "gpus": reserved.gpu,
        # run.workers > 1: the trial's process only starts and follows the workers, which take
        # one GPU each when the sweep's trials take GPUs (resources.gpu > 0), else CPUs.
        "workers_gpu": resources.gpu > 0 if planned.config.run.workers > 1 else None,
        "config": to_dict(planned.config),
        "fail_once_at_step": fail_once_at_step,
        "kind": planned.trial.kind,
    }


def trial_resources(planned: PlannedTrial, resources: Resources) -> Resources:
    """What Tune reserves for a trial's own process: the sweep's resources, or nothing for a
    trial of run.workers > 1 (its workers ask Ray Train for theirs: see worker_demand)."""
    if planned.config.run.workers > 1 and planned.trial.kind == "train":
        return Resources(cpu=0.0, gpu=0.0)
    return resources


def _storage(plan: SweepPlan, storage: str | None) -> str:
    """Tune's storage_path: local (default <out>/ray), a shared directory, or a cloud URI."""
    if storage is None:
        return str(plan.out / "ray")
    return storage if "://" in storage else str(Path(storage).absolute())


def drive(
    plan: SweepPlan,
    outcome: SweepOutcome,
    *,
    env: dict[str, str],
    fail_once: int | None,
    resume: bool,
    address: str | None,
    storage: str | None,
    console: Any,
    num_cpus: int | None,
    temp_dir: Path | None,
    refresh_auth: bool,
) -> None:
    """Start or join the cluster, run the Tuner (or restore it), fill `outcome` trial by trial."""
    trials.connect(address=address, env=env, num_cpus=num_cpus, temp_dir=temp_dir, refresh_auth=refresh_auth)
    names = [p.trial.name for p in plan.trials]
    display = SweepDisplay(f"tre sweep {plan.spec.name} ({plan.spec.preset}): {len(names)} trials", names, console)
    for planned in plan.trials:  # a resumed sweep's finished trials send no events
        finished = finished_result(planned.run_dir)
        if finished is not None:
            display.trials[planned.trial.name] = TrialProgress(
                planned.trial.name,
                "done",
                finished["steps_done"],
                planned.config.ppo.steps,
                score=finished.get("final_eval"),
            )
    try:
        max_concurrent = concurrency_limit(plan, trials.cluster_resources())
        storage_path = _storage(plan, storage)
        experiment = trials.experiment_path(storage_path)
        if resume and trials.can_restore(storage_path):
            tuner = trials.tuner(train_trial, _reservation, None, storage_path=storage_path,
                                 max_concurrent=max_concurrent, max_failures=plan.max_failures)
            console.print(f"resuming {plan.out} ({experiment})")
        else:
            if resume:  # killed before Tune saved its state: the trials resume their run directories
                console.print(
                    f"no Tune state in {experiment} yet: starting it again; trials continue their run directories"
                )
            params = [trial_param(p, plan.resources, fail_once) for p in plan.trials]
            tuner = trials.tuner(train_trial, _reservation, params, storage_path=storage_path,
                                 max_concurrent=max_concurrent, max_failures=plan.max_failures)
        with display:
            results = trials.fit(tuner, display.update)
        for name, failed in results:
            if failed:
                outcome.failed.append(name)
            elif finished_result(plan.out / RUNS_DIR / name):
                outcome.finished.append(name)
            else:
                outcome.unfinished.append(name)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        trials.shutdown()


def _reservation(trial_config: dict[str, Any]):
    """Tune's resource request for one trial (its param space entry: see trial_param)."""
    spec = trial_config["trial"]
    return trials.placement(spec["cpus"], spec["gpus"])
