"""The critic's learning-rate warm-up: the released code's ramp, or a shifted one.

The scheduler is stepped once per PPO step, after the step's updates, so the factor for step s
(1-based) is `critic_warmup_factor(s - 1, warmup, ramp)`; warmup = int(ppo.critic_warmup_ratio *
ppo.steps).

- "released": verl's constant schedule with linear warm-up, i / warmup while i < warmup, then 1.
  The first step trains the critic at learning rate 0 (its Adam moments still accumulate).
- "shifted": (i + 1) / (warmup + 1), capped at 1: the first step already
  moves the critic, and the ramp ends one step later.

The released code counts `warmup` from its total training steps (dataloader length x epochs);
tre counts it from `ppo.steps`, the steps the run actually trains.
"""

from __future__ import annotations

WARMUP_RAMPS = ("released", "shifted")


def critic_warmup_factor(i: int, warmup: int, ramp: str = "released") -> float:
    """The critic's learning-rate multiplier after `i` scheduler steps."""
    if ramp == "released":
        return i / max(1, warmup) if i < warmup else 1.0
    if ramp == "shifted":
        return min(1.0, (i + 1) / (warmup + 1))
    raise ValueError(f"unknown critic warm-up ramp {ramp!r}; choose one of: {', '.join(WARMUP_RAMPS)}")
