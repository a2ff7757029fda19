"""Pure torch losses: per-token statistics, regularizers, token selectors and PPO pieces.

Nothing here needs a model: every function maps tensors to tensors and is tested against a
brute-force definition (tests/brute.py, tests/test_*.py).
"""

from tre_cli.losses.stats import (
    RegionSpec,
    TokenStats,
    entropy,
    min_entropy,
    p_max,
    token_logprobs,
    token_stats,
    tre_k_entropy,
    tre_p_entropy,
    tre_p_region_size,
)

__all__ = [
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
]
