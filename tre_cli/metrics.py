"""The names of the per-step metrics that other parts of tre read back (`tre report`'s curves,
its mechanism figure and table). Written once here, so that a renamed metric fails a test
(tests/test_report.py checks each is logged by the trainer's code) instead of silently emptying
a figure.

This module imports nothing: the report and the config load it without torch.
"""

from __future__ import annotations

P_MAX = "actor/p_max"  # mean top-1 probability over response tokens (Figure 3)
ENTROPY = "actor/entropy"  # mean full-vocabulary entropy over response tokens
TAIL_MASS = "actor/tail_mass"  # mass outside the policy's top metrics.tail_k tokens, token mean
TAIL_DRAWS = "rollout/tail_draws"  # share of responses with a sampled token below metrics.tail_p
TAIL_DRAWS_PER_RESPONSE = "rollout/tail_draws_per_response"  # mean count of such tokens per response
REWARD_MEAN = "reward/mean"  # mean reward of the step's rollouts

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
