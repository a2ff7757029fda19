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

The nucleus is found without sorting the vocabulary (`_nucleus`). A float32 histogram of each
row's mass by the float32 bits of exp(z - max) (8 buckets per factor 2) proposes a band of logit
values that holds the boundary. The tokens above the band are inside (their float64 mass A is
< P), those below it outside, and the band's tokens, sorted by value (after narrowing by a float64
value histogram when there are more than FIRST_CANDIDATES of them), enter while A + the band's
mass before them is < P, accumulated in float64 per row. Both sides of the proposal are checked
in float64 (A < P <= A + band mass); a row that fails is redone over its whole sorted row, so no
row is ever approximated. The row maximum, its lowest-id position and the K largest values come
from the maxima of blocks of 64 ids.

`released_code_compat=True` reproduces the released code's two deviations on purpose: the
nucleus is searched among the top 256 tokens only, and the cumulative mass is compared with P in
bf16 (so P = 0.999 behaves as 1.0). It exists to reproduce the paper's numbers, not as a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# TRE-P: a row's band (the tokens around the nucleus boundary, sorted to find it) is narrowed
# first when it has more than FIRST_CANDIDATES tokens; band rows are accumulated in groups padded
# to FIRST_BAND_WIDTH x CANDIDATE_GROWTH^i tokens. (Real 135M-model rows at P=0.99 have a median
# nucleus of ~180 tokens, p99 ~4,400; their bands are a few dozen tokens.)
FIRST_CANDIDATES = 1024
FIRST_BAND_WIDTH = 64
CANDIDATE_GROWTH = 8
RELEASED_CODE_TOP = 256
# Widest block of contiguous ids whose maxima stand in for the row in max / argmax / top-K.
BLOCK = 64
# The TRE-P candidate histogram: float32 bits of exp(z - max) >> 20 (8 buckets per factor 2;
# values in [0, 1] give keys below 1,024), and the extra mass it asks for against float32 sums.
_BUCKET_SHIFT = 20
_N_BUCKETS = 1 << 10
HISTOGRAM_MARGIN = 1e-4
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
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    p_max: torch.Tensor
    min_entropy: torch.Tensor
    region_size: torch.Tensor
    region_entropy: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Row scans shared by every statistic. A row is viewed as blocks of `_block_width(V)` contiguous
# ids: the block maxima (one cheap reduction) give the row maximum, its lowest-id position and
# the K largest values without a per-element selection over the whole row.


def _block_width(vocab: int) -> int:
    """The largest divisor of the vocabulary size that is at most BLOCK (1 for a prime)."""
    return next(b for b in range(min(BLOCK, vocab), 0, -1) if vocab % b == 0)


def _blocks(z: torch.Tensor) -> torch.Tensor:
    rows, vocab = z.shape
    width = _block_width(vocab)
    return z.view(rows, vocab // width, width)


def _first_argmax(blocks: torch.Tensor, block_max: torch.Tensor, zmax: torch.Tensor) -> torch.Tensor:
    """Lowest id holding the row maximum: the first block whose maximum it is, then the first
    position inside that block (argmax answers the first of equal maxima)."""
    rows = torch.arange(blocks.shape[0], device=blocks.device)
    first_block = (block_max == zmax[:, None]).to(torch.uint8).argmax(-1)
    inner = (blocks[rows, first_block] == zmax[:, None]).to(torch.uint8).argmax(-1)
    return first_block * blocks.shape[-1] + inner


def _top_values(z: torch.Tensor, blocks: torch.Tensor, block_max: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row, sorted descending. As values (whichever tied token
    carries them) they are the k largest of the k blocks with the largest maxima: those k maxima
    are each >= every value outside those blocks."""
    n_blocks, width = blocks.shape[1:]
    if k * width >= z.shape[-1] or k >= n_blocks:
        return torch.topk(z, k, dim=-1, sorted=True).values
    chosen = torch.topk(block_max, k, dim=-1, sorted=False).indices
    cand = blocks.gather(1, chosen[:, :, None].expand(-1, -1, width)).reshape(z.shape[0], k * width)
    return torch.topk(cand, k, dim=-1, sorted=True).values


# ----------------------------------------------------------------------------------------------
# Region search (no gradient). Each search finds, per row, the region size m and the m largest
# logits in sorted order, from which `_local_stats` derives everything the forward and backward
# need: the threshold (m-th largest logit), how many tokens equal to it are inside (lowest ids
# first), and the log-normaliser and entropy of the local softmax. The region's values are the
# top-m values, whichever tied token carries each value.


class _Region(NamedTuple):
    size: torch.Tensor  # long
    threshold: torch.Tensor
    ties_in: torch.Tensor  # long
    lse: torch.Tensor
    entropy: torch.Tensor


def _local_stats(vals: torch.Tensor, size: torch.Tensor):
    """From sorted candidate values [rows, c] and region sizes <= c: threshold, ties inside,
    local log-normaliser and local entropy."""
    inside = torch.arange(vals.shape[-1], device=vals.device) < size[:, None]
    threshold = vals.gather(-1, (size - 1)[:, None]).squeeze(-1)
    ties_in = size - (vals > threshold[:, None]).sum(-1)  # every token above is a candidate
    local = vals.masked_fill(~inside, -math.inf)
    lse = torch.logsumexp(local, -1)
    q = torch.exp(local - lse[:, None])
    entropy = (q * (lse[:, None] - vals)).masked_fill(~inside, 0.0).sum(-1)
    return threshold, ties_in, lse, entropy


def _empty_region(n_rows: int, z: torch.Tensor) -> _Region:
    long = torch.empty(n_rows, dtype=torch.long, device=z.device)
    flt = torch.empty(n_rows, dtype=z.dtype, device=z.device)
    return _Region(long, flt.clone(), long.clone(), flt.clone(), flt.clone())


def _fill(region: _Region, rows: torch.Tensor, size: torch.Tensor, vals: torch.Tensor) -> None:
    region.size[rows] = size
    for buf, value in zip(region[1:], _local_stats(vals, size)):
        buf[rows] = value


def _band_edges(e: torch.Tensor, zmax: torch.Tensor, sum_e: torch.Tensor, p: float, margin: float,
                scratch: _Scratch):
    """Logits t_lo <= t_hi per row such that, very probably, the tokens with z >= t_hi hold less
    than P of the mass and those with z >= t_lo at least P: the nucleus boundary lies in the band
    t_lo <= z < t_hi.

    A float32 histogram of the mass by the float32 bits of e = exp(z - max) (8 buckets per
    factor 2) gives the edges: the band is the bucket(s) where the mass from the top crosses
    P (1 -/+ margin), widened by 1e-3 in logit against rounding; t_lo = -inf where no bucket
    edge holds enough. Nothing depends on the edges being right: the caller checks both masses
    in float64."""
    n_rows = e.shape[0]
    e32 = e.to(torch.float32)  # no copy unless the logits are float64
    keys = torch.bitwise_right_shift(e32.view(torch.int32), _BUCKET_SHIFT, out=scratch.get("keys", e32, torch.int32))
    keys += torch.arange(0, n_rows * _N_BUCKETS, _N_BUCKETS, dtype=torch.int32, device=e.device)[:, None]
    hist = torch.zeros(n_rows * _N_BUCKETS, dtype=torch.float32, device=e.device)
    hist.index_add_(0, keys.view(-1), e32.view(-1))
    from_top = hist.view(n_rows, _N_BUCKETS).double().flip(-1).cumsum(-1).flip(-1)  # mass at or above each bucket
    target = p * sum_e.double()[:, None]
    lo = (from_top >= target * (1.0 + margin)).sum(-1) - 1  # the highest bucket holding enough
    hi = (from_top >= target * (1.0 - margin)).sum(-1)  # the lowest bucket above holding too little

    def logit_at(bucket: torch.Tensor) -> torch.Tensor:  # lower edge of a bucket, as a logit
        edge = torch.bitwise_left_shift(bucket.clamp(min=0).to(torch.int32), _BUCKET_SHIFT).view(torch.float32)
        return zmax.double() + torch.log(edge.double())  # log(0) = -inf: the whole row

    t_lo = torch.where(lo >= 0, logit_at(lo) - 1e-3, -math.inf)
    t_hi = logit_at(hi) + 1e-3  # bucket 1,024 has edge 2: nothing is above it
    return t_lo.to(e.dtype), t_hi.to(e.dtype)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat positions of the True entries of a contiguous bool tensor: the same as
    mask.view(-1).nonzero(), but the scan runs over 8-byte words and only words holding a True
    are unpacked (2-3x faster on a CPU when few entries are True)."""
    flat = mask.view(-1)
    if flat.numel() % 8 or mask.device.type != "cpu":
        return flat.nonzero().squeeze(-1)
    words = flat.view(torch.int64).nonzero().squeeze(-1)
    word, byte = flat.view(-1, 8).index_select(0, words).nonzero().unbind(-1)
    return words.index_select(0, word) * 8 + byte


def _by_row_then_value(owner: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Permutation sorting flat entries by row, then by value descending (two stable sorts)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[torch.sort(owner[order], stable=True).indices]


class _Tokens(NamedTuple):
    """Flat per-token arrays of some rows' tokens: the row, the logit, its probability q and
    log q - log p_max (both float64)."""

    owner: torch.Tensor
    values: torch.Tensor
    q: torch.Tensor
    u: torch.Tensor

    def where(self, keep: torch.Tensor) -> _Tokens:
        """The tokens where `keep` (bool) holds, or at `keep` (indices), in their order."""
        idx = keep.nonzero().squeeze(-1) if keep.dtype == torch.bool else keep
        return _Tokens(*(t.index_select(0, idx) for t in self))


class _Sums(NamedTuple):
    """Per row, over the tokens known to be inside: how many, their float64 mass and sum q * u."""

    count: torch.Tensor
    mass: torch.Tensor
    tilt: torch.Tensor

    def plus(self, tokens: _Tokens) -> _Sums:
        n = self.count.shape[0]
        return _Sums(self.count + torch.bincount(tokens.owner, minlength=n),
                     self.mass.index_add(0, tokens.owner, tokens.q),
                     self.tilt.index_add(0, tokens.owner, tokens.q * tokens.u))


def _narrow(band: _Tokens, inside: _Sums, p: float, n_rows: int) -> tuple:
    """Shrink bands of more than FIRST_CANDIDATES tokens: 1,024 equal-width value buckets per
    row, their float64 masses, and the bucket where inside.mass + (mass from the top) reaches P.
    Tokens of higher buckets are inside (the mass before each is < P), of lower ones outside (the
    mass before each is >= P); the band keeps that bucket. Bucketing is monotone in the value, so
    ties stay together; a band of one repeated value cannot shrink and is left as it is."""
    stuck = torch.zeros(n_rows, dtype=torch.bool, device=band.owner.device)
    while True:
        counts = torch.bincount(band.owner, minlength=n_rows)
        wide = (counts > FIRST_CANDIDATES) & ~stuck
        if not bool(wide.any()):
            return band, inside
        sel = wide[band.owner]
        owner, v = band.owner[sel], band.values[sel].double()
        vmin = torch.full((n_rows,), math.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, owner, v, "amin")
        vmax = torch.full((n_rows,), -math.inf, dtype=torch.float64, device=v.device).scatter_reduce(
            0, owner, v, "amax"
        )
        span = vmax - vmin
        stuck |= wide & (span == 0)
        buckets = _N_BUCKETS
        bucket = ((v - vmin[owner]) / span[owner].clamp(min=1e-300) * buckets).floor().clamp_(max=buckets - 1).long()
        hist = torch.zeros(n_rows * buckets, dtype=torch.float64, device=v.device)
        hist.index_add_(0, owner * buckets + bucket, band.q[sel])
        from_top = hist.view(n_rows, buckets).flip(-1).cumsum(-1).flip(-1)  # mass of buckets >= b
        cut = ((inside.mass[:, None] + from_top) >= p).sum(-1) - 1  # the bucket holding the boundary
        keep = torch.ones_like(band.owner, dtype=torch.bool)
        keep[sel] = bucket == cut[owner]
        enter = torch.zeros_like(keep)
        enter[sel] = bucket > cut[owner]
        before = counts
        inside = inside.plus(band.where(enter))
        band = band.where(keep)
        stuck |= wide & (torch.bincount(band.owner, minlength=n_rows) == before)  # no progress


def _nucleus(z: torch.Tensor, e: torch.Tensor, zmax: torch.Tensor, sum_e: torch.Tensor, lse64: torch.Tensor,
             p: float, margin: float = HISTOGRAM_MARGIN, scratch: _Scratch | None = None) -> _Region:
    """Exact TRE-P nucleus per row (P < 1), without sorting the vocabulary.

    With the band edges of `_band_edges`: every token with z >= t_hi is inside (their float64
    mass A is < P, so the mass before each of them is too), no token below the band is (the mass
    before it is >= P), and the band's tokens (narrowed by `_narrow` if wide), sorted by value
    descending, enter while A + (the band's mass before them) < P, accumulated in float64 per
    row. Band rows are padded for that accumulation in groups of FIRST_BAND_WIDTH x
    CANDIDATE_GROWTH^i tokens. The local log-normaliser and entropy come from the same float64
    masses. A row whose edges fail either check is redone over its whole sorted row."""
    n_rows, vocab = z.shape
    dev = z.device
    scratch = scratch or _Scratch()
    t_lo, t_hi = _band_edges(e, zmax, sum_e, p, margin, scratch)
    flat = _flat_nonzero(torch.ge(z, t_lo[:, None], out=scratch.get("mask", z, torch.bool)))
    owner = torch.div(flat, vocab, rounding_mode="floor")
    values = z.view(-1).index_select(0, flat)
    del flat
    v64 = values.double()
    cand = _Tokens(owner, values, torch.exp(v64 - lse64.index_select(0, owner)),  # q, in float64
                   v64 - zmax.double().index_select(0, owner))  # log q - log p_max, exact
    in_band = values < t_hi.index_select(0, owner)
    band = cand.where(in_band)
    # Every candidate above the band is inside: their sums are all candidates' minus the band's.
    everything = _Sums(torch.zeros(n_rows, dtype=torch.long, device=dev), *(torch.zeros(
        n_rows, dtype=torch.float64, device=dev) for _ in range(2))).plus(cand)
    band_sums = _Sums(*(torch.zeros_like(t) for t in everything)).plus(band)
    inside = _Sums(*(a - b for a, b in zip(everything, band_sums)))
    band, inside = _narrow(band, inside, p, n_rows)
    band = band.where(_by_row_then_value(band.owner, band.values))
    counts = torch.bincount(band.owner, minlength=n_rows)
    rank = torch.arange(band.owner.numel(), device=dev) - (counts.cumsum(0) - counts)[band.owner]

    region = _empty_region(n_rows, z)
    done = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    lower, width = 0, min(FIRST_BAND_WIDTH, vocab)
    while True:
        rows = ((counts > lower) & (counts <= width)).nonzero().squeeze(-1)
        if rows.numel():
            local = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
            local[rows] = torch.arange(rows.numel(), device=dev)
            take = local[band.owner] >= 0
            at = (local[band.owner[take]], rank[take])
            q_pad = band.q.new_zeros((rows.numel(), width)).index_put_(at, band.q[take])
            u_pad = band.u.new_zeros((rows.numel(), width)).index_put_(at, band.u[take])
            v_pad = band.values.new_full((rows.numel(), width), math.inf).index_put_(at, band.values[take])
            a = inside.mass[rows]
            cum = q_pad.cumsum(-1)  # padding adds 0
            into = (torch.arange(width, device=dev) < counts[rows, None]) & (a[:, None] + (cum - q_pad) < p)
            k = into.sum(-1)
            ok = (a < p) & (a + cum[:, -1] >= p)
            threshold = v_pad.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
            ties_in = (into & (v_pad == threshold[:, None])).sum(-1)
            mass = a + (q_pad * into).sum(-1)
            tilt = inside.tilt[rows] + (q_pad * u_pad * into).sum(-1)
            # log q = u + c with c = zmax - lse: H_local = log(mass) - c - tilt / mass (both >= 0).
            c = zmax.double()[rows] - lse64[rows]
            local_lse = lse64[rows] + torch.log(mass)
            local_entropy = (torch.log(mass) - c) - tilt / mass
            rows, parts = rows[ok], (inside.count[rows] + k, threshold, ties_in, local_lse, local_entropy)
            for buf, value in zip(region, parts):
                buf[rows] = value[ok].to(buf.dtype)
            done[rows] = True
        if width == vocab:
            break
        lower, width = width, min(width * CANDIDATE_GROWTH, vocab)
    redo = (~done).nonzero().squeeze(-1)
    if redo.numel():
        vals = torch.sort(z[redo], dim=-1, descending=True).values
        mass = torch.exp(vals.double() - lse64[redo, None]).cumsum(-1)
        _fill(region, redo, 1 + (mass[:, :-1] < p).sum(-1), vals)
    return region


def _whole_vocabulary(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor) -> _Region:
    """P = 1: the region is every token, so the local softmax is the full one."""
    zmin = z.amin(-1)
    size = torch.full_like(zmin, z.shape[-1], dtype=torch.long)
    return _Region(size, zmin, (z == zmin[:, None]).sum(-1), lse.clone(), entropy.clone())


def _released_nucleus(z: torch.Tensor, top: torch.Tensor, lse: torch.Tensor, p: float) -> _Region:
    """The released code's nucleus: top-256 candidates (`top`, sorted), probabilities accumulated
    and compared with P in bf16. A bf16 running sum near 1 stops growing when the next probability
    is below half its spacing, and P = 0.999 itself rounds to 1.0, so such nuclei run to the cap."""
    probs = torch.exp(top - lse[:, None]).to(torch.bfloat16)
    p_bf16 = torch.tensor(p, dtype=torch.bfloat16, device=z.device)
    running = torch.zeros_like(probs[:, 0])
    below = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for j in range(top.shape[-1] - 1):  # sequential, each partial sum rounded to bf16
        running = running + probs[:, j]
        below += running < p_bf16
    region = _empty_region(z.shape[0], z)
    _fill(region, torch.arange(z.shape[0], device=z.device), 1 + below, top)
    return region


def _top_k(top: torch.Tensor) -> _Region:
    region = _empty_region(top.shape[0], top)
    rows = torch.arange(top.shape[0], device=top.device)
    _fill(region, rows, torch.full_like(rows, top.shape[-1]), top)
    return region


def _region_members(z: torch.Tensor, threshold: torch.Tensor, ties_in: torch.Tensor, scratch=None):
    """(row, token) indices of the region: tokens above the threshold plus the `ties_in`
    lowest-id tokens equal to it. Rows with an infinite threshold contribute nothing."""
    mask = (
        torch.ge(z, threshold[:, None], out=scratch.get("mask", z, torch.bool)) if scratch else z >= threshold[:, None]
    )
    flat = _flat_nonzero(mask)  # ids ascend within a row
    rows, cols = flat // z.shape[-1], flat % z.shape[-1]
    values = z.view(-1)[flat]
    equal = values == threshold[rows]
    # Rank of each equal entry among its row's equal entries, by id: a cumulative count minus
    # the count before the row's first entry.
    running = equal.to(torch.long).cumsum(0)
    counts = torch.bincount(rows, minlength=z.shape[0])
    first = counts.cumsum(0) - counts
    before = torch.zeros_like(counts)
    has = counts > 0
    before[has] = (running - equal.to(torch.long))[first[has]]
    keep = ~equal | (running - before[rows] <= ties_in[rows])
    return rows[keep], cols[keep], values[keep]


# ----------------------------------------------------------------------------------------------
# One chunk of rows, forward and backward.


class _Scratch:
    """Buffers that every chunk of one call reuses: a chunk's [rows, V] temporaries are allocated
    (and their pages first touched) once per call, not once per chunk."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        n = like.numel()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n].view(like.shape)


def _chunk_forward(z, tokens, region: RegionSpec | None, scratch: _Scratch):
    vocab = z.shape[-1]
    blocks = _blocks(z)
    block_max = blocks.amax(-1)
    zmax = block_max.amax(-1)
    argmax = _first_argmax(blocks, block_max, zmax)  # the lowest id on ties
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
            found = _top_k(_top_values(z, blocks, block_max, min(region.k, vocab)))
        elif region.released_code_compat:
            top = _top_values(z, blocks, block_max, min(RELEASED_CODE_TOP, vocab))
            found = _released_nucleus(z, top, lse, region.p)
        elif region.p >= 1.0:  # the smallest prefix with all the mass is the whole vocabulary
            found = _whole_vocabulary(z, lse, entropy)
        else:
            found = _nucleus(z, e, zmax, sum_e, lse64, region.p, scratch=scratch)
        size = found.size
        scale = _scale(vocab, size)
        region_entropy = scale * found.entropy
        saved.update(region=found, scale=scale)
    outputs = (logprob, entropy, p_max, log_sum, size.to(torch.float32), region_entropy)
    return outputs, saved


def _scale(vocab: int, size: torch.Tensor) -> torch.Tensor:
    """log|V| / log|region|, and 0 for a one-token region (the regularizer vanishes there)."""
    size_f = size.to(torch.float32)
    safe = torch.where(size > 1, size_f, torch.full_like(size_f, 2.0))
    return torch.where(size > 1, math.log(vocab) / torch.log(safe), torch.zeros_like(size_f))


def _chunk_backward(z, tokens, saved, grads, inv_temperature: float, out: torch.Tensor, scratch: _Scratch):
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
        rows, cols, values = _region_members(z, threshold, region.ties_in, scratch)
        shifted = (values - region.lse[rows]).clamp_(min=torch.finfo(z.dtype).min)  # log q
        # d(local H)/dz = -q (log q + H_local) inside the region, 0 outside.
        local = -weight[rows] * torch.exp(shifted) * (shifted + region.entropy[rows])
        grad.index_put_((rows, cols), local, accumulate=True)
    return grad


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, tokens1d, region, temperature, chunk_rows):
        n = logits2d.shape[0]
        outs = [torch.empty(n, dtype=torch.float32, device=logits2d.device) for _ in range(6)]
        saved_chunks = []
        scratch = _Scratch()
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            z = _scaled(logits2d[start:stop], temperature, scratch)
            toks = tokens1d[start:stop] if tokens1d is not None else None
            chunk_out, saved = _chunk_forward(z, toks, region, scratch)
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
        scratch = _Scratch()
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
        return grad_logits, None, None, None, None


def _scaled(logits_chunk: torch.Tensor, temperature: float, scratch: _Scratch) -> torch.Tensor:
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
        elements = DEFAULT_CHUNK_ELEMENTS if logits.device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS_GPU
        chunk_rows = max(1, elements // vocab)
    outs = None
    if logits.is_cuda:  # the fused Triton kernels where they apply (TRE_KERNELS=0 turns them off)
        from tre_cli.kernels import fused_or_none

        outs = fused_or_none(logits2d, tokens1d, region, float(temperature))
    if outs is None:
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
