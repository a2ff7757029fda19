"""Ray: a sweep's trials as Ray Tune trials, and a run's workers (run.workers > 1) as a Ray
Train TorchTrainer (`run_workers`, issue 12). The only module of tre that imports ray; the
launcher (launch.py) imports it once the environment Ray reads is set.

`drive` starts or joins a cluster and runs a Tuner whose function trainable (`train_trial`) calls
trainer.run in the trial's process (no subprocess, no argv, no log parsing); Tune's trial events
reach the live display through `SweepProgressCallback`.

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

import ray
from ray import tune

from tre_cli.config import from_dict, to_dict, with_overrides
from tre_cli.sweep.display import SweepDisplay, TrialProgress
from tre_cli.sweep.grid import RUNS_DIR, PlannedTrial, SweepPlan
from tre_cli.sweep.launch import FAIL_ONCE_ENV, FAIL_ONCE_MARKER, SweepOutcome, concurrency_limit, finished_result
from tre_cli.sweep.spec import PathLike, Resources

EXPERIMENT_NAME = "tune"
# What Tune reserves for the process of a trial whose run.workers > 1 (see _reservation).
DRIVER_MEMORY_BYTES = 2**20

# The display the callback forwards to while `drive` runs (see SweepProgressCallback).
_ACTIVE_DISPLAY: SweepDisplay | None = None


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
        tune.report({"step": finished["steps_done"], "steps": steps, "eval/score": finished.get("final_eval")})
        return

    console = Console(stderr=True, force_terminal=False, width=200)
    if spec.get("kind") == "eval":
        _set_aside_failed_attempt(run_dir)
        result = trainer.evaluate_model(config, console=console)
        tune.report({"step": 0, "steps": 0, "eval/score": result.final_eval})
        return

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            recorded = Path(json.loads(_pointer_file(directory).read_text(encoding="utf-8"))["run_dir"])
        if recorded != run_dir:
            raise ValueError(f"trial {name}: its Ray checkpoint points at {recorded}, not {run_dir}")
    # A run directory with a config is an earlier attempt of this trial (a fresh sweep refuses a
    # non-empty --out); it may have crashed before its first checkpoint, which resume handles too.
    if checkpoint is not None or (run_dir / "config.yaml").is_file():
        config = with_overrides(config, {"run.resume": str(run_dir)})

    fail_at = spec.get("fail_once_at_step")

    def on_step(step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        payload = {**metrics, "step": step, "steps": steps}
        if checkpoint_dir is None:
            tune.report(payload)
        else:
            import tempfile

            # Ray copies the directory into its storage during report(); ours holds one pointer.
            with tempfile.TemporaryDirectory(dir=run_dir, prefix=".ray-checkpoint-") as pointer_dir:
                _pointer_file(pointer_dir).write_text(json.dumps({"run_dir": str(run_dir), "step": step}))
                tune.report(payload, checkpoint=tune.Checkpoint.from_directory(pointer_dir))
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
    global _ACTIVE_DISPLAY
    if refresh_auth:
        # Something imported ray before the launcher set the environment (vLLM does), so its
        # cached config and token loader still hold the auth mode of that import while the
        # cluster we start reads ours: refresh both, as ray's own token-auth setup does after it
        # sets RAY_AUTH_MODE (ray._private.authentication; there is no public call for it).
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    init_kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                                       logging_level="ERROR")
    if address is not None:
        init_kwargs["address"] = address
        # Workers of a cluster started elsewhere do not inherit this process's environment (W&B's
        # cache folders excepted: they are paths on this machine).
        cache_vars = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
        init_kwargs["runtime_env"] = {"env_vars": {k: v for k, v in env.items() if k not in cache_vars}}
    else:
        init_kwargs["_temp_dir"] = str(temp_dir)
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**init_kwargs)
    except Exception as error:  # ray raises ConnectionError, RuntimeError, ValueError... for a bad cluster
        raise ValueError(
            f"cannot start or join the Ray cluster{' at ' + address if address else ''}: {error}"
        ) from None

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
    _ACTIVE_DISPLAY = display
    try:
        trainable = tune.with_resources(train_trial, _reservation)
        max_concurrent = concurrency_limit(plan, ray.cluster_resources())
        storage_path = _storage(plan, storage)
        experiment = storage_path.rstrip("/") + "/" + EXPERIMENT_NAME
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
            console.print(f"resuming {plan.out} ({experiment})")
        else:
            if resume:  # killed before Tune saved its state: the trials resume their run directories
                console.print(
                    f"no Tune state in {experiment} yet: starting it again; trials continue their run directories"
                )
            params = [trial_param(p, plan.resources, fail_once) for p in plan.trials]
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(params)},
                tune_config=tune.TuneConfig(
                    num_samples=1,
                    max_concurrent_trials=max_concurrent,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_NAME,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[SweepProgressCallback()],
                    verbose=0,
                    log_to_file=True,
                ),
            )
        with display:
            results = tuner.fit()
        for result in results:
            name = (result.config or {}).get("trial", {}).get("name", "?")
            if result.error is not None:
                outcome.failed.append(name)
            elif finished_result(plan.out / RUNS_DIR / name):
                outcome.finished.append(name)
            else:
                outcome.unfinished.append(name)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        _ACTIVE_DISPLAY = None
        ray.shutdown()


class SweepProgressCallback(tune.Callback):
    """Forwards Tune's trial events to the driver's display. It is pickled into Tune's experiment
    state (tuner.pkl), so it holds no reference itself: a restored sweep's callback finds the
    current driver's display in _ACTIVE_DISPLAY."""

    def _show(self, trial: Any, event: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        if _ACTIVE_DISPLAY is not None:
            _ACTIVE_DISPLAY.update(_trial_name(trial), event, result,
                                   failures=int(getattr(trial, "num_failures", 0) or 0), error=error)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trial, "start")

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trial, "retry", error=_error_line(trial))

    def on_trial_restore(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trial, "start")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self._show(trial, "result", result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trial, "complete", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trial, "error", trial.last_result, error=_error_line(trial))


def _reservation(trial_config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """Tune's resource request for one trial (its param space entry: see trial_param)."""
    spec = trial_config["trial"]
    bundle = {"CPU": float(spec["cpus"]), "GPU": float(spec["gpus"])}
    if not any(bundle.values()):
        # Tune refuses an empty request; a trial that only follows its workers holds a token of
        # memory, which every node has, so it takes no CPU or GPU from its workers.
        bundle = {"memory": float(DRIVER_MEMORY_BYTES)}
    return tune.PlacementGroupFactory([bundle])


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _error_line(trial) -> str:
    """The last line of a failed trial's error file, if Tune wrote one."""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8").strip().splitlines() if path else []
    except OSError:
        text = []
    return text[-1][:200] if text else "error"


def run_workers(worker: Any, payload: dict[str, Any], workers: int, *, use_gpu: bool) -> None:
    """issue 12: `worker(payload)` in `workers` processes through Ray Train's TorchTrainer (one
    GPU a worker and NCCL on CUDA, gloo on CPU), on the cluster this process is connected to or
    on a local one started (and stopped) here. A worker that fails fails the run: one line
    with Ray's first line of it (a WorkerFailure; no retry here: `tre run --resume` continues
    from the last checkpoint)."""
    import tempfile

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tre_cli.trainer.distributed import CPUS_PER_WORKER

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True,
                 configure_logging=True, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="tre-ray-train-") as storage:
            trainer = TorchTrainer(
                worker,
                train_loop_config=payload,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                             resources_per_worker=None if use_gpu else {"CPU": CPUS_PER_WORKER}),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                run_config=RunConfig(name=f"tre-{secrets.token_hex(4)}", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=0)),
            )
            try:
                trainer.fit()
            except ray.train.TrainingFailedError as error:
                from tre_cli.trainer.distributed import WorkerFailure, failure_line

                raise WorkerFailure(failure_line(workers, str(error))) from None
    finally:
        if started:
            ray.shutdown()
