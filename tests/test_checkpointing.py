"""Gradient checkpointing is really active when on (issue 11, item 3): the trainer's update passes
run in training mode, where transformers' decoder layers checkpoint; results are unchanged."""

from __future__ import annotations

import math

import torch

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.models import load_critic, load_policy
from tre_cli.models.modes import dropout_probabilities

OVERLAY = {"task": {"options": {"train_size": 16, "test_size": 4}}, "rollout": {"max_new_tokens": 8},
           "eval": {"metric": "pass@1"}}


def _config(model_dir, out, checkpointing):
    return resolve(
        task="countdown", method="tre-p", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", "ppo.steps=1", "ppo.prompts_per_step=2", "ppo.rollouts_per_prompt=2",
                   "ppo.mini_batch_prompts=2", "ppo.micro_batch_tokens=64", "run.device=cpu",
                   f"model.gradient_checkpointing={str(checkpointing).lower()}", "run.wandb.mode=disabled"],
    )


def _layer_calls_with_grad(parts):
    """Counts decoder-layer forwards that start with autograd on: each update pass once, and once
    more in the backward when the layer is checkpointed (its forward is recomputed there). A
    pre-hook, because torch stops a recomputation as soon as it has what the backward needs, so
    a recomputed forward may never reach its end (and a forward hook)."""
    counts = {"calls": 0}

    def hook(module, args):
        if torch.is_grad_enabled():
            counts["calls"] += 1

    layers = list(parts.policy.model.layers) + list(parts.critic.backbone.layers)
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    return counts, handles


def _one_step(model_dir, out, checkpointing):
    torch.manual_seed(0)
    parts = trainer.build(_config(model_dir, out, checkpointing))
    counts, handles = _layer_calls_with_grad(parts)
    try:
        metrics = trainer.train_step(parts, 1)
    finally:
        for handle in handles:
            handle.remove()
    return parts, counts["calls"], metrics


def test_the_trainers_update_passes_checkpoint_when_on(quick_testbed, tmp_path):
    _, plain_calls, plain = _one_step(quick_testbed, tmp_path / "plain", False)
    parts, checkpointed_calls, checkpointed = _one_step(quick_testbed, tmp_path / "ckpt", True)
    assert plain_calls > 0
    # Every layer forward of the update is recomputed once in the backward.
    assert checkpointed_calls == 2 * plain_calls
    # Back in eval mode after the update (sampling and the no-grad passes).
    assert not parts.policy.training and not parts.critic.training
    # A memory knob: the step's numbers are the same.
    for key, value in plain.items():
        if not key.startswith(("timing/", "perf/")):
            assert math.isclose(value, checkpointed[key], rel_tol=1e-5, abs_tol=1e-7), key


def test_the_paper_models_have_no_dropout_so_training_mode_computes_the_same(quick_testbed):
    from transformers import Qwen2Config

    assert Qwen2Config().attention_dropout == 0.0  # Qwen2.5's published configs: 0.0 too
    policy = load_policy(quick_testbed)
    critic = load_critic(quick_testbed)
    assert dropout_probabilities(policy) == {} and dropout_probabilities(critic.backbone) == {}
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        evaluated = policy(input_ids=ids).logits
        policy.train()
        trained = policy(input_ids=ids).logits
    assert torch.equal(evaluated, trained)
    # And the probe does see dropout where a config has it.
    policy.config.attention_dropout = 0.1
    assert dropout_probabilities(policy) == {"config.attention_dropout": 0.1}
