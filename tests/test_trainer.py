"""The PPO trainer end to end on a tiny locally built model (CPU)."""

from __future__ import annotations

import json
import math

import pytest

from tre_cli import metrics as M
from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.losses.registry import METHODS

OVERLAY = {"task": {"options": {"train_size": 64, "test_size": 8}}, "rollout": {"max_new_tokens": 16},
           "eval": {"metric": "pass@1"}}
VOLATILE = ("time", "timing/", "perf/")


def _config(model_dir, out, method="tre-p", steps=2, extra=()):
    return resolve(
        task="countdown", method=method, model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", f"ppo.steps={steps}", "ppo.prompts_per_step=4", "ppo.rollouts_per_prompt=2",
                   "ppo.mini_batch_prompts=2", "ppo.micro_batch_tokens=128", "eval.limit=4", "eval.n_samples=1",
                   "eval.every=0", "run.save_every=2", "run.wandb.mode=disabled", *extra],
    )


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stable(record):
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    result = trainer.run(_config(tiny_testbed, out, method))
    assert result.status == "finished" and result.steps_done == 2
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key in (M.REWARD_MEAN, M.P_MAX, M.ENTROPY, "actor/pg_loss", "actor/ppo_kl",
                    "actor/pg_clipfrac", "critic/vf_loss", "actor/grad_norm", "timing/gen_s", "perf/tokens_per_s",
                    M.TAIL_MASS, M.TAIL_DRAWS, M.TAIL_DRAWS_PER_RESPONSE):
            assert key in record and math.isfinite(record[key]), (method, key)
        assert 0 < record[M.P_MAX] <= 1
        # Every curve `tre report` reads (tre_cli/metrics.py) is logged, so a renamed metric fails here.
        assert set(M.CURVES) <= set(record), set(M.CURVES) - set(record)
        assert 0 <= record[M.TAIL_MASS] < 1 - record[M.P_MAX] + 1e-6
        assert 0 <= record[M.TAIL_DRAWS] <= 1 and record[M.TAIL_DRAWS_PER_RESPONSE] >= 0
    has_region = method in ("tre-k", "tre-p")
    assert (M.REGION_SIZE in records[0]) == has_region
    if method == "tre-k":
        assert records[0][M.REGION_SIZE] == 2.0  # K = 2
    if method == "forking-tokens":
        assert 0 < records[0]["actor/forking_kept_frac"] <= 0.3
    if method == "kl-cov":
        assert 0 < records[0]["actor/klcov_selected_frac"] <= 0.1
    assert (out / "checkpoints" / "step_2" / "policy" / "config.json").exists()
    assert json.loads((out / "result.json").read_text())["final_eval"] is not None


def test_entropy_bonus_raises_entropy_and_tre_raises_local_entropy(tiny_testbed, tmp_path):
    """The flag reaches the tensor: a large alpha moves the statistic it multiplies. (Actor lr 1e-3:
    at 3e-3 the vanilla control itself drifted to near-uniform entropy with seed 0 once sampling
    became per-sequence, issue 12; at 1e-3 the gap was 2.2-3.0 nats over seeds 0-2.)"""
    big = ["method.alpha=2.0", "ppo.actor_lr=1e-3"]
    base = _metrics_after(tiny_testbed, tmp_path / "v", "vanilla", ["ppo.actor_lr=1e-3"])
    ent = _metrics_after(tiny_testbed, tmp_path / "e", "ent", big)
    tre = _metrics_after(tiny_testbed, tmp_path / "t", "tre-k", big)
    assert ent[M.ENTROPY] > base[M.ENTROPY] + 0.05
    assert tre["actor/tre_local_entropy"] > base_local(tiny_testbed, tmp_path / "tv")


def _metrics_after(model_dir, out, method, extra):
    trainer.run(_config(model_dir, out, method, steps=3, extra=extra))
    return _metrics(out)[-1]


def rounding_floor(key, metrics, floor):
    """The absolute tolerance of `key` between two runs that sum the same floats in another order.

    pg_loss is a token mean of terms -A * ratio of both signs that nearly cancel (about 2.6e-4
    from terms of size |A| ~ 0.9 on one machine's tiny model; two micro-batch orders put it 4.7e-8
    apart): float32 sums in another order move it by rounding relative to the mean |A|, not to
    itself. A change of what is averaged (a mean of micro-batch means) moves it far more."""
    return floor + (1e-5 * metrics["critic/advantages_abs"] if key == "actor/pg_loss" else 0.0)


def base_local(model_dir, out):
    """TRE-K's local entropy under a vanilla-like run (alpha 0)."""
    return _metrics_after(model_dir, out, "tre-k", ["method.alpha=0.0", "ppo.actor_lr=1e-3"])["actor/tre_local_entropy"]


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_testbed, tmp_path):
    whole = tmp_path / "whole"
    trainer.run(_config(tiny_testbed, whole, steps=4))

    cut = tmp_path / "cut"

    def stop_after_two(step, metrics, checkpoint):
        if step == 2:
            assert checkpoint is not None
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(_config(tiny_testbed, cut, steps=4), on_step=stop_after_two)
    assert json.loads((cut / "result.json").read_text())["status"] == "interrupted"
    resumed = trainer.run(_config(tiny_testbed, tmp_path / "ignored", steps=4, extra=[f"run.resume={cut}"]))
    assert resumed.status == "finished" and resumed.steps_done == 4
    a, b = _metrics(whole), _metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [_stable(r) for r in a] == [_stable(r) for r in b]
    # The smoke preset evaluates before training too: step 0 once, then the end.
    evals_a, evals_b = _evals(whole), _evals(cut)
    assert [r["step"] for r in evals_b] == [0, 4]
    assert [_stable(r) for r in evals_a] == [_stable(r) for r in evals_b]


def _evals(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_eval_before_training_is_step_0_and_not_a_result(tiny_testbed, tmp_path):
    cut = tmp_path / "cut"

    def stop_at_once(step, metrics, checkpoint):
        raise KeyboardInterrupt  # after step 1, before any checkpoint (save_every 2)

    with pytest.raises(KeyboardInterrupt):
        trainer.run(_config(tiny_testbed, cut, steps=2), on_step=stop_at_once)
    assert [r["step"] for r in _evals(cut)] == [0]
    interrupted = json.loads((cut / "result.json").read_text())
    assert interrupted["final_eval"] is None and interrupted["best_eval"] is None
    resumed = trainer.run(_config(tiny_testbed, tmp_path / "ignored", steps=2, extra=[f"run.resume={cut}"]))
    evals = _evals(cut)
    assert [r["step"] for r in evals] == [0, 2]  # the starting model is not evaluated twice
    assert resumed.final_eval == evals[-1][M.EVAL_SCORE] == resumed.best_eval

    off = tmp_path / "off"
    trainer.run(_config(tiny_testbed, off, steps=1, extra=["eval.before_train=false"]))
    assert [r["step"] for r in _evals(off)] == [1]


def test_step_examples_continue_across_epochs():
    data = [{"i": i} for i in range(10)]
    seen = [ex["i"] for step in range(1, 6) for ex in trainer.step_examples(data, step, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10))  # the first epoch is a permutation
    assert sorted(seen[10:20]) == list(range(10))
    assert trainer.step_examples(data, 3, 4, seed=3) == trainer.step_examples(data, 3, 4, seed=3)
    assert trainer.step_examples(data, 1, 4, seed=3) != trainer.step_examples(data, 1, 4, seed=4)


def test_rollout_gap_compares_behaviour_and_recomputed_probabilities():
    import torch

    from tre_cli.rollout.base import Rollout
    from tre_cli.trainer.step import Scored, rollout_gap

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    behaviour = torch.log(torch.tensor([[0.5, 0.2, 1.0], [0.9, 1.0, 1.0]]))
    recomputed = torch.log(torch.tensor([[0.4, 0.2, 0.1], [0.6, 0.3, 0.3]]))
    rollout = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                      torch.zeros(2, 3, dtype=torch.long), mask, behaviour * mask, torch.arange(2),
                      torch.ones(2, dtype=torch.bool), ["", ""], 0, 1.0)
    zeros = torch.zeros(2, 3)
    gap = rollout_gap(rollout, Scored(recomputed, zeros, zeros, zeros))
    assert gap["rollout/probs_diff_max"] == pytest.approx(0.3)
    assert gap["rollout/probs_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    rollout.logprobs[0, 0] = float("nan")  # vLLM with top_p < 1: no full-vocabulary log-probs
    assert rollout_gap(rollout, Scored(recomputed, zeros, zeros, zeros)) == {}


def test_rollout_stop_ends_the_training_responses(tiny_testbed, tmp_path):
    """rollout.stop reaches the step: the same step-1 samples (per-sequence seeding), cut at their
    first space, are shorter and all finished; the flag changes nothing else about sampling."""
    whole = _metrics_after(tiny_testbed, tmp_path / "whole", "vanilla", ["ppo.steps=1"])
    cut = _metrics_after(tiny_testbed, tmp_path / "cut", "vanilla", ["ppo.steps=1", "rollout.stop=[' ']"])
    assert cut["response/length_mean"] < whole["response/length_mean"]
    assert cut["response/length_max"] <= whole["response/length_max"]
    assert cut["response/truncated_frac"] <= whole["response/truncated_frac"]


def test_micro_batch_order_is_a_speed_knob(tiny_testbed, tmp_path):
    """ppo.micro_batch_order=length splits the rows differently (longest together) and trains
    the same step up to float rounding."""
    extra = ["ppo.steps=1", "ppo.micro_batch_tokens=400"]  # ~100 prompt tokens: 2 rows a micro-batch
    rows = _metrics_after(tiny_testbed, tmp_path / "rows", "tre-p", extra)
    length = _metrics_after(tiny_testbed, tmp_path / "length", "tre-p", [*extra, "ppo.micro_batch_order=length"])
    for key in ("actor/pg_loss", M.ENTROPY, M.P_MAX, "actor/tre_local_entropy", "critic/vf_loss",
                "actor/grad_norm", "critic/values"):
        tolerance = rounding_floor(key, rows, 1e-8)
        assert math.isclose(rows[key], length[key], rel_tol=1e-5, abs_tol=tolerance), (key, rows[key], length[key])
    assert rows[M.REWARD_MEAN] == length[M.REWARD_MEAN]
