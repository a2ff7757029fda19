"""The GPU-only branches of the trainer and its engines (issue 20), run on CPU: vLLM's sleep,
sync and wake sequence through a recording stand-in for vllm.LLM, the CUDA device kept across an
engine's start, the worker's engine device and placement check, the in-process vLLM setting.
What only a device can confirm is listed in README.md, "What has run on a GPU"."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from tre_cli.rollout.vllm import IN_PROCESS_ENV, VLLMEngine, kept_current_device, require_in_process
from tre_cli.trainer.distributed import SINGLE, Workers
from tre_cli.trainer.parts import check_engine_placement, engine_device


class RecordingLLM:
    """Stands in for vllm.LLM: records the calls the engine makes, reads the weights as vLLM's
    in-process reload does (once, as they come), and runs `on_wake` at every wake_up."""

    def __init__(self, on_wake=None):
        self.calls: list[str] = []
        self.loaded: list[tuple[str, torch.dtype]] = []
        self.on_wake = on_wake

    def sleep(self, level=1):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        if self.on_wake is not None:
            self.on_wake()
        self.calls.append(f"wake_up({tags})")

    def collective_rpc(self, method, kwargs=None):
        weights = kwargs["weights_iterator"]
        assert not isinstance(weights, (list, tuple, dict)), "the weights must come streamed"
        self.loaded = [(name, tensor.dtype) for name, tensor in weights]
        self.calls.append(f"{method}({len(self.loaded)})")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def _engine(llm, sleep_level=2):
    """A VLLMEngine as on a GPU, around `llm`, without starting vLLM."""
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.on_gpu, engine.sleep_level, engine.dtype, engine.verbose = llm, True, sleep_level, \
        torch.bfloat16, False
    engine.asleep = engine.weights_stale = False
    return engine


@pytest.fixture
def collections():
    """Records "gc" into a list when a full garbage collection starts."""
    events: list[str] = []

    def record(phase, info):
        if phase == "start" and info["generation"] == 2:
            events.append("gc")

    gc.callbacks.append(record)
    yield events
    gc.callbacks.remove(record)


def test_a_sync_after_sleep_frees_memory_wakes_the_weights_loads_them_then_wakes_the_kv_cache(collections):
    model = torch.nn.Linear(4, 3)
    seen: list[str] = []
    llm = RecordingLLM(on_wake=lambda: seen.append("gc" if collections else "no gc"))
    engine = _engine(llm)
    engine.sleep()
    collections.clear()
    engine.sync_weights(model)
    assert llm.calls == ["sleep(2)", "wake_up(['weights'])", "reload_weights(2)", "wake_up(['kv_cache'])",
                         "reset_prefix_cache"]
    assert seen[0] == "gc"  # collected before the first wake
    assert llm.loaded == [("weight", torch.bfloat16), ("bias", torch.bfloat16)]  # cast to the engine's dtype
    assert not engine.asleep and not engine.weights_stale
    # Awake: a sync loads and resets the prefix cache, nothing else.
    llm.calls.clear()
    engine.sync_weights(model.state_dict())
    assert llm.calls == ["reload_weights(2)", "reset_prefix_cache"]


def test_level_2_discards_the_weights_so_only_a_sync_wakes_the_engine():
    engine = _engine(RecordingLLM())
    engine.sleep()
    with pytest.raises(RuntimeError, match="level-2 sleep without new weights"):
        engine.wake()
    level_1 = _engine(RecordingLLM(), sleep_level=1)
    level_1.sleep()
    level_1.wake()
    assert level_1.llm.calls == ["sleep(1)", "wake_up(None)"] and not level_1.asleep


@pytest.mark.slow
def test_no_gradient_is_alive_when_the_engine_wakes_after_an_update(tiny_testbed, tmp_path):
    """train_step frees the last mini-batch's gradients (set_to_none) before the engine's sync
    wakes it: a recording engine checks every parameter of the policy and critic at that moment."""
    from test_trainer import _config
    from tre_cli import trainer

    parts = trainer.build(_config(tiny_testbed, tmp_path / "run", steps=1))
    alive: list[int] = []
    hf = parts.engine

    class Recording:
        def __getattr__(self, name):
            return getattr(hf, name)

        def sync_weights(self, weights=None):
            params = [*parts.policy.parameters(), *parts.critic.parameters()]
            alive.append(sum(p.grad is not None for p in params))
            hf.sync_weights(weights)

    metrics = trainer.train_step(dataclasses.replace(parts, engine=Recording()), 1)
    assert metrics["actor/grad_norm"] > 0  # there were gradients, and the step took them
    assert alive == [0]


def test_the_current_cuda_device_is_set_again_after_the_engine_starts():
    device = {"index": 1}
    selected: list[int] = []

    def select(index):
        selected.append(index)
        device["index"] = index

    with kept_current_device(True, current=lambda: device["index"], select=select):
        device["index"] = 0  # what vLLM's in-process worker does
    assert selected == [1] and device["index"] == 1
    with kept_current_device(True, current=lambda: device["index"], select=select):
        pass
    assert selected == [1]  # unchanged: nothing to set
    with kept_current_device(False, current=lambda: pytest.fail("no CUDA call on CPU"), select=select):
        pass


def test_a_worker_engine_is_built_on_its_own_gpu_and_vllm_engines_cannot_share_gpu_0():
    assert engine_device("cuda", current=3) == "cuda:3"
    assert engine_device("cpu") == "cpu"
    two = Workers(rank=1, world=2)
    with pytest.raises(ValueError) as refused:
        check_engine_placement("vllm", two, visible_gpus=2)
    assert "\n" not in str(refused.value) and "rollout.engine=vllm with run.workers=2" in str(refused.value)
    check_engine_placement("vllm", two, visible_gpus=1)  # the worker sees its own GPU only
    check_engine_placement("hf", two, visible_gpus=8)
    check_engine_placement("vllm", SINGLE, visible_gpus=8)


def test_vllm_runs_in_process_or_is_refused_with_one_line():
    environ: dict[str, str] = {}
    require_in_process(environ)
    assert environ == {IN_PROCESS_ENV: "0"}
    require_in_process({IN_PROCESS_ENV: "0"})
    with pytest.raises(ValueError) as refused:
        require_in_process({IN_PROCESS_ENV: "1"})
    assert str(refused.value).startswith(f"{IN_PROCESS_ENV}=1: ") and "\n" not in str(refused.value)


class RecordingCuda:
    """Stands in for torch.cuda: `visible` GPUs, the current one `current`, each with its own RNG
    state; records which devices were touched."""

    def __init__(self, visible=4, current=2):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(visible)}
        self.current = current
        self.touched: set[int] = set()

    def is_available(self):
        return True

    def current_device(self):
        return self.current

    def get_rng_state(self, device):
        self.touched.add(device)
        return self.states[device].clone()

    def set_rng_state(self, state, device):
        self.touched.add(device)
        self.states[device] = state.clone()

    def get_rng_state_all(self):
        pytest.fail("every GPU's RNG state was read")

    def set_rng_state_all(self, states):
        pytest.fail("every GPU's RNG state was set")


def test_a_checkpoint_holds_and_restores_the_cuda_rng_of_the_current_device_only():
    from types import SimpleNamespace

    from tre_cli.trainer.checkpoint import _rng_state, _set_rng_state

    parts = SimpleNamespace(device="cuda")
    cuda = RecordingCuda(visible=4, current=2)
    state = _rng_state(parts, cuda=cuda)
    assert torch.equal(state["cuda"], torch.tensor([2], dtype=torch.uint8)) and cuda.touched == {2}
    restored = RecordingCuda(visible=4, current=2)
    restored.states[2] = torch.tensor([9], dtype=torch.uint8)
    _set_rng_state(parts, state, cuda=restored)
    assert torch.equal(restored.states[2], torch.tensor([2], dtype=torch.uint8)) and restored.touched == {2}
    # A checkpoint written with every visible GPU's state: the current device's entry is restored.
    old = {**state, "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(4)]}
    _set_rng_state(parts, old, cuda=restored)
    assert torch.equal(restored.states[2], torch.tensor([12], dtype=torch.uint8)) and restored.touched == {2}
    # A CPU run touches no GPU.
    cpu = RecordingCuda()
    assert "cuda" not in _rng_state(SimpleNamespace(device="cpu"), cuda=cpu) and not cpu.touched


def test_a_vllm_without_the_layerwise_reload_is_named_in_one_line():
    from tre_cli.rollout.vllm import weight_sync_gaps

    class OldLLM:  # the shape of vLLM 0.11's LLM
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None): ...

        def sleep(self, level=1): ...

        def wake_up(self, tags=None): ...

        def reset_prefix_cache(self): ...

    class OldRunner:
        def reload_weights(self): ...

    assert weight_sync_gaps(OldLLM, OldRunner) == ["reload_weights(weights_iterator=...)"]
    assert weight_sync_gaps(object, None) == ["LLM.collective_rpc()", "LLM.sleep()", "LLM.wake_up()",
                                              "LLM.reset_prefix_cache()", "reload_weights()"]


def test_the_installed_vllm_has_what_the_weight_sync_calls():
    import os

    from tre_cli.rollout.vllm import check_weight_sync, weight_sync_gaps

    require_in_process(os.environ)
    vllm = pytest.importorskip("vllm")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert weight_sync_gaps(vllm.LLM, GPUModelRunner) == []
    check_weight_sync(vllm)


@pytest.mark.parametrize("static_cache", [False, True])
def test_batching_the_hf_engine_never_changes_a_sample(quick_policy, quick_tokenizer, static_cache):
    """rollout.max_batch_sequences is a memory knob: 3 prompts x 3 samples decoded 4, 1 or all 9
    at a time (a short last batch, filled up under a static cache) give the same tokens, since
    every sequence draws its own noise and sees the same padded prompt; the behaviour log-probs
    agree to float32 rounding (a matmul's sums depend on the batch's size)."""
    from tre_cli.rollout.hf import HFEngine

    prompts = [quick_tokenizer(text)["input_ids"] for text in
               ("Using the numbers 3, 7, 9, make 30.", "Make 12 from 2 and 6.", "Numbers 44, 5, 1, 9, 2: make 61.")]
    finished: list[int] = []
    results = []
    for size in (None, 4, 1):
        engine = HFEngine(quick_policy, quick_tokenizer, seed=5, static_cache=static_cache, compile=False,
                          max_batch_sequences=size)
        progress = finished.append if size == 4 else None
        results.append(engine.generate(prompts, n=3, max_new_tokens=16, stream=7, first_sequence=6,
                                       progress=progress))
    whole = results[0]
    for batched in results[1:]:
        assert torch.equal(whole.response_ids, batched.response_ids)
        assert torch.allclose(whole.logprobs, batched.logprobs, rtol=0, atol=1e-5)
        assert torch.equal(whole.response_mask, batched.response_mask)
    assert finished[-1] == 9 and finished == sorted(finished)
    with pytest.raises(ValueError, match="rollout.max_batch_sequences"):
        HFEngine(quick_policy, quick_tokenizer, max_batch_sequences=0)


def _qwen_like(tmp_path, layers=28, heads=12, kv_heads=2, hidden=1536):
    """A model folder with Qwen2.5-1.5B's shape (config only)."""
    import json

    folder = tmp_path / "qwen-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_size": hidden, "intermediate_size": 8960,
        "vocab_size": 151936, "max_position_embeddings": 32768}))
    return folder


def test_an_hf_batch_larger_than_the_gpu_is_refused_in_one_line_before_loading(tmp_path):
    """The paper's step (512 prompts x 8) at 1,024 + 8,192 positions in one batch needs about a
    terabyte of bf16 KV cache on a 1.5B Qwen2 (28 layers x 2 KV heads x 128): refused on an 80 GB
    GPU; rollout.max_batch_sequences brings it within; CPU (no static cache) is never checked."""
    from tre_cli.config import resolve
    from tre_cli.trainer.parts import check_hf_batch_memory

    model = _qwen_like(tmp_path)
    keys = [f"run.out={tmp_path / 'run'}", "rollout.engine=hf", "rollout.max_new_tokens=8192",
            "model.dtype=bf16", "run.wandb.mode=disabled"]

    def config(*extra):
        return resolve(task="countdown", method="tre-p", model=str(model), preset="paper", overrides=[*keys, *extra])

    gpu = 80 * 2**30
    with pytest.raises(ValueError) as refused:
        check_hf_batch_memory(config(), model, "cuda", total_memory=gpu)
    message = str(refused.value)
    assert "\n" not in message and "4096 sequences x 9216 positions" in message and "1,008 GiB" in message
    assert "rollout.max_batch_sequences (about 81 fit" in message
    check_hf_batch_memory(config("rollout.max_batch_sequences=81"), model, "cuda", total_memory=gpu)
    # Two workers halve a step's share, still too many; the evaluation's batch counts too.
    with pytest.raises(ValueError, match="2048 sequences"):
        check_hf_batch_memory(config(), model, "cuda", Workers(0, 2), total_memory=gpu)
    check_hf_batch_memory(config(), model, "cpu", total_memory=1)
    check_hf_batch_memory(config("rollout.engine=vllm"), model, "cuda", total_memory=1)


def test_each_model_is_sharded_before_the_next_one_loads():
    from tre_cli.trainer.parts import load_models

    events: list[str] = []

    def loader(name):
        def load():
            events.append(f"load {name}")
            return torch.nn.Linear(2, 2)
        return load

    def shard(module):
        events.append("shard")
        return module

    policy, critic, reference = load_models([loader("policy"), loader("critic"), None], shard)
    assert events == ["load policy", "shard", "load critic", "shard"] and reference is None
    events.clear()
    load_models([loader("policy"), loader("critic"), loader("reference")], None)
    assert events == ["load policy", "load critic", "load reference"]


def test_the_weight_stream_is_the_state_dict(quick_policy):
    """The engine's weight sync streams the module's state_dict() (under FSDP2 its hooks give the
    stepped sharded parameters; keep_vars=True gave the root unit's stale unsharded ones, which
    test_workers' vLLM test caught), every name once, a tied embedding under both its names."""
    from tre_cli.trainer.distributed import stream_full_state

    streamed = list(stream_full_state(quick_policy))
    state = quick_policy.state_dict()
    assert [name for name, _ in streamed] == list(state)
    assert "lm_head.weight" in dict(streamed)
    assert all(torch.equal(tensor, state[name]) for name, tensor in streamed)
    assert not any(t.requires_grad for _, t in streamed)


def test_the_critic_and_its_value_head_return_no_views(quick_testbed):
    """FSDP2 units warn when they return a view (an in-place op on it would skip their backward
    hooks): the value head (its own unit under run.workers) and the critic return fresh tensors."""
    from tre_cli.models import load_critic

    critic = load_critic(quick_testbed)
    head_views: list[bool] = []
    critic.value_head.register_forward_hook(lambda module, inputs, output: head_views.append(output._is_view()))
    values = critic(torch.tensor([[3, 4, 5], [6, 7, 8]]))
    assert values.shape == (2, 3) and not values._is_view() and head_views == [False]
