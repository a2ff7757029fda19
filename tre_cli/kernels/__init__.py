"""Fused GPU kernels with the same results as the torch reference in `tre_cli.losses`.

`token_stats` calls `fused_or_none` for CUDA logits; it answers None (use the reference) when
Triton is missing, the kernels are switched off (TRE_KERNELS=0), or the call is one the kernels
do not cover (float64 logits, the released code's nucleus). Triton is imported only here, lazily:
the main environment may not have it (vLLM's CPU build needs it absent).
"""

from __future__ import annotations

import functools
import os

import torch

ENV_SWITCH = "TRE_KERNELS"  # "0" forces the torch reference everywhere
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=1)
def kernels_available() -> bool:
    """Whether Triton can be imported (not whether a GPU is present)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an incompatible Triton build fails with more than ImportError
        return False
    return True


def kernels_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def applies(logits2d: torch.Tensor, region) -> bool:
    """Whether the fused path covers this call (device aside)."""
    if logits2d.dtype not in KERNEL_DTYPES or logits2d.shape[-1] >= 1 << 24:
        return False  # per-block counts are exact in float32 below 2^24
    return region is None or not region.released_code_compat


def fused_token_stats(logits2d, tokens1d, region, temperature: float = 1.0):
    """The six outputs of `token_stats` (flattened rows) from the Triton kernels."""
    from tre_cli.kernels.token_stats import fused_token_stats as run

    return run(logits2d, tokens1d, region, temperature)


def fused_or_none(logits2d, tokens1d, region, temperature: float) -> tuple | None:
    """The fused outputs when the kernels apply to these CUDA logits, else None."""
    if not (logits2d.is_cuda and kernels_enabled() and applies(logits2d, region) and kernels_available()):
        return None
    return fused_token_stats(logits2d, tokens1d, region, temperature)


__all__ = ["ENV_SWITCH", "applies", "fused_or_none", "fused_token_stats", "kernels_available", "kernels_enabled"]
