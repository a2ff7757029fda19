"""Per-token statistics of a categorical policy, exact and memory-lean.

Every function takes logits whose last dimension is the vocabulary (any leading shape, any float
dtype, bf16 included), computes in float32 (float64 for the nucleus boundary), and is
differentiable with respect to the logits. All statistics of a row come from one pass over it,
and rows are processed in chunks: forward and backward need the logits, their gradient and one
chunk's temporaries, never a [N, V] float32 copy. The backward recomputes each chunk from O(1)
saved numbers per row (log-normaliser, region threshold), so nothing of size V is kept.

Trust regions (Algorithm 1 of the paper):
- TRE-K: the K largest logits.
- TRE-P: sort by probability, descending, ties by lower token id; a token is in the nucleus iff
  the mass of the tokens strictly before it is < P. The top-1 token is always in it; P = 1 is the
  whole vocabulary. No cap on the nucleus size.
- The local entropy is the entropy of the softmax over the region's logits, scaled by
  log|V| / log|region|; it is 0 when the region has one token. The region itself is not
  differentiated: the gradient flows only into the region's logits through the local softmax.

Where the region lies (row maxima, top-K, the nucleus found without a sort) is `regions.py`.

`released_code_compat=True` reproduces the released code's TRE-P nucleus as its runtime computed
it (`regions.released_nucleus`): searched among the top 256 tokens only, from the logits as bf16
values, with float32 probabilities, a float32 cumulative sum and a float32 comparison with P (CUDA
autocast runs softmax and cumsum in float32). It exists to reproduce the paper's numbers, not as
a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tre_cli.losses.regions import (
    RELEASED_CODE_TOP,
    row_blocks,
    first_argmax,
    nucleus,
    region_members,
    released_nucleus,
    Scratch,
    top_k_region,
    top_values,
    whole_vocabulary,
)

# Elements of one chunk of rows: a chunk's temporaries are a few [rows, V] buffers of float32 and
# int32 (4 * this bytes each), reused from chunk to chunk. On a CPU, 16 MiB buffers stay partly in
# cache and every chunk after the first reuses pages already touched (2^24 was ~1.5x slower on
# 512 real SmolLM2 rows, TRE-P); a GPU prefers fewer, larger launches. Speed only: results are the same.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
DEFAULT_CHUNK_ELEMENTS_GPU = 1 << 24


@dataclass(frozen=True)
class RegionSpec:
    """A trust region: the K largest logits ("k") or the top-P nucleus ("p")."""

    kind: str
    k: int = 0
    p: float = 0.0
    released_code_compat: bool = False

    @staticmethod
    def top_k(k: int) -> RegionSpec:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"K must be an integer >= 1, got {k!r}")
        return RegionSpec("k", k=k)

    @staticmethod
    def top_p(p: float, released_code_compat: bool = False) -> RegionSpec:
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
    tail_mass:      1 - the mass of the `tail_k` most probable tokens (None unless `tail_k` was
                    given; a diagnostic, not differentiable): where a global entropy bonus
                    pushes probability and a trust-region one does not
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    p_max: torch.Tensor
    min_entropy: torch.Tensor
    region_size: torch.Tensor
    region_entropy: torch.Tensor
    tail_mass: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# One chunk of rows, forward and backward.


def _chunk_forward(z, tokens, region: RegionSpec | None, scratch: Scratch, tail_k: int = 0):
    vocab = z.shape[-1]
    blocks = row_blocks(z)
    block_max = blocks.amax(-1)
    zmax = block_max.amax(-1)
    argmax = first_argmax(blocks, block_max, zmax)  # the lowest id on ties
    d = torch.sub(z, zmax[:, None], out=scratch.get("d", z))
    e = torch.exp(d, out=scratch.get("e", z))
    sum_e = e.sum(-1)
    # sum(e * d), the product written over d (nothing below needs d): no fresh [rows, V] buffer.
    dot = d.mul_(e).sum(-1)
    finite = torch.isfinite(dot)
    if not bool(finite.all()):  # -inf logits: 0 * -inf; a finite floor gives 0
        d = torch.sub(z, zmax[:, None], out=d).clamp_(min=torch.finfo(d.dtype).min)
        dot = d.mul_(e).sum(-1)
    # H = log S - sum(e d) / S: both terms are >= 0, so no cancellation near H = 0.
    log_sum = torch.log(sum_e)
    entropy = log_sum - dot / sum_e
    # The log-normaliser in float64 (one number per row): a float32 one is off by up to an ulp
    # of the largest logit (1e-6 at z ~ 10), which would move the nucleus mass by as much.
    lse64 = zmax.double() + torch.log(sum_e.double())
    lse = lse64.to(z.dtype)
    p_max = 1.0 / sum_e
    if tokens is not None:
        logprob = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    else:
        logprob = torch.zeros_like(lse)

    saved = {"lse": lse, "argmax": argmax, "entropy": entropy, "p_max": p_max, "finite": finite}
    if region is None:
        size = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        region_entropy = torch.zeros_like(lse)
    else:
        if region.kind == "k":
            found = top_k_region(top_values(z, blocks, block_max, min(region.k, vocab)))
        elif region.released_code_compat:
            top = top_values(z, blocks, block_max, min(RELEASED_CODE_TOP, vocab))
            found = released_nucleus(z, top, region.p)
        elif region.p >= 1.0:  # the smallest prefix with all the mass is the whole vocabulary
            found = whole_vocabulary(z, lse, entropy)
        else:
            found = nucleus(z, e, zmax, sum_e, lse64, region.p, scratch=scratch)
        size = found.size
        scale = _scale(vocab, size)
        region_entropy = scale * found.entropy
        saved.update(region=found, scale=scale)
    # With tail_k >= |V| nothing is outside: 0 exactly, not the normaliser's rounding.
    tail = _tail_mass(top_values(z, blocks, block_max, tail_k), lse64) if 0 < tail_k < vocab else torch.zeros_like(lse)
    outputs = (logprob, entropy, p_max, log_sum, size.to(torch.float32), region_entropy, tail)
    return outputs, saved


def _tail_mass(top: torch.Tensor, lse64: torch.Tensor) -> torch.Tensor:
    """1 - the mass of the given largest logits, summed in float64 against the row's float64
    log-normaliser: the tail to about 1e-7 absolute (the normaliser's float32 row sum), where a
    float32 head sum would round tails of ~1e-4 to a few digits."""
    head = torch.exp(top.double() - lse64[:, None]).sum(-1)
    return (1.0 - head).clamp_(min=0.0).float()


def _scale(vocab: int, size: torch.Tensor) -> torch.Tensor:
    """log|V| / log|region|, and 0 for a one-token region (the regularizer vanishes there)."""
    size_f = size.to(torch.float32)
    safe = torch.where(size > 1, size_f, torch.full_like(size_f, 2.0))
    return torch.where(size > 1, math.log(vocab) / torch.log(safe), torch.zeros_like(size_f))


def _chunk_backward(z, tokens, saved, grads, inv_temperature: float, out: torch.Tensor, scratch: Scratch):
    """Write into `out` the gradient of sum_i g_i * output_i with respect to the chunk's
    (unscaled) logits.

    Every full-softmax term is p_j * (a + b * log p_j) plus one-hot corrections:
      d logprob = onehot(token) - p         d H     = -p (log p + H)
      d p_max   = p_max (onehot(argmax) - p) d H_inf = p - onehot(argmax)
    and the region term -w q_j (log q_j + H_local) lives on the region's tokens only.
    """
    g_logprob, g_entropy, g_pmax, g_minent, g_region = grads
    zeros = torch.zeros_like(saved["lse"])
    g_logprob = g_logprob if (g_logprob is not None and tokens is not None) else None
    a = zeros.clone()
    if g_logprob is not None:
        a -= g_logprob
    if g_pmax is not None:
        a -= g_pmax * saved["p_max"]
    if g_minent is not None:
        a += g_minent
    # log p is written into `out` itself and p into one scratch buffer; the gradient then
    # overwrites log p in place.
    logp = torch.sub(z, saved["lse"][:, None], out=out)
    if not bool(saved["finite"].all()):
        logp.clamp_(min=torch.finfo(logp.dtype).min)
    p = torch.exp(logp, out=scratch.get("e", z))
    if g_entropy is not None:
        a -= g_entropy * saved["entropy"]
        grad = torch.addcmul((a * inv_temperature)[:, None], logp, (-g_entropy * inv_temperature)[:, None], out=out)
        grad.mul_(p)
    else:
        grad = torch.mul(p, (a * inv_temperature)[:, None], out=out)
    if g_logprob is not None:
        grad.scatter_add_(-1, tokens[:, None], g_logprob[:, None] * inv_temperature)
    at_max = zeros.clone()
    if g_pmax is not None:
        at_max += g_pmax * saved["p_max"]
    if g_minent is not None:
        at_max -= g_minent
    if g_pmax is not None or g_minent is not None:
        grad.scatter_add_(-1, saved["argmax"][:, None], at_max[:, None] * inv_temperature)
    if g_region is not None and "region" in saved:
        region = saved["region"]
        weight = g_region * saved["scale"] * inv_temperature
        # Rows whose term has no gradient (one-token regions, zero upstream) are skipped.
        threshold = region.threshold.masked_fill(weight == 0, math.inf)
        rows, cols, values = region_members(z, threshold, region.ties_in, scratch)
        shifted = (values - region.lse[rows]).clamp_(min=torch.finfo(z.dtype).min)  # log q
        # d(local H)/dz = -q (log q + H_local) inside the region, 0 outside.
        local = -weight[rows] * torch.exp(shifted) * (shifted + region.entropy[rows])
        grad.index_put_((rows, cols), local, accumulate=True)
    return grad


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, tokens1d, region, temperature, chunk_rows, tail_k):
        n = logits2d.shape[0]
        outs = [torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(7)]
        saved_chunks = []
        scratch = Scratch()
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            z = _scaled(logits2d[start:stop], temperature, scratch)
            toks = tokens1d[start:stop] if tokens1d is not None else None
            chunk_out, saved = _chunk_forward(z, toks, region, scratch, tail_k)
            for buf, val in zip(outs, chunk_out):
                buf[start:stop] = val
            saved_chunks.append(saved)
        ctx.save_for_backward(logits2d, tokens1d)
        ctx.saved_chunks = saved_chunks
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(outs[4], outs[6])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_pmax, g_minent, _g_size, g_region, _g_tail):
        logits2d, tokens1d = ctx.saved_tensors
        grad_logits = torch.empty_like(logits2d)
        n = logits2d.shape[0]
        scratch = Scratch()
        for i, start in enumerate(range(0, n, ctx.chunk_rows)):
            stop = min(start + ctx.chunk_rows, n)
            z = _scaled(logits2d[start:stop], ctx.temperature, scratch)
            toks = tokens1d[start:stop] if tokens1d is not None else None
            chunk_grads = tuple(None if g is None else g[start:stop].to(z.dtype)
                                for g in (g_logprob, g_entropy, g_pmax, g_minent, g_region))
            target = grad_logits[start:stop]
            direct = target.dtype == z.dtype and target.is_contiguous()
            out = target if direct else scratch.get("grad", z)
            _chunk_backward(z, toks, ctx.saved_chunks[i], chunk_grads, 1.0 / ctx.temperature, out, scratch)
            if not direct:
                target.copy_(out)
        return grad_logits, None, None, None, None, None


def _scaled(logits_chunk: torch.Tensor, temperature: float, scratch: Scratch) -> torch.Tensor:
    """The chunk divided by the temperature, in float32 (float64 stays float64), contiguous."""
    dtype = torch.float64 if logits_chunk.dtype == torch.float64 else torch.float32
    if logits_chunk.dtype == dtype and temperature == 1.0 and logits_chunk.is_contiguous():
        return logits_chunk
    z = scratch.get("z", logits_chunk, dtype).copy_(logits_chunk)
    return z.div_(temperature) if temperature != 1.0 else z


def token_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor | None = None,
    region: RegionSpec | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    tail_k: int | None = None,
) -> TokenStats:
    """All per-token statistics of `logits / temperature` in one pass per chunk of rows.

    logits: [..., V]; tokens: [...] integer ids (for `logprob`), or None.
    region: the trust region for `region_size` / `region_entropy`, or None (both zero).
    tail_k: also `tail_mass`, the mass outside the tail_k most probable tokens (None: not computed).
    The gradient of any combination of the outputs flows back to `logits` (in their dtype).
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail_k is not None and (isinstance(tail_k, bool) or not isinstance(tail_k, int) or tail_k < 1):
        raise ValueError(f"tail_k must be an integer >= 1, got {tail_k!r}")
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)
    tokens1d = None
    if tokens is not None:
        if tokens.shape != lead_shape:
            raise ValueError(f"tokens shape {tuple(tokens.shape)} does not match logits {tuple(lead_shape)}")
        tokens1d = tokens.reshape(-1).to(torch.long)
    if chunk_rows is None:
        elements = DEFAULT_CHUNK_ELEMENTS if logits.device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS_GPU
        chunk_rows = max(1, elements // vocab)
    outs = None
    if logits.is_cuda:  # the fused Triton kernels where they apply (TRE_KERNELS=0 turns them off)
        from tre_cli.kernels import fused_or_none

        outs = fused_or_none(logits2d, tokens1d, region, float(temperature))
        if outs is not None and tail_k:  # the kernels do not compute it: one more read of the logits
            outs = (*outs, _tail_mass_of(logits2d, float(temperature), tail_k))
    if outs is None:
        outs = _TokenStatsFunction.apply(logits2d, tokens1d, region, float(temperature), int(chunk_rows),
                                         int(tail_k or 0))
    stats = TokenStats(*(o.reshape(lead_shape) for o in outs))
    return stats if tail_k else stats._replace(tail_mass=None)


@torch.no_grad()
def _tail_mass_of(logits2d: torch.Tensor, temperature: float, tail_k: int) -> torch.Tensor:
    z = logits2d.float() / temperature
    if tail_k >= z.shape[-1]:
        return torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
    lse64 = torch.logsumexp(z, -1).double()
    return _tail_mass(torch.topk(z, tail_k, dim=-1).values, lse64)


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


def tail_draws(logprob: torch.Tensor, mask: torch.Tensor, p: float) -> tuple[float, float]:
    """Draws from the tail, over responses ([N, R] log-probs of the sampled tokens under the
    policy that sampled them, 0/1 mask): (the share of responses with at least one token of
    probability < p, the mean number of such tokens per response). A per-token risk compounds
    with length: at a constant rate r per token a response of T tokens holds one with
    probability 1 - (1 - r)^T."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"the tail threshold must be in (0, 1), got {p!r}")
    draws = ((logprob < math.log(p)) & (mask > 0)).sum(-1).double()
    responses = (mask > 0).any(-1)
    if not bool(responses.any()):
        return 0.0, 0.0
    draws = draws[responses]
    return float((draws > 0).double().mean()), float(draws.mean())
