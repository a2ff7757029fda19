"""What a run builds once: task, data, tokenizer, policy, critic, rollout engine, optimizers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from tre_cli.config import RunConfig, resolve_device, resolve_gradient_checkpointing
from tre_cli.losses.actor import ActorObjective
from tre_cli.rollout.base import RolloutEngine
from tre_cli.tasks import TaskProtocol


@dataclass
class Parts:
    """Everything a run builds once."""

    config: RunConfig
    device: str
    task: TaskProtocol
    tokenizer: Any  # a transformers tokenizer
    policy: torch.nn.Module
    critic: torch.nn.Module
    engine: RolloutEngine
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    critic_sched: torch.optim.lr_scheduler.LambdaLR
    objective: ActorObjective
    train: list[dict]
    test: list[dict]
    test_prompts: list[list[int]]
    max_new_tokens: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def encode_prompt(task: TaskProtocol, example: dict, tokenizer: Any, max_prompt_length: int) -> list[int]:
    """The rendered prompt's ids, keeping the last max_prompt_length tokens (the question's end
    and the assistant header matter most)."""
    ids = tokenizer(task.render(example, tokenizer), add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_length:])


def max_new_tokens_of(config: RunConfig) -> int:
    if config.rollout.max_new_tokens is None:
        raise ValueError("rollout.max_new_tokens is not set (the task overlay should set it)")
    return config.rollout.max_new_tokens


def objective_of(config: RunConfig) -> ActorObjective:
    """The actor's objective from the method's registry entry and the PPO settings."""
    return ActorObjective.of(config.method.name, config.method.params, clip=config.ppo.clip,
                             dual_clip_c=config.ppo.dual_clip_c, loss_agg=config.ppo.loss_agg)


def build(config: RunConfig) -> Parts:
    from tre_cli.models import load_critic, load_policy, load_tokenizer, resolve_model
    from tre_cli.tasks import get_task

    device = resolve_device(config.run.device)
    dtype = config.model.dtype
    checkpointing = resolve_gradient_checkpointing(config.model.gradient_checkpointing, device)
    objective = objective_of(config)
    task = get_task(config.task.name, **config.task.options)
    train = task.load("train")
    test = task.load("test", limit=config.eval.limit)
    if not train:
        raise ValueError(f"task {config.task.name!r} has no training examples")
    model_path = resolve_model(config.model.name)
    tokenizer = load_tokenizer(model_path)
    policy = load_policy(model_path, dtype=dtype, device=device, gradient_checkpointing=checkpointing)
    critic = load_critic(resolve_model(config.model.critic_name or config.model.name), dtype=dtype,
                         device=device, gradient_checkpointing=checkpointing)
    engine = make_engine(config, model_path, tokenizer, device, policy)
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=config.ppo.actor_lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=config.ppo.critic_lr, weight_decay=0.0)
    warmup = int(config.ppo.critic_warmup_ratio * config.ppo.steps)
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    max_new_tokens = max_new_tokens_of(config)
    test_prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    return Parts(config, device, task, tokenizer, policy, critic, engine, actor_opt, critic_opt, critic_sched,
                 objective, train, test, test_prompts, max_new_tokens)


def make_engine(config: RunConfig, model_path: Path, tokenizer: Any, device: str,
                policy: torch.nn.Module | None = None) -> RolloutEngine:
    """The configured rollout engine: `hf` samples from `policy` itself (loaded from model_path
    when None); `vllm` loads its own copy of the weights and syncs them from the policy."""
    from tre_cli.rollout import get_engine

    if config.rollout.engine == "hf":
        options: dict[str, Any] = {"model": policy}
    else:
        options = {"gpu_memory_utilization": config.rollout.gpu_memory_utilization,
                   "kv_cache_memory_bytes": config.rollout.kv_cache_memory_bytes}
    return get_engine(config.rollout.engine, model_path, tokenizer, device=device, dtype=config.model.dtype,
                      seed=config.run.seed, **options)


def step_examples(train: Sequence[dict], step: int, per_step: int, seed: int) -> list[dict]:
    """The prompts of `step` (1-based): consecutive slices of a per-epoch shuffle, so the data
    position is a function of the step and a resumed run continues exactly where it stopped."""
    n = len(train)
    out, perms = [], {}
    for i in range((step - 1) * per_step, step * per_step):
        epoch, index = divmod(i, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(train[perms[epoch][index]])
    return out
