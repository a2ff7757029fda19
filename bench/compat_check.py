"""`released_code_compat` against the released TRE-P rule as the released actor ran it, on a GPU.

The released actor computes its statistics inside `torch.autocast("cuda", dtype=bfloat16)` on the
model's bf16 logits, through `torch.compile(..., dynamic=True)` by default. `released_rule` below
restates its TRE-P statistic from its description (softmax over the row, the 256 most probable
tokens, their cumulative sum shifted by one compared with P, the first token always in; the
entropy of the softmax over the kept logits, the others set to -1e10, scaled by
log|V| / log|region|, 0 for one token). This runs it on random bf16 logits under CUDA autocast,
eagerly and compiled, and compares region sizes and values with
`token_stats(..., RegionSpec.top_p(p, released_code_compat=True))` on the same logits.

A row agrees when the sizes are equal and the values are within float32 rounding of the released
formula (`value_tolerance`). A disagreement is explained when every boundary decision that
differs compares a mass within NEAR_TIE of P (float64 mass from the same bf16 logits): such a
row can go either way with the order of float32 summation, as eager and compiled runs of the
released rule can between themselves. Passes when every (V, P) group agrees on >= 99.5% of its
rows in both modes and every disagreement is explained.

    python bench/compat_check.py --out compat-check.json   # a CUDA device
    python bench/compat_check.py --dry-run                 # CPU: small shapes, the same code path

The dry run has no CUDA autocast: it gives the rule float32 copies of the bf16 logits (what
autocast gives softmax and cumsum) and compiles with dynamo's eager backend, so it checks the
script, not the question. `bench/gpu_check.py` runs it as its `released_compat` check.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

P_VALUES = (0.9, 0.99, 0.999)
CAP = 256
NEAR_TIE = 2e-6  # float32 rounding of a row's mass: a few dozen ulps of 1
AGREEMENT = 0.995
# (V, rows): the real vocabulary width (Qwen2.5's padded LM head) and two small ones.
GPU_GROUPS = ((151_936, 512), (5_000, 2_048), (500, 2_048))
DRY_GROUPS = ((4_096, 48), (500, 64), (50, 64))


def released_rule(logits, p: float):
    """The released code's TRE-P (region size, scaled local entropy) per row, restated from its
    description. Under CUDA autocast the softmaxes, cumsum and logsumexp run in float32."""
    import torch

    vocab = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    top_probs, top_ids = torch.topk(probs, min(CAP, vocab), dim=-1)
    cumulative = torch.cumsum(top_probs, dim=-1)
    first = torch.ones_like(cumulative[..., :1], dtype=torch.bool)
    keep = torch.cat([first, cumulative[..., :-1] < p], dim=-1)  # the mass before each token < P
    size = keep.sum(-1)
    kept = torch.gather(logits, -1, top_ids)
    kept = torch.where(keep, kept, torch.full_like(kept, -1e10))
    local = torch.softmax(kept, dim=-1)
    entropy = torch.logsumexp(kept, dim=-1) - (local * kept).sum(-1)
    scale = math.log(vocab) / torch.log(size.float().clamp(min=2.0))
    return size, torch.where(size == 1, torch.zeros_like(entropy), entropy * scale)


def random_logits(n: int, vocab: int, seed: int, device: str):
    """bf16 logits with a spread of shapes: per-row scales from 0.5 to 8 (nuclei from one token
    to past the cap), a quarter of the rows with one dominant token."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(n, 1).uniform_(math.log(0.5), math.log(8.0), generator=gen))
    z = torch.randn(n, vocab, generator=gen) * scale
    peaked = torch.rand(n, generator=gen) < 0.25
    z[peaked, torch.randint(vocab, (int(peaked.sum()),), generator=gen)] += 8.0
    return z.to(torch.bfloat16).to(device)


def value_tolerance(logits, size):
    """Float32 rounding of the released value over n kept tokens with L the largest |z|: the
    sum's n + 4 roundings of L and the logsumexp's (~L ulps) times the z it multiplies, times
    the scale (the same bound as tests/test_released_compat.py)."""
    import torch

    largest = logits.float().abs().amax(-1)
    n = size.double()
    scale = math.log(logits.shape[-1]) / torch.log(n.clamp(min=2.0))
    tol = scale * 2.0**-23 * (1.0 + largest.double()) * (n + 4 + largest.double())
    return torch.where(size > 1, tol, torch.zeros_like(tol))


def _mass_before(logits):
    """Float64 mass before each of the top CAP tokens (sorted by value)."""
    import torch

    z = logits.double()
    top = torch.topk(z, min(CAP, z.shape[-1]), dim=-1).values
    probs = torch.exp(top - torch.logsumexp(z, dim=-1, keepdim=True))
    return torch.cumsum(probs, dim=-1) - probs


def _compare(logits, p, ours, theirs) -> dict:
    import torch

    our_size, our_value = ours
    size, value = theirs
    size_differs = our_size.long() != size.long()
    value_differs = ~size_differs & ((our_value.double() - value.double()).abs() > value_tolerance(logits, size))
    bad = (size_differs | value_differs).nonzero().squeeze(-1)
    explained = 0
    if bad.numel():
        before = _mass_before(logits[bad])
        lo = torch.minimum(our_size[bad].long(), size[bad].long())
        hi = torch.maximum(our_size[bad].long(), size[bad].long())
        positions = torch.arange(before.shape[-1], device=before.device)
        flipped = (positions >= lo[:, None]) & (positions < hi[:, None])  # the decisions that differ
        near = ((before - p).abs() <= NEAR_TIE) | ~flipped
        explained = int((size_differs[bad] & flipped.any(-1) & near.all(-1)).sum())
    same = size.long() == our_size.long()
    diff = (our_value.double() - value.double()).abs()[same]
    return {"agree": int(logits.shape[0] - bad.numel()), "size_differs": int(size_differs.sum()),
            "value_differs": int(value_differs.sum()), "explained_near_ties": explained,
            "max_value_diff_same_size": float(diff.max()) if diff.numel() else 0.0}


def run(device: str, dry_run: bool) -> dict:
    import torch

    from tre_cli.losses.stats import RegionSpec, token_stats

    cuda = device == "cuda"
    groups = DRY_GROUPS if dry_run else GPU_GROUPS
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    backend = "inductor" if cuda else "eager"
    results, ok = [], True
    for p in P_VALUES:
        compiled = torch.compile(functools.partial(released_rule, p=p), dynamic=True, backend=backend)
        for vocab, rows in groups:
            logits = random_logits(rows, vocab, seed=vocab + int(p * 1000), device=device)
            rule_input = logits if cuda else logits.float()  # the dry run: what autocast gives softmax
            with torch.no_grad():
                out = token_stats(logits, region=RegionSpec.top_p(p, released_code_compat=True))
                ours = (out.region_size, out.region_entropy)
                with autocast:
                    eager = released_rule(rule_input, p)
                    started = time.perf_counter()
                    graph = compiled(rule_input)
                    compile_s = time.perf_counter() - started
            entry = {"vocab": vocab, "rows": rows, "p": p, "eager": _compare(logits, p, ours, eager),
                     "compiled": _compare(logits, p, ours, graph),
                     "eager_vs_compiled_size_differs": int((eager[0] != graph[0]).sum()),
                     "compiled_call_s": round(compile_s, 2)}
            for mode in ("eager", "compiled"):
                r = entry[mode]
                unexplained = rows - r["agree"] - r["explained_near_ties"]
                ok &= r["agree"] >= AGREEMENT * rows and unexplained == 0
            results.append(entry)
    worst = min(min(e["eager"]["agree"], e["compiled"]["agree"]) / e["rows"] for e in results)
    return {"autocast": "cuda bf16" if cuda else "none (dry run: float32 copies of the bf16 logits)",
            "compile": f"torch.compile(dynamic=True, backend={backend!r})", "groups": results,
            "worst_agreement": round(worst, 5), "passed": bool(ok)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes: checks the script")
    parser.add_argument("--out", default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("compat_check: no CUDA device here; use --dry-run on a CPU")
    result = run(device, args.dry_run)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("passed") else 1)
