"""PPO steps at a real model's shapes: seconds, tokens per second and peak memory per phase.

The model is built here with random weights from a named shape (Qwen2.5-1.5B's or 7B's, no
download) and saved with a tokenizer you point at (the real Qwen2 tokenizer for real prompt
lengths); then `tre_cli.trainer.run` runs a few PPO steps on Countdown with the shapes you ask
for, and the per-step metrics it logs are summarised per phase. Random weights rarely emit EOS,
so responses run to --max-new-tokens: the worst case for memory and time.

    # the check the trainer issue asks for on a GPU (Qwen2.5-1.5B shapes, one paper mini-batch)
    python bench/ppo_shapes.py --shape qwen2.5-1.5b --tokenizer ../shared/models/qwen2-tokenizer \\
        --device cuda --prompts 64 --n 8 --max-new-tokens 512 --steps 2
    # a CPU check of the script itself
    python bench/ppo_shapes.py --shape tiny --tokenizer PATH --device cpu --prompts 4 --n 2 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

# Qwen2.5 configurations (their config.json), tiny: a CPU-sized stand-in with the same layout.
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=None, tie_word_embeddings=True),
}
PHASES = ("gen", "reward", "old_logprob_values", "update", "sync", "step")


class _Enough(Exception):
    """Stops the run after the last measured step, before the final evaluation and checkpoint
    (optimizer states of a 1.5B model are tens of GB to write)."""


def build_model(shape: str, tokenizer_path: str, out: Path, seed: int = 0) -> Path:
    """Random weights at `shape` (bf16 on disk for the real shapes), saved with the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tre_cli.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    dims = dict(SHAPES[shape])
    if dims["vocab_size"] is None or dims["vocab_size"] < len(tokenizer):
        dims["vocab_size"] = -(-len(tokenizer) // 64) * 64
    config = Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def summarise(metrics: list[dict], skip_first: bool) -> dict:
    """Mean seconds and tokens/s per phase over the steps (the first left out when asked: compile
    and allocator warm-up), and the peak memory of any step."""
    rows = metrics[1:] if skip_first and len(metrics) > 1 else metrics
    tokens = statistics.mean(r["perf/response_tokens"] for r in rows)
    phases = {}
    for phase in PHASES:
        key = f"timing/{phase}_s"
        if all(key in r for r in rows):
            seconds = statistics.mean(r[key] for r in rows)
            phases[phase] = {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf")}
    peaks = [r["perf/max_memory_allocated_gib"] for r in metrics if "perf/max_memory_allocated_gib" in r]
    return {"steps": len(rows), "response_tokens": tokens, "phases": phases,
            "peak_memory_gib": max(peaks) if peaks else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (e.g. the Qwen2 tokenizer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", default="tre-p")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (the paper's mini-batch: 64)")
    parser.add_argument("--n", type=int, default=8, help="rollouts per prompt (the paper: 8)")
    parser.add_argument("--mini-batch-prompts", type=int, default=None, help="default: --prompts (one update a step)")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Countdown's T in the paper: 512")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="more run-config overrides, as `tre run --set`")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    from tre_cli import trainer
    from tre_cli.config import resolve

    with tempfile.TemporaryDirectory(prefix="tre-ppo-shapes-") as scratch:
        model_dir = build_model(args.shape, args.tokenizer, Path(scratch) / "model")
        out = Path(scratch) / "run"
        config = resolve(
            task="countdown", method=args.method, model=str(model_dir),
            overrides=[f"run.out={out}", f"run.device={args.device}", f"ppo.steps={args.steps + 1}",
                       f"ppo.prompts_per_step={args.prompts}", f"ppo.rollouts_per_prompt={args.n}",
                       f"ppo.mini_batch_prompts={args.mini_batch_prompts or args.prompts}",
                       f"ppo.micro_batch_tokens={args.micro_batch_tokens}",
                       f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.engine=hf",
                       f"task.options.train_size={max(args.prompts * args.steps, 8)}", "task.options.test_size=8",
                       "eval.every=0", "eval.limit=1", "eval.n_samples=1", "run.save_every=0",
                       "run.wandb.mode=disabled", *args.set],
        )
        def stop(step, metrics, checkpoint):
            if step >= args.steps:
                raise _Enough

        try:
            trainer.run(config, on_step=stop)
        except _Enough:
            pass
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"shape": args.shape, "device": args.device, "method": args.method, "prompts": args.prompts,
               "n": args.n, "max_new_tokens": args.max_new_tokens, **summarise(metrics, skip_first=args.steps > 1)}
    print(f"{args.shape} on {args.device}, {args.method}: {args.prompts} prompts x {args.n}, T={args.max_new_tokens}, "
          f"{summary['steps']} step(s) averaged, {summary['response_tokens']:.0f} response tokens a step")
    print(f"{'phase':20} {'seconds':>9} {'tokens/s':>10}")
    for phase, row in summary["phases"].items():
        print(f"{phase:20} {row['seconds']:9.2f} {row['tokens_per_s']:10.0f}")
    peak = summary["peak_memory_gib"]
    print(f"peak GPU memory: {peak:.1f} GiB" if peak is not None else "peak GPU memory: n/a (not CUDA)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
