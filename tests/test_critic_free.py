"""issue 21: critic-free estimators, clip-higher and the alpha controller in the config and the
trainer (the pure functions are in test_estimators.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.losses.estimators import CRITIC_FREE, ESTIMATORS
from tre_cli.losses.registry import METHODS
from tre_cli.trainer.checkpoint import STATE_KEYS, TRAINER_STATE

OVERLAY = {"task": {"options": {"train_size": 64, "test_size": 8}}, "rollout": {"max_new_tokens": 16},
           "eval": {"metric": "pass@1"}}
VOLATILE = ("time", "timing/", "perf/")


def _resolve(method="tre-p", overrides=(), preset=None):
    return resolve(task="countdown", method=method, preset=preset, task_overlay=OVERLAY, overrides=list(overrides))


# ----------------------------------------------------------------------------- the config


def test_estimator_keys_default_to_the_paper():
    ppo = _resolve().ppo
    assert (ppo.estimator, ppo.clip_low, ppo.clip_high, ppo.skip_uniform_groups) == ("gae", None, None, False)
    assert ppo.loss_agg == "token-mean"


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_a_group_of_one_is_one_error_naming_the_key(estimator):
    with pytest.raises(ValueError) as error:
        _resolve(overrides=[f"ppo.estimator={estimator}", "ppo.rollouts_per_prompt=1"])
    message = str(error.value)
    assert "ppo.rollouts_per_prompt" in message and estimator in message and "\n" not in message
    assert _resolve(overrides=["ppo.rollouts_per_prompt=1"]).ppo.rollouts_per_prompt == 1  # GAE: fine


def test_bad_estimator_and_clip_values_name_their_keys():
    for item, key in (("ppo.estimator=ppo", "ppo.estimator"), ("ppo.clip_low=1.5", "ppo.clip_low"),
                      ("ppo.clip_high=0", "ppo.clip_high"), ("ppo.estimater=grpo", "ppo.estimator")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            _resolve(overrides=[item])


def test_dr_grpo_brings_its_aggregation_unless_a_layer_above_the_presets_sets_one(tmp_path):
    assert _resolve(overrides=["ppo.estimator=dr-grpo"]).ppo.loss_agg == "seq-mean-token-sum-norm"
    # The paper preset writes token-mean out; the estimator's own still wins over a preset.
    assert _resolve(preset="paper", overrides=["ppo.estimator=dr-grpo"]).ppo.loss_agg == "seq-mean-token-sum-norm"
    assert _resolve(overrides=["ppo.estimator=dr-grpo", "ppo.loss_agg=token-mean"]).ppo.loss_agg == "token-mean"
    # Forking-Tokens averages over the tokens it keeps: it keeps token-mean under dr-grpo.
    assert _resolve("forking-tokens", ["ppo.estimator=dr-grpo"]).ppo.loss_agg == "token-mean"
    for estimator in ("grpo", "rloo"):
        assert _resolve(overrides=[f"ppo.estimator={estimator}"]).ppo.loss_agg == "token-mean"


def test_alpha_control_params_are_checked_per_method():
    cfg = _resolve("tre-k", ["method.alpha_control=target", "method.target_entropy=2.5", "method.alpha_max=0.05"])
    assert cfg.method.params["alpha_control"] == "target" and cfg.method.params["target_entropy"] == 2.5
    with pytest.raises(ValueError, match="config key 'method.target_entropy' must be set when alpha_control"):
        _resolve("ent", ["method.alpha_control=target"])
    with pytest.raises(ValueError, match="config key 'method.alpha' .* must be <= alpha_max"):
        _resolve("ent", ["method.alpha_control=target", "method.target_entropy=1", "method.alpha=0.5"])
    with pytest.raises(ValueError, match="config key 'method.alpha_control' expects one of 'fixed', 'target'"):
        _resolve("ent", ["method.alpha_control=pid"])
    for method in ("vanilla", "forking-tokens", "kl-cov"):  # no bonus, no alpha to control
        with pytest.raises(ValueError, match=f"'method.alpha_control' is not a parameter of method '{method}'"):
            _resolve(method, ["method.alpha_control=target"])


def test_tre_methods_shows_the_controller():
    from typer.testing import CliRunner

    from tre_cli.cli import app

    out = CliRunner().invoke(app, ["methods"], terminal_width=400).output
    assert "alpha_control=fixed" in out and "target_entropy=None" in out and "alpha_max=0.01" in out


# ----------------------------------------------------------------------------- the trainer

TINY = ["ppo.prompts_per_step=2", "ppo.rollouts_per_prompt=2", "ppo.mini_batch_prompts=1",
        "ppo.micro_batch_tokens=128", "rollout.max_new_tokens=8", "run.wandb.mode=disabled"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_under_every_estimator(method, estimator, tiny_testbed):
    """One tiny step of each method under each estimator, through the registry."""
    from tre_cli.trainer.parts import build
    from tre_cli.trainer.step import train_step

    config = resolve(task="countdown", method=method, model=str(tiny_testbed), preset="smoke", task_overlay=OVERLAY,
                     overrides=[*TINY, f"ppo.estimator={estimator}"])
    parts = build(config)
    critic_free = estimator in CRITIC_FREE
    assert (parts.critic is None, parts.critic_opt is None, parts.critic_sched is None) == (critic_free,) * 3
    before = [p.detach().clone() for p in parts.policy.parameters()]
    metrics = train_step(parts, 1)
    parts.engine.close()
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "reward/mean"):
        assert math.isfinite(metrics[key]), key
    assert any(k.startswith("critic/") for k in metrics) != critic_free
    assert ("actor/advantages_abs" in metrics) == critic_free
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.policy.parameters()))  # it trained


def _config(model_dir, out, steps, extra=()):
    return resolve(task="countdown", method="tre-p", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
                   overrides=[f"run.out={out}", f"ppo.steps={steps}", "ppo.prompts_per_step=4",
                              "ppo.rollouts_per_prompt=2", "ppo.mini_batch_prompts=2", "ppo.micro_batch_tokens=128",
                              "eval.limit=4", "eval.n_samples=1", "eval.every=0", "eval.before_train=false",
                              "run.save_every=2", "run.wandb.mode=disabled", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# A target far above TRE-P's region entropy: alpha rises by alpha_step every step.
TARGET = ["ppo.estimator=grpo", "method.alpha_control=target", "method.target_entropy=50",
          "method.alpha_step=0.002", "method.alpha_max=0.1"]


def test_a_critic_free_target_alpha_run_has_no_critic_and_resumes_exactly(tiny_testbed, tmp_path):
    whole = tmp_path / "whole"
    trainer.run(_config(tiny_testbed, whole, 4, TARGET))
    records = _metrics(whole)
    assert not any(k.startswith("critic/") for r in records for k in r)
    assert [r["actor/alpha"] for r in records] == pytest.approx([0.001, 0.003, 0.005, 0.007])
    state = torch.load(whole / "checkpoints" / "step_4" / TRAINER_STATE, weights_only=True)
    assert not any(k.startswith("critic") for k in state) and set(STATE_KEYS) - set(state) == {
        "critic", "critic_opt", "critic_sched"}
    assert state["alpha_control"]["alpha"] == pytest.approx(0.009)

    cut = tmp_path / "cut"

    def stop_after_two(step, metrics, checkpoint):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(_config(tiny_testbed, cut, 4, TARGET), on_step=stop_after_two)
    trainer.run(_config(tiny_testbed, tmp_path / "ignored", 4, [*TARGET, f"run.resume={cut}"]))
    stable = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]
    assert [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in _metrics(cut)] == stable


def test_skip_uniform_groups_drops_groups_without_signal(tiny_testbed, monkeypatch):
    """All rewards equal: every group is dropped, counted, and the policy does not move (the
    entropy bonus alone would move it); without the flag it does."""
    from tre_cli.trainer.parts import build
    from tre_cli.trainer.step import train_step

    def step(skip):
        config = resolve(task="countdown", method="ent", model=str(tiny_testbed), preset="smoke",
                         task_overlay=OVERLAY, overrides=[*TINY, "ppo.estimator=grpo", "method.alpha=0.5",
                                                          f"ppo.skip_uniform_groups={str(skip).lower()}"])
        parts = build(config)
        monkeypatch.setattr(parts.task, "rewards", lambda texts, examples: [0.1] * len(texts))
        before = [p.detach().clone() for p in parts.policy.parameters()]
        metrics = train_step(parts, 1)
        parts.engine.close()
        return metrics, any(not torch.equal(a, b) for a, b in zip(before, parts.policy.parameters()))

    skipped, moved = step(True)
    assert skipped["rollout/uniform_groups"] == 2 and not moved
    kept, moved = step(False)
    assert "rollout/uniform_groups" not in kept and moved
