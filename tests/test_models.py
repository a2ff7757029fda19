"""Model loading, the critic, and the testbed builder (a tiny, fast variant)."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_models import QUICK_TESTBED
from tre_cli.models import ValueModel, load_critic, load_policy, load_tokenizer, resolve_model
from tre_cli.models import testbed
from tre_cli.testbed import build, data


def test_tiny_testbed_builds_and_loads(quick_testbed):
    card = json.loads((quick_testbed / "testbed.json").read_text())
    assert card["spec"]["steps"] == QUICK_TESTBED["steps"]
    assert card["spec"]["hidden_size"] // card["spec"]["num_attention_heads"] == 32
    assert card["final_loss"] < card["first_loss"] - 0.5  # the warm start learns even in 8 steps
    model = load_policy(quick_testbed)
    tokenizer = load_tokenizer(quick_testbed)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("<answer>1 + 2</answer>", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_tokenizer_roundtrip_and_chat_template(quick_testbed):
    tokenizer = load_tokenizer(quick_testbed)
    text = "<think>98 + 34 = 132, 132 - 54 = 78</think> <answer>98 + 34 - 54</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Tags are single tokens and numbers are spelled digit by digit.
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("9876", add_special_tokens=False)["input_ids"]) == 4
    # Text outside the training corpus still round-trips (byte-level, no unknown token).
    odd = "Ünïcode ✓ and\ttabs {}"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in prompt_ids
    assert tokenizer.eos_token_id in prompt_ids
    assert tokenizer.decode(prompt_ids + ids + [tokenizer.eos_token_id], skip_special_tokens=True).endswith(text)


def test_countdown_prompt_renders_with_testbed_tokenizer(quick_testbed):
    from tre_cli.tasks import get_task

    tokenizer = load_tokenizer(quick_testbed)
    prompt = get_task("countdown").render({"nums": [3, 5, 7], "target": 22}, tokenizer)
    assert prompt.startswith("<|im_start|>user\nUsing the numbers [3, 5, 7]")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    assert len(ids) < 128  # BPE compresses the fixed instruction text


def test_signed_sum_solution_is_a_correct_answer():
    from tre_cli.tasks.countdown import score

    reasoning, expression = data.signed_sum_solution([98, 54, 6, 34], 72)
    assert expression == "98 - 54 - 6 + 34"
    assert reasoning == "98 - 54 = 44, 44 - 6 = 38, 38 + 34 = 72"
    assert score(f"<think>{reasoning}</think> <answer>{expression}</answer>", [98, 54, 6, 34], 72) == 1.0
    assert data.signed_sum_solution([2, 3, 7], 100) is None
    for example, response in data.sft_pairs(50, seed=3):
        assert score(response, example["nums"], example["target"]) == 1.0
        assert not data.has_answer_slip(response)


def test_warm_start_slips_are_the_given_fraction_and_cost_the_whole_reward():
    from tre_cli.tasks.countdown import score

    pairs = data.sft_pairs(400, seed=5, think="equation", slips=0.5)
    slipped = [(example, response) for example, response in pairs if data.has_answer_slip(response)]
    assert 160 <= len(slipped) <= 240  # Binomial(400, 0.5): 5 standard deviations either side
    for example, response in slipped:
        assert response.endswith(f" = {example['target']}</answer>")
        assert score(response, example["nums"], example["target"]) == 0.0
        # Without the slip the same answer is right: the slip alone costs the reward.
        fixed = response.replace(f" = {example['target']}</answer>", "</answer>")
        assert score(fixed, example["nums"], example["target"]) == 1.0
    # The same problems and answers as without slips: only the answers' form changes.
    clean = data.sft_pairs(400, seed=5, think="equation", slips=0.0)
    assert [e for e, _ in clean] == [e for e, _ in pairs]
    assert not any(data.has_answer_slip(response) for _, response in clean)


def test_build_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown testbed setting"):
        build.build_testbed(tmp_path / "a", hidden_sise=64)
    with pytest.raises(ValueError, match="head_dim"):
        build.build_testbed(tmp_path / "b", hidden_size=48, num_attention_heads=3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build.build_testbed(tmp_path / "c", **QUICK_TESTBED)


def test_ensure_testbed_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRE_CACHE_DIR", str(tmp_path))
    spec = {**testbed.TESTBED_SPEC, **QUICK_TESTBED, "eval_problems": 4}
    path = build.ensure_testbed(spec=spec)
    assert path.parent == tmp_path and path.name.startswith("testbed-")
    card = json.loads((path / "testbed.json").read_text())
    assert 0.0 <= card["countdown_reward_t1"] <= 1.0 and 0.0 <= card["answer_slip_rate_t1"] <= 1.0
    stamp = (path / "config.json").stat().st_mtime_ns
    assert build.ensure_testbed(spec=spec) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [path.name]  # no staging left


def test_testbed_resolves_to_the_shipped_copy_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("TRE_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_model("testbed")
    assert path == testbed.SHIPPED_DIR
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached
    card = testbed.verify_testbed(path)
    assert card["spec_hash"] == testbed.spec_hash(testbed.TESTBED_SPEC)  # shipped from today's recipe
    assert card["spec"] == testbed.TESTBED_SPEC
    # The shipped model is the one the smoke runs and the learning test were measured on: a
    # reward above zero and below its ceiling, and the slip PPO unlearns.
    assert 0.03 <= card["countdown_reward_t1"] <= 0.3 and card["answer_slip_rate_t1"] >= 0.2
    policy = load_policy("testbed")
    assert sum(p.numel() for p in policy.parameters()) == card["parameters"]


def test_an_altered_testbed_is_refused(tmp_path):
    import shutil

    copy = tmp_path / "testbed"
    shutil.copytree(testbed.SHIPPED_DIR, copy)
    testbed.verify_testbed(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        testbed.verify_testbed(copy)
    (copy / testbed.CHECKSUMS).unlink()
    with pytest.raises(ValueError, match="no SHA256SUMS"):
        testbed.verify_testbed(copy)


def test_ship_replaces_a_shipped_copy_only_with_a_build_of_todays_recipe(tmp_path):
    import shutil

    build = tmp_path / "build"
    shutil.copytree(testbed.SHIPPED_DIR, build)
    target = testbed.ship(build, target=tmp_path / "shipped")
    assert testbed.verify_testbed(target)["spec_hash"] == testbed.spec_hash(testbed.TESTBED_SPEC)
    assert not (tmp_path / "shipped.new").exists()
    card = json.loads((build / "testbed.json").read_text())
    (build / "testbed.json").write_text(json.dumps({**card, "spec_hash": "0" * 12}))
    with pytest.raises(ValueError, match="not built from today's TESTBED_SPEC"):
        testbed.ship(build, target=tmp_path / "shipped")
    testbed.verify_testbed(target)  # the earlier copy is untouched


def test_missing_local_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="model directory not found") as info:
        load_policy(str(missing))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unreachable_hub_id_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError) as info:
        load_tokenizer("tre-test-org/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert "'tre-test-org/no-such-model'" in message and "--model /path/to/model" in message


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # A port nothing listens on: the probe is refused at once, as on a machine with no hub.
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    import time

    started = time.perf_counter()
    with pytest.raises(ValueError, match="cannot be reached"):
        resolve_model("tre-test-org/no-such-model")
    assert time.perf_counter() - started < 10


def test_critic_values_shape_and_training(quick_testbed):
    torch.manual_seed(0)
    critic = load_critic(quick_testbed, value_head_std=1e-3)
    assert isinstance(critic, ValueModel)
    input_ids = torch.randint(3, 100, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    values = critic(input_ids, attention_mask)
    assert values.shape == (3, 7) and values.dtype == torch.float32
    assert values.abs().max() < 0.5  # a small head: the critic starts near zero
    target = torch.ones(3, 7)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = ((critic(input_ids, attention_mask) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    # Gradients reach the backbone, not just the head.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.backbone.parameters())


def test_value_head_init_defaults_to_the_models_initializer_range(quick_testbed):
    """The released code's head: transformers' token-classification init, N(0, initializer_range^2)
    weights and a zero bias, no dropout (verl sets it to 0)."""
    torch.manual_seed(0)
    critic = load_critic(quick_testbed)
    std = critic.config.initializer_range
    weight = critic.value_head.weight
    assert weight.shape[1] >= 64 and abs(weight.std().item() - std) < 0.3 * std
    assert torch.equal(critic.value_head.bias, torch.zeros(1))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in critic.modules())
    small = load_critic(quick_testbed, value_head_std=1e-3)
    assert small.value_head.weight.std().item() < 2e-3
    with pytest.raises(ValueError, match="init std"):
        load_critic(quick_testbed, value_head_std=0.0)


def test_gradient_checkpointing_gives_the_same_gradients(quick_testbed):
    input_ids = torch.randint(3, 100, (2, 9))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(quick_testbed, gradient_checkpointing=checkpointing)
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dtype_names():
    from tre_cli.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")
