"""Ray, below the sweep and the trainer that both use it: `trials` runs a sweep's trials through
Ray Tune (tre_cli.sweep's backend), `workers` a run's workers (run.workers > 1) through Ray
Train (trainer.job). Those two modules are the only ones of tre that import ray; import them
once the environment Ray reads at import is set (sweep/launch.py does).

This package module itself imports nothing heavy: what the launcher of a worker group and its
workers agree on (the CPUs a worker takes, the error a failed group raises).
"""

from __future__ import annotations

# CPU cores each worker asks of Ray and uses for torch's intra-op threads. Set by the worker
# itself rather than left to the environment (Ray's OMP_NUM_THREADS default, a caller's own), so
# every launcher of the same run sums floats in the same order.
CPUS_PER_WORKER = 1


class WorkerFailure(RuntimeError):
    """A worker of a run.workers > 1 run failed (crashed, was killed, raised): the run failed."""


def failure_line(workers: int, report: str) -> str:
    """One line for a failed worker group: the first informative line of the launcher's report
    (not a heading ending in a colon), cut to 240 characters."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith(":")]
    detail = (informative or lines or ["no detail"])[0]
    return f"run.workers={workers}: a worker failed, so the run did: {detail[:240]}"
