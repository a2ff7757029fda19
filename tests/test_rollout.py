"""The hf rollout engine: layout, masks, EOS, reproducibility, and exact behaviour log-probs."""

from __future__ import annotations

import pytest
import torch

from reference import model_inputs
from tre_cli.models import load_policy
from tre_cli.rollout import Rollout, get_engine, response_logprobs_from_logits
from tre_cli.rollout.base import cut_at_stop
from tre_cli.rollout.context import check_model_context
from tre_cli.rollout.hf import HFEngine, sample_tokens, sequence_uniforms


def prompts_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


PROMPT_TEXTS = ["Using the numbers [3, 5, 7]", "<answer>", "create an equation that equals 42. You can use"]


def test_layout_masks_and_grouping(quick_testbed, quick_tokenizer, quick_policy):
    engine = get_engine("hf", quick_testbed, quick_tokenizer, model=quick_policy, seed=1)
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    rollout = engine.generate(prompts, n=4, max_new_tokens=12, temperature=1.0)
    assert isinstance(rollout, Rollout)
    assert rollout.num_samples == 12
    assert rollout.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    width = max(len(p) for p in prompts)
    assert rollout.prompt_ids.shape == (12, width)
    for row in range(12):
        prompt = prompts[row // 4]
        # Left padding: the prompt ends at the last column.
        assert rollout.prompt_ids[row, width - len(prompt) :].tolist() == prompt
        assert rollout.prompt_mask[row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        length = int(rollout.response_lengths[row])
        assert 1 <= length <= 12
        # Right padding: tokens first, then pads with mask 0 and log-prob 0.
        assert rollout.response_mask[row].tolist() == [1] * length + [0] * (rollout.response_ids.shape[1] - length)
        assert (rollout.response_ids[row, length:] == quick_tokenizer.pad_token_id).all()
        assert (rollout.logprobs[row, length:] == 0).all()
        assert (rollout.logprobs[row, :length] <= 0).all()
        tokens = rollout.response_ids[row, :length].tolist()
        eos_positions = [i for i, t in enumerate(tokens) if t == quick_tokenizer.eos_token_id]
        # EOS, when sampled, is the last response token and inside the mask.
        assert eos_positions in ([], [length - 1])
        assert bool(rollout.finished[row]) == (eos_positions == [length - 1])
        if not rollout.finished[row]:
            assert length == 12
        assert rollout.texts[row] == quick_tokenizer.decode(tokens, skip_special_tokens=True)
    inputs = model_inputs(rollout)
    assert inputs["input_ids"].shape == (12, width + rollout.response_ids.shape[1])
    assert inputs["position_ids"][0, -1] == rollout.attention_mask[0].sum() - 1


def test_stops_at_eos(quick_testbed, quick_tokenizer):
    """A model that always prefers EOS: every sample is exactly [EOS], finished, masked in."""
    model = load_policy(quick_testbed)
    bias = torch.zeros(model.config.vocab_size)
    bias[quick_tokenizer.eos_token_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    engine = HFEngine(model, quick_tokenizer, seed=0)
    rollout = engine.generate(prompts_of(quick_tokenizer, PROMPT_TEXTS), n=2, max_new_tokens=8)
    assert rollout.response_ids.shape == (6, 1)
    assert (rollout.response_ids[:, 0] == quick_tokenizer.eos_token_id).all()
    assert rollout.response_mask.tolist() == [[1]] * 6
    assert rollout.finished.all()
    assert rollout.texts == [""] * 6
    assert torch.allclose(rollout.logprobs, torch.zeros(6, 1), atol=1e-6)


def test_seeded_and_reproducible(quick_testbed, quick_tokenizer, quick_policy):
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    first = HFEngine(quick_policy, quick_tokenizer, seed=7).generate(prompts, n=3, max_new_tokens=10)
    again = HFEngine(quick_policy, quick_tokenizer, seed=7).generate(prompts, n=3, max_new_tokens=10)
    other = HFEngine(quick_policy, quick_tokenizer, seed=8).generate(prompts, n=3, max_new_tokens=10)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.response_ids, other.response_ids)
    # Samples of one prompt differ from each other (independent draws, not copies).
    assert len({tuple(r) for r in first.response_ids[:3].tolist()}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_full_forward(quick_testbed, quick_tokenizer, quick_policy, temperature):
    engine = HFEngine(quick_policy, quick_tokenizer, seed=3)
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    rollout = engine.generate(prompts, n=3, max_new_tokens=16, temperature=temperature)
    with torch.no_grad():
        logits = quick_policy(**model_inputs(rollout)).logits
    recomputed = response_logprobs_from_logits(
        logits, rollout.response_ids, rollout.prompt_ids.shape[1], temperature
    ) * rollout.response_mask
    assert torch.allclose(rollout.logprobs, recomputed, atol=1e-4), (rollout.logprobs - recomputed).abs().max()


def test_static_cache_path_matches_dynamic(quick_testbed, quick_tokenizer, quick_policy):
    """The CUDA decoding path (static cache, full-width mask) run eagerly on CPU."""
    prompts = prompts_of(quick_tokenizer, PROMPT_TEXTS)
    dynamic = HFEngine(quick_policy, quick_tokenizer, seed=5).generate(prompts, n=2, max_new_tokens=10)
    static = HFEngine(quick_policy, quick_tokenizer, seed=5, static_cache=True, compile=False).generate(
        prompts, n=2, max_new_tokens=10
    )
    assert torch.equal(dynamic.response_ids, static.response_ids)
    assert torch.allclose(dynamic.logprobs, static.logprobs, atol=1e-4)
    # A second call reuses the (reset) cache: same results as a fresh dynamic engine's second call.
    engines = [
        HFEngine(quick_policy, quick_tokenizer, seed=9),
        HFEngine(quick_policy, quick_tokenizer, seed=9, static_cache=True),
    ]
    rollouts = [[e.generate(prompts, n=2, max_new_tokens=10) for _ in range(2)] for e in engines]
    assert len(engines[1]._static_caches) == 1
    assert torch.equal(rollouts[0][1].response_ids, rollouts[1][1].response_ids)
    assert torch.allclose(rollouts[0][1].logprobs, rollouts[1][1].logprobs, atol=1e-4)


def test_top_p_sampling_keeps_the_nucleus():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    uniforms = sequence_uniforms(0, 0, torch.arange(4000), 0)
    tokens = sample_tokens(logprobs, 0.7, uniforms)
    counts = torch.bincount(tokens, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0  # mass before token 2 is 0.8 >= 0.7
    assert abs(counts[0] - 0.5 / 0.8) < 0.03
    tokens = sample_tokens(logprobs, 1.0, uniforms)
    counts = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), counts


def test_inverse_transform_sampling_is_exact_at_the_boundaries():
    """Token i is drawn for u in [F(i-1), F(i)) of the float64 cumulative mass; a token of zero
    mass never is, whatever u."""
    logprobs = torch.log(torch.tensor([[0.25, 0.0, 0.5, 0.25]])).repeat(5, 1)
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.9999999], dtype=torch.float64)
    assert sample_tokens(logprobs, 1.0, uniforms).tolist() == [0, 0, 2, 2, 3]


def _mix32_reference(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_sequence_uniforms_are_the_reference_hash_and_look_uniform():
    """The tensor hash (16-bit split products) equals plain integer arithmetic in Python, so
    every device draws the same numbers; the draws fill [0, 1) evenly and differ by stream."""
    from tre_cli.rollout.hf import _fold

    seqs = torch.tensor([0, 1, 7, 2**31 + 5, 2**32 - 1])
    got = sequence_uniforms(12345, 3, seqs, 9)
    key = _fold((_fold(12345) << 32) | _fold(3))
    for s, u in zip(seqs.tolist(), got.tolist()):
        h = _mix32_reference(_mix32_reference(s ^ key) ^ _fold(9))
        want = ((_mix32_reference(h ^ 0x9E3779B9) >> 5) * 2**26 + (_mix32_reference(h ^ 0x7F4A7C15) >> 6)) / 2**53
        assert u == want
    many = sequence_uniforms(0, 1, torch.arange(20000), 0)
    assert ((many >= 0) & (many < 1)).all()
    histogram = torch.histc(many.float(), bins=10, min=0, max=1) / 20000
    assert (histogram - 0.1).abs().max() < 0.01, histogram
    assert not torch.equal(many, sequence_uniforms(0, 2, torch.arange(20000), 0))
    assert not torch.equal(many, sequence_uniforms(0, 1, torch.arange(20000), 1))
    assert not torch.equal(many, sequence_uniforms(1, 1, torch.arange(20000), 0))


def test_samples_do_not_depend_on_how_the_prompts_are_split(quick_testbed, quick_tokenizer, quick_policy):
    """Issue 12: sample k's noise is (seed, stream, sequence index k), so prompts 0..7 in one call
    equal prompts 0..3 and 4..7 in two (as two workers would generate them), token for token."""
    texts = [f"Using the numbers [{a}, {a + 2}, {a + 5}], create an equation that equals {10 + 3 * a}."
             for a in range(8)]
    prompts = prompts_of(quick_tokenizer, texts)
    engine = HFEngine(quick_policy, quick_tokenizer, seed=11)
    whole = engine.generate(prompts, n=2, max_new_tokens=12, stream=5)
    first = engine.generate(prompts[:4], n=2, max_new_tokens=12, stream=5)
    second = engine.generate(prompts[4:], n=2, max_new_tokens=12, stream=5, first_sequence=8)
    halves = [r[:int(m.sum())].tolist() for part in (first, second)
              for r, m in zip(part.response_ids, part.response_mask)]
    assert halves == [r[:int(m.sum())].tolist() for r, m in zip(whole.response_ids, whole.response_mask)]
    assert first.texts + second.texts == whole.texts
    assert torch.allclose(torch.cat([first.logprobs[:, :4], second.logprobs[:, :4]]), whole.logprobs[:, :4],
                          atol=1e-5)
    # Another stream samples other tokens; the call counter (no stream) gives a new stream per call.
    assert engine.generate(prompts, n=2, max_new_tokens=12, stream=6).texts != whole.texts
    counted = [HFEngine(quick_policy, quick_tokenizer, seed=11).generate(prompts, n=2, max_new_tokens=12).texts
               for _ in range(2)]
    assert counted[0] == counted[1]


def test_generation_restores_training_mode(quick_testbed, quick_tokenizer, quick_policy):
    quick_policy.train()
    HFEngine(quick_policy, quick_tokenizer).generate(prompts_of(quick_tokenizer, ["hi"]), n=1, max_new_tokens=2)
    assert quick_policy.training
    quick_policy.eval()


def test_bad_arguments_are_clear(quick_testbed, quick_tokenizer, quick_policy):
    engine = HFEngine(quick_policy, quick_tokenizer)
    prompt = prompts_of(quick_tokenizer, ["hi"])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompt, n=1, max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompt, n=1, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], n=1, max_new_tokens=4)
    # prompt + max_new_tokens beyond the model's positions is refused where a run plans its
    # context (rollout.context), before any engine exists.
    with pytest.raises(ValueError, match="positions"):
        check_model_context(quick_testbed, len(prompt[0]), 10_000)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        get_engine("sglang", quick_testbed, quick_tokenizer)


def test_engine_loads_the_model_when_not_given(quick_testbed, quick_tokenizer):
    engine = get_engine("hf", quick_testbed, quick_tokenizer, seed=0)
    rollout = engine.generate(prompts_of(quick_tokenizer, ["hi"]), n=2, max_new_tokens=3)
    assert rollout.num_samples == 2
    # sync_weights with a state dict loads it into the engine's own module.
    state = {k: torch.zeros_like(v) for k, v in engine.model.state_dict().items()}
    engine.sync_weights(state)
    assert all((p == 0).all() for p in engine.model.parameters())
    # (name, tensor) pairs that are not a mapping (a sharded policy's stream, issue 12) are
    # copied in as they come, cast to the engine's dtype; the generator is read to its end.
    own = engine.model.state_dict()
    target = {k: torch.randn_like(v, dtype=torch.float64) for k, v in own.items()}
    for name, tensor in own.items():  # tied weights (the embedding and the head) get one value
        first = next(k for k, v in own.items() if v.data_ptr() == tensor.data_ptr())
        target[name] = target[first]
    read = []

    def stream():
        for name, tensor in target.items():
            read.append(name)
            yield name, tensor

    engine.sync_weights(stream())
    assert read == list(target)
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, target[name].to(tensor.dtype)), name


def _first_stop_by_scan(tokens, stop, tokenizer):
    """The definition of rollout.stop, by brute force: the shortest prefix whose text holds a stop string."""
    for k in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:k], skip_special_tokens=True) for s in stop):
            return k
    return None


@pytest.mark.parametrize("stop", [(" ",), ("e", "3"), ("<answer>",), ("never-written",)])
def test_cut_at_stop_ends_each_response_at_its_first_stop_string(quick_testbed, quick_tokenizer, quick_policy, stop):
    engine = HFEngine(quick_policy, quick_tokenizer, seed=3)
    whole = engine.generate(prompts_of(quick_tokenizer, PROMPT_TEXTS), n=4, max_new_tokens=24)
    cut = cut_at_stop(whole, stop, quick_tokenizer)
    cuts = 0
    for row in range(whole.num_samples):
        length = int(whole.response_lengths[row])
        tokens = whole.response_ids[row, :length].tolist()
        keep = _first_stop_by_scan(tokens, stop, quick_tokenizer)
        kept = length if keep is None else keep
        cuts += keep is not None and keep < length
        assert int(cut.response_lengths[row]) == kept
        assert cut.response_ids[row, :kept].tolist() == tokens[:kept]
        assert torch.equal(cut.logprobs[row, :kept], whole.logprobs[row, :kept])  # the kept tokens' own log-probs
        assert (cut.logprobs[row, kept:] == 0).all()
        assert (cut.response_ids[row, kept:] == quick_tokenizer.pad_token_id).all()
        assert bool(cut.finished[row]) == (bool(whole.finished[row]) or keep is not None)
        assert cut.texts[row] == quick_tokenizer.decode(tokens[:kept], skip_special_tokens=True)
    assert cut.response_ids.shape[1] == max(1, int(cut.response_lengths.max()))
    assert torch.equal(cut.prompt_ids, whole.prompt_ids) and torch.equal(cut.prompt_index, whole.prompt_index)
    if stop == ("never-written",):
        assert cuts == 0 and torch.equal(cut.response_ids, whole.response_ids)
    elif stop == (" ",):
        assert cuts > 0  # the check above saw real cuts


def test_no_stop_strings_leave_the_rollout_alone(quick_testbed, quick_tokenizer, quick_policy):
    rollout = HFEngine(quick_policy, quick_tokenizer, seed=0).generate(prompts_of(quick_tokenizer, ["hi"]), n=2,
                                                                      max_new_tokens=4)
    assert cut_at_stop(rollout, (), quick_tokenizer) is rollout
