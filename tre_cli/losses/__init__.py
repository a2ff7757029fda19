"""Pure torch losses: per-token statistics, token selectors, PPO pieces, the actor and critic
losses composed from them, and the registry of methods.

Nothing here needs a model: every function maps tensors to tensors and is tested against a
brute-force definition (tests/brute.py, tests/test_*.py). The registry imports no torch, and
importing this package does not either: the statistics below load on first use.
"""

from __future__ import annotations

from typing import Any

_STATS = (
    "RegionSpec",
    "TokenStats",
    "entropy",
    "min_entropy",
    "p_max",
    "token_logprobs",
    "token_stats",
    "tre_k_entropy",
    "tre_p_entropy",
    "tre_p_region_size",
)

__all__ = list(_STATS)


def __getattr__(name: str) -> Any:
    if name in _STATS:
        from tre_cli.losses import stats

        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
