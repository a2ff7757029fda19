"""Tiny models built locally for tests (no download): shared by the trainer and CLI tests."""

from __future__ import annotations

import pytest

# A far smaller testbed than the real one: same recipe, a minute or less on 2 cores.
TINY_TESTBED = dict(steps=40, sft_problems=300, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory):
    from tre_cli.testbed.build import build_testbed

    out = tmp_path_factory.mktemp("tiny-testbed") / "model"
    build_testbed(out, measure=False, **TINY_TESTBED)
    return out


# Trained for 8 steps only: enough for loading, layout and engine tests, built once per session.
QUICK_TESTBED = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,  # head_dim 32 for vLLM CPU
                     intermediate_size=128, num_hidden_layers=2, sft_problems=200, steps=8, batch_size=8,
                     warmup_steps=2)


@pytest.fixture(scope="session")
def quick_testbed(tmp_path_factory):
    from tre_cli.testbed.build import build_testbed

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


# SmolLM2's shape in miniature (issue 13): a Llama with tied embeddings, a ChatML template that
# adds a default system turn, BOS <|im_start|>, EOS <|im_end|> and the pad token equal to EOS.
# Random weights (no training): enough for the loading, engine, checkpoint and eval paths.
SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llama(out, seed: int = 0):
    """A LlamaForCausalLM (head_dim 32 for vLLM on CPU) and its tokenizer saved into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tre_cli.testbed.data import sft_pairs
    from tre_cli.testbed.tokenizer import CHAT_END, CHAT_START, build_tokenizer, tokenizer_corpus

    tokenizer = build_tokenizer(tokenizer_corpus(sft_pairs(200, seed)), 384)
    tokenizer.bos_token, tokenizer.pad_token = CHAT_START, CHAT_END
    tokenizer.chat_template = SMOL_CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids(CHAT_END)
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.convert_tokens_to_ids(CHAT_START), eos_token_id=eos,
        pad_token_id=eos, rope_theta=100_000.0, dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
