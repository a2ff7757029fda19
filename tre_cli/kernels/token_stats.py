"""Triton kernels for `tre_cli.losses.token_stats`: same outputs, same gradient, no [N, V]
temporaries.

One program per row, streaming the row in blocks:

- pass A: online max (lowest-id argmax), sum of exp and sum of exp * (z - max) (the entropy
  without cancellation, as the reference computes it), the minimum, the logit at the token.
- region search (TRE-K and TRE-P, exact): the region is {z > tau} plus the `ties_in` lowest-id
  tokens equal to tau, where tau = the smallest logit v with W(v) < target, W(v) = the weight of
  the tokens strictly above v (weight 1 and target K for TRE-K; weight exp(z - max) and target
  P * sum(exp) for TRE-P). W is a non-increasing step function of v that only steps at the row's
  values, so tau is found by a radix search over the order-preserving integer keys of the float32
  logits: each level tests 2^R - 1 candidate keys at once in one read of the row and fixes R more
  bits of the largest key that fails the test; tau is that key plus one. bf16 logits (at
  temperature 1) have 16-bit keys, so 16 / R levels; float32 ones 32 / R. No candidate buffer,
  so no row ever needs a fallback, whatever its nucleus size (1 or 150,000).
- a last pass counts the tokens above and equal to tau and their exp sums, from which the tie
  count, the region size and the local log-normaliser and entropy follow in closed form.

Saved per row for the backward: the log-normaliser, argmax, tau, ties inside, the local
log-normaliser and entropy (O(1)). The backward is one read of the row and one write of its
gradient: the full-softmax terms p * (a + b log p), two one-hot corrections, and the local term
-w q (log q + H_local) on the region (ties counted in id order with a running count).

Masses are summed in float32 within a block and float64 across blocks; the reference sums in
float64 throughout, so a boundary within ~1e-6 of P may be decided differently (the tests keep
clear of such knife edges, as test_stats.py does).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Bits fixed per search level: 2^R - 1 candidate keys are tested per read of the row. R = 4 gives
# 4 levels for bf16 logits; larger R means fewer reads but more compares per element.
SEARCH_BITS = 4
BLOCK = 2048  # elements per step of pass A, the final pass and the backward
SEARCH_BLOCK = 512  # elements per step of a search level ([SEARCH_BLOCK, 2^R] compares)

MODE_NONE, MODE_K, MODE_P = 0, 1, 2
# A jit-visible global must be a constexpr (the interpreter does not check; the compiler does).
FLOAT32_MIN = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _load_row(x_ptr, offs, mask, temperature, HAS_TEMPERATURE: tl.constexpr):
    """The row's scaled logits as float32, -0.0 folded into +0.0 (equal values share a key).
    Divided with IEEE rounding, as torch does, so ties and boundaries match the reference."""
    z = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_TEMPERATURE:
        z = tl.math.div_rn(z, temperature)
    return tl.where(z == 0.0, 0.0, z)


@triton.jit
def _ordered_key(z, SHIFT: tl.constexpr):
    """int32 whose signed order is the float order; SHIFT drops bits known to be zero."""
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if SHIFT > 0:
        key = key >> SHIFT
    return key


@triton.jit
def _forward_kernel(
    x_ptr, tok_ptr, V, temperature, target_ptr, log_vocab,
    # outputs, one per row
    logprob_ptr, entropy_ptr, pmax_ptr, minent_ptr, size_ptr, regent_ptr,
    lse_ptr, argmax_ptr, tau_ptr, ties_ptr, lse_loc_ptr, h_loc_ptr, scale_ptr,
    HAS_TOKENS: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, MODE: tl.constexpr,
    SHIFT: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * V
    cols = tl.arange(0, BLOCK)

    # ---- pass A: max, argmax, sum exp, sum exp * d, min ------------------------------------
    m = tl.full((), FLOAT32_MIN, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    zmin = tl.full((), float("inf"), tl.float32)
    amax = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_row(x_row, offs, mask, temperature, HAS_TEMPERATURE)
        bmax = tl.max(z, 0)
        barg = tl.argmax(z, 0, tie_break_left=True).to(tl.int32) + start
        amax = tl.where(bmax > m, barg, amax)  # strict: the earlier block keeps a tie
        m_new = tl.maximum(m, bmax)
        alpha = tl.exp(m - m_new)
        d = tl.maximum(z - m_new, FLOAT32_MIN)  # -inf logits: exp -> 0 and 0 * d stays 0
        e = tl.where(mask, tl.exp(d), 0.0)
        # Rescale the running sums to the new max: e' = alpha e, d' = d + (m - m_new).
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
        zmin = tl.minimum(zmin, tl.min(tl.where(mask, z, float("inf")), 0))
    log_s = tl.log(s)
    entropy = log_s - t / s
    lse = (m.to(tl.float64) + tl.log(s.to(tl.float64))).to(tl.float32)
    tl.store(entropy_ptr + row, entropy)
    tl.store(pmax_ptr + row, 1.0 / s)
    tl.store(minent_ptr + row, log_s)
    tl.store(lse_ptr + row, lse)
    tl.store(argmax_ptr + row, amax)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row)
        z_tok = tl.load(x_row + tok).to(tl.float32)
        if HAS_TEMPERATURE:
            z_tok = tl.math.div_rn(z_tok, temperature)
        tl.store(logprob_ptr + row, z_tok - lse)
    else:
        tl.store(logprob_ptr + row, 0.0)

    if MODE == 0:
        tl.store(size_ptr + row, 0.0)
        tl.store(regent_ptr + row, 0.0)
    else:
        # ---- radix search for tau: the largest key whose weight above is >= target ------------
        NB: tl.constexpr = 32 - SHIFT
        NP: tl.constexpr = 1 << R
        target = tl.load(target_ptr)  # float64: P is compared at full precision
        if MODE == 1:
            goal = target
        else:
            goal = target * s.to(tl.float64)
        lo = tl.full((), -(1 << (NB - 1)), tl.int64)  # key of nothing real: fails the test
        digits = tl.arange(0, NP)
        scols = tl.arange(0, SEARCH_BLOCK)
        for level in tl.static_range(NB // R):
            low_bits = NB - R * (level + 1)
            cand = (lo + (digits.to(tl.int64) << low_bits)).to(tl.int32)
            above = tl.zeros((NP,), tl.float64)
            for start in range(0, V, SEARCH_BLOCK):
                offs = start + scols
                mask = offs < V
                z = _load_row(x_row, offs, mask, temperature, HAS_TEMPERATURE)
                key = _ordered_key(z, SHIFT)
                if MODE == 1:
                    w = tl.where(mask, 1.0, 0.0)
                else:
                    w = tl.where(mask, tl.exp(tl.maximum(z - m, FLOAT32_MIN)), 0.0)
                gt = key[:, None] > cand[None, :]
                above += tl.sum(tl.where(gt, w[:, None], 0.0), 0).to(tl.float64)
            fails = (above >= goal) & (digits > 0)  # digit 0 is lo itself, known to fail
            lo = lo + (tl.sum(fails.to(tl.int64), 0) << low_bits)
        # tau's key; rounding can leave it just outside the row's range (P within float noise
        # of the whole mass, or P = 1 given as an infinite target): the clamp lands on the min.
        tau_key = tl.minimum(tl.maximum(lo + 1, _ordered_key(zmin, SHIFT).to(tl.int64)),
                             _ordered_key(m, SHIFT).to(tl.int64)).to(tl.int32)

        # ---- final pass: counts and exp sums above and at tau ----------------------------------
        n_gt = tl.zeros((), tl.float64)
        n_eq = tl.zeros((), tl.float64)
        e_gt = tl.zeros((), tl.float64)
        ed_gt = tl.zeros((), tl.float64)
        tau = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            z = _load_row(x_row, offs, mask, temperature, HAS_TEMPERATURE)
            key = _ordered_key(z, SHIFT)
            gt = (key > tau_key) & mask
            eq = (key == tau_key) & mask
            d = tl.maximum(z - m, FLOAT32_MIN)
            e = tl.where(gt, tl.exp(d), 0.0)
            n_gt += tl.sum(gt.to(tl.float32), 0).to(tl.float64)
            n_eq += tl.sum(eq.to(tl.float32), 0).to(tl.float64)
            e_gt += tl.sum(e, 0).to(tl.float64)
            ed_gt += tl.sum(e * d, 0).to(tl.float64)
            tau = tl.maximum(tau, tl.max(tl.where(eq, z, float("-inf")), 0))
        d_tau = (tau - m).to(tl.float64)
        e_tau = tl.exp(tau - m).to(tl.float64)
        if MODE == 1:
            ties = tl.minimum(goal - n_gt, n_eq)
        else:
            # Tokens equal to tau enter in id order while the mass before them is < P:
            # ceil((P S - mass above) / p_tau) of them, at least 1 (tau's first is inside).
            room = goal - e_gt
            x = tl.where(e_tau > 0.0, room / tl.where(e_tau > 0.0, e_tau, 1.0), float("inf"))
            x = tl.minimum(x, n_eq)
            whole = x.to(tl.int64).to(tl.float64)
            ties = tl.maximum(tl.where(whole < x, whole + 1.0, whole), 1.0)
        size = n_gt + ties
        s_loc = e_gt + ties * e_tau
        t_loc = ed_gt + ties * e_tau * d_tau
        h_loc = (tl.log(s_loc) - t_loc / s_loc).to(tl.float32)
        lse_loc = (m.to(tl.float64) + tl.log(s_loc)).to(tl.float32)
        size_f = size.to(tl.float32)
        scale = tl.where(size > 1.0, log_vocab / tl.log(tl.maximum(size_f, 2.0)), 0.0)
        tl.store(size_ptr + row, size_f)
        tl.store(regent_ptr + row, scale * h_loc)
        tl.store(tau_ptr + row, tau)
        tl.store(ties_ptr + row, ties.to(tl.int32))
        tl.store(lse_loc_ptr + row, lse_loc)
        tl.store(h_loc_ptr + row, h_loc)
        tl.store(scale_ptr + row, scale)


@triton.jit
def _backward_kernel(
    x_ptr, grad_ptr, tok_ptr, V, temperature,
    lse_ptr, argmax_ptr, tau_ptr, ties_ptr, lse_loc_ptr, h_loc_ptr,
    c_p_ptr, c_logp_ptr, c_tok_ptr, c_max_ptr, w_reg_ptr,
    HAS_TOKENS: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, HAS_REGION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad = p (c_p + c_logp log p) + c_tok [j = token] + c_max [j = argmax]
              - w q (log q + H_local) [j in region]      (all coefficients already / T)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * V
    g_row = grad_ptr + row * V
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    c_p = tl.load(c_p_ptr + row)
    c_logp = tl.load(c_logp_ptr + row)
    c_max = tl.load(c_max_ptr + row)
    amax = tl.load(argmax_ptr + row)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row).to(tl.int32)
        c_tok = tl.load(c_tok_ptr + row)
    if HAS_REGION:
        tau = tl.load(tau_ptr + row)
        ties = tl.load(ties_ptr + row)
        lse_loc = tl.load(lse_loc_ptr + row)
        h_loc = tl.load(h_loc_ptr + row)
        w_reg = tl.load(w_reg_ptr + row)
        seen = tl.zeros((), tl.int32)  # tokens equal to tau in earlier blocks
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_row(x_row, offs, mask, temperature, HAS_TEMPERATURE)
        logp = z - lse
        p = tl.exp(logp)
        # -inf logits (and padding lanes) get exactly 0, never 0 * inf.
        grad = tl.where(p > 0.0, p * (c_p + c_logp * logp), 0.0)
        grad += tl.where(offs == amax, c_max, 0.0)
        if HAS_TOKENS:
            grad += tl.where(offs == tok, c_tok, 0.0)
        if HAS_REGION:
            eq = (z == tau) & mask
            eq_i = eq.to(tl.int32)
            rank = seen + tl.cumsum(eq_i, 0) - eq_i
            inside = (z > tau) | (eq & (rank < ties))
            log_q = z - lse_loc
            local = -w_reg * tl.exp(log_q) * (log_q + h_loc)
            grad += tl.where(inside & mask, local, 0.0)
            seen += tl.sum(eq_i, 0)
        tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side.


def _block(vocab: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(vocab))


def _region_args(region, vocab: int):
    """The kernels' region mode and its target (K, or P; inf for the whole vocabulary)."""
    if region is None:
        return MODE_NONE, 0.0
    if region.kind == "k":
        return MODE_K, float(min(region.k, vocab))
    if region.kind == "p":
        return MODE_P, (math.inf if region.p >= 1.0 else float(region.p))
    raise ValueError(f"unknown trust region kind {region.kind!r}; the kernels know 'k' (top-K) and 'p' (top-P)")


class _FusedTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, tokens1d, region, temperature):
        n, vocab = logits2d.shape
        dev = logits2d.device
        f32 = dict(dtype=torch.float32, device=dev)
        outs = [torch.empty(n, **f32) for _ in range(6)]
        lse, tau, lse_loc, h_loc, scale = (torch.zeros(n, **f32) for _ in range(5))
        argmax = torch.zeros(n, dtype=torch.int32, device=dev)
        ties = torch.zeros(n, dtype=torch.int32, device=dev)
        mode, target = _region_args(region, vocab)
        has_t = temperature != 1.0
        shift = 16 if (logits2d.dtype == torch.bfloat16 and not has_t) else 0
        toks = tokens1d if tokens1d is not None else argmax  # any int tensor; unused
        target_t = torch.tensor([target], dtype=torch.float64, device=dev)
        if n:
            _forward_kernel[(n,)](
                logits2d, toks, vocab, temperature, target_t, math.log(vocab),
                *outs, lse, argmax, tau, ties, lse_loc, h_loc, scale,
                HAS_TOKENS=tokens1d is not None, HAS_TEMPERATURE=has_t, MODE=mode,
                SHIFT=shift, R=SEARCH_BITS, BLOCK=_block(vocab, BLOCK),
                SEARCH_BLOCK=_block(vocab, SEARCH_BLOCK),
            )
        ctx.save_for_backward(logits2d, tokens1d, lse, argmax, outs[1], outs[2], tau, ties,
                              lse_loc, h_loc, scale)
        ctx.has_region = mode != MODE_NONE
        ctx.temperature = temperature
        ctx.mark_non_differentiable(outs[4])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_pmax, g_minent, _g_size, g_region):
        (logits2d, tokens1d, lse, argmax, entropy, p_max, tau, ties, lse_loc, h_loc,
         scale) = ctx.saved_tensors
        n, vocab = logits2d.shape
        inv_t = 1.0 / ctx.temperature
        zero = torch.zeros_like(lse)
        g_lp, g_h, g_pm, g_me, g_reg = (zero if g is None else g.float()
                                        for g in (g_logprob, g_entropy, g_pmax, g_minent, g_region))
        if tokens1d is None:
            g_lp = zero
        # The reference's coefficients (stats._chunk_backward), per row, already divided by T.
        c_p = (-g_lp - g_pm * p_max + g_me - g_h * entropy) * inv_t
        c_logp = -g_h * inv_t
        c_tok = g_lp * inv_t
        c_max = (g_pm * p_max - g_me) * inv_t
        w_reg = g_reg * scale * inv_t
        has_region = ctx.has_region and bool(torch.any(w_reg != 0))
        # Rows whose regularizer has no gradient are skipped, as in the reference.
        tau = torch.where(w_reg != 0, tau, torch.full_like(tau, math.inf))
        grad = torch.empty_like(logits2d)
        has_t = ctx.temperature != 1.0
        if n:
            _backward_kernel[(n,)](
                logits2d, grad, tokens1d if tokens1d is not None else argmax, vocab, ctx.temperature,
                lse, argmax, tau, ties, lse_loc, h_loc, c_p, c_logp, c_tok, c_max, w_reg,
                HAS_TOKENS=tokens1d is not None, HAS_TEMPERATURE=has_t, HAS_REGION=has_region,
                BLOCK=_block(vocab, BLOCK),
            )
        return grad, None, None, None


def fused_token_stats(logits2d: torch.Tensor, tokens1d, region, temperature: float):
    """The six per-row outputs of `token_stats` for [N, V] logits (bf16, fp16 or fp32) on a
    device Triton can run on (or on the CPU under TRITON_INTERPRET=1)."""
    logits2d = logits2d.contiguous()
    if tokens1d is not None:
        tokens1d = tokens1d.contiguous()
    return _FusedTokenStats.apply(logits2d, tokens1d, region, float(temperature))
