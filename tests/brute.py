"""Brute-force definitions of the per-token statistics: float64, a plain loop over the
probability-sorted vocabulary. Slow on purpose; the tests compare the library against these.
`released_row` is the one float32 definition: the released code's nucleus as its runtime
computed it."""

from __future__ import annotations

import math

import numpy as np
import torch


def row_stats(z: list[float], token: int | None, kind: str | None, k: int = 0, p: float = 0.0) -> dict:
    """Statistics of one row of logits `z` (python floats) by definition."""
    vocab = len(z)
    zmax = max(z)
    lse = zmax + math.log(sum(math.exp(v - zmax) for v in z))
    probs = [math.exp(v - lse) for v in z]
    out = {
        "entropy": -sum(q * math.log(q) for q in probs if q > 0),
        "p_max": max(probs),
        "min_entropy": -math.log(max(probs)),
        "logprob": (z[token] - lse) if token is not None else 0.0,
        "region": [],
        "region_size": 0,
        "region_entropy": 0.0,
        "margin": math.inf,
    }
    if kind is None:
        return out
    # Descending probability, ties by lower token id (a stable sort).
    order = sorted(range(vocab), key=lambda i: (-z[i], i))
    region: list[int] = []
    if kind == "k":
        region = order[: min(k, vocab)]
    elif p >= 1.0:
        region = order
    else:
        mass = 0.0
        for i in order:
            if mass < p:  # the mass strictly before token i
                region.append(i)
                # how close the boundary decision came to flipping
                out["margin"] = min(out["margin"], abs(mass - p))
                mass += probs[i]
            else:
                out["margin"] = min(out["margin"], abs(mass - p))
                break
    out["region"] = region
    out["region_size"] = len(region)
    if len(region) > 1:
        zr = [z[i] for i in region]
        zr_max = max(zr)
        lse_r = zr_max + math.log(sum(math.exp(v - zr_max) for v in zr))
        local = [math.exp(v - lse_r) for v in zr]
        h_local = -sum(q * math.log(q) for q in local if q > 0)
        out["region_entropy"] = math.log(vocab) / math.log(len(region)) * h_local
    return out


def stats(logits: torch.Tensor, tokens: torch.Tensor | None, kind: str | None, k: int = 0, p: float = 0.0):
    """Brute-force statistics of a [N, V] tensor, row by row."""
    rows = logits.detach().to(torch.float64).tolist()
    toks = tokens.tolist() if tokens is not None else [None] * len(rows)
    return [row_stats(z, t, kind, k, p) for z, t in zip(rows, toks)]


def grad_of(logits: torch.Tensor, tokens: torch.Tensor | None, rows: list[dict], weights: dict) -> torch.Tensor:
    """d/dlogits of sum_rows sum_stat weights[stat][row] * stat(row), in float64, by autograd on
    the textbook formulas with the brute-force region held fixed."""
    z = logits.detach().to(torch.float64).requires_grad_(True)
    total = z.new_zeros(())
    vocab = z.shape[-1]
    for n, row in enumerate(rows):
        logp = torch.log_softmax(z[n], -1)
        prob = logp.exp()
        top = int(torch.argmax(z[n]))  # lowest id among tied maxima: a subgradient convention
        if "entropy" in weights:
            total = total + weights["entropy"][n] * -(prob * logp).sum()
        if "p_max" in weights:
            total = total + weights["p_max"][n] * prob[top]
        if "min_entropy" in weights:
            total = total + weights["min_entropy"][n] * -logp[top]
        if "logprob" in weights and tokens is not None:
            total = total + weights["logprob"][n] * logp[int(tokens[n])]
        if "region_entropy" in weights and row["region_size"] > 1:
            zr = z[n, row["region"]]
            lq = torch.log_softmax(zr, -1)
            scale = math.log(vocab) / math.log(row["region_size"])
            total = total + weights["region_entropy"][n] * scale * -(lq.exp() * lq).sum()
    total.backward()
    return z.grad


def tail_mass(z: list[float], k: int) -> float:
    """The mass outside the k most probable tokens of one row, by sorting its probabilities."""
    zmax = max(z)
    lse = zmax + math.log(sum(math.exp(v - zmax) for v in z))
    probs = sorted((math.exp(v - lse) for v in z), reverse=True)
    return sum(probs[k:])


def tail_draws(logprobs: list[list[float]], lengths: list[int], p: float) -> tuple[float, float]:
    """(share of responses with a sampled token of probability < p, mean count per response),
    over the responses with at least one token; a plain loop."""
    counts = [sum(1 for lp in row[:n] if math.exp(lp) < p) for row, n in zip(logprobs, lengths) if n > 0]
    if not counts:
        return 0.0, 0.0
    return sum(1 for c in counts if c > 0) / len(counts), sum(counts) / len(counts)


RELEASED_TOP = 256


def bf16_value(v: float) -> np.float32:
    """v rounded to the nearest bf16 (ties to even), as a float32: the float32 bits with the low
    16 rounded away."""
    bits = int(np.float32(v).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return np.uint32(bits).view(np.float32)


def float32_sum(xs: list) -> np.float32:
    """The float32 sum of float32 numbers, added pairwise (halves, then halves of those), as a
    GPU reduction adds: a sequential sum of thousands of terms rounds more than any GPU does."""
    if len(xs) <= 8:
        total = np.float32(0.0)
        for x in xs:
            total = total + x
        return total
    half = len(xs) // 2
    return float32_sum(xs[:half]) + float32_sum(xs[half:])


def released_row(z: list[float], p: float) -> dict:
    """The released code's TRE-P statistic of one row as its runtime computed it (bf16 logits,
    softmax and cumulative sum in float32 under CUDA autocast), by its description, every number
    a float32 (no float64 anywhere): the logits rounded to bf16; probabilities exp(z - max)
    divided by their sum; the 256 most probable tokens (ties by lower id); a token is in iff the
    running float32 sum of the probabilities before it is < P as a float32 (the first token
    always); the value is log|V| / log|region| * (logsumexp - sum q z) over the region, 0 for one
    token. "margin": the smallest distance between a compared running sum and P, i.e. how close a
    boundary decision came to flipping."""
    f32 = np.float32
    zb = [bf16_value(v) for v in z]
    zmax = max(zb)
    e = [np.exp(v - zmax) for v in zb]
    total = float32_sum(e)
    probs = [x / total for x in e]
    order = sorted(range(len(z)), key=lambda i: (-probs[i], i))[:RELEASED_TOP]
    p32 = f32(p)
    region, running, margin = [], f32(0.0), f32(np.inf)
    for rank, i in enumerate(order):
        if rank > 0:
            margin = min(margin, abs(running - p32))
            if not running < p32:
                break
        region.append(i)
        running = running + probs[i]
    value = f32(0.0)
    if len(region) > 1:
        vals = [zb[i] for i in region]
        top = max(vals)
        lse = top + np.log(float32_sum([np.exp(v - top) for v in vals]))
        dot = f32(0.0)
        for v in vals:
            dot = dot + np.exp(v - lse) * v
        value = np.log(f32(len(z))) / np.log(f32(len(region))) * (lse - dot)
    return {"region": region, "region_size": len(region), "region_entropy": value, "margin": margin}
