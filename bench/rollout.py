"""Rollout throughput of the hf and vllm engines on the same model and prompts.

New tokens per second (response tokens, EOS included, over the wall time of one generate call,
after one warm-up call), and the vllm/hf ratio. Countdown prompts; the testbed model by default.

    python bench/rollout.py                                  # testbed, CPU
    python bench/rollout.py --prompts 64 --n 8 --max-new-tokens 128
    python bench/rollout.py --model /path/to/model --device cuda
"""

from __future__ import annotations

import argparse
import time


def countdown_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    from tre_cli.tasks import get_task
    from tre_cli.tasks.countdown import generate

    task = get_task("countdown")
    return [
        tokenizer(task.render(row, tokenizer), add_special_tokens=False)["input_ids"] for row in generate(count, seed)
    ]


def time_engine(engine, prompts, n: int, max_new_tokens: int, repeats: int) -> dict:
    engine.generate(prompts[: max(1, len(prompts) // 4)], n=1, max_new_tokens=8)  # warm-up
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        rollout = engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
        seconds = time.perf_counter() - started
        tokens = rollout.num_response_tokens
        if best is None or tokens / seconds > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tre_cli.models import load_tokenizer, resolve_model
    from tre_cli.rollout import get_engine

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = countdown_prompts(tokenizer, args.prompts, args.seed)
    results = {}
    for name in args.engines.split(","):
        started = time.perf_counter()
        engine = get_engine(name, path, tokenizer, device=args.device, seed=args.seed)
        setup = time.perf_counter() - started
        results[name] = {**time_engine(engine, prompts, args.n, args.max_new_tokens, args.repeats), "setup_s": setup}
        engine.close()
    print(f"model {args.model} ({path}), device {args.device}, {args.prompts} prompts x {args.n} samples, "
          f"max {args.max_new_tokens} new tokens, temperature 1.0")
    print(f"{'engine':8} {'setup s':>8} {'tokens':>8} {'gen s':>8} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:8} {r['setup_s']:8.1f} {r['tokens']:8d} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f}")
    if "hf" in results and "vllm" in results:
        print(f"vllm / hf tokens/s: {results['vllm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
