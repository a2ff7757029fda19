"""Reference code the tests check tre against and tre itself does not run: the one-group
Forking-Tokens selection with its threshold form, and the inputs of a full forward over a
rollout."""

from __future__ import annotations

import torch

from tre_cli.losses.registry import SCOPE_GLOBAL, SCOPE_GROUP, SELECTION_SCOPES
from tre_cli.losses.selectors import top_count, top_tokens_mask


def _valid_entropies(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if entropy.shape != mask.shape:
        raise ValueError(f"scores shape {tuple(entropy.shape)} does not match mask shape {tuple(mask.shape)}")
    values = entropy.detach()[mask.bool()]
    if torch.isnan(values).any():
        raise ValueError("selection scores contain NaN on valid tokens")
    return values


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_ratio: float = 0.2) -> torch.Tensor:
    """The `top_count(n_valid, top_ratio)`-th largest entropy among the valid tokens, as a 0-dim
    tensor (+inf when no token is valid, so that nothing passes it)."""
    values = _valid_entropies(entropy, mask)
    if values.numel() == 0:
        return torch.tensor(float("inf"), dtype=entropy.dtype, device=entropy.device)
    return torch.topk(values, top_count(values.numel(), top_ratio)).values[-1]


def mask_from_threshold(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Bool mask of the valid tokens whose entropy is >= threshold. Tokens tied with the
    threshold are all kept, so the count can exceed `top_count` when ties straddle the boundary."""
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} does not match mask shape {tuple(mask.shape)}")
    return mask.bool() & (entropy.detach() >= threshold)


def forking_tokens_mask(entropy: torch.Tensor, mask: torch.Tensor, top_ratio: float = 0.2, scope: str = SCOPE_GROUP,
                        threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """Forking-Tokens' bool [B, T] mask of the highest-entropy response tokens.

    scope "group": the given rows are one selection group (the released code's micro-batch);
    exactly `top_count(n_valid, top_ratio)` of its tokens are kept (ties: row-major). `threshold`
    must be None.

    scope "global": the kept tokens are those with entropy >= `threshold`, the
    `entropy_threshold` of the whole mini-batch (ties at the threshold all kept)."""
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"unknown forking-tokens scope {scope!r}; choose one of: {', '.join(SELECTION_SCOPES)}")
    if scope == SCOPE_GROUP:
        if threshold is not None:
            raise ValueError("forking-tokens scope 'group' selects within the group; do not pass a threshold")
        return top_tokens_mask(entropy, mask, top_ratio)
    if threshold is None:
        raise ValueError(f"forking-tokens scope '{SCOPE_GLOBAL}' needs the mini-batch threshold from "
                         "entropy_threshold()")
    return mask_from_threshold(entropy, mask, threshold)


def model_inputs(rollout) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids of a full forward over a rollout's prompt +
    response; the logits that predict response token j sit at column P - 1 + j."""
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids}
