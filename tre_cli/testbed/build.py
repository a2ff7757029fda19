"""A testbed build: tokenizer, model and warm start from the recipe into a directory, with its
card (testbed.json); and the cached build (`ensure_testbed`, one builder at a time by a file lock)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from tre_cli.models import cache_root, load_tokenizer
from tre_cli.models.testbed import SLIP_EVAL_SEED, TESTBED_SPEC, spec_hash
from tre_cli.testbed.data import render_prompt, sft_pairs
from tre_cli.testbed.reward import measure_countdown_reward
from tre_cli.testbed.tokenizer import build_tokenizer, tokenizer_corpus
from tre_cli.testbed.warm_start import build_config, supervised_warm_start


def build_testbed(out_dir: str | os.PathLike, log=None, measure: bool = True, **overrides) -> dict:
    """Build the testbed into `out_dir` (created; must not exist or be empty); returns its card.

    `overrides` replace TESTBED_SPEC entries (tests build a far smaller, faster model).
    """
    unknown = sorted(set(overrides) - set(TESTBED_SPEC))
    if unknown:
        raise ValueError(f"unknown testbed setting(s) {', '.join(unknown)}; known: {', '.join(TESTBED_SPEC)}")
    spec = {**TESTBED_SPEC, **overrides}
    if spec["hidden_size"] // spec["num_attention_heads"] not in (32, 64):
        raise ValueError("testbed head_dim (hidden_size / num_attention_heads) must be 32 or 64 for vLLM on CPU")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"testbed output directory is not empty: {out}")
    from transformers import Qwen2ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(spec["seed"])
    if spec["think"] not in ("steps", "equation"):
        raise ValueError(f"testbed think must be 'steps' or 'equation', got {spec['think']!r}")
    pairs = sft_pairs(spec["sft_problems"], spec["seed"], spec["think"], spec["slips"])
    tokenizer = build_tokenizer(tokenizer_corpus(pairs), spec["vocab_size"])
    sequences = []
    for example, response in pairs:
        prompt_ids = tokenizer(render_prompt(example, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append((prompt_ids + response_ids, len(prompt_ids)))
    model = Qwen2ForCausalLM(build_config(spec, tokenizer))
    losses = supervised_warm_start(model, sequences, spec, tokenizer.pad_token_id, log=log)
    train_seconds = time.perf_counter() - started
    card: dict[str, Any] = {
        "spec": spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "prompt_tokens_mean": sum(p for _, p in sequences) / len(sequences),
        "response_tokens_mean": sum(len(s) - p for s, p in sequences) / len(sequences),
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "build_seconds": round(train_seconds, 1),
        "spec_hash": spec_hash(spec),
        # What the result depends on besides the recipe: the kernels that summed the numbers.
        "built_with": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
    }
    if measure:
        # A seed far from the SFT seeds, so these problems are (almost surely) unseen.
        reward, slip_rate = measure_countdown_reward(model, tokenizer, spec["eval_problems"], SLIP_EVAL_SEED)
        card["countdown_reward_t1"], card["answer_slip_rate_t1"] = reward, slip_rate
        card["measure_seconds"] = round(time.perf_counter() - started - train_seconds, 1)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _check_reloaded_tokenizer(out, tokenizer, [render_prompt(e, tokenizer) + r for e, r in pairs[:50]])
    (out / "testbed.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _check_reloaded_tokenizer(out: Path, built, texts: Sequence[str]) -> None:
    """The tokenizer as tre loads it must give the ids the model was trained on."""
    loaded = load_tokenizer(out)
    for text in texts:
        if loaded(text, add_special_tokens=False)["input_ids"] != built(text, add_special_tokens=False)["input_ids"]:
            raise RuntimeError(f"testbed tokenizer changes when reloaded ({type(loaded).__name__}) on {text!r}")


def testbed_dir(spec: dict | None = None) -> Path:
    return cache_root() / f"testbed-{spec_hash(spec or TESTBED_SPEC)}"


def ensure_testbed(log=None, force: bool = False, spec: dict | None = None) -> Path:
    """The cached testbed directory, built first when absent (atomic: temp dir, then rename).

    `spec` (default TESTBED_SPEC) names the recipe; its hash names the directory.
    """
    import fcntl

    spec = dict(TESTBED_SPEC if spec is None else spec)
    target = testbed_dir(spec)
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel sweep trials all ask for it at start-up).
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and not force:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_testbed(staging, log=log, **spec)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
