"""How many positions a run needs, and whether the model holds them.

A run needs `ppo.max_prompt_length + rollout.max_new_tokens` positions: the longest prompt it
feeds plus the longest response it samples (`tre eval`: the same with its own T). That is the
vLLM engine's `max_model_len`, and every training forward of the policy and critic spans it too.
A model whose context is shorter is an error before any model is loaded, naming both numbers;
nothing is cut silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Config keys that hold a model's context length, in the order transformers' configs use them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context_length(model_dir: str | os.PathLike) -> int | None:
    """The number of positions the model in `model_dir` holds (its config.json), None if unstated."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    sources = [config] + [config[k] for k in ("text_config", "llm_config") if isinstance(config.get(k), dict)]
    for source in sources:
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def required_model_len(max_prompt_length: int, max_new_tokens: int | None) -> int:
    """Positions a run needs: its longest prompt plus its longest response."""
    if max_new_tokens is None:
        raise ValueError("rollout.max_new_tokens is not set (the task overlay should set it)")
    return int(max_prompt_length) + int(max_new_tokens)


def check_model_context(model_dir: str | os.PathLike, max_prompt_length: int, max_new_tokens: int | None,
                        model_name: str | None = None) -> int:
    """The run's `max_model_len` (prompt + response positions); a ValueError naming both numbers
    when the model's context is shorter."""
    needed = required_model_len(max_prompt_length, max_new_tokens)
    context = model_context_length(model_dir)
    if context is not None and context < needed:
        name = model_name or str(model_dir)
        raise ValueError(
            f"model {name!r} holds {context} positions, but a run needs ppo.max_prompt_length ({max_prompt_length}) "
            f"+ rollout.max_new_tokens ({max_new_tokens}) = {needed}; lower one of them or use a longer-context model"
        )
    return needed
