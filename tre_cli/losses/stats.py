"""Per-token statistics of a categorical policy, exact and memory-lean.

Every function takes logits whose last dimension is the vocabulary (any leading shape, any float
dtype, bf16 included), computes in float32 (float64 for the nucleus boundary), and is
differentiable with respect to the logits. All statistics of a row come from one pass over it,
and rows are processed in chunks: forward and backward need the logits, their gradient and one
chunk's temporaries, never a [N, V] float32 copy. The backward recomputes each chunk from O(1)
saved numbers per row (log-normaliser, region threshold), so nothing of size V is kept.

Trust regions (REFERENCE.md, Algorithm 1 of the paper):
- TRE-K: the K largest logits.
- TRE-P: sort by probability, descending, ties by lower token id; a token is in the nucleus iff
  the mass of the tokens strictly before it is < P. The top-1 token is always in it; P = 1 is the
  whole vocabulary. No cap on the nucleus size.
- The local entropy is the entropy of the softmax over the region's logits, scaled by
  log|V| / log|region|; it is 0 when the region has one token. The region itself is not
  differentiated: the gradient flows only into the region's logits through the local softmax.

The nucleus is found without sorting the vocabulary: the top-`c` candidates of each row (a
partial selection) decide it whenever their mass reaches P; rows they cannot decide are retried
with 8x more candidates, up to the full row, so no row is ever approximated.

`released_code_compat=True` reproduces the released code's two deviations on purpose: the
nucleus is searched among the top 256 tokens only, and the cumulative mass is compared with P in
bf16 (so P = 0.999 behaves as 1.0). It exists to reproduce the paper's numbers, not as a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# Candidates examined first when searching a TRE-P nucleus; rows needing more are retried with
# 8x as many (real 135M-model rows at P=0.99 have a median nucleus of ~180 tokens, p99 ~4,400).
FIRST_CANDIDATES = 1024
CANDIDATE_GROWTH = 8
RELEASED_CODE_TOP = 256
# Elements of one chunk of rows: each float32 temporary of a chunk is at most 4 * this bytes.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RegionSpec:
    """A trust region: the K largest logits ("k") or the top-P nucleus ("p")."""

    kind: str
    k: int = 0
    p: float = 0.0
    released_code_compat: bool = False

    @staticmethod
    def top_k(k: int) -> "RegionSpec":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"K must be an integer >= 1, got {k!r}")
        return RegionSpec("k", k=k)

    @staticmethod
    def top_p(p: float, released_code_compat: bool = False) -> "RegionSpec":
        p = float(p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"P must be in (0, 1], got {p!r}")
        return RegionSpec("p", p=p, released_code_compat=bool(released_code_compat))


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like the logits without the vocabulary dim (float32).

    logprob:        log pi(token) (0 where no tokens were given)
    entropy:        H(pi) over the full vocabulary
    p_max:          max_a pi(a)                                  (Eq. 11 of the paper)
    min_entropy:    -log max_a pi(a)                             (Min-Ent's H_inf)
    region_size:    |trust region| (0 when no region was asked for; not differentiable)
    region_entropy: log|V|/log|region| * H(softmax over the region), 0 for a one-token region
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    p_max: torch.Tensor
    min_entropy: torch.Tensor
    region_size: torch.Tensor
    region_entropy: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Region search (no gradient): returns, per row, the region size m, the m-th largest logit
# (the threshold) and how many tokens equal to the threshold are inside (lowest ids first).


def _nucleus(z: torch.Tensor, lse: torch.Tensor, p: float):
    """Exact TRE-P nucleus per row: (size, size-th largest logit), by growing top-c candidates."""
    n_rows, vocab = z.shape
    size = torch.empty(n_rows, dtype=torch.long, device=z.device)
    threshold = torch.empty(n_rows, dtype=z.dtype, device=z.device)
    if p >= 1.0:
        size.fill_(vocab)
        threshold.copy_(z.min(-1).values)
        return size, threshold
    todo = torch.arange(n_rows, device=z.device)
    c = min(FIRST_CANDIDATES, vocab)
    while todo.numel():
        vals = torch.topk(z[todo], c, dim=-1, sorted=True).values
        mass = torch.exp(vals.double() - lse[todo, None]).cumsum(-1)
        # size = 1 + #{r < c : S_r < P}, valid when S_c >= P (or c covers the vocabulary).
        decided = (mass[:, -1] >= p) | (c == vocab)
        counted = 1 + (mass[:, :-1] < p).sum(-1)
        rows = todo[decided]
        size[rows] = counted[decided]
        threshold[rows] = vals[decided].gather(-1, (counted[decided] - 1)[:, None]).squeeze(-1)
        todo = todo[~decided]
        c = min(c * CANDIDATE_GROWTH, vocab)
    return size, threshold


def _released_nucleus(z: torch.Tensor, lse: torch.Tensor, p: float):
    """The released code's nucleus: top-256 candidates, probabilities accumulated and compared
    with P in bf16. A bf16 running sum near 1 stops growing when the next probability is below
    half its spacing, and P = 0.999 itself rounds to 1.0, so such nuclei run to the cap."""
    c = min(RELEASED_CODE_TOP, z.shape[-1])
    vals = torch.topk(z, c, dim=-1, sorted=True).values
    probs = torch.exp(vals - lse[:, None]).to(torch.bfloat16)
    p_bf16 = torch.tensor(p, dtype=torch.bfloat16, device=z.device)
    running = torch.zeros_like(probs[:, 0])
    below = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for j in range(c - 1):  # sequential, each partial sum rounded to bf16
        running = running + probs[:, j]
        below += running < p_bf16
    size = 1 + below
    return size, vals.gather(-1, (size - 1)[:, None]).squeeze(-1)


def _top_k(z: torch.Tensor, k: int):
    size = torch.full((z.shape[0],), min(k, z.shape[-1]), dtype=torch.long, device=z.device)
    return size, torch.topk(z, int(size[0]), dim=-1, sorted=True).values[:, -1]


def _region_mask(z: torch.Tensor, threshold: torch.Tensor, ties_in: torch.Tensor) -> torch.Tensor:
    """Tokens above the threshold, plus the `ties_in` lowest-id tokens equal to it."""
    above = z > threshold[:, None]
    equal = z == threshold[:, None]
    mask = above | equal
    split = equal.sum(-1) > ties_in
    if bool(split.any()):
        idx = split.nonzero().squeeze(-1)
        eq = equal[idx]
        rank = eq.to(torch.int32).cumsum(-1)
        mask[idx] = above[idx] | (eq & (rank <= ties_in[idx, None]))
    return mask


# ----------------------------------------------------------------------------------------------
# One chunk of rows, forward and backward.


def _chunk_forward(z, tokens, region: Optional[RegionSpec]):
    vocab = z.shape[-1]
    zmax = z.max(-1).values
    argmax = torch.argmax(z, -1)  # the first (lowest id) maximiser, for ties
    # The log-normaliser in float64 (one number per row): a float32 one is off by up to an ulp
    # of the largest logit (1e-6 at z ~ 10), which would move the nucleus mass by as much.
    lse64 = zmax.double() + torch.log(torch.exp(z - zmax[:, None]).sum(-1).double())
    lse = lse64.to(z.dtype)
    logp = z - lse[:, None]
    p = torch.exp(logp)
    entropy = -torch.where(p > 0, p * logp, torch.zeros((), device=z.device)).sum(-1)
    del p, logp
    min_entropy = lse - zmax
    p_max = torch.exp(-min_entropy)
    if tokens is not None:
        logprob = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    else:
        logprob = torch.zeros_like(lse)

    n = z.shape[0]
    saved = {"lse": lse, "argmax": argmax, "entropy": entropy, "p_max": p_max}
    if region is None:
        size = torch.zeros(n, dtype=torch.long, device=z.device)
        region_entropy = torch.zeros_like(lse)
    else:
        if region.kind == "k":
            size, threshold = _top_k(z, region.k)
        elif region.released_code_compat:
            size, threshold = _released_nucleus(z, lse, region.p)
        else:
            size, threshold = _nucleus(z, lse64, region.p)
        # Tokens equal to the threshold enter lowest id first, as many as the size leaves room for.
        ties_in = size - (z > threshold[:, None]).sum(-1)
        mask = _region_mask(z, threshold, ties_in)
        z_region = z.masked_fill(~mask, -math.inf)
        lse_region = torch.logsumexp(z_region, -1)
        q = torch.exp(z_region - lse_region[:, None])
        local_entropy = (q * (lse_region[:, None] - z).masked_fill(~mask, 0.0)).sum(-1)
        scale = _scale(vocab, size)
        region_entropy = scale * local_entropy
        saved.update(threshold=threshold, ties_in=ties_in, lse_region=lse_region,
                     local_entropy=local_entropy, scale=scale)
    outputs = (logprob, entropy, p_max, min_entropy, size.to(torch.float32), region_entropy)
    return outputs, saved


def _scale(vocab: int, size: torch.Tensor) -> torch.Tensor:
    """log|V| / log|region|, and 0 for a one-token region (the regularizer vanishes there)."""
    size_f = size.to(torch.float32)
    safe = torch.where(size > 1, size_f, torch.full_like(size_f, 2.0))
    return torch.where(size > 1, math.log(vocab) / torch.log(safe), torch.zeros_like(size_f))


def _chunk_backward(z, tokens, saved, grads):
    g_logprob, g_entropy, g_pmax, g_minent, g_region = grads
    lse = saved["lse"]
    logp = z - lse[:, None]
    p = torch.exp(logp)
    # Coefficient multiplying p in every full-softmax term, then one-hot corrections.
    coef = torch.zeros_like(lse)
    grad = None
    if g_entropy is not None:
        # dH/dz_i = -p_i (log p_i + H)
        grad = -(g_entropy[:, None] * p) * (logp + saved["entropy"][:, None])
        grad = torch.where(p > 0, grad, torch.zeros((), device=z.device))
    del logp
    if g_logprob is not None and tokens is not None:
        coef = coef - g_logprob
    if g_pmax is not None:
        coef = coef - g_pmax * saved["p_max"]
    if g_minent is not None:
        coef = coef + g_minent
    if grad is None:
        grad = coef[:, None] * p
    else:
        grad += coef[:, None] * p
    del p
    if g_logprob is not None and tokens is not None:
        grad.scatter_add_(-1, tokens[:, None], g_logprob[:, None])
    onehot_max = torch.zeros_like(lse)
    if g_pmax is not None:
        onehot_max = onehot_max + g_pmax * saved["p_max"]
    if g_minent is not None:
        onehot_max = onehot_max - g_minent
    if g_pmax is not None or g_minent is not None:
        grad.scatter_add_(-1, saved["argmax"][:, None], onehot_max[:, None])
    if g_region is not None and "threshold" in saved:
        mask = _region_mask(z, saved["threshold"], saved["ties_in"])
        lse_region = saved["lse_region"]
        shifted = (z - lse_region[:, None]).masked_fill(~mask, -math.inf)
        q = torch.exp(shifted)
        # d(local H)/dz_i = -q_i (log q_i + H_local) inside the region, 0 outside.
        weight = g_region * saved["scale"]
        local = -(weight[:, None] * q) * (shifted.masked_fill(~mask, 0.0) + saved["local_entropy"][:, None])
        grad += local
    return grad


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, tokens1d, region, temperature, chunk_rows):
        n = logits2d.shape[0]
        outs = [torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(6)]
        saved_chunks = []
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            z = _scaled(logits2d[start:stop], temperature)
            toks = tokens1d[start:stop] if tokens1d is not None else None
            chunk_out, saved = _chunk_forward(z, toks, region)
            for buf, val in zip(outs, chunk_out):
                buf[start:stop] = val
            saved_chunks.append(saved)
        ctx.save_for_backward(logits2d, tokens1d)
        ctx.saved_chunks = saved_chunks
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(outs[4])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_pmax, g_minent, _g_size, g_region):
        logits2d, tokens1d = ctx.saved_tensors
        grad_logits = torch.empty_like(logits2d)
        n = logits2d.shape[0]
        for i, start in enumerate(range(0, n, ctx.chunk_rows)):
            stop = min(start + ctx.chunk_rows, n)
            z = _scaled(logits2d[start:stop], ctx.temperature)
            toks = tokens1d[start:stop] if tokens1d is not None else None
            chunk_grads = tuple(None if g is None else g[start:stop].to(z.dtype)
                                for g in (g_logprob, g_entropy, g_pmax, g_minent, g_region))
            grad = _chunk_backward(z, toks, ctx.saved_chunks[i], chunk_grads)
            if ctx.temperature != 1.0:
                grad = grad / ctx.temperature
            grad_logits[start:stop] = grad
        return grad_logits, None, None, None, None


def _scaled(logits_chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits_chunk.to(torch.float32) if logits_chunk.dtype != torch.float64 else logits_chunk
    return z / temperature if temperature != 1.0 else z


def token_stats(
    logits: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    region: Optional[RegionSpec] = None,
    temperature: float = 1.0,
    chunk_rows: Optional[int] = None,
) -> TokenStats:
    """All per-token statistics of `logits / temperature` in one pass per chunk of rows.

    logits: [..., V]; tokens: [...] integer ids (for `logprob`), or None.
    region: the trust region for `region_size` / `region_entropy`, or None (both zero).
    The gradient of any combination of the outputs flows back to `logits` (in their dtype).
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)
    tokens1d = None
    if tokens is not None:
        if tokens.shape != lead_shape:
            raise ValueError(f"tokens shape {tuple(tokens.shape)} does not match logits {tuple(lead_shape)}")
        tokens1d = tokens.reshape(-1).to(torch.long)
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    outs = _TokenStatsFunction.apply(logits2d, tokens1d, region, float(temperature), int(chunk_rows))
    return TokenStats(*(o.reshape(lead_shape) for o in outs))


# ----------------------------------------------------------------------------------------------
# One statistic at a time: thin views of `token_stats`.


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(pi) = -sum_a pi(a) log pi(a) over the full vocabulary."""
    return token_stats(logits).entropy


def min_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H_inf(pi) = -log max_a pi(a)."""
    return token_stats(logits).min_entropy


def p_max(logits: torch.Tensor) -> torch.Tensor:
    """max_a pi(a) (Eq. 11)."""
    return token_stats(logits).p_max


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) for each position."""
    return token_stats(logits, tokens).logprob


def tre_k_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Scaled local entropy over the K largest logits (the quantity TRE-K maximises)."""
    return token_stats(logits, region=RegionSpec.top_k(k)).region_entropy


def tre_p_entropy(logits: torch.Tensor, p: float, released_code_compat: bool = False) -> torch.Tensor:
    """Scaled local entropy over the top-P nucleus (the quantity TRE-P maximises)."""
    return token_stats(logits, region=RegionSpec.top_p(p, released_code_compat)).region_entropy


def tre_p_region_size(logits: torch.Tensor, p: float, released_code_compat: bool = False) -> torch.Tensor:
    """Number of tokens in the top-P nucleus of each row (float32)."""
    with torch.no_grad():
        return token_stats(logits.detach(), region=RegionSpec.top_p(p, released_code_compat)).region_size
