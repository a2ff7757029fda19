"""Starts a run's workers for tests without Ray (issue 12): torch.multiprocessing processes with
a gloo process group, each calling the worker entry Ray Train calls (trainer.job.worker_main).
Ray's own start-up is tested once, in test_workers.py's Ray test; the numerics need only
torch.distributed."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, payload: dict, env: dict) -> None:
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from tre_cli.trainer.job import worker_main

        worker_main(payload)
    finally:
        if dist.is_initialized():  # an in-process vLLM engine destroys it when it closes (as Ray Train guards too)
            dist.destroy_process_group()


def run_workers_locally(config, run_dir, world: int, resuming: bool = False, env: dict | None = None) -> None:
    """What trainer.run does for run.workers > 1, with processes instead of Ray actors."""
    import torch.multiprocessing as mp

    from tre_cli.config import to_dict

    payload = {"config": to_dict(config), "run_dir": str(run_dir), "resuming": resuming}
    mp.spawn(_worker, args=(world, free_port(), payload, {"OMP_NUM_THREADS": "1", **(env or {})}), nprocs=world)
