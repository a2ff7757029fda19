"""Tiny models built locally for tests (no download): shared by the trainer and CLI tests."""

from __future__ import annotations

import pytest

# A far smaller testbed than the real one: same recipe, a minute or less on 2 cores.
TINY_TESTBED = dict(steps=40, sft_problems=300, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory):
    from tre_cli.models.testbed import build_testbed

    out = tmp_path_factory.mktemp("tiny-testbed") / "model"
    build_testbed(out, measure=False, **TINY_TESTBED)
    return out


# Trained for 8 steps only: enough for loading, layout and engine tests, built once per session.
QUICK_TESTBED = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,  # head_dim 32 for vLLM CPU
                     intermediate_size=128, num_hidden_layers=2, sft_problems=200, steps=8, batch_size=8,
                     warmup_steps=2)


@pytest.fixture(scope="session")
def quick_testbed(tmp_path_factory):
    from tre_cli.models.testbed import build_testbed

    out = tmp_path_factory.mktemp("quick-testbed") / "model"
    build_testbed(out, measure=False, **QUICK_TESTBED)
    return out


@pytest.fixture(scope="session")
def quick_tokenizer(quick_testbed):
    from tre_cli.models import load_tokenizer

    return load_tokenizer(quick_testbed)


@pytest.fixture(scope="session")
def quick_policy(quick_testbed):
    """Shared by the rollout modules: tests may switch its mode but must not change its weights."""
    from tre_cli.models import load_policy

    return load_policy(quick_testbed)
