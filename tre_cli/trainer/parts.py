"""What a run builds once: task, data, tokenizer, policy, critic (GAE only), rollout engine,
optimizers, the alpha controller."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from tre_cli.config import RunConfig, resolve_device, resolve_gradient_checkpointing
from tre_cli.losses.actor import ActorObjective
from tre_cli.losses.alpha_control import AlphaController
from tre_cli.losses.estimators import needs_critic
from tre_cli.rollout.base import RolloutEngine
from tre_cli.rollout.context import check_model_context
from tre_cli.schedules import critic_warmup_factor
from tre_cli.tasks import TaskProtocol
from tre_cli.trainer.distributed import SINGLE, Workers, current_workers, shard_module


@dataclass
class Parts:
    """Everything a run builds once."""

    config: RunConfig
    device: str
    task: TaskProtocol
    tokenizer: Any  # a transformers tokenizer
    policy: torch.nn.Module
    # issue 21: None (and its optimizer and scheduler) with a critic-free ppo.estimator.
    critic: torch.nn.Module | None
    engine: RolloutEngine
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    critic_sched: torch.optim.lr_scheduler.LambdaLR | None
    objective: ActorObjective
    train: list[dict]
    test: list[dict]
    test_prompts: list[list[int]]
    max_new_tokens: int
    # issue 11: the frozen starting policy for ppo.kl_coef > 0 (verl's use_kl_loss); None at kl_coef 0 (the paper).
    reference: torch.nn.Module | None = None
    # issue 12: this process's place among the run's workers (run.workers); SINGLE: alone.
    workers: Workers = SINGLE
    # issue 21: the alpha of the next step (method.alpha_control); None: the objective's, fixed.
    alpha: AlphaController | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def encode_prompt(task: TaskProtocol, example: dict, tokenizer: Any, max_prompt_length: int) -> list[int]:
    """The rendered prompt's ids. Prompts longer than max_prompt_length were dropped when the
    task was loaded (tasks.base.fit_prompts) unless task.options.overlong_prompts=truncate_left,
    which keeps the last max_prompt_length tokens (the question's end and the assistant header)."""
    ids = tokenizer(task.render(example, tokenizer), add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_length:])


def max_new_tokens_of(config: RunConfig) -> int:
    if config.rollout.max_new_tokens is None:
        raise ValueError("rollout.max_new_tokens is not set (the task overlay should set it)")
    return config.rollout.max_new_tokens


def objective_of(config: RunConfig) -> ActorObjective:
    """The actor's objective from the method's registry entry and the PPO settings."""
    ppo = config.ppo
    return ActorObjective.of(config.method.name, config.method.params, clip=ppo.clip_low or ppo.clip,
                             dual_clip_c=ppo.dual_clip_c, loss_agg=ppo.loss_agg,
                             kl_coef=ppo.kl_coef, kl_loss_type=ppo.kl_loss_type, clip_high=ppo.clip_high,
                             agg_norm=agg_norm_of(config))


def agg_norm_of(config: RunConfig) -> float | None:
    """issue 21: the constant of ppo.loss_agg "seq-mean-token-sum-norm": the max response length."""
    return float(config.rollout.max_new_tokens) if config.rollout.max_new_tokens else None


def task_and_examples(config: RunConfig, tokenizer: Any,
                      train: bool = True) -> tuple[TaskProtocol, list[dict], list[dict]]:
    """The task as this run uses it (HH: the policy model's reward model), its train examples
    (none when `train` is False) and its test examples (at most eval.limit), without prompts
    longer than ppo.max_prompt_length (tasks.base.fit_prompts). `tre run` and `tre eval` share it."""
    from tre_cli.tasks import task_for_run
    from tre_cli.tasks.base import fit_prompts

    task = task_for_run(config.task.name, config.task.options, config.model.name)
    splits = {"train": task.load("train")} if train else {}
    splits["test"] = task.load("test", limit=config.eval.limit)
    if train and not splits["train"]:
        raise ValueError(f"task {config.task.name!r} has no training examples")
    fitted = fit_prompts(task, tokenizer, config.ppo.max_prompt_length, splits)
    return task, fitted.get("train", []), fitted["test"]


def build(config: RunConfig) -> Parts:
    from tre_cli.models import load_critic, load_policy, load_tokenizer, resolve_dtype, resolve_model
    from tre_cli.models.precision import training_precision

    device = resolve_device(config.run.device)
    workers = current_workers()
    if workers.many and device == "cuda":  # one GPU a worker
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", workers.rank)))
    checkpointing = resolve_gradient_checkpointing(config.model.gradient_checkpointing, device)
    objective = objective_of(config)
    model_path = resolve_model(config.model.name)
    # issue 11: the model must hold prompt + T positions; checked before any model is loaded.
    check_model_context(model_path, config.ppo.max_prompt_length, config.rollout.max_new_tokens, config.model.name)
    tokenizer = load_tokenizer(model_path)
    task, train, test = task_and_examples(config, tokenizer)
    # issue 11: fp32 masters (parameters, gradients, optimizer state), forwards in the compute dtype (autocast).
    precision = training_precision(resolve_dtype(config.model.dtype, device), device)
    policy = load_policy(model_path, device=device, gradient_checkpointing=checkpointing, precision=precision)
    critic = None
    if needs_critic(config.ppo.estimator):  # issue 21: no critic at all for a critic-free estimator
        critic = load_critic(resolve_model(config.model.critic_name or config.model.name), device=device,
                             gradient_checkpointing=checkpointing, precision=precision,
                             value_head_std=config.model.value_head_init_std)  # None: the model's initializer_range
    # issue 11: a frozen copy of the starting weights, computed like the policy, only when a KL loss is asked for.
    reference = (load_policy(model_path, device=device, precision=precision).requires_grad_(False)
                 if config.ppo.kl_coef > 0 else None)
    if workers.many:
        # issue 12: FSDP2 shards; the engine samples from its own unsharded copy (synced after updates).
        for module in (policy, critic, reference):
            if module is not None:
                shard_module(module, precision.compute)
        engine = make_engine(config, model_path, tokenizer, device, None)
    else:
        engine = make_engine(config, model_path, tokenizer, device, policy)
    # issue 11: AdamW weight decay and the critic's warm-up ramp as named options (defaults: the released code).
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=config.ppo.actor_lr, weight_decay=config.ppo.weight_decay)
    critic_opt = critic_sched = None
    if critic is not None:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=config.ppo.critic_lr,
                                       weight_decay=config.ppo.weight_decay)
        warmup, ramp = int(config.ppo.critic_warmup_ratio * config.ppo.steps), config.ppo.critic_warmup_ramp
        critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda i: critic_warmup_factor(i, warmup, ramp))
    max_new_tokens = max_new_tokens_of(config)
    test_prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    alpha = AlphaController.of(config.method.params, objective.alpha)
    return Parts(config, device, task, tokenizer, policy, critic, engine, actor_opt, critic_opt, critic_sched,
                 objective, train, test, test_prompts, max_new_tokens, reference=reference, workers=workers,
                 alpha=alpha if alpha.adapts else None)


def make_engine(config: RunConfig, model_path: Path, tokenizer: Any, device: str,
                policy: torch.nn.Module | None = None) -> RolloutEngine:
    """The configured rollout engine: `hf` samples from `policy` itself (loaded from model_path
    when None); `vllm` loads its own copy of the weights and syncs them from the policy."""
    from tre_cli.rollout import get_engine

    # issue 11: vLLM's context is prompt + T (eval: its own T), never a fixed cap.
    max_model_len = check_model_context(model_path, config.ppo.max_prompt_length, config.rollout.max_new_tokens,
                                        config.model.name)
    if config.rollout.engine == "hf":
        options: dict[str, Any] = {"model": policy}
    else:
        options = {"gpu_memory_utilization": config.rollout.gpu_memory_utilization,
                   "kv_cache_memory_bytes": config.rollout.kv_cache_memory_bytes, "max_model_len": max_model_len,
                   "verbose": config.run.verbose}
    return get_engine(config.rollout.engine, model_path, tokenizer, device=device, dtype=config.model.dtype,
                      seed=config.run.seed, **options)


# Sampling streams (issue 12): training step s samples stream s; the evaluation after step s
# (0: before training, and `tre eval`) samples EVAL_STREAM + s. Every sample's noise is a function
# of (run seed, stream, its index), whoever generates it.
EVAL_STREAM = 1 << 40


def eval_stream(step: int) -> int:
    return EVAL_STREAM + int(step)


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
