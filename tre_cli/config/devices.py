"""Which device and memory settings a run gets: 'auto' resolved on the machine that runs it."""

from __future__ import annotations



def resolve_device(requested: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> 'cpu' | 'cuda'; asking for cuda without one is an error."""
    if requested == "cpu":
        return "cpu"
    import torch  # only here: the config itself needs no torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if requested not in ("auto", "cuda"):
        raise ValueError(f"config key 'run.device' expects one of 'auto', 'cpu', 'cuda', got {requested!r}")
    return "cuda" if available else "cpu"


def resolve_gradient_checkpointing(setting: bool | str, device: str) -> bool:
    """'auto' trades compute for memory only where memory is the limit (cuda)."""
    if setting == "auto":
        return device == "cuda"
    return bool(setting)
