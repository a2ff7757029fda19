"""PPO improves the built-in testbed's Countdown reward, with every method (CPU, 1-3 min each).

The testbed (tre_cli/models/testbed.py, built by tre_cli/testbed/) is the copy shipped with the
package: the same weights on every machine. It starts with a Countdown pass@1 of about 0.07
(top-p 0.7) and a habit that costs it reward, writing "= value" inside its answer; PPO with the
smoke preset's learning rate unlearns it within tens of steps. Each run here is the smoke preset
(30 steps), with a larger evaluation (256 test prompts x 4 samples) after training, against the
same evaluation of the untrained model (once for all methods: it does not depend on the method).

Two assertions per method: the slip rate (at temperature 1.0 on 512 held-out problems, the
protocol of the testbed's card) falls by far more than its noise, and pass@1 rises. The slip is
the large, robust effect (a standard deviation of 0.022 at 512 problems); pass@1 moves less
(from 0.07 to 0.10-0.13 at most: without the slip the testbed would score about 0.13), so its
bound is only "rises". Both bounds come from the spread measured under other processors' kernels
and thread counts (bench/learning_spread.py; the numbers are in CHANGELOG.md, issue 10).
"""

from __future__ import annotations

import json

import pytest

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.losses.registry import METHODS
from tre_cli.models import load_policy, load_tokenizer, resolve_model
from tre_cli.models.testbed import SLIP_EVAL_SEED
from tre_cli.testbed.reward import measure_countdown_reward

STEPS = 30  # the smoke preset's own length
EVAL = ["eval.limit=256", "eval.n_samples=4", "run.wandb.mode=disabled"]
# The slip rate must fall at least this much below the untrained model's (0.46 on the card).
MIN_SLIP_DROP = 0.15


@pytest.fixture(scope="module")
def score_before(tmp_path_factory):
    """pass@1 of the untrained testbed under the evaluation protocol the runs use."""
    out = tmp_path_factory.mktemp("learning") / "base"
    config = resolve(task="countdown", method="vanilla", model="testbed", preset="smoke",
                     overrides=[f"run.out={out}", *EVAL])
    return trainer.evaluate_model(config).final_eval


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_reward_rises_over_a_short_run(method, score_before, tmp_path):
    _reward_rises(method, score_before, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla"])
def test_reward_rises_under_grpo(method, score_before, tmp_path):
    """issue 21: the same bounds without a critic (GRPO over the smoke preset's groups of 4).
    Vanilla went from 0.069 to 0.112 (slip 0.455 -> 0.063). TRE-P is not asserted: its one run
    cut the slip (0.455 -> 0.078) but ended at pass@1 0.060 (CHANGELOG, issue 21), and the
    spread of either under GRPO is not measured yet."""
    _reward_rises(method, score_before, tmp_path, ["ppo.estimator=grpo"])


def _reward_rises(method, score_before, tmp_path, extra=()):
    out = tmp_path / "run"
    config = resolve(
        task="countdown", method=method, model="testbed", preset="smoke",
        overrides=[f"run.out={out}", f"ppo.steps={STEPS}", "eval.every=0", "eval.before_train=false",
                   "run.save_every=0", *EVAL, *extra],
    )
    result = trainer.run(config)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [record["step"] for record in evals] == [STEPS]
    after = evals[-1]["eval/score"]
    trained = out / "checkpoints" / f"step_{STEPS}" / "policy"
    card = json.loads((resolve_model("testbed") / "testbed.json").read_text())
    _, slip_after = measure_countdown_reward(load_policy(trained), load_tokenizer(trained),
                                             card["spec"]["eval_problems"], SLIP_EVAL_SEED)
    slip_before = card["answer_slip_rate_t1"]
    print(f"\nLEARNING {method} before={score_before:.4f} after={after:.4f} "  # read by bench/learning_spread.py
          f"slip_before={slip_before:.4f} slip_after={slip_after:.4f}")
    assert slip_after <= slip_before - MIN_SLIP_DROP, (method, slip_before, slip_after)
    assert after > score_before, (method, score_before, after)
    assert result.final_eval == after and result.best_eval == after
