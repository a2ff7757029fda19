"""Brute-force definitions of the per-token statistics: float64, a plain loop over the
probability-sorted vocabulary. Slow on purpose; the tests compare the library against these."""

from __future__ import annotations

import math

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
