"""The PPO loop: `run(config) -> RunResult`, for `tre run`, `tre sweep` trials and tests alike.

One step (REFERENCE.md, "PPO setup"):

    prompts -> engine.generate (n rollouts each) -> task.rewards -> old log-probs (policy, no grad)
    -> critic values -> reward on the last response token -> GAE -> (whiten) ->
    mini-batches of prompts x micro-batches of tokens:
        actor:  logits / temperature -> token_stats -> dual-clip surrogate (Forking-Tokens keeps
                the top-entropy tokens; KL-Cov penalises the top-cov tokens) - alpha * bonus
        critic: clipped value loss
    -> optimizer steps -> engine.sync_weights

The method enters only through the registry: `method.region(params)` (TRE-K/TRE-P), the
regularizer's `bonus_field` of TokenStats (the tensor alpha multiplies), and `method.selector`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from tre_cli.config import (
    RunConfig,
    load_run_config,
    resolve_device,
    resolve_dtype,
    resolve_gradient_checkpointing,
    with_overrides,
)
from tre_cli.evaluation import default_metric, evaluate
from tre_cli.losses import selectors
from tre_cli.losses.kl import kl_estimate
from tre_cli.losses.selection_groups import forking_tokens_in_groups, kl_cov_in_groups, selection_groups
from tre_cli.losses.ppo import aggregate_share, gae, masked_mean, place_terminal_reward, policy_loss, value_loss, whiten
from tre_cli.losses.registry import REGULARIZERS, get_method
from tre_cli.losses.stats import token_stats
from tre_cli.models.modes import set_training
from tre_cli.models.precision import autocast_for
from tre_cli.rollout.base import position_ids_from_mask
from tre_cli.rollout.context import check_model_context
from tre_cli.schedules import critic_warmup_factor
from tre_cli.tracking import RunResult, Tracker, atomic_dir, open_run_dir

# on_step(step, metrics, checkpoint_dir or None): how a sweep trial hears about progress.
StepCallback = Callable[[int, Dict[str, float], Optional[Path]], None]


@dataclass
class Parts:
    """Everything a run builds once."""

    config: RunConfig
    device: str
    task: object
    tokenizer: object
    policy: torch.nn.Module
    critic: torch.nn.Module
    engine: object
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    critic_sched: torch.optim.lr_scheduler.LambdaLR
    train: List[dict]
    test: List[dict]
    test_prompts: List[List[int]]
    max_new_tokens: int
    # issue 11: the frozen starting policy for ppo.kl_coef > 0 (verl's use_kl_loss); None at kl_coef 0 (the paper).
    reference: Optional[torch.nn.Module] = None


# ------------------------------------------------------------------------------------ building


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def encode_prompt(task, example: dict, tokenizer, max_prompt_length: int) -> List[int]:
    """The rendered prompt's ids. Prompts longer than max_prompt_length were dropped when the
    task was loaded (tasks.base.fit_prompts) unless task.options.overlong_prompts=truncate_left,
    which keeps the last max_prompt_length tokens (the question's end and the assistant header)."""
    ids = tokenizer(task.render(example, tokenizer), add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_length:])


def build(config: RunConfig) -> Parts:
    from tre_cli.models import load_critic, load_policy, load_tokenizer, resolve_model
    from tre_cli.models import resolve_dtype as resolve_torch_dtype
    from tre_cli.models.precision import training_precision
    from tre_cli.tasks import task_for_run
    from tre_cli.tasks.base import fit_prompts

    device = resolve_device(config.run.device)
    dtype = resolve_dtype(config.model.dtype, device)
    checkpointing = resolve_gradient_checkpointing(config.model.gradient_checkpointing, device)
    task = task_for_run(config.task.name, config.task.options, config.model.name)
    train = task.load("train")
    test = task.load("test", limit=config.eval.limit)
    if not train:
        raise ValueError(f"task {config.task.name!r} has no training examples")
    model_path = resolve_model(config.model.name)
    # issue 11: the model must hold prompt + T positions; checked before any model is loaded.
    check_model_context(model_path, config.ppo.max_prompt_length, config.rollout.max_new_tokens, config.model.name)
    tokenizer = load_tokenizer(model_path)
    fitted = fit_prompts(task, tokenizer, config.ppo.max_prompt_length, {"train": train, "test": test})
    train, test = fitted["train"], fitted["test"]
    # issue 11: fp32 masters (parameters, gradients, optimizer state), forwards in `dtype` (autocast).
    precision = training_precision(resolve_torch_dtype(dtype, device), device)
    policy = load_policy(model_path, device=device, gradient_checkpointing=checkpointing, precision=precision)
    critic = load_critic(resolve_model(config.model.critic_name or config.model.name), device=device,
                         gradient_checkpointing=checkpointing, precision=precision,
                         value_head_std=config.model.value_head_init_std)  # issue 11: None = the model's initializer_range
    # issue 11: a frozen copy of the starting weights, computed like the policy, only when a KL loss is asked for.
    reference = (load_policy(model_path, device=device, precision=precision).requires_grad_(False)
                 if config.ppo.kl_coef > 0 else None)
    engine = make_engine(config, model_path, tokenizer, device, dtype, policy)
    # issue 11: AdamW weight decay and the critic's warm-up ramp as named options (defaults: the released code).
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=config.ppo.actor_lr, weight_decay=config.ppo.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=config.ppo.critic_lr, weight_decay=config.ppo.weight_decay)
    warmup, ramp = int(config.ppo.critic_warmup_ratio * config.ppo.steps), config.ppo.critic_warmup_ramp
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda i: critic_warmup_factor(i, warmup, ramp))
    max_new_tokens = config.rollout.max_new_tokens
    if max_new_tokens is None:
        raise ValueError("rollout.max_new_tokens is not set (the task overlay should set it)")
    test_prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    return Parts(config, device, task, tokenizer, policy, critic, engine, actor_opt, critic_opt, critic_sched,
                 train, test, test_prompts, max_new_tokens, reference=reference)


def make_engine(config: RunConfig, model_path, tokenizer, device: str, dtype: str, policy=None):
    """The configured rollout engine: `hf` samples from `policy` itself; `vllm` loads its own copy
    of the weights (synced from the trainer after every update)."""
    from tre_cli.rollout import get_engine

    # issue 11: vLLM's context is prompt + T (eval: its own T), never a fixed cap.
    max_model_len = check_model_context(model_path, config.ppo.max_prompt_length, config.rollout.max_new_tokens,
                                        config.model.name)
    if config.rollout.engine == "hf":
        options = {"model": policy}
    else:
        options = {"gpu_memory_utilization": config.rollout.gpu_memory_utilization,
                   "kv_cache_memory_bytes": config.rollout.kv_cache_memory_bytes, "max_model_len": max_model_len}
    return get_engine(config.rollout.engine, model_path, tokenizer, device=device, dtype=dtype,
                      seed=config.run.seed, **options)


def step_examples(train: Sequence[dict], step: int, per_step: int, seed: int) -> List[dict]:
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


# ------------------------------------------------------------------------------------ one step


def _model_inputs(rollout, rows: torch.Tensor, response_width: int, device: str) -> dict:
    prompt_width = rollout.prompt_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids[rows], rollout.response_ids[rows, :response_width]], dim=1)
    mask = torch.cat([rollout.prompt_mask[rows], rollout.response_mask[rows, :response_width]], dim=1)
    positions = position_ids_from_mask(mask)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
            "prompt_width": prompt_width}


def _response_logits(policy, inputs: dict, response_width: int) -> torch.Tensor:
    """Logits [b, R, V] that predict the response tokens, computing the LM head on those positions only."""
    start = inputs["prompt_width"] - 1
    keep = torch.arange(start, start + response_width, device=inputs["input_ids"].device)
    with autocast_for(policy):  # issue 11: the compute dtype over fp32 masters; statistics stay outside
        out = policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], logits_to_keep=keep, use_cache=False)
    return out.logits


def _response_values(critic, inputs: dict, response_width: int) -> torch.Tensor:
    start = inputs["prompt_width"] - 1
    values = critic(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    return values[:, start:start + response_width]


def _micro_batches(rows: torch.Tensor, lengths: torch.Tensor, prompt_width: int, token_budget: int):
    """Split sample indices into micro-batches of at most `token_budget` padded tokens each."""
    width = prompt_width + int(lengths[rows].max())
    per_micro = max(1, token_budget // width)
    for start in range(0, len(rows), per_micro):
        chunk = rows[start:start + per_micro]
        yield chunk, int(lengths[chunk].max())


@torch.no_grad()
def _score_rollout(parts: Parts, rollout) -> Dict[str, torch.Tensor]:
    """Old log-probs (recomputed by the policy, as verl does) and old values, per micro-batch."""
    cfg = parts.config
    n = rollout.num_samples
    width = rollout.response_ids.shape[1]
    old_logprob = torch.zeros(n, width)
    old_values = torch.zeros(n, width)
    ref_logprob = torch.zeros(n, width)
    lengths = rollout.response_lengths
    rows = torch.arange(n)
    for chunk, r_width in _micro_batches(rows, lengths, rollout.prompt_ids.shape[1], cfg.ppo.micro_batch_tokens):
        inputs = _model_inputs(rollout, chunk, r_width, parts.device)
        logits = _response_logits(parts.policy, inputs, r_width)
        stats = token_stats(logits, rollout.response_ids[chunk, :r_width].to(parts.device),
                            temperature=rollout.temperature)
        old_logprob[chunk, :r_width] = stats.logprob.float().cpu()
        old_values[chunk, :r_width] = _response_values(parts.critic, inputs, r_width).float().cpu()
        if parts.reference is not None:  # issue 11: the reference policy's log-probs, once per step as verl
            ref_logprob[chunk, :r_width] = token_stats(_response_logits(parts.reference, inputs, r_width),
                                                       rollout.response_ids[chunk, :r_width].to(parts.device),
                                                       temperature=rollout.temperature).logprob.float().cpu()
    mask = rollout.response_mask.float()
    scored = {"old_logprob": old_logprob * mask, "old_values": old_values * mask}
    if parts.reference is not None:
        scored["ref_logprob"] = ref_logprob * mask
    return scored


class _Mean:
    """Weighted running means of detached scalars, for the step's metrics."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.weights: Dict[str, float] = {}

    def add(self, key: str, value, weight: float = 1.0) -> None:
        value = float(value.detach() if isinstance(value, torch.Tensor) else value)
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self) -> Dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


def ppo_update(parts: Parts, rollout, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
    """All mini-batch updates of one step; returns the step's actor/critic metrics."""
    cfg = parts.config
    method = get_method(cfg.method.name)
    params = cfg.method.params
    region = method.region(params)
    bonus_field = REGULARIZERS[method.regularizer].bonus_field
    alpha = float(params.get("alpha", 0.0)) if bonus_field else 0.0
    mode = cfg.ppo.loss_agg
    if method.selector == "forking-tokens" and mode != "token-mean":
        raise ValueError("forking-tokens averages over the kept tokens: it needs ppo.loss_agg=token-mean")
    n_rollouts = cfg.ppo.rollouts_per_prompt
    mask_all = rollout.response_mask.float()
    lengths = rollout.response_lengths
    prompt_width = rollout.prompt_ids.shape[1]
    temperature = rollout.temperature
    meter = _Mean()
    gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + step)
    n_prompts = rollout.num_samples // n_rollouts
    for _epoch in range(cfg.ppo.epochs):
        prompt_order = torch.randperm(n_prompts, generator=gen)
        for mb_start in range(0, n_prompts, cfg.ppo.mini_batch_prompts):
            prompts = prompt_order[mb_start:mb_start + cfg.ppo.mini_batch_prompts]
            rows = (prompts[:, None] * n_rollouts + torch.arange(n_rollouts)[None, :]).reshape(-1)
            micro = list(_micro_batches(rows, lengths, prompt_width, cfg.ppo.micro_batch_tokens))
            mb_mask = mask_all[rows]
            total_tokens = float(mb_mask.sum())
            total_seqs = float((mb_mask.sum(-1) > 0).sum())
            # issue 11: selections in fixed groups of sequences, seeded by run, step, epoch and mini-batch.
            group_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 7919 + _epoch * 131 + mb_start)
            selected = _selection_masks(parts, rollout, batch, micro, method.selector, params, group_gen) if method.selector else None
            kept = selected if method.selector == "forking-tokens" else None
            kept_total = float(sum(k.sum() for k in kept)) if kept is not None else None
            parts.actor_opt.zero_grad(set_to_none=True)
            parts.critic_opt.zero_grad(set_to_none=True)
            set_training(True, parts.policy, parts.critic)  # issue 11: checkpointing runs in training mode only
            for i, (chunk, r_width) in enumerate(micro):
                inputs = _model_inputs(rollout, chunk, r_width, parts.device)
                dev = parts.device
                mask = mask_all[chunk, :r_width].to(dev)
                tokens = rollout.response_ids[chunk, :r_width].to(dev)
                adv = batch["advantages"][chunk, :r_width].to(dev)
                old_lp = batch["old_logprob"][chunk, :r_width].to(dev)
                # Actor.
                logits = _response_logits(parts.policy, inputs, r_width)
                stats = token_stats(logits, tokens, region, temperature=temperature)
                del logits
                pg = policy_loss(stats.logprob, old_lp, adv, mask, clip=cfg.ppo.clip,
                                 clip_ratio_c=cfg.ppo.dual_clip_c, agg="token-mean")
                per_token, agg_mask, agg_total = pg.per_token, mask, total_tokens
                if method.selector == "forking-tokens":
                    agg_mask, agg_total = kept[i].to(dev).float(), kept_total
                elif method.selector == "kl-cov":
                    chosen = selected[i].to(dev)  # issue 11: chosen per selection group, not per micro-batch
                    per_token = selectors.kl_cov_loss(per_token, stats.logprob, old_lp, chosen, beta=float(params["beta"]))
                    meter.add("actor/klcov_selected_frac", chosen.float().sum() / mask.sum().clamp(min=1), float(mask.sum()))
                loss = aggregate_share(per_token, agg_mask, mode, agg_total, total_seqs, cfg.rollout.max_new_tokens)
                if alpha > 0:
                    bonus = getattr(stats, bonus_field)
                    reg = aggregate_share(bonus, mask, mode, total_tokens, total_seqs, cfg.rollout.max_new_tokens)
                    loss = loss - alpha * reg
                if parts.reference is not None:  # issue 11: + kl_coef * KL(pi || pi_ref), verl's use_kl_loss
                    kld = kl_estimate(stats.logprob, batch["ref_logprob"][chunk, :r_width].to(dev), cfg.ppo.kl_loss_type)
                    loss = loss + cfg.ppo.kl_coef * aggregate_share(kld, mask, mode, total_tokens, total_seqs,
                                                                    cfg.rollout.max_new_tokens)
                    meter.add("actor/kl_loss", masked_mean(kld.detach(), mask), float(mask.sum()))
                loss.backward()
                # Critic.
                values = _response_values(parts.critic, inputs, r_width)
                vl = value_loss(values, batch["old_values"][chunk, :r_width].to(dev),
                                batch["returns"][chunk, :r_width].to(dev), mask, clip=cfg.ppo.value_clip,
                                scale=cfg.ppo.critic_loss_coef)  # issue 11: released 1.0 (no 0.5)
                aggregate_share(vl.per_token, mask, mode, total_tokens, total_seqs, cfg.rollout.max_new_tokens).backward()
                # Metrics, weighted by tokens.
                w = float(mask.sum())
                for key, value in (("actor/p_max", stats.p_max), ("actor/entropy", stats.entropy),
                                   ("actor/min_entropy", stats.min_entropy)):
                    meter.add(key, masked_mean(value.detach(), mask), w)
                if region is not None:
                    meter.add("actor/tre_region_size", masked_mean(stats.region_size, mask), w)
                    meter.add("actor/tre_local_entropy", masked_mean(stats.region_entropy.detach(), mask), w)
                if bonus_field:
                    meter.add("actor/regularizer", masked_mean(getattr(stats, bonus_field).detach(), mask), w)
                meter.add("actor/pg_loss", masked_mean(pg.per_token.detach(), mask), w)
                for key, value in pg.metrics.items():
                    meter.add(key, value, w)
                meter.add("critic/vf_loss", masked_mean(vl.per_token.detach(), mask), w)
                meter.add("critic/vf_clipfrac", vl.metrics["critic/vf_clipfrac"], w)
                meter.add("critic/values", masked_mean(values.detach(), mask), w)
                if kept is not None:
                    meter.add("actor/forking_kept_frac", kept[i].float().sum() / mask.sum().clamp(min=1), w)
            actor_norm = torch.nn.utils.clip_grad_norm_(parts.policy.parameters(), cfg.ppo.max_grad_norm)
            critic_norm = torch.nn.utils.clip_grad_norm_(parts.critic.parameters(), cfg.ppo.max_grad_norm)
            meter.add("actor/grad_norm", actor_norm)
            meter.add("critic/grad_norm", critic_norm)
            if torch.isfinite(actor_norm):
                parts.actor_opt.step()
            if torch.isfinite(critic_norm):
                parts.critic_opt.step()
            set_training(False, parts.policy, parts.critic)  # issue 11: no-grad passes and sampling in eval mode
    metrics = meter.result()
    metrics["actor/lr"] = parts.actor_opt.param_groups[0]["lr"]
    metrics["critic/lr"] = parts.critic_opt.param_groups[0]["lr"]
    parts.critic_sched.step()
    return metrics


@torch.no_grad()
def _selection_masks(parts: Parts, rollout, batch, micro, selector: str, params, generator) -> List[torch.Tensor]:
    """issue 11: the Forking-Tokens kept tokens or KL-Cov penalised tokens of each micro-batch of a
    mini-batch, chosen within groups of ppo.selection_group_size sequences (scope "group", the
    released code's per-GPU micro-batch) or over the whole mini-batch (scope "global"); never per
    micro-batch, which is a memory knob. Scores come from a no-grad pass of the current policy
    (it does not change within a mini-batch) over all the mini-batch's sequences first."""
    rows = torch.cat([chunk for chunk, _ in micro])
    width = max(r_width for _, r_width in micro)
    entropy, logprob = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    offset = 0
    for chunk, r_width in micro:
        inputs = _model_inputs(rollout, chunk, r_width, parts.device)
        logits = _response_logits(parts.policy, inputs, r_width)
        stats = token_stats(logits, rollout.response_ids[chunk, :r_width].to(parts.device), temperature=rollout.temperature)
        entropy[offset:offset + len(chunk), :r_width] = stats.entropy.float().cpu()
        logprob[offset:offset + len(chunk), :r_width] = stats.logprob.float().cpu()
        offset += len(chunk)
    mask = rollout.response_mask[rows, :width].float()
    group_size = parts.config.ppo.selection_group_size if params["scope"] == "group" else None
    groups = selection_groups(len(rows), group_size, generator)
    if selector == "forking-tokens":
        chosen = forking_tokens_in_groups(entropy, mask, groups, float(params["top_ratio"]), params["count_rounding"])
    else:
        chosen = kl_cov_in_groups(batch["advantages"][rows, :width], logprob, mask, groups, float(params["ratio"]))
    out, offset = [], 0
    for chunk, r_width in micro:
        out.append(chosen[offset:offset + len(chunk), :r_width])
        offset += len(chunk)
    return out


def train_step(parts: Parts, step: int) -> Dict[str, float]:
    """One PPO step; returns its metrics (namespaced)."""
    cfg = parts.config
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    examples = step_examples(parts.train, step, cfg.ppo.prompts_per_step, cfg.run.seed)
    prompt_ids = [encode_prompt(parts.task, ex, parts.tokenizer, cfg.ppo.max_prompt_length) for ex in examples]
    parts.engine.wake()
    rollout = parts.engine.generate(prompt_ids, n=cfg.ppo.rollouts_per_prompt, max_new_tokens=parts.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    parts.engine.sleep()
    timings["timing/gen_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    answered = [examples[int(i)] for i in rollout.prompt_index]
    scores = torch.tensor(parts.task.rewards(rollout.texts, answered), dtype=torch.float32)
    timings["timing/reward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    batch = _score_rollout(parts, rollout)
    mask = rollout.response_mask.float()
    token_rewards = place_terminal_reward(scores, mask)
    advantages, returns = gae(token_rewards, batch["old_values"], mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = whiten(advantages, mask)
    batch.update(advantages=advantages, returns=returns)
    timings["timing/old_logprob_values_s"] = time.perf_counter() - t

    t = time.perf_counter()
    update_metrics = ppo_update(parts, rollout, batch, step)
    timings["timing/update_s"] = time.perf_counter() - t
    t = time.perf_counter()
    parts.engine.sync_weights(parts.policy.state_dict())  # issue 11: each engine casts/skips as it needs
    timings["timing/sync_s"] = time.perf_counter() - t
    timings["timing/step_s"] = time.perf_counter() - t0

    lengths = rollout.response_lengths.float()
    n_tokens = float(lengths.sum())
    metrics = {
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "reward/max": float(scores.max()),
        "reward/solved_frac": float((scores >= 1.0 - 1e-9).float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float((~rollout.finished).float().mean()),
        "critic/advantages_abs": float(masked_mean(advantages.abs(), mask)),
        "critic/returns": float(masked_mean(returns, mask)),
        "perf/response_tokens": n_tokens,
        "perf/gen_tokens_per_s": n_tokens / max(timings["timing/gen_s"], 1e-9),
        "perf/update_tokens_per_s": n_tokens / max(timings["timing/update_s"], 1e-9),
        "perf/tokens_per_s": n_tokens / max(timings["timing/step_s"], 1e-9),
        **update_metrics,
        **timings,
    }
    if torch.cuda.is_available() and parts.device == "cuda":
        metrics["perf/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return metrics


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(parts: Parts, tracker: Tracker, step: int) -> Path:
    target = tracker.run_dir.checkpoint_dir(step)
    with atomic_dir(target) as tmp:
        parts.policy.save_pretrained(tmp / "policy", safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp / "policy")
        torch.save({
            "critic": parts.critic.state_dict(),
            "actor_opt": parts.actor_opt.state_dict(),
            "critic_opt": parts.critic_opt.state_dict(),
            "critic_sched": parts.critic_sched.state_dict(),
            "rng": _rng_state(parts),
        }, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    tracker.run_dir.prune_checkpoints(parts.config.run.keep_last)
    return target


def load_checkpoint(parts: Parts, path: Path) -> int:
    from safetensors.torch import load_file

    files = sorted((path / "policy").glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f), device=str(parts.device)))
    missing, unexpected = parts.policy.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the policy (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    saved = torch.load(path / "trainer.pt", map_location=parts.device, weights_only=False)
    parts.critic.load_state_dict(saved["critic"])
    parts.actor_opt.load_state_dict(saved["actor_opt"])
    parts.critic_opt.load_state_dict(saved["critic_opt"])
    parts.critic_sched.load_state_dict(saved["critic_sched"])
    _set_rng_state(parts, saved["rng"])
    parts.engine.sync_weights(parts.policy.state_dict())  # issue 11: each engine casts/skips as it needs
    return int(json.loads((path / "state.json").read_text())["step"])


def _rng_state(parts: Parts) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(parts.engine, "generator", None)
    if isinstance(generator, torch.Generator):
        state["engine"] = generator.get_state()
    return state


def _set_rng_state(parts: Parts, state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(parts.engine, "generator", None)
    if "engine" in state and isinstance(generator, torch.Generator):
        generator.set_state(state["engine"].cpu() if generator.device.type == "cpu" else state["engine"])


# ------------------------------------------------------------------------------------ the run


def evaluate_model(config: RunConfig, console=None) -> RunResult:
    """`tre eval`: the evaluation protocol on a model or checkpoint, recorded as a run directory
    whose result is labelled "base" (the Base row of Table 1) and whose eval.jsonl has step 0."""
    from rich.console import Console

    from tre_cli.models import load_policy, load_tokenizer, resolve_model
    from tre_cli.tasks import task_for_run
    from tre_cli.tasks.base import fit_prompts

    console = console or Console(stderr=True)
    _quiet_transformers()
    device = resolve_device(config.run.device)
    _seed_everything(config.run.seed)
    task = task_for_run(config.task.name, config.task.options, config.model.name)
    test = task.load("test", limit=config.eval.limit)
    model_path = resolve_model(config.model.name)
    tokenizer = load_tokenizer(model_path)
    test = fit_prompts(task, tokenizer, config.ppo.max_prompt_length, {"test": test})["test"]
    dtype = resolve_dtype(config.model.dtype, device)
    policy = load_policy(model_path, dtype=dtype, device=device) if config.rollout.engine == "hf" else None
    engine = make_engine(config, model_path, tokenizer, device, dtype, policy)
    prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    if config.rollout.max_new_tokens is None:
        raise ValueError("rollout.max_new_tokens is not set (the task overlay should set it)")
    with Tracker(config, config.run.out) as tracker:
        console.print(f"[bold]eval[/] {config.model.name} on {len(test)} {config.task.name} test prompts "
                      f"x {config.eval.n_samples} samples -> {tracker.path}")
        result = evaluate(engine, task, test, prompts, n_samples=config.eval.n_samples,
                          temperature=config.eval.temperature, top_p=config.eval.top_p,
                          max_new_tokens=config.rollout.max_new_tokens,
                          metric=config.eval.metric or default_metric(config.task.name))
        tracker.log_eval(step=0, score=result.score, metric=result.metric, n_prompts=result.n_prompts,
                         n_samples=result.n_samples, extra=result.extra())
        run_result = tracker.finish("finished", steps_done=0, method="base")
    engine.close()
    return run_result


def run_eval(parts: Parts, step: int, tracker: Optional[Tracker]):
    cfg = parts.config
    result = evaluate(parts.engine, parts.task, parts.test, parts.test_prompts, n_samples=cfg.eval.n_samples,
                      temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=parts.max_new_tokens,
                      metric=cfg.eval.metric or default_metric(cfg.task.name))
    if tracker is not None:
        tracker.log_eval(step=step, score=result.score, metric=result.metric, n_prompts=result.n_prompts,
                         n_samples=result.n_samples, extra=result.extra())
    return result


def run(config: RunConfig, on_step: Optional[StepCallback] = None, console=None) -> RunResult:
    """Train with `config` (a fresh run, or `run.resume` = a run directory to continue)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    _quiet_transformers()
    resume_step = None
    run_dir = config.run.out
    if config.run.resume:
        opened = open_run_dir(config.run.resume)
        config = with_overrides(load_run_config(opened.path), {"run.resume": str(opened.path)})
        latest = opened.latest_checkpoint()
        resume_step = latest[0] if latest else 0
        run_dir = opened.path
    resolve_device(config.run.device)  # fail before any file is written
    _seed_everything(config.run.seed)
    parts = build(config)
    with Tracker(config, run_dir, resume_step=resume_step) as tracker:
        start = 1
        if resume_step:
            loaded = load_checkpoint(parts, tracker.run_dir.checkpoint_dir(resume_step))
            start = loaded + 1
            console.print(f"[bold]resumed[/] {tracker.path} from step {loaded}")
        else:
            console.print(f"[bold]run[/] {tracker.path}")
        cfg = parts.config = tracker.config
        steps = cfg.ppo.steps
        step = start - 1
        if cfg.eval.before_train and start == 1 and not tracker.has_eval(0):
            evaluated = run_eval(parts, 0, tracker)
            console.print(f"step {0:>4}/{steps}  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/] (before training)")
        bar = _progress_bar(console, steps, start - 1)
        try:
            for step in range(start, steps + 1):
                metrics = train_step(parts, step)
                tracker.log(metrics, step=step)
                evaluated = None
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == steps:
                    evaluated = run_eval(parts, step, tracker)
                    metrics = {**metrics, "eval/score": evaluated.score}
                checkpoint = None
                if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == steps:
                    checkpoint = save_checkpoint(parts, tracker, step)
                console.print(_progress_line(step, steps, metrics, evaluated), soft_wrap=True)
                bar.advance(metrics)
                if on_step is not None:
                    on_step(step, metrics, checkpoint)
        finally:
            bar.stop()
        result = tracker.finish("finished", steps_done=step)
    parts.engine.close()
    return result


class _Bar:
    """A live progress bar under the per-step lines in a terminal; nothing elsewhere (CI logs
    keep only the lines)."""

    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, metrics: Dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, reward=metrics["reward/mean"])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _progress_bar(console, steps: int, done: int) -> _Bar:
    if not console.is_terminal:
        return _Bar(None, None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TextColumn("reward {task.fields[reward]:.3f}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task("steps", total=steps, completed=done, reward=float("nan"))
    progress.start()
    return _Bar(progress, task)


def _quiet_transformers() -> None:
    """Checkpoint saves and loads would each draw a progress bar; one line per step is ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _progress_line(step: int, steps: int, m: Dict[str, float], evaluated) -> str:
    line = (f"step {step:>4}/{steps}  reward {m['reward/mean']:.3f}  p_max {m.get('actor/p_max', math.nan):.3f}  "
            f"entropy {m.get('actor/entropy', math.nan):.3f}  len {m['response/length_mean']:.0f}  "
            f"{m['timing/step_s']:.1f}s  {m['perf/tokens_per_s']:.0f} tok/s")
    if "actor/tre_region_size" in m:
        line += f"  region {m['actor/tre_region_size']:.1f}"
    if evaluated is not None:
        line += f"  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/]"
    return line
