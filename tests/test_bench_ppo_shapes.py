"""bench/ppo_shapes.py (the GPU check of PPO at Qwen2.5 shapes) runs end to end at a tiny shape."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench


def _bench():
    return load_bench("ppo_shapes")


def test_real_shapes_are_qwen25s():
    shapes = _bench().SHAPES
    one = shapes["qwen2.5-1.5b"]
    # 1.54B parameters with tied embeddings: the published size of Qwen2.5-1.5B.
    h, i, layers, heads, kv, vocab = (one[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "vocab_size"))
    head_dim = h // heads
    per_layer = h * h * 2 + 2 * h * kv * head_dim + (h + 2 * kv * head_dim) + 3 * h * i + 2 * h
    assert abs(layers * per_layer + vocab * h + h - 1.54e9) < 0.01e9


@pytest.mark.slow
def test_tiny_shape_runs_and_reports_every_phase(quick_testbed, tmp_path, capsys):
    out = tmp_path / "summary.json"
    summary = _bench().main(["--shape", "tiny", "--tokenizer", str(quick_testbed), "--device", "cpu", "--prompts", "2",
                             "--n", "2", "--max-new-tokens", "8", "--steps", "2", "--micro-batch-tokens", "64",
                             "--json", str(out)])
    assert summary["steps"] == 1  # the first step is left out of the means (warm-up)
    assert summary["response_tokens"] > 0 and summary["peak_memory_gib"] is None  # CPU: no CUDA peak
    for phase in ("gen", "old_logprob_values", "update", "step"):
        assert summary["phases"][phase]["seconds"] > 0
    assert summary["phases"]["step"]["seconds"] >= summary["phases"]["update"]["seconds"]
    assert json.loads(out.read_text()) == summary
    printed = capsys.readouterr().out
    assert "tiny on cpu, tre-p: 2 prompts x 2, T=8" in printed and "peak GPU memory: n/a" in printed
