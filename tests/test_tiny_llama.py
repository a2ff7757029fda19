"""A SmolLM2-shaped model (Llama, tied embeddings, ChatML with a system turn, pad = EOS), built
locally (tests/fixtures_models.py), end to end: `tre run` with both engines, checkpoint and
resume with the LM head still tied to the embeddings, `tre eval` (issue 13)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from tre_cli import trainer
from tre_cli.cli import app
from tre_cli.config import PRESETS, resolve

OVERLAY = {"task": {"options": {"train_size": 32, "test_size": 4}}, "rollout": {"max_new_tokens": 12}}
VOLATILE = ("time", "timing/", "perf/")
runner = CliRunner()


def _config(model_dir, out, steps=2, extra=()):
    # A large actor lr, so that one update visibly moves the (tied) embeddings.
    return resolve(
        task="countdown", method="tre-p", model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", f"ppo.steps={steps}", "ppo.prompts_per_step=2", "ppo.rollouts_per_prompt=2",
                   "ppo.mini_batch_prompts=2", "ppo.actor_lr=1e-2", "eval.limit=2", "eval.n_samples=1",
                   "eval.every=0", "eval.before_train=false", "run.save_every=1", "run.keep_last=2",
                   "run.wandb.mode=disabled", *extra],
    )


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stable(record):
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def _stop_after_one(step, metrics, checkpoint):
    assert checkpoint is not None
    raise KeyboardInterrupt


def _tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tiny_llama_has_smollm2s_shape(tiny_llama):
    from safetensors import safe_open

    from tre_cli.models import load_policy, load_tokenizer

    config = json.loads((tiny_llama / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM's CPU attention
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())  # saved once, as the embeddings
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == config["eos_token_id"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12 + 3"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert _tied(load_policy(tiny_llama))


@pytest.mark.slow
def test_hf_run_resumes_with_tied_weights_and_evaluates(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    trainer.run(_config(tiny_llama, whole))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer.run(_config(tiny_llama, cut), on_step=_stop_after_one)
    resumed = trainer.run(_config(tiny_llama, tmp_path / "ignored", extra=[f"run.resume={cut}"]))
    assert resumed.status == "finished" and resumed.steps_done == 2
    # Step 2 samples from and trains the resumed weights: identical to the uninterrupted run.
    assert [_stable(r) for r in _metrics(whole)] == [_stable(r) for r in _metrics(cut)]

    # The checkpoint holds the embeddings once; loaded into a fresh build, the head is the same tensor.
    checkpoint = cut / "checkpoints" / "step_1"
    saved = load_file(str(checkpoint / "policy" / "model.safetensors"))
    assert "lm_head.weight" not in saved
    base = load_file(str(tiny_llama / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(saved["model.embed_tokens.weight"], base)  # the update moved them
    from tre_cli.trainer.checkpoint import load_checkpoint

    parts = trainer.build(_config(tiny_llama, tmp_path / "unused"))
    assert load_checkpoint(parts, checkpoint) == 1
    assert _tied(parts.policy)
    assert torch.equal(parts.policy.lm_head.weight.detach(), saved["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(str(checkpoint / "policy"))
    assert _tied(reloaded)
    ids = torch.tensor([parts.test_prompts[0]])
    with torch.no_grad():
        assert torch.equal(parts.policy(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    ev = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(cut), "--out", str(ev), "--preset", "smoke", "--set",
                                 "eval.limit=2", "--set", "eval.n_samples=1", "--set", "rollout.max_new_tokens=8",
                                 "--set", "run.wandb.mode=disabled"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    record = json.loads((ev / "result.json").read_text())
    assert record["method"] == "base" and record["final_eval"] is not None
    assert record["config"]["model"]["name"].endswith("checkpoints/step_2/policy")


def _vllm_or_skip():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken CUDA-only dependency
        pytest.skip(f"vllm cannot be imported ({type(error).__name__}: {error})")


VLLM_SETS = ["rollout.engine=vllm", "rollout.kv_cache_memory_bytes=67108864"]


@pytest.mark.slow
def test_vllm_run_resumes_and_evaluates_quietly(tiny_llama, tmp_path):
    _vllm_or_skip()
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer.run(_config(tiny_llama, cut, extra=VLLM_SETS), on_step=_stop_after_one)
    result = runner.invoke(app, ["run", "--resume", str(cut)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert [r["step"] for r in _metrics(cut)] == [1, 2]
    assert json.loads((cut / "result.json").read_text())["status"] == "finished"

    # As a user runs it (a new process, vLLM's log handlers on the real streams): quiet by default.
    quiet = _tre_eval(cut, tmp_path / "eval")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads((tmp_path / "eval" / "result.json").read_text())["final_eval"] is not None
    for stream in (quiet.stdout, quiet.stderr):
        assert "Traceback" not in stream and " INFO " not in stream, stream
    assert "Chat template warmup failed" not in quiet.stdout + quiet.stderr


@pytest.mark.slow
def test_vllm_logs_and_progress_with_verbose(tiny_llama, tmp_path):
    _vllm_or_skip()
    loud = _tre_eval(tiny_llama, tmp_path / "eval", "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert " INFO " in loud.stdout + loud.stderr  # vLLM's own start-up lines
    assert "eval 2/2 sequences" in loud.stderr  # progress as plain lines (stderr is not a terminal)
    assert "eval 2/2" not in loud.stdout


def _tre_eval(model, out, *extra):
    import subprocess
    import sys

    sets = ["eval.limit=2", "eval.n_samples=1", "rollout.max_new_tokens=8", "run.wandb.mode=disabled", *VLLM_SETS]
    args = [sys.executable, "-m", "tre_cli.cli", "eval", "--model", str(model), "--out", str(out), "--preset",
            "smoke", *[a for s in sets for a in ("--set", s)], *extra]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


def test_smollm2_sweep_plans_with_a_local_model_and_the_small_preset(tiny_llama, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "smollm2", "--set", f"model.name={tiny_llama}", "--out", str(out),
                                 "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    trials = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert trials == [f"countdown-{v}-s{s}" for v in ("vanilla", "ent", "tre-k", "tre-p") for s in (0, 1)]
    assert not out.exists()  # a dry run starts nothing

    from tre_cli.sweep import plan_sweep

    plan = plan_sweep("smollm2", [], None, [f"model.name={tiny_llama}"], tmp_path / "plan", None)
    config = plan.trials[0].config
    assert config.model.name == str(tiny_llama) and config.ppo.steps >= 20
    small = PRESETS["small"]
    assert config.rollout.engine == small["rollout"]["engine"]
    assert config.ppo.prompts_per_step == small["ppo"]["prompts_per_step"]
    assert config.task.options["format_score"] == 0.1
    assert config.task.options["response_prefix"] == "<think>\n</think>\n<answer>"  # the answer-first opening
    assert config.rollout.stop == ("</answer>",)
