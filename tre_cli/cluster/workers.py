"""Ray Train: a run's workers (run.workers > 1) as one TorchTrainer worker group (trainer.job)."""

from __future__ import annotations

import os
import secrets
from typing import Any

import ray

from tre_cli.cluster import CPUS_PER_WORKER, WorkerFailure, failure_line


def run_workers(worker: Any, payload: dict[str, Any], workers: int, *, use_gpu: bool) -> None:
    """`worker(payload)` in `workers` processes through Ray Train's TorchTrainer (one GPU a
    worker and NCCL on CUDA, gloo on CPU), on the cluster this process is connected to or on a
    local one started (and stopped) here. A worker that fails fails the run: one line with
    Ray's first line of it (a WorkerFailure; no retry here: `tre run --resume` continues from
    the last checkpoint)."""
    import tempfile

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
                raise WorkerFailure(failure_line(workers, str(error))) from None
    finally:
        if started:
            ray.shutdown()
