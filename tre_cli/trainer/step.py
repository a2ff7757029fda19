"""One PPO step (the paper's setup, as its released code runs it):

    prompts -> engine.generate (n rollouts each) -> task.rewards -> old log-probs (policy, no grad)
    -> critic values -> reward on the last response token -> GAE -> (whiten) ->
    mini-batches of prompts x micro-batches of tokens:
        actor:  logits / temperature -> token_stats -> losses.actor.actor_loss
        critic: values -> losses.actor.critic_loss
    -> optimizer steps -> the engine syncs its weights if it needs to -> the alpha controller

With a critic-free ppo.estimator there is no critic: the advantages come from each
prompt's group of scores (losses/estimators.py) and every critic phase above is skipped.

The method enters only through `parts.objective` (losses.actor.ActorObjective, built from the
registry): the trust region token_stats computes, and the loss it composes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

import torch

from tre_cli import metrics as M
from tre_cli.losses.actor import PPOBatch, actor_loss, critic_loss
from tre_cli.losses.estimators import outcome_advantages, uniform_groups
from tre_cli.losses.ppo import gae, masked_mean, place_terminal_reward, whiten
from tre_cli.losses.registry import SCOPE_GROUP
from tre_cli.losses.selection_groups import selection_groups
from tre_cli.losses.stats import tail_draws, token_stats
from tre_cli.models.modes import set_training
from tre_cli.models.precision import autocast_for
from tre_cli.rollout.base import Rollout, assemble_rollout, cut_at_stop, position_ids_from_mask
from tre_cli.trainer import distributed
from tre_cli.trainer.parts import Parts, encode_prompt, step_examples
from tre_cli.trainer.progress import NO_PHASES, Phases


# The phases of a step as the progress display names them.
GENERATE, OLD_LOGPROB, UPDATE = "generate", "old log-probs", "update"


@dataclass(frozen=True)
class Scored:
    """A step's rollout scored before the updates ([N, R] each, on the CPU, 0 on padding)."""

    old_logprob: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    # The frozen reference policy's log-probs (ppo.kl_coef > 0), else None.
    ref_logprob: torch.Tensor | None = None
    # [N] bool, the rows the updates use (ppo.skip_uniform_groups); None: every row.
    keep: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int


def _model_inputs(rollout: Rollout, rows: torch.Tensor, response_width: int, device: str) -> ModelInputs:
    prompt_width = rollout.prompt_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids[rows], rollout.response_ids[rows, :response_width]], dim=1)
    mask = torch.cat([rollout.prompt_mask[rows], rollout.response_mask[rows, :response_width]], dim=1)
    positions = position_ids_from_mask(mask)
    return ModelInputs(ids.to(device), mask.to(device), positions.to(device), prompt_width)


def _response_logits(policy: torch.nn.Module, inputs: ModelInputs, response_width: int) -> torch.Tensor:
    """Logits [b, R, V] that predict the response tokens, computing the LM head on those positions only."""
    start = inputs.prompt_width - 1
    keep = torch.arange(start, start + response_width, device=inputs.input_ids.device)
    with autocast_for(policy):  # the compute dtype over fp32 masters; statistics stay outside
        out = policy(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                     position_ids=inputs.position_ids, logits_to_keep=keep, use_cache=False)
    return out.logits


def _response_values(critic: torch.nn.Module, inputs: ModelInputs, response_width: int) -> torch.Tensor:
    start = inputs.prompt_width - 1
    values = critic(inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    return values[:, start:start + response_width]


def micro_batches(rows: torch.Tensor, lengths: torch.Tensor, prompt_width: int, token_budget: int,
                  order: str = "rows") -> Iterator[tuple[torch.Tensor, int]]:
    """Split sample indices into micro-batches of at most `token_budget` padded tokens each (as
    many rows as fit at the longest response's width; one at least), yielded with each one's
    longest response length. Rows that fit in one micro-batch stay one, in order. Otherwise, with
    `order` "rows" (ppo.micro_batch_order), in their order; with "length", longest first (the
    short micro-batch, if any, where it pads least), so a short response is not padded to a long
    one's width (never more padding than the same split in row order): less compute for the same
    loss, as each micro-batch's loss is its share of the mini-batch's whatever the split."""
    longest = int(lengths[rows].max())
    per_micro = max(1, token_budget // (prompt_width + longest))
    if len(rows) <= per_micro:
        yield rows, longest
        return
    full, short = divmod(len(rows), per_micro)

    def split(at: int) -> list[int]:  # chunk sizes with the short one (if any) at position `at`
        sizes = [per_micro] * full
        return sizes[:at] + [short] + sizes[at:] if short else sizes

    if order == "rows":
        ordered, sizes = rows, split(full)
    else:
        ordered = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
        sorted_lengths = lengths[ordered].tolist()

        def padded(sizes: list[int]) -> int:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return sum(size * sorted_lengths[start] for size, start in zip(sizes, starts))

        sizes = min((split(at) for at in (range(full + 1) if short else [0])), key=padded)
    start = 0
    for size in sizes:
        chunk = ordered[start:start + size]
        start += size
        yield chunk, int(lengths[chunk].max())


def worker_micro_batches(parts: Parts, rows: torch.Tensor, lengths: torch.Tensor,
                         prompt_width: int) -> list[tuple[torch.Tensor, int, bool]]:
    """(rows, response width, real) of this worker's micro-batches of `rows`. One worker: all of
    `rows`' micro-batches, all real. Several workers: those of its contiguous share, then
    empty ones (`real` False: a row of `rows` whose results are dropped and whose loss has
    mask 0) up to the most any worker has, since every sharded forward is a collective."""
    workers = parts.workers
    budget, order = parts.config.ppo.micro_batch_tokens, parts.config.ppo.micro_batch_order
    if not workers.many:
        return [(chunk, width, True) for chunk, width in micro_batches(rows, lengths, prompt_width, budget, order)]
    mine = rows[share(len(rows), workers).start:share(len(rows), workers).stop]
    micro = [(chunk, width, True) for chunk, width in micro_batches(mine, lengths, prompt_width, budget, order)] \
        if len(mine) else []
    filler = rows[:1]
    micro += [(filler, int(lengths[filler].max()), False)] * (distributed.all_max(len(micro)) - len(micro))
    return micro


share = distributed.share


@torch.no_grad()
def _old_logprob_and_values(parts: Parts, rollout: Rollout,
                            phases: Phases = NO_PHASES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Old log-probs (recomputed by the policy, as verl does), old values and (with a reference
    policy) the reference log-probs, per micro-batch."""
    n = rollout.num_samples
    width = rollout.response_ids.shape[1]
    old_logprob = torch.zeros(n, width)
    old_values = torch.zeros(n, width)
    ref_logprob = torch.zeros(n, width) if parts.reference is not None else None
    rows = torch.arange(n)
    micro = worker_micro_batches(parts, rows, rollout.response_lengths, rollout.prompt_ids.shape[1])
    phases.start(OLD_LOGPROB, len(micro), "micro-batches")
    for done, (chunk, r_width, real) in enumerate(micro):
        phases.update(OLD_LOGPROB, done)
        if not real:  # join the other workers' collectives, keep nothing
            inputs = _model_inputs(rollout, chunk, r_width, parts.device)
            _response_logits(parts.policy, inputs, r_width)
            if parts.critic is not None:
                _response_values(parts.critic, inputs, r_width)
            if parts.reference is not None:
                _response_logits(parts.reference, inputs, r_width)
            continue
        inputs = _model_inputs(rollout, chunk, r_width, parts.device)
        logits = _response_logits(parts.policy, inputs, r_width)
        stats = token_stats(logits, rollout.response_ids[chunk, :r_width].to(parts.device),
                            temperature=rollout.temperature)
        old_logprob[chunk, :r_width] = stats.logprob.float().cpu()
        if parts.critic is not None:
            old_values[chunk, :r_width] = _response_values(parts.critic, inputs, r_width).float().cpu()
        if ref_logprob is not None:  # the reference policy's log-probs, once per step as verl
            ref_logprob[chunk, :r_width] = token_stats(_response_logits(parts.reference, inputs, r_width),
                                                       rollout.response_ids[chunk, :r_width].to(parts.device),
                                                       temperature=rollout.temperature).logprob.float().cpu()
    phases.done(OLD_LOGPROB)
    if parts.workers.many:  # each row was computed by one worker; the sum is the whole batch
        old_logprob, old_values = distributed.all_reduce_sum(old_logprob), distributed.all_reduce_sum(old_values)
        ref_logprob = distributed.all_reduce_sum(ref_logprob) if ref_logprob is not None else None
    mask = rollout.response_mask.float()
    return old_logprob * mask, old_values * mask, (ref_logprob * mask if ref_logprob is not None else None)


def score_rollout(parts: Parts, rollout: Rollout, scores: torch.Tensor, phases: Phases = NO_PHASES) -> Scored:
    """Old log-probs and values, then GAE on the terminal rewards (whitened as the released code
    does); with a critic-free estimator, old log-probs and each prompt group's advantages."""
    cfg = parts.config.ppo
    old_logprob, old_values, ref_logprob = _old_logprob_and_values(parts, rollout, phases)
    mask = rollout.response_mask.float()
    if parts.critic is None:  # no values, no returns
        advantages = outcome_advantages(scores.float(), rollout.prompt_index, mask, cfg.estimator)
        returns = torch.zeros_like(advantages)
    else:
        advantages, returns = gae(place_terminal_reward(scores, mask), old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
    keep = ~uniform_groups(scores, rollout.prompt_index) if cfg.skip_uniform_groups else None
    return Scored(old_logprob, old_values, advantages, returns, ref_logprob, keep)


class _Mean:
    """Weighted running means of detached scalars, for the step's metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, key: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        value = float(value.detach() if isinstance(value, torch.Tensor) else value)
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


@torch.no_grad()
def _selection(parts: Parts, rollout: Rollout, scored: Scored, rows: torch.Tensor,
               micro: list[tuple[torch.Tensor, int, bool]], generator: torch.Generator,
               mask_all: torch.Tensor) -> list[torch.Tensor]:
    """The method's selected tokens of each micro-batch of a mini-batch: the selector
    chooses within groups of ppo.selection_group_size sequences (scope "group", the released
    code's per-GPU micro-batch) or over the whole mini-batch (scope "global"); never per
    micro-batch, which is a memory knob. Its scores come from a no-grad pass of the current
    policy (it does not change within a mini-batch) over all the mini-batch's sequences first;
    with several workers each scores its share and the scores are summed into the
    whole mini-batch's, so the choice is the one a single worker makes."""
    selector = parts.objective.selector
    assert selector is not None
    width = int(rollout.response_lengths[rows].max())
    position = {row: i for i, row in enumerate(rows.tolist())}

    def at(chunk: torch.Tensor) -> torch.Tensor:
        return torch.tensor([position[row] for row in chunk.tolist()], dtype=torch.long)

    entropy, logprob = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for chunk, r_width, real in micro:
        inputs = _model_inputs(rollout, chunk, r_width, parts.device)
        logits = _response_logits(parts.policy, inputs, r_width)
        if not real:
            continue
        stats = token_stats(logits, rollout.response_ids[chunk, :r_width].to(parts.device),
                            temperature=rollout.temperature)
        entropy[at(chunk), :r_width] = stats.entropy.float().cpu()
        logprob[at(chunk), :r_width] = stats.logprob.float().cpu()
    if parts.workers.many:
        entropy, logprob = distributed.all_reduce_sum(entropy), distributed.all_reduce_sum(logprob)
    mask = mask_all[rows, :width]
    group_size = parts.config.ppo.selection_group_size if selector.scope == SCOPE_GROUP else None
    groups = selection_groups(len(rows), group_size, generator)
    chosen = selector.choose(entropy, logprob, scored.advantages[rows, :width], mask, groups)
    return [chosen[at(chunk), :r_width] if real else torch.zeros_like(chosen[:len(chunk), :r_width])
            for chunk, r_width, real in micro]


def ppo_update(parts: Parts, rollout: Rollout, scored: Scored, step: int,
               phases: Phases = NO_PHASES) -> dict[str, float]:
    """All mini-batch updates of one step; returns the step's actor/critic metrics."""
    cfg = parts.config
    objective = parts.objective
    if parts.alpha is not None:  # this step's alpha from the controller
        objective = dataclasses.replace(objective, alpha=parts.alpha.applied)
    selector = objective.selector
    critic = parts.critic
    n_rollouts = cfg.ppo.rollouts_per_prompt
    mask_all = rollout.response_mask.float()
    if scored.keep is not None:  # ppo.skip_uniform_groups
        mask_all = mask_all * scored.keep[:, None].float()
    lengths = rollout.response_lengths
    prompt_width = rollout.prompt_ids.shape[1]
    meter = _Mean()
    gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + step)
    n_prompts = rollout.num_samples // n_rollouts
    dev = parts.device
    scale = distributed.loss_scale(parts.workers)  # FSDP averages gradients over workers
    per_epoch = -(-n_prompts // cfg.ppo.mini_batch_prompts)
    phases.start(UPDATE, cfg.ppo.epochs * per_epoch, "mini-batches")
    for _epoch in range(cfg.ppo.epochs):
        prompt_order = torch.randperm(n_prompts, generator=gen)
        for mb_start in range(0, n_prompts, cfg.ppo.mini_batch_prompts):
            mini_done = _epoch * per_epoch + mb_start // cfg.ppo.mini_batch_prompts
            prompts = prompt_order[mb_start:mb_start + cfg.ppo.mini_batch_prompts]
            rows = (prompts[:, None] * n_rollouts + torch.arange(n_rollouts)[None, :]).reshape(-1)
            micro = worker_micro_batches(parts, rows, lengths, prompt_width)
            mb_mask = mask_all[rows]
            total_tokens = float(mb_mask.sum())
            total_seqs = float((mb_mask.sum(-1) > 0).sum())
            if scored.keep is not None and not bool(scored.keep[rows].any()):
                continue  # every group of this mini-batch was dropped: no update
            selected: list[torch.Tensor] | None = None
            selected_total = None
            if selector is not None:
                # Selections in fixed groups of sequences, seeded by run, step, epoch and mini-batch.
                group_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 7919 + _epoch * 131
                                                          + mb_start)
                phases.update(UPDATE, mini_done, "selection pass")
                selected = _selection(parts, rollout, scored, rows, micro, group_gen, mask_all)
                selected_total = float(sum(s.sum() for s in selected))
                if parts.workers.many:  # the whole mini-batch's count
                    selected_total = float(distributed.all_reduce_sum(torch.tensor([selected_total],
                                                                                   dtype=torch.float64)))
            parts.actor_opt.zero_grad(set_to_none=True)
            if critic is not None:
                parts.critic_opt.zero_grad(set_to_none=True)
            # Checkpointing runs in training mode only
            set_training(True, *(m for m in (parts.policy, critic) if m is not None))
            for i, (chunk, r_width, real) in enumerate(micro):
                phases.update(UPDATE, mini_done, f"micro-batch {i + 1}/{len(micro)}")
                inputs = _model_inputs(rollout, chunk, r_width, dev)
                batch = PPOBatch(
                    mask=(mask_all[chunk, :r_width] if real else torch.zeros(len(chunk), r_width)).to(dev),
                    old_logprob=scored.old_logprob[chunk, :r_width].to(dev),
                    advantages=scored.advantages[chunk, :r_width].to(dev),
                    old_values=scored.old_values[chunk, :r_width].to(dev),
                    returns=scored.returns[chunk, :r_width].to(dev),
                    tokens=total_tokens, seqs=total_seqs,
                    selected=selected[i].to(dev) if selected is not None else None, selected_total=selected_total,
                    ref_logprob=scored.ref_logprob[chunk, :r_width].to(dev) if scored.ref_logprob is not None else None,
                )
                logits = _response_logits(parts.policy, inputs, r_width)
                stats = token_stats(logits, rollout.response_ids[chunk, :r_width].to(dev), objective.region,
                                    temperature=rollout.temperature, tail_k=cfg.metrics.tail_k)
                del logits
                actor = actor_loss(stats, batch, objective)
                (actor.loss * scale).backward() if parts.workers.many else actor.loss.backward()
                critic_metrics = {}
                if critic is not None:
                    values = _response_values(critic, inputs, r_width)
                    critic_out = critic_loss(values, batch, clip=cfg.ppo.value_clip, loss_agg=cfg.ppo.loss_agg,
                                             scale=cfg.ppo.critic_loss_coef,  # the released code's 1.0
                                             agg_norm=objective.agg_norm)
                    (critic_out.loss * scale).backward() if parts.workers.many else critic_out.loss.backward()
                    critic_metrics = critic_out.metrics
                if not real:  # an empty micro-batch (mask 0, zero gradients) has no metrics
                    continue
                # Metrics, weighted by tokens.
                w = float(batch.mask.sum())
                for key, value in {**actor.metrics, **critic_metrics}.items():
                    meter.add(key, value, w)
            actor_norm = torch.nn.utils.clip_grad_norm_(parts.policy.parameters(), cfg.ppo.max_grad_norm)
            if parts.workers.many:  # the norm of the sharded gradients, on every worker
                actor_norm = distributed.local_tensor(actor_norm)
            meter.add("actor/grad_norm", actor_norm)
            if torch.isfinite(actor_norm):
                parts.actor_opt.step()
            if critic is not None:
                critic_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.ppo.max_grad_norm)
                if parts.workers.many:
                    critic_norm = distributed.local_tensor(critic_norm)
                meter.add("critic/grad_norm", critic_norm)
                if torch.isfinite(critic_norm):
                    parts.critic_opt.step()
            set_training(False, *(m for m in (parts.policy, critic) if m is not None))  # eval mode
    # no gradient outlives the last optimizer step (the engine's sync wakes it next).
    parts.actor_opt.zero_grad(set_to_none=True)
    if parts.critic_opt is not None:
        parts.critic_opt.zero_grad(set_to_none=True)
    phases.done(UPDATE)
    metrics = distributed.merge_weighted_means(meter.sums, meter.weights) if parts.workers.many else meter.result()
    metrics["actor/lr"] = parts.actor_opt.param_groups[0]["lr"]
    if critic is not None:
        metrics["critic/lr"] = parts.critic_opt.param_groups[0]["lr"]
        parts.critic_sched.step()
    return metrics


def train_step(parts: Parts, step: int, phases: Phases = NO_PHASES) -> dict[str, float]:
    """One PPO step; returns its metrics (namespaced). `phases` shows its progress (display only)."""
    cfg = parts.config
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    examples = step_examples(parts.train, step, cfg.ppo.prompts_per_step, cfg.run.seed)
    prompt_ids = [encode_prompt(parts.task, ex, parts.tokenizer, cfg.ppo.max_prompt_length) for ex in examples]
    parts.engine.wake()
    phases.start(GENERATE, len(prompt_ids) * cfg.ppo.rollouts_per_prompt, "sequences")
    if parts.workers.many:
        rollout = _generate_shared(parts, prompt_ids, step)
    else:
        rollout = parts.engine.generate(prompt_ids, n=cfg.ppo.rollouts_per_prompt,
                                        max_new_tokens=cfg.rollout.max_new_tokens,
                                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, stream=step,
                                        progress=phases.counter(GENERATE))
    rollout = cut_at_stop(rollout, cfg.rollout.stop, parts.tokenizer)
    phases.done(GENERATE)
    parts.engine.sleep()
    timings["timing/gen_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    answered = [examples[int(i)] for i in rollout.prompt_index]
    scores = torch.tensor(parts.task.rewards(rollout.texts, answered), dtype=torch.float32)
    timings["timing/reward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    scored = score_rollout(parts, rollout, scores, phases)
    timings["timing/old_logprob_values_s"] = time.perf_counter() - t

    t = time.perf_counter()
    update_metrics = ppo_update(parts, rollout, scored, step, phases)
    timings["timing/update_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # With several workers the engine's copy takes the weights gathered from the shards,
    # one parameter at a time.
    parts.engine.sync_weights(distributed.stream_full_state(parts.policy) if parts.workers.many else parts.policy)
    timings["timing/sync_s"] = time.perf_counter() - t
    timings["timing/step_s"] = time.perf_counter() - t0
    return {**_step_metrics(rollout, scores, scored, timings, parts.critic is not None), **update_metrics,
            **timings, **_memory_metrics(parts.device), **rollout_gap(rollout, scored),
            **_tail_draw_metrics(rollout, scored, cfg.metrics.tail_p), **control_alpha(parts, update_metrics)}


def _tail_draw_metrics(rollout: Rollout, scored: Scored, tail_p: float) -> dict[str, float]:
    """Sampled tokens the sampling policy gave less than tail_p, from the trainer's recomputed
    log-probs of the policy that sampled them (the engine's own are absent with vLLM top_p < 1)."""
    share, per_response = tail_draws(scored.old_logprob, rollout.response_mask.float(), tail_p)
    return {M.TAIL_DRAWS: share, M.TAIL_DRAWS_PER_RESPONSE: per_response}


def control_alpha(parts: Parts, update_metrics: dict[str, float]) -> dict[str, float]:
    """With method.alpha_control=target, the alpha this step trained with
    (`actor/alpha`), and the controller moved for the next step by this step's regularized entropy:
    the token mean of the method's bonus (`actor/regularizer`, losses/actor.py), held at
    method.target_entropy."""
    if parts.alpha is None:
        return {}
    used = parts.alpha.applied
    if M.REGULARIZER in update_metrics:
        parts.alpha.update(update_metrics[M.REGULARIZER])
    return {M.ALPHA: used}


def _generate_shared(parts: Parts, prompt_ids: list[list[int]], step: int) -> Rollout:
    """This worker samples its contiguous share of the prompts (sequence indices as in
    the whole batch, so the samples are those of one worker); every worker gets the whole Rollout."""
    cfg = parts.config
    n = cfg.ppo.rollouts_per_prompt
    mine = share(len(prompt_ids), parts.workers)
    local = None
    if len(mine):
        local = parts.engine.generate([prompt_ids[i] for i in mine], n=n,
                                      max_new_tokens=cfg.rollout.max_new_tokens,
                                      temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, stream=step,
                                      first_sequence=mine.start * n)
    responses, logprobs = distributed.gather_samples(local, len(mine) * n)
    engine = parts.engine
    return assemble_rollout(prompt_ids, n, responses, logprobs, engine.eos_token_ids, engine.pad_token_id,
                            parts.tokenizer, cfg.rollout.temperature)


def rollout_gap(rollout: Rollout, scored: Scored) -> dict[str, float]:
    """How far the engine's sampling probabilities are from the trainer's recomputation of them
    (verl's rollout_probs_diff): |exp(behaviour log-prob) - exp(old log-prob)| over the response
    tokens. Nothing when the engine gave no full-vocabulary log-probs (vLLM with top_p < 1)."""
    mask = rollout.response_mask.bool()
    behaviour = rollout.logprobs[mask]
    if behaviour.numel() == 0 or not torch.isfinite(behaviour).all():
        return {}
    diff = (behaviour.exp() - scored.old_logprob[mask].exp()).abs()
    return {"rollout/probs_diff_mean": float(diff.mean()), "rollout/probs_diff_max": float(diff.max())}


def _step_metrics(rollout: Rollout, scores: torch.Tensor, scored: Scored, timings: dict[str, float],
                  has_critic: bool = True) -> dict[str, Any]:
    mask = rollout.response_mask.float()
    lengths = rollout.response_lengths.float()
    n_tokens = float(lengths.sum())
    metrics = {
        M.REWARD_MEAN: float(scores.mean()),
        "reward/std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "reward/max": float(scores.max()),
        "reward/solved_frac": float((scores >= 1.0 - 1e-9).float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float((~rollout.finished).float().mean()),
        "critic/advantages_abs": float(masked_mean(scored.advantages.abs(), mask)),
        "critic/returns": float(masked_mean(scored.returns, mask)),
        "perf/response_tokens": n_tokens,
        "perf/gen_tokens_per_s": n_tokens / max(timings["timing/gen_s"], 1e-9),
        "perf/update_tokens_per_s": n_tokens / max(timings["timing/update_s"], 1e-9),
        "perf/tokens_per_s": n_tokens / max(timings["timing/step_s"], 1e-9),
    }
    if not has_critic:  # no critic, no critic/ metrics; the advantages under their own name
        del metrics["critic/advantages_abs"], metrics["critic/returns"]
        metrics["actor/advantages_abs"] = float(masked_mean(scored.advantages.abs(), mask))
    if scored.keep is not None:  # ppo.skip_uniform_groups
        n = rollout.prompt_index
        metrics["rollout/uniform_groups"] = float(len(set(n[~scored.keep].tolist())))
    return metrics


def _memory_metrics(device: str) -> dict[str, float]:
    if device != "cuda" or not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"perf/max_memory_allocated_gib": peak}
