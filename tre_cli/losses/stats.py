"""Per-token statistics of a categorical policy over the vocabulary (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class RegionSpec:
    """A trust region: the K largest logits ("k") or the top-P nucleus ("p")."""

    kind: str
    k: int = 0
    p: float = 0.0
    released_code_compat: bool = False

    @staticmethod
    def top_k(k: int) -> "RegionSpec":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"K must be an integer >= 1, got {k!r}")
        return RegionSpec("k", k=k)

    @staticmethod
    def top_p(p: float, released_code_compat: bool = False) -> "RegionSpec":
        p = float(p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"P must be in (0, 1], got {p!r}")
        return RegionSpec("p", p=p, released_code_compat=released_code_compat)


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like the logits without the vocabulary dimension (float32)."""

    logprob: torch.Tensor
    entropy: torch.Tensor
    p_max: torch.Tensor
    min_entropy: torch.Tensor
    region_size: torch.Tensor
    region_entropy: torch.Tensor
