"""What a run builds once: task, data, tokenizer, policy, critic (GAE only), rollout engine,
optimizers, the alpha controller."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch

from tre_cli.config import RunConfig, resolve_device, resolve_gradient_checkpointing
from tre_cli.losses.actor import ActorObjective
from tre_cli.losses.alpha_control import AlphaController
from tre_cli.losses.estimators import needs_critic
from tre_cli.rollout.base import RolloutEngine
from tre_cli.rollout.context import check_model_context, required_model_len
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
    # None (and its optimizer and scheduler) with a critic-free ppo.estimator.
    critic: torch.nn.Module | None
    engine: RolloutEngine
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    critic_sched: torch.optim.lr_scheduler.LambdaLR | None
    objective: ActorObjective
    train: list[dict]
    test: list[dict]
    test_prompts: list[list[int]]
    # The frozen starting policy for ppo.kl_coef > 0 (verl's use_kl_loss); None at kl_coef 0 (the paper).
    reference: torch.nn.Module | None = None
    # This process's place among the run's workers (run.workers); SINGLE: alone.
    workers: Workers = SINGLE
    # the alpha of the next step (method.alpha_control); None: the objective's, fixed.
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


def plan_context(config: RunConfig, model_path: Path) -> int:
    """The positions a run (or `tre eval`) needs, ppo.max_prompt_length + rollout.max_new_tokens,
    checked against the model's context before any model loads (rollout.context): the one place
    rollout.max_new_tokens is checked; everything after reads it from the config."""
    return check_model_context(model_path, config.ppo.max_prompt_length, config.rollout.max_new_tokens,
                               config.model.name)


def objective_of(config: RunConfig) -> ActorObjective:
    """The actor's objective from the method's registry entry and the PPO settings."""
    ppo = config.ppo
    return ActorObjective.of(config.method.name, config.method.params, clip=ppo.clip_low or ppo.clip,
                             dual_clip_c=ppo.dual_clip_c, loss_agg=ppo.loss_agg,
                             kl_coef=ppo.kl_coef, kl_loss_type=ppo.kl_loss_type, clip_high=ppo.clip_high,
                             agg_norm=agg_norm_of(config))


def agg_norm_of(config: RunConfig) -> float | None:
    """The constant of ppo.loss_agg "seq-mean-token-sum-norm": the max response length."""
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
        check_engine_placement(config.rollout.engine, workers, torch.cuda.device_count())
    checkpointing = resolve_gradient_checkpointing(config.model.gradient_checkpointing, device)
    objective = objective_of(config)
    model_path = resolve_model(config.model.name)
    max_model_len = plan_context(config, model_path)
    check_hf_batch_memory(config, model_path, device, workers)
    tokenizer = load_tokenizer(model_path)
    task, train, test = task_and_examples(config, tokenizer)
    # fp32 masters (parameters, gradients, optimizer state), forwards in the compute dtype (autocast).
    precision = training_precision(resolve_dtype(config.model.dtype, device), device)
    # With several workers each model loads into host memory and is sharded with FSDP2
    # before the next one loads; fully_shard moves each unit's shard to the worker's GPU as it
    # shards it, so the GPU holds the shards and at most one unit whole, never a whole model.
    load_device = "cpu" if workers.many else device
    policy, critic, reference = load_models([
        lambda: load_policy(model_path, device=load_device, gradient_checkpointing=checkpointing, precision=precision),
        # no critic at all for a critic-free estimator.
        (lambda: load_critic(resolve_model(config.model.critic_name or config.model.name), device=load_device,
                             gradient_checkpointing=checkpointing, precision=precision,
                             value_head_std=config.model.value_head_init_std))  # None: its initializer_range
        if needs_critic(config.ppo.estimator) else None,
        # A frozen copy of the starting weights, computed like the policy, only for a KL loss.
        (lambda: load_policy(model_path, device=load_device, precision=precision).requires_grad_(False))
        if config.ppo.kl_coef > 0 else None,
    ], (lambda module: shard_module(module, precision.compute)) if workers.many else None)
    if workers.many:
        # The engine samples from its own unsharded copy (synced after updates).
        engine = make_engine(config, model_path, tokenizer, engine_device(device), None, max_model_len=max_model_len)
    else:
        engine = make_engine(config, model_path, tokenizer, device, policy, max_model_len=max_model_len)
    # AdamW weight decay and the critic's warm-up ramp as named options (defaults: the released code).
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=config.ppo.actor_lr, weight_decay=config.ppo.weight_decay)
    critic_opt = critic_sched = None
    if critic is not None:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=config.ppo.critic_lr,
                                       weight_decay=config.ppo.weight_decay)
        warmup, ramp = int(config.ppo.critic_warmup_ratio * config.ppo.steps), config.ppo.critic_warmup_ramp
        critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda i: critic_warmup_factor(i, warmup, ramp))
    test_prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    alpha = AlphaController.of(config.method.params, objective.alpha)
    return Parts(config, device, task, tokenizer, policy, critic, engine, actor_opt, critic_opt, critic_sched,
                 objective, train, test, test_prompts, reference=reference, workers=workers,
                 alpha=alpha if alpha.adapts else None)


def load_models(loaders: Sequence[Callable[[], torch.nn.Module] | None],
                shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> list[torch.nn.Module | None]:
    """Each loader's model (None for a None loader), in order; with `shard`, each is sharded as
    soon as it is loaded, before the next one loads."""
    models: list[torch.nn.Module | None] = []
    for loader in loaders:
        module = loader() if loader is not None else None
        models.append(shard(module) if shard is not None and module is not None else module)
    return models


def engine_device(device: str, current: int | None = None) -> str:
    """The device a worker's engine is built on: on CUDA the worker's own GPU by index
    (`current`: torch.cuda.current_device() unless given), never plain "cuda"."""
    if device != "cuda":
        return device
    return f"cuda:{torch.cuda.current_device() if current is None else int(current)}"


def check_engine_placement(engine: str, workers: Workers, visible_gpus: int) -> None:
    """A ValueError (one line) for run.workers > 1 with in-process vLLM engines on a worker that
    sees several GPUs: vLLM's in-process executor places its engine on the first visible GPU
    whatever the worker's own (vLLM 0.32 takes no device argument), so every worker's engine
    would land on GPU 0. A worker that sees only its own GPU is fine."""
    if engine == "vllm" and workers.many and visible_gpus > 1:
        raise ValueError(
            f"rollout.engine=vllm with run.workers={workers.world}: each worker sees {visible_gpus} GPUs, and "
            "vLLM's in-process engine always takes the first one, so all engines would share GPU 0; "
            "use rollout.engine=hf, or give each worker only its own GPU (CUDA_VISIBLE_DEVICES)")


# What evaluation.evaluate gives the engine at once: this many prompts x eval.n_samples.
EVAL_BATCH_PROMPTS = 64


def check_hf_batch_memory(config: RunConfig, model_path: Path, device: str, workers: Workers = SINGLE,
                          total_memory: int | None = None) -> None:
    """A ValueError (one line, before any model loads) when the hf engine on CUDA would allocate a
    static KV cache larger than the GPU (`total_memory` bytes: the current device's unless given)
    for its largest batch: a step's share of prompts x rollouts_per_prompt, or an evaluation
    batch, each capped by rollout.max_batch_sequences, at prompt + T positions."""
    if config.rollout.engine != "hf" or device != "cuda":
        return
    from transformers import AutoConfig

    from tre_cli.models import resolve_dtype
    from tre_cli.rollout.hf import STATIC_CACHE_BUCKET

    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    model = AutoConfig.from_pretrained(str(model_path))
    heads = int(model.num_attention_heads)
    head_dim = int(getattr(model, "head_dim", None) or model.hidden_size // heads)
    kv_heads = int(getattr(model, "num_key_value_heads", None) or heads)
    itemsize = resolve_dtype(config.model.dtype, device).itemsize
    per_position = 2 * int(model.num_hidden_layers) * kv_heads * head_dim * itemsize  # keys and values
    width = required_model_len(config.ppo.max_prompt_length, config.rollout.max_new_tokens)
    width = -(-width // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    step = -(-config.ppo.prompts_per_step // workers.world) * config.ppo.rollouts_per_prompt
    sequences = max(step, EVAL_BATCH_PROMPTS * config.eval.n_samples)
    if config.rollout.max_batch_sequences is not None:
        sequences = min(sequences, config.rollout.max_batch_sequences)
    need = sequences * width * per_position
    if need > total_memory:
        fits = max(1, total_memory // 4 // (width * per_position))
        raise ValueError(
            f"the hf engine (rollout.engine=hf): a batch of {sequences} sequences x {width} positions needs a "
            f"{need / 2**30:,.0f} GiB KV cache, more than the GPU's {total_memory / 2**30:,.0f} GiB; set "
            f"rollout.max_batch_sequences (about {fits} fit in a quarter of it) or use rollout.engine=vllm")


def make_engine(config: RunConfig, model_path: Path, tokenizer: Any, device: str,
                policy: torch.nn.Module | None = None, *, max_model_len: int) -> RolloutEngine:
    """The configured rollout engine: `hf` samples from `policy` itself (loaded from model_path
    when None); `vllm` loads its own copy of the weights and syncs them from the policy, with a
    context of `max_model_len` positions (plan_context: prompt + T, never a fixed cap)."""
    from tre_cli.rollout import get_engine

    if config.rollout.engine == "hf":
        options: dict[str, Any] = {"model": policy, "max_batch_sequences": config.rollout.max_batch_sequences}
    else:
        options = {"gpu_memory_utilization": config.rollout.gpu_memory_utilization,
                   "kv_cache_memory_bytes": config.rollout.kv_cache_memory_bytes, "max_model_len": max_model_len,
                   "verbose": config.run.verbose}
    return get_engine(config.rollout.engine, model_path, tokenizer, device=device, dtype=config.model.dtype,
                      seed=config.run.seed, **options)


# Sampling streams: training step s samples stream s; the evaluation after step s
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
