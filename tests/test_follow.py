"""trainer.follow: how a sweep trial hears the steps of its run.workers > 1 run from rank 0's run
directory (issue 12), and how a sweep sizes such trials for Tune. No Ray, no model: the run
directory is written here as rank 0's Tracker would."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tre_cli import metrics as M
from tre_cli.config import resolve
from tre_cli.trainer.follow import StepFollower, checkpoints_at, evaluates_at, run_and_follow

from test_trainer import OVERLAY


def _config(steps=5, extra=()):
    return resolve(task="countdown", method="vanilla", model="testbed", preset="smoke", task_overlay=OVERLAY,
                   overrides=[f"ppo.steps={steps}", "eval.every=2", "run.save_every=3", *extra])


def _log(run_dir: Path, step: int, **values) -> None:
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "time": time.time(), M.REWARD_MEAN: step / 10, **values}) + "\n")


def _eval(run_dir: Path, step: int, score: float) -> None:
    with (run_dir / "eval.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "time": time.time(), M.EVAL_SCORE: score}) + "\n")


def test_the_schedule_is_the_trainers():
    config = _config()
    assert [s for s in range(1, 6) if evaluates_at(config, s)] == [2, 4, 5]
    assert [s for s in range(1, 6) if checkpoints_at(config, s)] == [3, 5]
    none = _config(extra=["eval.every=0", "run.save_every=0"])
    assert [s for s in range(1, 6) if evaluates_at(none, s) or checkpoints_at(none, s)] == [5]


def test_a_step_is_reported_once_what_it_writes_is_there(tmp_path):
    follower = StepFollower(tmp_path, _config())
    assert follower.poll(ended=False) == []  # nothing written yet
    _log(tmp_path, 1)
    ((step, metrics, checkpoint),) = follower.poll(ended=False)  # step 1 writes nothing else
    assert (step, checkpoint) == (1, None) and metrics == {M.REWARD_MEAN: 0.1}
    _log(tmp_path, 2)
    assert follower.poll(ended=False) == []  # step 2 evaluates: wait for its record
    _eval(tmp_path, 2, 0.25)
    ((step, metrics, checkpoint),) = follower.poll(ended=False)
    assert step == 2 and metrics[M.EVAL_SCORE] == 0.25 and checkpoint is None
    _log(tmp_path, 3)
    assert follower.poll(ended=False) == []  # step 3 checkpoints: wait for step_3/
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    assert follower.poll(ended=False) == [(3, {M.REWARD_MEAN: 0.3}, tmp_path / "checkpoints" / "step_3")]
    # A later line completes a step whose files are gone (a pruned checkpoint) or never came.
    _log(tmp_path, 4)
    _log(tmp_path, 5)
    assert [r[0] for r in follower.poll(ended=False)] == [4]
    # A line cut off mid-write waits; the workers' end reports what there is.
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "reward/me')
    ((step, metrics, checkpoint),) = follower.poll(ended=True)
    assert step == 5 and M.EVAL_SCORE not in metrics and checkpoint == tmp_path / "checkpoints" / "step_5"
    assert follower.poll(ended=True) == []


def test_a_resumed_attempt_reports_only_the_steps_after_its_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _log(tmp_path, step)
    follower = StepFollower(tmp_path, _config(), after_step=3)
    _log(tmp_path, 4)
    assert [r[0] for r in follower.poll(ended=True)] == [4]


def test_steps_reach_the_caller_while_the_workers_run_and_errors_come_back(tmp_path):
    config = _config(steps=3, extra=["eval.every=0", "run.save_every=0"])
    go = [threading.Event() for _ in range(3)]
    heard = []

    def workers():
        for step in (1, 2, 3):
            _log(tmp_path, step)
            if step < 3:
                assert go[step].wait(30), f"the caller never heard step {step}"

    def on_step(step, metrics, checkpoint):
        heard.append(step)
        if step < 3:
            go[step].set()  # the workers go on only once the caller heard this step: heard live

    run_and_follow(workers, StepFollower(tmp_path, config), on_step, poll_s=0.01)
    assert heard == [1, 2, 3]

    def dies():
        raise RuntimeError("a worker died")

    with pytest.raises(RuntimeError, match="a worker died"):
        run_and_follow(dies, StepFollower(tmp_path / "none", config), on_step, poll_s=0.01)

    def refuses(step, metrics, checkpoint):
        raise ValueError("the trial's hook")

    (tmp_path / "again").mkdir()
    with pytest.raises(ValueError, match="the trial's hook"):
        run_and_follow(lambda: _log(tmp_path / "again", 1), StepFollower(tmp_path / "again", config), refuses,
                       poll_s=0.01)
