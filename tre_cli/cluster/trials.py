"""Ray Tune: a sweep's trials (tre_cli.sweep.ray_backend says what a trial does).

The driver side: `connect` starts or joins a cluster, `tuner` makes a Tuner over the trials'
parameters (or restores a saved one), `fit` runs it while `TrialEvents` forwards Tune's trial
events to a listener. The trial side: `report` sends a step's metrics (with a checkpoint
directory, when there is one), `restored_checkpoint` opens the checkpoint a retried trial
starts from.

Tune's param space is {"trial": grid_search([params, ...])}; each trial's params carry its
"name", which names the trial, its directory and its events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune

EXPERIMENT_NAME = "tune"
# What Tune reserves for a trial that asks for no CPU and no GPU (see placement).
DRIVER_MEMORY_BYTES = 2**20

# Where TrialEvents forwards while `fit` runs: listener(trial name, event, result, failures=, error=).
_LISTENER: Callable[..., None] | None = None


def connect(*, address: str | None, env: dict[str, str], num_cpus: int | None, temp_dir: Path | None,
            refresh_auth: bool) -> None:
    """Start a local cluster (in `temp_dir`, with `num_cpus`) or join the one at `address`, whose
    workers get `env`. A ValueError names a cluster that cannot be started or joined."""
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


def cluster_resources() -> dict[str, float]:
    """What the connected cluster holds ({"CPU": ..., "GPU": ..., ...})."""
    return ray.cluster_resources()


def shutdown() -> None:
    ray.shutdown()


def placement(cpus: float, gpus: float) -> tune.PlacementGroupFactory:
    """Tune's resource request for one trial's process."""
    bundle = {"CPU": float(cpus), "GPU": float(gpus)}
    if not any(bundle.values()):
        # Tune refuses an empty request; a trial that only follows its workers holds a token of
        # memory, which every node has, so it takes no CPU or GPU from its workers.
        bundle = {"memory": float(DRIVER_MEMORY_BYTES)}
    return tune.PlacementGroupFactory([bundle])


def experiment_path(storage_path: str) -> str:
    return storage_path.rstrip("/") + "/" + EXPERIMENT_NAME


def can_restore(storage_path: str) -> bool:
    """Whether Tune saved an experiment under `storage_path` that a resumed sweep can restore."""
    return tune.Tuner.can_restore(experiment_path(storage_path))


def tuner(trainable: Callable[[dict[str, Any]], None], reservation: Callable[[dict[str, Any]], Any],
          params: list[dict[str, Any]] | None, *, storage_path: str, max_concurrent: int | None,
          max_failures: int) -> tune.Tuner:
    """A Tuner running `trainable` once per entry of `params`, each trial reserving
    `reservation(its config)`; `params=None` restores the saved experiment instead (its
    unfinished and failed trials run again)."""
    resourced = tune.with_resources(trainable, reservation)
    if params is None:
        return tune.Tuner.restore(experiment_path(storage_path), trainable=resourced, resume_unfinished=True,
                                  resume_errored=True)
    return tune.Tuner(
        resourced,
        param_space={"trial": tune.grid_search(params)},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[TrialEvents()],
            verbose=0,
            log_to_file=True,
        ),
    )


def fit(tuner: tune.Tuner, listener: Callable[..., None]) -> list[tuple[str, bool]]:
    """Run the Tuner with its trial events sent to `listener`; (trial name, failed) per trial."""
    global _LISTENER
    _LISTENER = listener
    try:
        results = tuner.fit()
    finally:
        _LISTENER = None
    return [((result.config or {}).get("trial", {}).get("name", "?"), result.error is not None) for result in results]


class TrialEvents(tune.Callback):
    """Forwards Tune's trial events to the listener of `fit`. It is pickled into Tune's experiment
    state (tuner.pkl), so it holds no reference itself: a restored sweep's callback finds the
    current driver's listener in _LISTENER."""

    def _show(self, trial: Any, event: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        if _LISTENER is not None:
            _LISTENER(trial_name(trial), event, result, failures=int(getattr(trial, "num_failures", 0) or 0),
                      error=error)

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


def trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _error_line(trial) -> str:
    """The last line of a failed trial's error file, if Tune wrote one."""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8").strip().splitlines() if path else []
    except OSError:
        text = []
    return text[-1][:200] if text else "error"


# ----------------------------------------------------------------------------- inside a trial


def report(metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
    """A trial's metrics to Tune; with `checkpoint_dir`, Tune copies that directory into its
    storage as the trial's checkpoint (during this call)."""
    if checkpoint_dir is None:
        tune.report(metrics)
    else:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


@contextlib.contextmanager
def restored_checkpoint() -> Iterator[Path | None]:
    """The directory of the checkpoint this trial was restored from (None: a first attempt)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)
