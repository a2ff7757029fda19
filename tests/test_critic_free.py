"""issue 21: critic-free estimators, clip-higher and the alpha controller in the config and the
trainer (the pure functions are in test_estimators.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tre_cli import metrics as M
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


def test_the_objective_carries_the_clip_range_and_the_normaliser():
    from tre_cli.trainer.parts import objective_of

    objective = objective_of(_resolve(overrides=["ppo.estimator=dr-grpo", "ppo.clip_low=0.1", "ppo.clip_high=0.28",
                                                 "rollout.max_new_tokens=96"]))
    assert (objective.clip, objective.clip_high, objective.loss_agg, objective.agg_norm) == (
        0.1, 0.28, "seq-mean-token-sum-norm", 96.0)
    default = objective_of(_resolve(overrides=["ppo.clip=0.25"]))
    assert (default.clip, default.clip_high) == (0.25, None)  # the symmetric clip, as before


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
    for key in ("actor/pg_loss", M.ENTROPY, "actor/grad_norm", M.REWARD_MEAN):
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
    assert [r[M.ALPHA] for r in records] == pytest.approx([0.001, 0.003, 0.005, 0.007])
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


# ----------------------------------------------------------------------------- the report


def _recorded_run(root, method, estimator, seed, score, params=None):
    from tre_cli.config import from_dict
    from tre_cli.tracking import Tracker

    cfg = from_dict({"model": {"name": "testbed"}, "task": {"name": "countdown"},
                     "method": {"name": method, **(params or {})}, "ppo": {"estimator": estimator},
                     "rollout": {"max_new_tokens": 64}, "run": {"seed": seed, "wandb": {"mode": "disabled"}}})
    with Tracker(cfg, root / f"{estimator}-{method}-s{seed}") as tracker:
        tracker.log_eval(step=1, score=score, metric="pass@1", n_prompts=8, n_samples=2)


def test_report_shows_each_estimator_as_its_own_setup(tmp_path):
    """GRPO runs get their own column ("testbed · GRPO") with deltas to GRPO's Vanilla; runs
    written before the alpha controller existed share a cell with runs at its defaults."""
    from tre_cli import report as rp

    _recorded_run(tmp_path, "vanilla", "gae", 0, 0.10)
    _recorded_run(tmp_path, "tre-p", "gae", 0, 0.12)
    _recorded_run(tmp_path, "vanilla", "grpo", 0, 0.20)
    _recorded_run(tmp_path, "tre-p", "grpo", 0, 0.25)
    _recorded_run(tmp_path, "tre-p", "grpo", 1, 0.27, {"alpha_control": "fixed", "alpha_max": 0.01})
    records, _ = rp.usable_records(rp.load_local_runs([tmp_path]), "final")
    assert {(r.model, r.estimator) for r in records} == {("testbed", "gae"), ("testbed · GRPO", "grpo")}
    table = rp.build_table1(records)
    assert [c.label.split(" Countdown")[0] for c in table.columns] == ["testbed", "testbed · GRPO"]
    tre = next(row for row in table.rows if row.method == "tre-p")
    gae_cell, grpo_cell = tre.cells
    assert gae_cell.delta == pytest.approx(0.02) and grpo_cell.delta == pytest.approx(0.06)
    assert grpo_cell.cell.n == 2  # both seeds, one cell
    assert "testbed · GRPO" in rp.render_markdown(table)


def test_controller_params_identify_a_run_only_off_their_defaults():
    from tre_cli.report import record_from_run

    def record(params):
        result = {"method": "tre-p", "task": "countdown", "model": "testbed", "params": params, "seed": 0,
                  "status": "finished", "final_eval": 0.1, "best_eval": 0.1, "eval_metric": "pass@1",
                  "config": {"rollout": {"max_new_tokens": 64}}}
        return record_from_run({"path": "x", "result": result})

    old = record({"alpha": 0.001, "p": 0.99, "released_code_compat": False})  # written before issue 21
    new = record(METHODS["tre-p"].defaults)
    assert old.params == new.params and old.estimator == "gae" and old.model == "testbed"
    target = record({**METHODS["tre-p"].defaults, "alpha_control": "target", "target_entropy": 3.0})
    assert dict(target.params)["alpha_control"] == "target" and dict(target.params)["target_entropy"] == 3.0
    assert "alpha_step" not in dict(target.params)  # at its default


@pytest.mark.parametrize("preset", ["paper", "smoke", "smollm2"])
def test_the_grpo_sweep_trains_vanilla_ent_and_tre_under_grpo(preset, tmp_path):
    from tre_cli import sweep

    plan = sweep.plan_sweep("grpo", preset=preset, out=tmp_path / "g", task_overlay=OVERLAY)
    configs = [planned.config for planned in plan.trials]
    assert {c.method.name for c in configs} == {"vanilla", "ent", "tre-k", "tre-p"}
    assert all(c.ppo.estimator == "grpo" and c.ppo.rollouts_per_prompt >= 2 for c in configs)
    assert all("grpo" in planned.trial.name for planned in plan.trials)


def test_two_critic_free_workers_train_like_one_with_the_controller(tiny_testbed, tmp_path):
    """run.workers=2 under GRPO with a target alpha: no critic sharded or saved, the controller's
    state in workers.pt, and the metrics (alpha included) those of one process."""
    from workers_harness import run_workers_locally

    from tre_cli.trainer.distributed import workers_state_path

    one, two = tmp_path / "one", tmp_path / "two"
    trainer.run(_config(tiny_testbed, one, 2, TARGET))
    run_workers_locally(_config(tiny_testbed, two, 2, [*TARGET, "run.workers=2"]), two, 2)
    a, b = _metrics(one), _metrics(two)
    for ra, rb in zip(a, b, strict=True):
        assert ra[M.REWARD_MEAN] == rb[M.REWARD_MEAN] and ra[M.ALPHA] == rb[M.ALPHA]
        for key in (M.P_MAX, M.ENTROPY, M.REGULARIZER):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-3), (key, ra[key], rb[key])
        assert not any(k.startswith("critic/") for k in rb)
    checkpoint = two / "checkpoints" / "step_2"
    state = torch.load(workers_state_path(checkpoint), weights_only=True)
    assert "critic_sched" not in state and state["alpha_control"]["alpha"] == pytest.approx(0.005)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    assert any(key.startswith("policy") for key in saved) and not any(key.startswith("critic") for key in saved)
