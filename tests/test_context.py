"""A run's context is prompt + T (issue 11, item 2): checked before anything runs, and given to
vLLM as its max_model_len (no 4,096 cap)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tre_cli import trainer
from tre_cli.trainer.parts import make_engine, plan_context
from tre_cli.config import resolve
from tre_cli.rollout.context import check_model_context, model_context_length, required_model_len

OVERLAY = {"task": {"options": {"train_size": 8, "test_size": 4}}, "eval": {"metric": "pass@1"}}


def _config(model_dir, out, prompt_length, new_tokens, engine="hf", extra=()):
    return resolve(
        task="countdown", method="vanilla", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", f"ppo.max_prompt_length={prompt_length}", f"rollout.max_new_tokens={new_tokens}",
                   f"rollout.engine={engine}", "run.device=cpu", "run.wandb.mode=disabled", *extra],
    )


def test_context_length_and_the_check(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert model_context_length(tmp_path) == 512
    assert required_model_len(256, 200) == 456
    assert check_model_context(tmp_path, 256, 256) == 512
    with pytest.raises(ValueError) as error:
        check_model_context(tmp_path, 256, 300, "tiny")
    message = str(error.value)
    assert "'tiny' holds 512 positions" in message and "(256)" in message and "(300) = 556" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(ValueError, match="max_new_tokens is not set"):
        required_model_len(256, None)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert model_context_length(tmp_path) == 4096
    (tmp_path / "config.json").write_text("{}")
    assert model_context_length(tmp_path) is None and check_model_context(tmp_path, 1024, 8192) == 9216


def test_a_run_beyond_the_models_context_fails_before_loading_it(quick_testbed, tmp_path):
    # The testbed holds 512 positions; 256 + 300 do not fit.
    with pytest.raises(ValueError, match=r"holds 512 positions.*\(256\) \+ rollout.max_new_tokens \(300\) = 556"):
        trainer.build(_config(quick_testbed, tmp_path / "run", 256, 300))


def test_an_evaluation_beyond_the_models_context_fails_before_loading_it(quick_testbed, tmp_path):
    with pytest.raises(ValueError, match=r"holds 512 positions.*= 556"):
        trainer.evaluate_model(_config(quick_testbed, tmp_path / "eval", 256, 300))
    assert not (tmp_path / "eval").exists()
    assert not (tmp_path / "run").exists()


def _long_context_copy(model_dir, out, positions):
    """The model with `positions` positions and weights under which EOS is never sampled: zero
    layers leave the residual stream equal to the input embedding, all rows of which are ones
    except EOS's, -10 times that, so EOS's logit is far below every other token's."""
    from tre_cli.models import load_policy, load_tokenizer

    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (out / "config.json").write_text(json.dumps(config))
    policy = load_policy(out)
    eos = load_tokenizer(out).eos_token_id
    with torch.no_grad():
        for name, tensor in policy.named_parameters():
            if ".layers." in name:
                tensor.zero_()
        policy.model.norm.weight.fill_(1.0)
        policy.model.embed_tokens.weight.fill_(1.0)
        policy.model.embed_tokens.weight[eos] = -10.0
    policy.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_vllm_gets_prompt_plus_t_as_its_context_beyond_4096(quick_testbed, quick_tokenizer, tmp_path):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken CUDA-only dependency
        pytest.skip(f"vllm cannot be imported ({type(error).__name__}: {error})")
    model = _long_context_copy(quick_testbed, tmp_path / "model", 8192)
    config = _config(model, tmp_path / "run", 8, 4100, engine="vllm",
                     extra=[f"rollout.kv_cache_memory_bytes={64 * 2**20}"])
    engine = make_engine(config, model, quick_tokenizer, "cpu", max_model_len=plan_context(config, model))
    try:
        assert engine.llm.llm_engine.model_config.max_model_len == 8 + 4100
        # Sequences past position 4,096 (generating all 4,100 tokens would take minutes on CPU):
        # a 4,000-token prompt and 100 new tokens, which the old cap would stop at 96.
        prompt = quick_tokenizer("Using the numbers", add_special_tokens=False)["input_ids"]
        long_prompt = (prompt * 4000)[:4000]
        rollout = engine.generate([long_prompt], n=2, max_new_tokens=100)
        assert rollout.response_lengths.tolist() == [100, 100]
    finally:
        engine.close()
