"""Forward+backward time and peak memory of the per-token statistics, side by side:

- ours:      tre_cli.losses.token_stats (chunked, exact, no full sort)
- sort:      the straightforward version (full softmax, full stable sort, cumsum, autograd)
- released:  the released code's approach (full softmax, top-256, bf16 mass, autograd; it also
             computes the full entropy and P_max)
- floor:     the bandwidth floor: read the logits once and write their gradient once (a copy)

Each measurement runs in a fresh subprocess so its peak memory is its own. "extra" is the peak
beyond the logits and one gradient-sized buffer. On CUDA the device's allocator is used; on CPU
the process's peak resident set (VmHWM).

    python bench/losses.py                 # CPU: N in {256, 1024}; CUDA: N in {4096, 16384}
    python bench/losses.py --n 4096 --stat tre-p --device cuda
    python bench/losses.py --quick         # a few seconds: one small size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

STATS = ("logprob", "entropy", "p_max", "min-ent", "tre-k", "tre-p", "all")


def make_logits(n: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
    """LM-like rows: a Zipf-shaped head (slope drawn per row) plus noise, at a random offset in
    the vocabulary, 5% of rows with one dominant token; tuned so that P_max (~0.55) and the TRE-P
    nucleus sizes at P = 0.99 (median ~60, p90 ~3,000, max ~15,000) resemble those measured on
    a small instruct model (REFERENCE.md)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = torch.empty(n, vocab, dtype=dtype, device=device)
    for start in range(0, n, 256):
        rows = min(256, n - start)
        slope = 1.4 + 1.2 * torch.rand(rows, 1, generator=gen)
        z = -slope * torch.log(rank) + 0.5 * torch.randn(rows, vocab, generator=gen)
        z[torch.rand(rows, generator=gen) < 0.05, 0] += 15.0
        shift = torch.randint(vocab, (rows, 1), generator=gen)
        z = z.gather(-1, (torch.arange(vocab) + shift) % vocab)
        logits[start:start + rows] = z.to(device=device, dtype=dtype)
    tokens = torch.randint(vocab, (n,), generator=gen).to(device)
    return logits, tokens


def smollm_like_logits(n: int, vocab: int = 49_152, seed: int = 0):
    """Rows shaped like SmolLM2-135M-Instruct's next-token distributions (REFERENCE.md, 7,881
    real rows: P_max mean 0.525; TRE-P nucleus at P = 0.99 median 179, p90 1,550, p99 4,405,
    max 11,161; 4.5% one-token nuclei; ties everywhere in bf16).

    Per row: a Zipf head z = -s log(rank) + 0.5 N(0, 1) with slope s ~ N(1.79, 0.19) clipped
    below at 1.45 (the slope sets the nucleus size: s = 1.8 gives ~180 tokens, s = 1.6 ~1,500);
    4.5% of rows get +12 on their top token (one-token nuclei); an offset U(5, 20); ids shuffled
    per row; values rounded to bf16 (ties as in a bf16 model) and returned as float32, the dtype
    of a CPU model's logits. On 2,048 rows this gives P_max mean ~0.52 and nucleus median ~170,
    p90 ~1,500, p99 ~6,000, max ~8,300 (bench/token_stats.py --vs-model prints them)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = torch.empty(n, vocab)
    for start in range(0, n, 256):
        rows = min(256, n - start)
        slope = (1.79 + 0.19 * torch.randn(rows, 1, generator=gen)).clamp(min=1.45)
        z = -slope * torch.log(rank) + 0.5 * torch.randn(rows, vocab, generator=gen)
        z[torch.rand(rows, generator=gen) < 0.045, 0] += 12.0
        z += 5.0 + 15.0 * torch.rand(rows, 1, generator=gen)
        shuffle = torch.argsort(torch.rand(rows, vocab, generator=gen), dim=-1)
        logits[start:start + rows] = z.gather(-1, shuffle).to(torch.bfloat16).float()
    tokens = torch.randint(vocab, (n,), generator=gen)
    return logits, tokens


# ---------------------------------------------------------------------------------------------
# Straightforward implementations (autograd does the backward).


def sort_based(logits, tokens, stat, k=2, p=0.99):
    z = logits.float()
    logp = torch.log_softmax(z, -1)
    prob = logp.exp()
    if stat == "logprob":
        return logp.gather(-1, tokens[:, None]).squeeze(-1)
    if stat == "entropy":
        return -(prob * logp).sum(-1)
    if stat == "p_max":
        return prob.max(-1).values
    if stat == "min-ent":
        return -logp.max(-1).values
    sorted_p, order = torch.sort(prob.detach(), dim=-1, descending=True, stable=True)
    if stat == "tre-k":
        in_sorted = torch.zeros_like(sorted_p, dtype=torch.bool)
        in_sorted[:, :k] = True
    else:
        in_sorted = (sorted_p.cumsum(-1) - sorted_p) < p
    mask = torch.zeros_like(in_sorted).scatter(-1, order, in_sorted)
    size = mask.sum(-1)
    lq = torch.log_softmax(z.masked_fill(~mask, float("-inf")), -1)
    h = -(lq.exp() * lq.masked_fill(~mask, 0.0)).sum(-1)
    scale = torch.where(
        size > 1, torch.log(torch.tensor(float(z.shape[-1]))) / torch.log(size.clamp(min=2).float()), 0.0
    )
    out = scale * h
    if stat == "all":
        out = out + -(prob * logp).sum(-1) + prob.max(-1).values + logp.gather(-1, tokens[:, None]).squeeze(-1)
    return out


def released_approach(logits, tokens, stat, k=2, p=0.99, top=256):
    """Full softmax and a top-256 per token in eager PyTorch, float32 mass compared with P in
    float32 (as the released code ran under CUDA autocast); the full entropy and P_max are
    computed alongside, as the released code does even when unused."""
    z = logits.float()
    logp = torch.log_softmax(z, -1)
    prob = logp.exp()
    full_entropy = -(prob * logp).sum(-1)
    pmax = prob.max(-1).values
    vals, idx = torch.topk(z, min(top, z.shape[-1]), dim=-1)
    if stat == "tre-k":
        keep = torch.zeros_like(vals, dtype=torch.bool)
        keep[:, :k] = True
    else:
        top_p = prob.gather(-1, idx).detach()
        keep = (top_p.cumsum(-1) - top_p) < p
    size = keep.sum(-1)
    lq = torch.log_softmax(vals.masked_fill(~keep, float("-inf")), -1)
    h = -(lq.exp() * lq.masked_fill(~keep, 0.0)).sum(-1)
    scale = torch.where(
        size > 1, torch.log(torch.tensor(float(z.shape[-1]))) / torch.log(size.clamp(min=2).float()), 0.0
    )
    return scale * h + 0.0 * (full_entropy + pmax)


def ours(logits, tokens, stat, k=2, p=0.99):
    from tre_cli.losses import RegionSpec, token_stats

    region = RegionSpec.top_k(k) if stat == "tre-k" else RegionSpec.top_p(p) if stat in ("tre-p", "all") else None
    s = token_stats(logits, tokens if stat in ("logprob", "all") else None, region)
    if stat == "all":
        return s.region_entropy + s.entropy + s.p_max + s.logprob
    field = {"logprob": "logprob", "entropy": "entropy", "p_max": "p_max", "min-ent": "min_entropy",
             "tre-k": "region_entropy", "tre-p": "region_entropy"}[stat]
    return getattr(s, field)


IMPLS = {"ours": ours, "sort": sort_based, "released": released_approach}


# ---------------------------------------------------------------------------------------------
# One measurement (in a child process).


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def time_and_peak(fn, repeats: int, cuda: bool, after_warmup=None) -> tuple[float, int]:
    """Best wall time of `fn` over `repeats` calls (after one warm-up call, then `after_warmup`,
    e.g. dropping the gradient it left) and how far memory peaked above what was in use before
    them: the device allocator on CUDA, else the peak resident set (VmHWM, reset first)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    if after_warmup is not None:
        after_warmup()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now_bytes()
        _reset_rss_peak()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()
    return min(times), peak - base


def measure_one(impl: str, stat: str, n: int, vocab: int, device: str, dtype: str, repeats: int) -> dict:
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    logits, tokens = make_logits(n, vocab, device, dt)
    cuda = device.startswith("cuda")
    logit_bytes = logits.numel() * logits.element_size()
    if impl == "floor":
        grad = torch.empty_like(logits)
        fn = lambda: grad.copy_(logits)  # noqa: E731 - one read of the logits, one write of a gradient
    else:
        leaf = logits.requires_grad_(True)

        def fn():
            leaf.grad = None
            out = IMPLS[impl](leaf, tokens, stat)
            out.float().sum().backward()

    try:
        # The warm-up's gradient would count in the base: drop it.
        seconds, grown = time_and_peak(fn, repeats, cuda, after_warmup=lambda: setattr(logits, "grad", None))
        # Beyond the logits (already in the base) and one gradient-sized buffer.
        extra = max(0, grown - (0 if impl == "floor" else logit_bytes))
        times = [seconds]
        status = "ok"
    except torch.OutOfMemoryError:
        times, extra, status = [float("nan")], float("nan"), "oom"
    best = min(times)
    return {"impl": impl, "stat": stat, "n": n, "vocab": vocab, "device": device, "dtype": dtype,
            "status": status, "seconds": best, "us_per_token": best / n * 1e6, "extra_mib": extra / 2**20,
            "logits_mib": logit_bytes / 2**20}


def run_child(args_list) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args_list], capture_output=True, text=True)
    if out.returncode != 0:
        return {"status": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--stat", nargs="*", default=list(STATS), choices=STATS)
    ap.add_argument("--impl", nargs="*", default=["ours", "sort", "released"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small size, for the demo")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, stat, n, vocab, device, dtype, repeats = args.child
        print(json.dumps(measure_one(impl, stat, int(n), int(vocab), device, dtype, int(repeats))))
        return
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.n, args.stat, args.repeats = [64], ["tre-p", "all"], 1
    sizes = args.n or ([4096, 16384] if cuda else [256, 1024])

    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = []
    for n in sizes:
        floor = run_child(["floor", "-", str(n), str(args.vocab), args.device, args.dtype, str(args.repeats)])
        rows.append(floor)
        table = Table(title=f"N = {n:,} tokens x V = {args.vocab:,} ({args.dtype}, {args.device}); "
                            f"floor {floor['us_per_token']:.3f} us/token")
        for col in ("stat", "impl", "us/token", "x floor", "x ours", "extra MiB", "status"):
            table.add_column(col, justify="right" if col not in ("stat", "impl", "status") else "left")
        for stat in args.stat:
            ours_t = None
            for impl in args.impl:
                r = run_child([impl, stat, str(n), str(args.vocab), args.device, args.dtype, str(args.repeats)])
                rows.append(r)
                if r.get("status") != "ok":
                    table.add_row(stat, impl, "-", "-", "-", "-", r.get("status", "?"))
                    continue
                if impl == "ours":
                    ours_t = r["us_per_token"]
                table.add_row(
                    stat,
                    impl,
                    f"{r['us_per_token']:.2f}",
                    f"{r['us_per_token'] / floor['us_per_token']:.1f}",
                    f"{r['us_per_token'] / ours_t:.2f}" if ours_t else "-",
                    f"{r['extra_mib']:.0f}",
                    "ok",
                )
        console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
