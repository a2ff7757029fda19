"""Mixed precision (issue 11, item 1): fp32 masters, bf16 compute, fp32 value head, bf16 engines.

The trainer-level checks run on CPU with `model.dtype=bf16`, which must behave as a GPU run does.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.models import load_critic, load_policy
from tre_cli.models.precision import (
    Precision,
    autocast_for,
    engine_state_dict,
    fraction_changed,
    precision_of,
    training_precision,
)
from tre_cli.rollout.hf import HFEngine
from tre_cli.trainer.checkpoint import load_checkpoint

BF16_CPU = training_precision(torch.bfloat16, "cpu")
OVERLAY = {"task": {"options": {"train_size": 64, "test_size": 8}}, "rollout": {"max_new_tokens": 12},
           "eval": {"metric": "pass@1"}}


def _config(model_dir, out, dtype, extra=()):
    return resolve(
        task="countdown", method="tre-p", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", "ppo.steps=1", "ppo.prompts_per_step=4", "ppo.rollouts_per_prompt=2",
                   "ppo.mini_batch_prompts=4", "ppo.micro_batch_tokens=256", "ppo.actor_lr=1e-6",
                   f"model.dtype={dtype}", "eval.limit=2", "eval.n_samples=1", "eval.every=0",
                   "eval.before_train=false", "run.save_every=0", "run.wandb.mode=disabled", "run.device=cpu",
                   *extra],
    )


def test_training_precision_keeps_fp32_masters_and_refuses_fp16():
    p = training_precision(torch.bfloat16, "cuda")
    assert (p.params, p.compute, p.device_type, p.mixed) == (torch.float32, torch.bfloat16, "cuda", True)
    assert not training_precision(torch.float32, "cpu").mixed
    with pytest.raises(ValueError, match="fp16 cannot train"):
        training_precision(torch.float16, "cuda")


def test_policy_masters_are_fp32_and_forwards_compute_in_bf16(quick_testbed):
    policy = load_policy(quick_testbed, precision=BF16_CPU)
    assert precision_of(policy) == BF16_CPU
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    ids = torch.randint(3, 100, (2, 9))
    with autocast_for(policy):
        logits = policy(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.bfloat16  # the stats.py contract: float32 statistics from bf16 logits
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # Outside the recorded module nothing is autocast.
    plain = load_policy(quick_testbed)
    with autocast_for(plain):
        assert plain(input_ids=ids, use_cache=False).logits.dtype == torch.float32


def test_value_head_stays_fp32_inside_autocast(quick_testbed):
    critic = load_critic(quick_testbed, precision=BF16_CPU)
    ids = torch.randint(3, 100, (2, 7))
    values = critic(ids, torch.ones_like(ids))
    assert values.dtype == torch.float32 and critic.value_head.weight.dtype == torch.float32
    # The head's output is exactly an fp32 Linear of the (bf16-computed) hidden state.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = critic.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    expected = torch.nn.functional.linear(hidden.float(), critic.value_head.weight, critic.value_head.bias).squeeze(-1)
    assert torch.equal(values, expected)
    # Under a caller's autocast too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic(ids, torch.ones_like(ids)).dtype == torch.float32


def test_engine_state_dict_casts_floats_only():
    state = {"w": torch.randn(3, dtype=torch.float32), "steps": torch.tensor([3], dtype=torch.long)}
    out = dict(engine_state_dict(state, torch.bfloat16))
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], state["w"].to(torch.bfloat16))
    assert out["steps"].dtype == torch.long


def test_hf_engine_samples_from_a_compute_dtype_copy_and_syncs_it(quick_testbed, quick_tokenizer):
    policy = load_policy(quick_testbed, precision=BF16_CPU)
    engine = HFEngine(policy, quick_tokenizer, seed=0, dtype="bf16")
    assert engine.owns_copy and engine.model is not policy
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    engine.sync_weights(policy.state_dict())
    for (name, mine), theirs in zip(engine.model.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(mine, theirs.to(torch.bfloat16)), name
    # Only parameters are cast: the rotary inverse frequencies stay float32, as in the policy.
    buffers = dict(policy.named_buffers())
    assert {n: b.dtype for n, b in engine.model.named_buffers()} == {n: b.dtype for n, b in buffers.items()}
    # Same dtype: the engine samples from the trainer's module itself, and a sync of it is a no-op.
    shared = HFEngine(policy, quick_tokenizer, seed=0, dtype="fp32")
    assert not shared.owns_copy and shared.model is policy
    shared.sync_weights(policy.state_dict())


def test_hf_engine_bf16_copy_samples_as_the_model_loaded_in_bf16(tiny_testbed, quick_tokenizer):
    """The engine's bf16 copy of fp32 masters samples what the same weights loaded in bf16 sample
    (issue 20: what a run.workers > 1 engine loads), token for token: a copy that rounded the
    rotary frequencies to bf16 too sampled other tokens."""
    from tre_cli.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_testbed)
    copied = HFEngine(load_policy(tiny_testbed, precision=BF16_CPU), tokenizer, seed=3, dtype="bf16")
    loaded = HFEngine(load_policy(tiny_testbed, dtype=torch.bfloat16), tokenizer, seed=3)
    prompts = [tokenizer(f"Using the numbers {i}, 7, 3, create an equation that equals {20 + i}.")["input_ids"]
               for i in range(4)]
    a = copied.generate(prompts, n=4, max_new_tokens=48, stream=1)
    b = loaded.generate(prompts, n=4, max_new_tokens=48, stream=1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def _parts_with_fp32_sampler(config):
    """The trainer's parts, sampling with the hf engine from the fp32 masters themselves, so that
    a bf16-compute run and an fp32 run see the same rollouts and differ only in the update."""
    parts = trainer.build(config)
    engine = HFEngine(parts.policy, parts.tokenizer, seed=config.run.seed)
    return dataclasses.replace(parts, engine=engine)


def _gradients_at_step(parts):
    """The policy's gradients as the actor optimizer steps (flattened, in parameter order; filled
    in when it steps): the trainer frees them after the last step."""
    kept: list[torch.Tensor] = []
    step = parts.actor_opt.step

    def recording_step(*args, **kwargs):
        kept[:] = [p.grad.detach().clone().reshape(-1) for p in parts.policy.parameters()]
        return step(*args, **kwargs)

    parts.actor_opt.step = recording_step
    return kept


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_bf16_compute_moves_the_weights_and_agrees_with_fp32(quick_testbed, tmp_path):
    """lr 1e-6 with bf16 compute moves (nearly) every weight, as fp32 does; a model stored and
    stepped in bf16 moves almost none (what `model.dtype=auto` did on CUDA before issue 11)."""
    torch.manual_seed(0)
    bf16 = _parts_with_fp32_sampler(_config(quick_testbed, tmp_path / "a", "bf16"))
    torch.manual_seed(0)
    fp32 = _parts_with_fp32_sampler(_config(quick_testbed, tmp_path / "b", "fp32"))
    start = _snapshot(fp32.policy)
    assert all(torch.equal(start[k], v) for k, v in _snapshot(bf16.policy).items())
    assert precision_of(bf16.policy).compute == torch.bfloat16 and precision_of(fp32.policy).compute == torch.float32

    grads_bf16, grads_fp32 = _gradients_at_step(bf16), _gradients_at_step(fp32)
    metrics_bf16 = trainer.train_step(bf16, 1)
    metrics_fp32 = trainer.train_step(fp32, 1)
    assert metrics_bf16["reward/mean"] == metrics_fp32["reward/mean"]  # the same rollouts
    after_bf16, after_fp32 = _snapshot(bf16.policy), _snapshot(fp32.policy)
    assert {v.dtype for v in after_bf16.values()} == {torch.float32}
    moved_bf16 = fraction_changed(start, after_bf16)
    moved_fp32 = fraction_changed(start, after_fp32)
    assert moved_fp32 >= 0.9 and moved_bf16 >= 0.9, (moved_bf16, moved_fp32)

    # The gradients (of the step's only mini-batch) agree to bf16 tolerance, and so do the
    # updates Adam made from them.
    g_bf16, g_fp32 = torch.cat(grads_bf16), torch.cat(grads_fp32)
    assert torch.nn.functional.cosine_similarity(g_bf16, g_fp32, dim=0) > 0.99
    assert (g_bf16 - g_fp32).norm() / g_fp32.norm() < 0.1
    d_bf16 = torch.cat([(after_bf16[k] - start[k]).reshape(-1) for k in start])
    d_fp32 = torch.cat([(after_fp32[k] - start[k]).reshape(-1) for k in start])
    assert torch.nn.functional.cosine_similarity(d_bf16, d_fp32, dim=0) > 0.95
    assert (d_bf16 - d_fp32).abs().max() <= 2.5e-6  # every weight within ~2 Adam steps of lr 1e-6
    # The critic: fp32 head and fp32 masters, updated too.
    assert bf16.critic.value_head.weight.dtype == torch.float32

    # The failure this guards against: the same update applied to weights stored in bf16.
    stored_bf16 = load_policy(quick_testbed, dtype="bf16")
    for p, grad in zip(stored_bf16.parameters(), grads_fp32):
        p.grad = grad.reshape(p.shape).to(torch.bfloat16)
    before = _snapshot(stored_bf16)
    torch.optim.AdamW(stored_bf16.parameters(), lr=1e-6, weight_decay=0.0).step()
    assert fraction_changed(before, _snapshot(stored_bf16)) < 0.1


@pytest.mark.slow
def test_checkpoint_holds_the_fp32_masters_and_resumes_them_exactly(quick_testbed, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    config = _config(quick_testbed, out, "bf16")
    start = _snapshot(load_policy(quick_testbed))
    trainer.run(config)
    saved = {}
    for f in sorted((out / "checkpoints" / "step_1" / "policy").glob("*.safetensors")):
        saved.update(load_file(str(f)))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert fraction_changed({k: start[k] for k in saved}, saved) >= 0.9  # lr 1e-6 moved the masters
    parts = trainer.build(config)
    assert load_checkpoint(parts, out / "checkpoints" / "step_1") == 1
    policy_state = parts.policy.state_dict()
    assert all(torch.equal(policy_state[k], v) for k, v in saved.items())
    # The hf engine's bf16 copy was refreshed from the loaded masters.
    engine_state = parts.engine.model.state_dict()
    assert all(torch.equal(engine_state[k], v.to(torch.bfloat16)) for k, v in saved.items())
    assert isinstance(precision_of(parts.policy), Precision)
