"""Checkpoints load with weights_only=True: a trainer.pt carrying a pickled object is refused
with one line before anything runs (its code never executes); tre's own state loads."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from tre_cli.cli import app
from tre_cli.config import dump_yaml, resolve
from tre_cli.trainer.checkpoint import STATE_KEYS, TRAINER_STATE, read_trainer_state


class Payload:
    """What an attacker would put in a shared run directory: unpickling it calls `touch`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def _run_dir_with(tmp_path, state):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    dump_yaml(resolve(task="countdown", method="tre-p", task_overlay={"rollout": {"max_new_tokens": 8}},
                      overrides=["run.wandb.mode=disabled", "run.device=cpu"]), run / "config.yaml")
    torch.save(state, step / TRAINER_STATE)
    return run, step


def _tre_like_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3))
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "engine": torch.Generator().manual_seed(5).get_state()}
    return {"critic": model.state_dict(), "actor_opt": opt.state_dict(), "critic_opt": opt.state_dict(),
            "critic_sched": sched.state_dict(), "rng": rng}


def test_a_pickled_payload_is_refused_with_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    run, _ = _run_dir_with(tmp_path, {**_tre_like_state(), "extra": Payload(marker)})
    result = CliRunner().invoke(app, ["run", "--resume", str(run)], catch_exceptions=False)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load") and TRAINER_STATE in lines[0], (
        result.stderr
    )
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing written


def test_tre_trainer_state_loads_weights_only(tmp_path):
    state = _tre_like_state()
    _, step = _run_dir_with(tmp_path, state)
    loaded = read_trainer_state(step)
    assert set(loaded) == set(STATE_KEYS)
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(loaded["critic"]["weight"], state["critic"]["weight"])
    assert loaded["critic_sched"] == state["critic_sched"]


def test_a_foreign_or_missing_state_is_one_clear_error(tmp_path):
    _, step = _run_dir_with(tmp_path, {"weights": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a tre trainer state"):
        read_trainer_state(step)
    with pytest.raises(FileNotFoundError, match="has no trainer.pt"):
        read_trainer_state(tmp_path)
