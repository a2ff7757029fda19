"""A run of several workers, heard step by step from its run directory.

A sweep trial reports each step to Tune through `on_step(step, metrics, checkpoint_dir)`. With
one worker the trainer calls it itself; with run.workers > 1 the trainer runs in Ray Train's
workers, and rank 0 writes the run directory. So the trial's process starts the workers in a
thread and, in its own thread, follows rank 0's files: a step is reported once its line is in
metrics.jsonl and what the schedule says that step writes is there too (its eval.jsonl record,
its checkpoint), or a later step has been logged, or the workers have ended. The metrics are
those the one-worker path passes: the step's logged values plus `eval/score` when it evaluated.
Nothing here knows about Ray: the workers are any blocking `start()`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tre_cli import metrics as M
from tre_cli.config import RunConfig
from tre_cli.io import read_jsonl
from tre_cli.tracking import RunDir

# on_step(step, metrics, checkpoint_dir or None), as trainer.job.StepCallback.
StepReport = tuple[int, dict[str, float], Path | None]
NOT_METRICS = ("step", "time")


def evaluates_at(config: RunConfig, step: int) -> bool:
    """Whether the trainer evaluates after `step` (the loop in trainer.job)."""
    return bool(config.eval.every and step % config.eval.every == 0) or step == config.ppo.steps


def checkpoints_at(config: RunConfig, step: int) -> bool:
    """Whether the trainer saves a checkpoint after `step` (the loop in trainer.job)."""
    return bool(config.run.save_every and step % config.run.save_every == 0) or step == config.ppo.steps


class StepFollower:
    """Reads the steps after `after_step` from a run directory as rank 0 appends them."""

    def __init__(self, run_dir: Path, config: RunConfig, after_step: int = 0) -> None:
        self.run = RunDir(Path(run_dir))
        self.config = config
        self.last = after_step
        self._offset = 0
        self._pending: list[dict[str, Any]] = []

    def _new_records(self) -> None:
        """Complete lines appended to metrics.jsonl since the last read (a line still being
        written, without its newline, waits for the next read)."""
        path = self.run.metrics_file
        if not path.is_file():
            return
        with path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in chunk[: end + 1].decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if int(record["step"]) > self.last:
                    self._pending.append(record)

    def poll(self, ended: bool) -> list[StepReport]:
        """The steps ready to report, in order; `ended`: the workers have stopped, so every
        logged step is as complete as it will be."""
        self._new_records()
        ready: list[StepReport] = []
        evals: dict[int, dict[str, Any]] | None = None
        while self._pending:
            record = self._pending[0]
            step = int(record["step"])
            wants_eval, wants_checkpoint = evaluates_at(self.config, step), checkpoints_at(self.config, step)
            if evals is None and wants_eval:
                evals = {int(r["step"]): r for r in read_jsonl(self.run.eval_file)}
            later = len(self._pending) > 1
            complete = (ended or later
                        or ((not wants_eval or step in (evals or {}))
                            and (not wants_checkpoint or self.run.checkpoint_dir(step).is_dir())))
            if not complete:
                break
            self._pending.pop(0)
            metrics = {k: v for k, v in record.items() if k not in NOT_METRICS}
            if wants_eval and evals is not None and step in evals:
                metrics[M.EVAL_SCORE] = evals[step][M.EVAL_SCORE]
            ready.append((step, metrics, self.run.checkpoint_dir(step) if wants_checkpoint else None))
            self.last = step
        return ready


def run_and_follow(start: Callable[[], None], follower: StepFollower,
                   on_step: Callable[[int, dict[str, float], Path | None], None], poll_s: float = 1.0) -> None:
    """`start()` (blocking: the workers) in a thread; each step `follower` finds complete goes
    to `on_step` in this thread, the last ones after `start` returns; then `start`'s error, if
    any, is raised here. An error of `on_step` propagates at once (the caller's process, a Tune
    trial, then fails and its workers with it)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            start()
        except BaseException as error:  # re-raised in the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=target, name="tre-workers", daemon=True)
    thread.start()
    while True:
        thread.join(poll_s)
        ended = not thread.is_alive()
        for step, metrics, checkpoint in follower.poll(ended):
            on_step(step, metrics, checkpoint)
        if ended:
            break
    if failure:
        raise failure[0]
