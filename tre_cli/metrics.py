"""The names of the metrics that one part of tre writes and another reads back: `tre report`'s
curves, its mechanism figure and table, the eval records, the alpha controller, the progress
line and the sweep display. Written once here, so that a renamed metric fails a test
(tests/test_metrics.py checks every key the report reads is one the trainer's code writes)
instead of silently emptying a figure. Metrics only logged (timings, losses, clip fractions)
keep their names where they are computed.

This module imports nothing: the report and the config load it without torch.
"""

from __future__ import annotations

# Per step, from the actor loss (losses/actor.py), token means over the response tokens.
P_MAX = "actor/p_max"  # top-1 probability (Figure 3)
ENTROPY = "actor/entropy"  # full-vocabulary entropy
TAIL_MASS = "actor/tail_mass"  # mass outside the policy's top metrics.tail_k tokens
REGION_SIZE = "actor/tre_region_size"  # |trust region| (TRE-K, TRE-P)
REGULARIZER = "actor/regularizer"  # the method's bonus: the entropy the alpha controller holds
ALPHA = "actor/alpha"  # the alpha a step trained with (method.alpha_control=target)

# Per step, from the rollout (trainer/step.py).
TAIL_DRAWS = "rollout/tail_draws"  # share of responses with a sampled token below metrics.tail_p
TAIL_DRAWS_PER_RESPONSE = "rollout/tail_draws_per_response"  # mean count of such tokens per response
REWARD_MEAN = "reward/mean"  # mean reward of the step's rollouts

# Per evaluation (eval.jsonl; the trainer's step metrics at an eval step).
EVAL_SCORE = "eval/score"  # the task's eval metric (eval.metric), e.g. pass@1

# Every per-step curve a RunRecord carries (read from metrics.jsonl, the results store's run
# directories, or a W&B run's history).
CURVES = (P_MAX, TAIL_MASS, TAIL_DRAWS, TAIL_DRAWS_PER_RESPONSE, ENTROPY, REWARD_MEAN)

# How the report names them (axis labels, table headers).
LABELS = {
    P_MAX: "P_max",
    ENTROPY: "entropy",
    TAIL_MASS: "tail mass",
    TAIL_DRAWS: "tail draws (share of responses)",
    TAIL_DRAWS_PER_RESPONSE: "tail draws per response",
    REWARD_MEAN: "reward (mean)",
}
