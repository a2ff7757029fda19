"""Rollout throughput of the hf and vllm engines and of plain transformers `generate` on the
same model and prompts, side by side in one run.

New tokens per second (response tokens, EOS included, over the wall time of one generate call,
after one warm-up call), and each engine's ratio to plain `generate` (engine "generate":
`model.generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)`, the same sampling). Each
engine samples its own responses, so lengths differ a little: tokens/s normalises that, and the
mean length is printed. Countdown prompts; the testbed model by default.

    python bench/rollout.py                                  # testbed, CPU
    python bench/rollout.py --prompts 64 --n 8 --max-new-tokens 128
    python bench/rollout.py --model /path/to/model --device cuda
    python bench/rollout.py --model /tmp/smollm2 --prompts 8 --n 4 --max-new-tokens 128 \
        --engines generate,hf,vllm --repeats 1                # SmolLM2-135M on CPU (issue 13)
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


class PlainGenerate:
    """transformers' `generate` behind the engines' interface (what a user would try first)."""

    name = "generate"

    def __init__(self, model, tokenizer, eos_token_ids, seed: int) -> None:
        self.model, self.tokenizer, self.eos, self.seed = model.eval(), tokenizer, set(eos_token_ids), seed

    def generate(self, prompts, n: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0):
        import torch

        from tre_cli.rollout.base import left_pad

        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        torch.manual_seed(self.seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                      max_new_tokens=max_new_tokens, num_return_sequences=n,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos))
        return _Counted(sum(_response_length(row, self.eos) for row in out[:, ids.shape[1]:].tolist()), len(out))

    def close(self) -> None:
        pass


class _Counted:
    def __init__(self, tokens: int, samples: int) -> None:
        self.num_response_tokens, self.num_samples = tokens, samples


def _response_length(tokens: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first EOS (generate pads the rest)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return i + 1
    return len(tokens)


def make_engine(name: str, path, tokenizer, device: str, seed: int, kv_cache_bytes: int | None):
    from tre_cli.models import load_policy
    from tre_cli.rollout import get_engine
    from tre_cli.rollout.base import eos_token_ids_of

    if name == "generate":
        model = load_policy(path, device=device)
        return PlainGenerate(model, tokenizer, eos_token_ids_of(tokenizer, model.generation_config), seed)
    options = {"kv_cache_memory_bytes": kv_cache_bytes} if name == "vllm" and kv_cache_bytes else {}
    return get_engine(name, path, tokenizer, device=device, seed=seed, **options)


def time_engine(engine, prompts, n: int, max_new_tokens: int, repeats: int) -> dict:
    engine.generate(prompts[: max(1, len(prompts) // 4)], n=1, max_new_tokens=8)  # warm-up
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        rollout = engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
        seconds = time.perf_counter() - started
        tokens = rollout.num_response_tokens
        if best is None or tokens / seconds > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "mean_length": tokens / rollout.num_samples}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="generate,hf,vllm", help="any of generate, hf, vllm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="vllm's KV cache (default: tre's)")
    args = parser.parse_args()

    from tre_cli.models import load_tokenizer, resolve_model
    from tre_cli.trainer.progress import quiet_transformers

    quiet_transformers()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = countdown_prompts(tokenizer, args.prompts, args.seed)
    results = {}
    for name in args.engines.split(","):
        started = time.perf_counter()
        engine = make_engine(name, path, tokenizer, args.device, args.seed, args.kv_cache_bytes)
        setup = time.perf_counter() - started
        results[name] = {**time_engine(engine, prompts, args.n, args.max_new_tokens, args.repeats), "setup_s": setup}
        engine.close()
    print(f"model {args.model} ({path}), device {args.device}, {args.prompts} prompts x {args.n} samples, "
          f"max {args.max_new_tokens} new tokens, temperature 1.0")
    base = results.get("generate") or results.get("hf")
    base_name = "generate" if "generate" in results else "hf"
    print(f"{'engine':8} {'setup s':>8} {'tokens':>8} {'mean len':>8} {'gen s':>8} {'tokens/s':>10} "
          f"{'/ ' + base_name:>11}")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{name:8} {r['setup_s']:8.1f} {r['tokens']:8d} {r['mean_length']:8.1f} {r['seconds']:8.2f} "
              f"{r['tokens_per_s']:10.1f} {ratio:10.2f}x")
    if "hf" in results and "vllm" in results:
        print(f"vllm / hf tokens/s: {results['vllm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
