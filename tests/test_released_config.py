"""The released configuration's details (issue 11, item 8): each matches the released code by
default and is a named option (README: "Released configuration")."""

from __future__ import annotations

import pytest
import torch

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.losses.ppo import value_loss
from tre_cli.schedules import critic_warmup_factor

OVERLAY = {"task": {"options": {"train_size": 16, "test_size": 4}}, "rollout": {"max_new_tokens": 8},
           "eval": {"metric": "pass@1"}}


def _config(model_dir, out, extra=()):
    return resolve(
        task="countdown", method="vanilla", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", "ppo.steps=20", "ppo.prompts_per_step=2", "ppo.rollouts_per_prompt=2",
                   "ppo.mini_batch_prompts=2", "run.device=cpu", "run.wandb.mode=disabled", *extra],
    )


def test_warmup_ramps():
    # verl's constant schedule with warm-up over w = 5 steps: 0, 1/5, ..., then 1.
    assert [critic_warmup_factor(i, 5) for i in range(7)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert [critic_warmup_factor(i, 5, "shifted") for i in range(7)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0]
    assert critic_warmup_factor(0, 0) == 1.0 == critic_warmup_factor(0, 0, "shifted")  # no warm-up
    with pytest.raises(ValueError, match="unknown critic warm-up ramp"):
        critic_warmup_factor(0, 5, "cosine")


def test_value_loss_scale():
    gen = torch.Generator().manual_seed(0)
    v, old, ret = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 5)
    half = value_loss(v, old, ret, mask)
    full = value_loss(v, old, ret, mask, scale=1.0)
    brute = torch.maximum((v - ret) ** 2, (torch.clamp(v, old - 0.5, old + 0.5) - ret) ** 2)
    assert torch.allclose(full.per_token, brute) and torch.allclose(half.per_token, 0.5 * brute)


def test_defaults_are_the_released_code(tmp_path):
    cfg = resolve(task="countdown", method="forking-tokens", check_device=False)
    assert cfg.ppo.weight_decay == 0.01 and cfg.ppo.critic_loss_coef == 1.0
    assert cfg.ppo.critic_warmup_ramp == "released" and cfg.model.value_head_init_std is None
    assert cfg.method.count_rounding == "ceil" and cfg.method.scope == "group"
    paper = resolve(task="math", method="tre-p", preset="paper", check_device=False)
    assert (paper.ppo.weight_decay, paper.ppo.critic_loss_coef, paper.ppo.critic_warmup_ramp) == (0.01, 1.0, "released")
    for item, message in (("ppo.weight_decay=-1", "ppo.weight_decay' must be >= 0"),
                          ("ppo.critic_loss_coef=0", "ppo.critic_loss_coef' must be > 0"),
                          ("model.value_head_init_std=0", "model.value_head_init_std' must be > 0"),
                          ("ppo.critic_warmup_ramp=cosine", "ppo.critic_warmup_ramp' expects one of 'released', 'shifted'")):
        with pytest.raises(ValueError, match=message):
            resolve(task="countdown", overrides=[item], check_device=False)


@pytest.mark.slow
def test_the_trainer_uses_them(quick_testbed, tmp_path):
    torch.manual_seed(0)
    parts = trainer.build(_config(quick_testbed, tmp_path / "released"))
    assert [g["weight_decay"] for g in parts.actor_opt.param_groups + parts.critic_opt.param_groups] == [0.01, 0.01]
    std = parts.critic.config.initializer_range
    assert abs(parts.critic.value_head.weight.std().item() - std) < 0.3 * std
    critic_before = {k: v.clone() for k, v in parts.critic.state_dict().items()}
    metrics = trainer.train_step(parts, 1)
    # The released ramp: w = int(0.05 * 20) = 1, the first step at critic lr 0 (its weights stay).
    assert metrics["critic/lr"] == 0.0
    assert all(torch.equal(v, critic_before[k]) for k, v in parts.critic.state_dict().items())
    assert trainer.train_step(parts, 2)["critic/lr"] == parts.config.ppo.critic_lr

    torch.manual_seed(0)
    old = trainer.build(_config(quick_testbed, tmp_path / "old", ["ppo.weight_decay=0", "ppo.critic_warmup_ramp=shifted",
                                                                   "model.value_head_init_std=0.001",
                                                                   "ppo.critic_loss_coef=0.5"]))
    assert [g["weight_decay"] for g in old.actor_opt.param_groups] == [0.0]
    assert old.critic.value_head.weight.std().item() < 2e-3
    assert trainer.train_step(old, 1)["critic/lr"] == 0.5 * old.config.ppo.critic_lr  # (0 + 1) / (1 + 1)
