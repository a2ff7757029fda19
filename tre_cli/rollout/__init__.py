"""Rollout engines by name, all returning the same Rollout.

    engine = get_engine("hf", model_path, tokenizer, device="cuda", dtype="bfloat16", seed=0, model=policy)
    rollout = engine.generate(prompt_token_ids, n=8, max_new_tokens=512, temperature=1.0, top_p=1.0)
    ... train ...
    engine.sync_weights(policy.state_dict())   # a no-op for `hf`, which samples from `policy` itself

`hf`: transformers, batched, our own decoding loop (static cache + compiled step on CUDA).
`vllm`: a colocated in-process vLLM engine; weights synced after each update; sleeps on GPU
while the trainer trains.
"""

from __future__ import annotations

import os

from tre_cli.rollout.base import Rollout, RolloutEngine, position_ids_from_mask, response_logprobs_from_logits

ENGINES = ("hf", "vllm")


def get_engine(
    name: str,
    model_path: str | os.PathLike | None,
    tokenizer,
    device: str = "cpu",
    dtype=None,
    seed: int = 0,
    **engine_options,
) -> RolloutEngine:
    """The engine called `name` for the model in `model_path` (a local directory).

    hf options: `model` (the trainer's policy module; loaded from model_path when absent),
    `static_cache`, `compile`. vllm options: see VLLMEngine.
    """
    if name == "hf":
        from tre_cli.rollout.hf import HFEngine

        model = engine_options.pop("model", None)
        if model is None:
            if model_path is None:
                raise ValueError("hf engine: pass the policy module (model=...) or a model path")
            from tre_cli.models import load_policy

            model = load_policy(model_path, dtype=dtype, device=device)
        # A given module in another dtype than `dtype` (fp32 masters): the engine samples from a copy in `dtype`.
        return HFEngine(model=model, tokenizer=tokenizer, device=device, seed=seed, dtype=dtype, **engine_options)
    if name == "vllm":
        from tre_cli.rollout.vllm import VLLMEngine

        if model_path is None:
            raise ValueError("vllm engine: a model path is needed")
        return VLLMEngine(model_path, tokenizer=tokenizer, device=device, dtype=dtype, seed=seed, **engine_options)
    raise ValueError(f"unknown rollout engine {name!r}; known: {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "Rollout",
    "RolloutEngine",
    "get_engine",
    "position_ids_from_mask",
    "response_logprobs_from_logits",
]
