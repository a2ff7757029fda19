"""Where a row's trust region lies, for `stats.token_stats`: the row maximum, the K largest logits
(TRE-K) and the exact top-P nucleus (TRE-P: tokens sorted by probability, descending, ties by
lower id; a token is in it iff the mass strictly before it is < P).

The nucleus is found without sorting the vocabulary (`nucleus`). A float32 histogram of each
row's mass by the float32 bits of exp(z - max) (8 buckets per factor 2) proposes a band of logit
values that holds the boundary. The tokens above the band are inside (their float64 mass A is
< P), those below it outside, and the band's tokens, sorted by value (after narrowing by a float64
value histogram when there are more than FIRST_CANDIDATES of them), enter while A + the band's
mass before them is < P, accumulated in float64 per row. Both sides of the proposal are checked
in float64 (A < P <= A + band mass); a row that fails is redone over its whole sorted row, so no
row is ever approximated. The row maximum, its lowest-id position and the K largest values come
from the maxima of blocks of 64 ids.
"""

from __future__ import annotations

import math
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

# ----------------------------------------------------------------------------------------------
# Row scans shared by every statistic. A row is viewed as blocks of `_block_width(V)` contiguous
# ids: the block maxima (one cheap reduction) give the row maximum, its lowest-id position and
# the K largest values without a per-element selection over the whole row.


def _block_width(vocab: int) -> int:
    """The largest divisor of the vocabulary size that is at most BLOCK (1 for a prime)."""
    return next(b for b in range(min(BLOCK, vocab), 0, -1) if vocab % b == 0)


def row_blocks(z: torch.Tensor) -> torch.Tensor:
    rows, vocab = z.shape
    width = _block_width(vocab)
    return z.view(rows, vocab // width, width)


def first_argmax(blocks: torch.Tensor, block_max: torch.Tensor, zmax: torch.Tensor) -> torch.Tensor:
    """Lowest id holding the row maximum: the first block whose maximum it is, then the first
    position inside that block (argmax answers the first of equal maxima)."""
    rows = torch.arange(blocks.shape[0], device=blocks.device)
    first_block = (block_max == zmax[:, None]).to(torch.uint8).argmax(-1)
    inner = (blocks[rows, first_block] == zmax[:, None]).to(torch.uint8).argmax(-1)
    return first_block * blocks.shape[-1] + inner


def top_values(z: torch.Tensor, blocks: torch.Tensor, block_max: torch.Tensor, k: int) -> torch.Tensor:
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


class Region(NamedTuple):
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


def _empty_region(n_rows: int, z: torch.Tensor) -> Region:
    long = torch.empty(n_rows, dtype=torch.long, device=z.device)
    flt = torch.empty(n_rows, dtype=z.dtype, device=z.device)
    return Region(long, flt.clone(), long.clone(), flt.clone(), flt.clone())


def _fill(region: Region, rows: torch.Tensor, size: torch.Tensor, vals: torch.Tensor) -> None:
    region.size[rows] = size
    for buf, value in zip(region[1:], _local_stats(vals, size)):
        buf[rows] = value


def _band_edges(e: torch.Tensor, zmax: torch.Tensor, sum_e: torch.Tensor, p: float, margin: float,
                scratch: Scratch):
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


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
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


def nucleus(z: torch.Tensor, e: torch.Tensor, zmax: torch.Tensor, sum_e: torch.Tensor, lse64: torch.Tensor,
             p: float, margin: float = HISTOGRAM_MARGIN, scratch: Scratch | None = None) -> Region:
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
    scratch = scratch or Scratch()
    t_lo, t_hi = _band_edges(e, zmax, sum_e, p, margin, scratch)
    flat = flat_nonzero(torch.ge(z, t_lo[:, None], out=scratch.get("mask", z, torch.bool)))
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


def whole_vocabulary(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor) -> Region:
    """P = 1: the region is every token, so the local softmax is the full one."""
    zmin = z.amin(-1)
    size = torch.full_like(zmin, z.shape[-1], dtype=torch.long)
    return Region(size, zmin, (z == zmin[:, None]).sum(-1), lse.clone(), entropy.clone())


def released_nucleus(z: torch.Tensor, top: torch.Tensor, p: float) -> Region:
    """The released code's TRE-P nucleus as its runtime computes it: among the top 256 tokens
    (`top`, the row's largest logits, sorted), a token is in iff the float32 mass of the tokens
    before it is < P in float32; the top-1 token always is.

    The released actor computes its statistics inside `torch.autocast("cuda", dtype=bfloat16)`
    on the model's bf16 logits (divided by the temperature in place, so rounded to bf16 again).
    Its `entropy_from_logits` takes `softmax` over the whole row, the top 256 probabilities, their
    `cumsum`, the sum shifted by one and compares it with the Python float P. CUDA autocast runs
    softmax and cumsum in float32 (both are on its float32 list), so the probabilities are
    float32 exp(z - max) / sum of bf16-valued logits, summed in float32, and a float32 tensor
    compared with a Python float is compared in float32 (P = 0.9 is 0.89999998). This repeats
    those ops: the logits rounded to bf16 (a no-op for bf16 logits at temperature 1), the row's
    float32 sum of exp(z - max), the candidates' probabilities divided by it, torch.cumsum, the
    comparison with P as a Python float. What can still differ from a GPU run is the order of
    the two float32 sums (the row's normaliser and the cumulative sum) and an ulp of exp, which
    move a row only where the mass before a token is within float32 rounding of P.

    The region is then the `size` largest logits as given (bf16 rounding preserves their order),
    and its local entropy is computed from their values, as for every other region."""
    as_bf16 = z.to(torch.bfloat16).to(torch.float32)
    zmax = as_bf16.amax(-1, keepdim=True)
    normaliser = torch.exp(as_bf16 - zmax).sum(-1, keepdim=True)
    del as_bf16
    probs = torch.exp(top.to(torch.bfloat16).to(torch.float32) - zmax) / normaliser
    before = torch.cumsum(probs, -1)[:, :-1]  # the mass before tokens 2, 3, ...
    size = 1 + (before < p).sum(-1)
    region = _empty_region(z.shape[0], z)
    _fill(region, torch.arange(z.shape[0], device=z.device), size, top)
    return region


def top_k_region(top: torch.Tensor) -> Region:
    region = _empty_region(top.shape[0], top)
    rows = torch.arange(top.shape[0], device=top.device)
    _fill(region, rows, torch.full_like(rows, top.shape[-1]), top)
    return region


def region_members(z: torch.Tensor, threshold: torch.Tensor, ties_in: torch.Tensor, scratch=None):
    """(row, token) indices of the region: tokens above the threshold plus the `ties_in`
    lowest-id tokens equal to it. Rows with an infinite threshold contribute nothing."""
    mask = (
        torch.ge(z, threshold[:, None], out=scratch.get("mask", z, torch.bool)) if scratch else z >= threshold[:, None]
    )
    flat = flat_nonzero(mask)  # ids ascend within a row
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


# Reusable per-call buffers (the nucleus search and the chunk loops of `stats` share them).


class Scratch:
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
