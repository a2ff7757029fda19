"""The fused Triton kernels (tre_cli/kernels) against the torch reference and the brute force.

Runs natively on CUDA; on a CPU-only machine under Triton's interpreter (TRITON_INTERPRET=1, as
`make test-kernels` does); skipped when Triton is not importable (the main venv) or when there is
neither a GPU nor the interpreter.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import brute
from tre_cli.kernels import applies, fused_or_none, fused_token_stats, kernels_available
from tre_cli.losses.stats import RegionSpec, TokenStats, token_stats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not kernels_available():
    pytestmark = pytest.mark.skip(
        reason="Triton is not importable here (make test-kernels builds .venv-kernel with it)"
    )
elif not (INTERPRET or torch.cuda.is_available()):
    pytestmark = pytest.mark.skip(reason="no CUDA device and TRITON_INTERPRET is not 1")
# The interpreter runs on host tensors.
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
FIELDS = ("logprob", "entropy", "p_max", "min_entropy", "region_entropy")


def _fused(logits, tokens=None, region=None, temperature=1.0) -> TokenStats:
    vocab = logits.shape[-1]
    flat = fused_token_stats(logits.reshape(-1, vocab), None if tokens is None else tokens.reshape(-1),
                             region, temperature)
    return TokenStats(*(o.reshape(logits.shape[:-1]) for o in flat))


def _rows(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        z = torch.randn(n, vocab, generator=gen) * 2.0
    elif kind == "flat":  # nearly uniform: nuclei of most of the row
        z = torch.randn(n, vocab, generator=gen) * 1e-3
    elif kind == "peaked":  # one dominant token: one-token nuclei
        z = torch.randn(n, vocab, generator=gen)
        z[torch.arange(n), torch.randint(vocab, (n,), generator=gen)] += 12.0
    elif kind == "ties":  # few distinct values: ties everywhere, at the boundary included
        z = torch.randint(0, 4, (n, vocab), generator=gen).float()
    elif kind == "bf16":  # 16-bit search keys
        return (torch.randn(n, vocab, generator=gen) * 3.0).to(torch.bfloat16)
    elif kind == "fp16":
        return (torch.randn(n, vocab, generator=gen) * 3.0).to(torch.float16)
    else:
        raise AssertionError(kind)
    return z


def _spec(region):
    if region is None:
        return None
    return RegionSpec.top_k(region[1]) if region[0] == "k" else RegionSpec.top_p(region[1])


def _brute(logits, tokens, region):
    if region is None:
        return brute.stats(logits, tokens, None)
    if region[0] == "k":
        return brute.stats(logits, tokens, "k", k=region[1])
    rows = brute.stats(logits, tokens, "p", p=region[1])
    for r in rows:  # a boundary within float noise of P is legitimately decided either way
        assert r["margin"] > 1e-6, "random input landed on a knife edge; change the seed"
    return rows


def _fresh(flavour, n, vocab, region, gen):
    """Random rows and tokens, drawn again while a TRE-P boundary sits on a knife edge."""
    for _ in range(20):
        logits = _rows(flavour, n, vocab, gen)
        tokens = torch.randint(vocab, (n,), generator=gen)
        if region is None or region[0] == "k":
            break
        if all(r["margin"] > 1e-6 for r in brute.stats(logits, tokens, "p", p=region[1])):
            break
    return logits, tokens, _brute(logits, tokens, region)


def _check_brute(ours: TokenStats, rows: list[dict], tol=2e-5):
    for field in FIELDS:
        want = torch.tensor([r[field] for r in rows], dtype=torch.float64)
        got = getattr(ours, field).reshape(-1).double().cpu()
        assert torch.allclose(got, want, rtol=tol, atol=tol), (field, (got - want).abs().max())
    sizes = torch.tensor([float(r["region_size"]) for r in rows], dtype=torch.float64)
    assert torch.equal(ours.region_size.reshape(-1).double().cpu(), sizes)


def _check_reference(ours: TokenStats, ref: TokenStats, tol=2e-5):
    for field in FIELDS:
        a, b = getattr(ours, field).cpu(), getattr(ref, field).cpu()
        assert torch.allclose(a, b, rtol=tol, atol=tol), (field, (a - b).abs().max())
    assert torch.equal(ours.region_size.cpu(), ref.region_size.cpu())


@pytest.mark.parametrize("flavour", ["normal", "flat", "peaked", "ties", "bf16", "fp16"])
@pytest.mark.parametrize("region", [None, ("k", 1), ("k", 2), ("k", 7), ("k", 500),
                                    ("p", 0.5), ("p", 0.9137), ("p", 0.999), ("p", 1.0)])
def test_forward_matches_brute_force_and_reference(flavour, region):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("kernel", flavour, region)).encode()))
    logits, tokens, rows = _fresh(flavour, 10, 97, region, gen)
    ours = _fused(logits.to(DEVICE), tokens.to(DEVICE), _spec(region))
    _check_brute(ours, rows)
    _check_reference(ours, token_stats(logits, tokens, _spec(region)))


def _weights(n, gen):
    return {f: torch.randn(n, generator=gen, dtype=torch.float64) for f in FIELDS}


@pytest.mark.parametrize("flavour", ["normal", "flat", "peaked", "ties", "bf16"])
@pytest.mark.parametrize("region", [("k", 2), ("k", 10), ("p", 0.5), ("p", 0.9137)])
def test_gradients_match_brute_force_and_reference(flavour, region):
    """A random combination of every output: float64 autograd on the textbook formulas (region
    held fixed) and the reference's own backward."""
    gen = torch.Generator().manual_seed(7 + zlib.crc32(repr(("kernel", flavour, region)).encode()))
    n = 9
    logits, tokens, rows = _fresh(flavour, n, 61, region, gen)
    w = _weights(n, gen)
    grads = []
    for run in (_fused, token_stats):
        leaf = logits.to(DEVICE if run is _fused else "cpu").clone().requires_grad_(True)
        out = run(leaf, tokens.to(leaf.device), _spec(region))
        sum((getattr(out, f).double() * w[f].to(leaf.device)).sum() for f in FIELDS).backward()
        assert leaf.grad.dtype == logits.dtype
        grads.append(leaf.grad.double().cpu())
    want = brute.grad_of(logits, tokens, rows, w)
    tol = 2e-2 if logits.dtype == torch.bfloat16 else 1e-5  # bf16 gradient storage rounds
    assert torch.allclose(grads[0], want, rtol=tol, atol=tol), (grads[0] - want).abs().max()
    assert torch.allclose(grads[0], grads[1], rtol=tol, atol=tol), (grads[0] - grads[1]).abs().max()


@pytest.mark.parametrize("field", FIELDS)
def test_each_output_alone_has_the_right_gradient(field):
    """Unused outputs reach the backward as zeros (or not at all): each term on its own."""
    gen = torch.Generator().manual_seed(3)
    logits = _rows("normal", 6, 40, gen)
    tokens = torch.randint(40, (6,), generator=gen)
    rows = _brute(logits, tokens, ("p", 0.8))
    w = {field: torch.randn(6, generator=gen, dtype=torch.float64)}
    leaf = logits.to(DEVICE).clone().requires_grad_(True)
    (
        getattr(_fused(leaf, tokens.to(DEVICE), RegionSpec.top_p(0.8)), field).double() * w[field].to(DEVICE)
    ).sum().backward()
    want = brute.grad_of(logits, tokens, rows, w)
    assert torch.allclose(leaf.grad.double().cpu(), want, atol=1e-5)


def test_without_tokens_logprob_is_zero_and_gets_no_gradient():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=gen).to(DEVICE).clone().requires_grad_(True)
    out = _fused(logits, None, RegionSpec.top_k(3))
    assert torch.all(out.logprob == 0)
    (out.logprob + out.entropy).sum().backward()
    ref = logits.detach().cpu().requires_grad_(True)
    token_stats(ref).entropy.sum().backward()
    assert torch.allclose(logits.grad.cpu(), ref.grad, atol=1e-6)


def test_one_token_nucleus_gives_zero_regularizer_and_zero_gradient():
    logits = torch.tensor([[10.0, 0.0, 0.0, -1.0], [0.0, 0.1, 0.2, 0.3]], device=DEVICE, requires_grad=True)
    out = _fused(logits, None, RegionSpec.top_p(0.99))
    assert out.region_size.tolist() == [1.0, 4.0]
    assert out.region_entropy[0].item() == 0.0
    out.region_entropy.sum().backward()
    assert torch.all(logits.grad[0] == 0)
    assert torch.any(logits.grad[1] != 0)


def test_ties_at_the_boundary_enter_lowest_id_first():
    logits = torch.zeros(1, 5, device=DEVICE, requires_grad=True)
    out = _fused(logits, None, RegionSpec.top_k(2))
    out.region_entropy.sum().backward()
    assert out.region_entropy.item() == pytest.approx(math.log(5) / math.log(2) * math.log(2))
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-7)
    # ids 3 and 4 tie for 2nd place: id 3 is in, id 4 is not.
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 2.0]], device=DEVICE, requires_grad=True)
    out = _fused(logits, None, RegionSpec.top_k(2))
    out.region_entropy.sum().backward()
    g = logits.grad[0]
    assert g[3] != 0 and g[5] != 0 and g[4] == 0 and torch.all(g[:3] == 0)


def test_ties_across_blocks_are_counted_in_id_order():
    """Equal logits spread over several blocks of the backward's stream: exactly the lowest-id
    ones receive the region gradient."""
    from tre_cli.kernels import token_stats as K

    vocab = 3 * K.BLOCK + 17 if DEVICE == "cuda" else 2 * min(K.BLOCK, 1024) + 17
    logits = torch.zeros(1, vocab)
    logits[0, ::7] = 1.0  # ~vocab/7 tied leaders, in every block
    logits[0, 5] = 2.0
    leaders = int((logits[0] == 1.0).sum())
    k = 1 + leaders // 2  # the top token plus the lower-id half of the tie
    leaf = logits.to(DEVICE).clone().requires_grad_(True)
    out = _fused(leaf, None, RegionSpec.top_k(k))
    assert out.region_size.item() == k
    out.region_entropy.sum().backward()
    got = leaf.grad[0].cpu() != 0
    want = torch.zeros(vocab, dtype=torch.bool)
    want[5] = True
    want[torch.nonzero(logits[0] == 1.0).squeeze(-1)[: k - 1]] = True
    assert torch.equal(got, want)


def test_signed_zeros_and_masked_logits_match_the_reference():
    """-0.0 equals +0.0 (one tie group, not two keys); -inf logits (a masked vocabulary) carry no
    mass and never enter a region below P = 1."""
    logits = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1.0, float("-inf"), 0.5],
                           [-0.0, float("-inf"), -0.0, 0.0, float("-inf"), -2.0, -0.0]])
    for spec in (RegionSpec.top_k(3), RegionSpec.top_p(0.5), RegionSpec.top_p(0.95)):
        leaf = logits.to(DEVICE).clone().requires_grad_(True)
        ours = _fused(leaf, None, spec)
        ref_leaf = logits.clone().requires_grad_(True)
        ref = token_stats(ref_leaf, None, spec)
        _check_reference(ours, ref)
        (ours.entropy + ours.region_entropy).sum().backward()
        (ref.entropy + ref.region_entropy).sum().backward()
        assert torch.allclose(leaf.grad.cpu(), ref_leaf.grad, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_matches_the_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 300, generator=gen) * 3).to(dtype)
    tokens = torch.randint(300, (4,), generator=gen)
    grads = []
    for run, dev in ((_fused, DEVICE), (token_stats, "cpu")):
        leaf = logits.to(dev).clone().requires_grad_(True)
        out = run(leaf, tokens.to(dev), RegionSpec.top_p(0.9), temperature=0.7)
        (out.entropy + out.region_entropy + out.logprob).sum().backward()
        grads.append((out, leaf.grad.float().cpu()))
    _check_reference(grads[0][0], grads[1][0])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6  # bf16 gradient storage rounds
    assert torch.allclose(grads[0][1], grads[1][1], rtol=tol, atol=tol)


def test_nuclei_of_thousands_of_tokens():
    """Nuclei from one token to most of a 16k-wide row, bf16 ties: sizes equal to the brute force,
    statistics and gradient to the reference. No candidate buffer, so no fallback is needed."""
    gen = torch.Generator().manual_seed(18)
    vocab = 16_384
    z = torch.randn(5, vocab, generator=gen) - 14.0
    z[0, :1] += 30.0  # one token
    z[1, :300] += 16.0  # hundreds
    z[2, :3000] += 16.0  # thousands
    z[3, :12000] += 16.0  # most of the row
    z[4] = torch.randn(vocab, generator=gen) * 0.5  # nearly flat
    z = z.to(torch.bfloat16)
    tokens = torch.randint(vocab, (5,), generator=gen)
    rows = _brute(z, tokens, ("p", 0.99))
    sizes = [r["region_size"] for r in rows]
    assert sizes[0] == 1 and 256 < sizes[1] < 1024 < sizes[2] < 8192 < sizes[3], sizes
    leaf = z.to(DEVICE).clone().requires_grad_(True)
    ours = _fused(leaf, tokens.to(DEVICE), RegionSpec.top_p(0.99))
    _check_brute(ours, rows, tol=1e-4)
    w = {f: torch.randn(5, generator=gen) for f in ("entropy", "region_entropy", "logprob")}
    sum((getattr(ours, f) * w[f].to(DEVICE)).sum() for f in w).backward()
    ref_leaf = z.float().requires_grad_(True)  # the same values, a float32 gradient
    ref = token_stats(ref_leaf, tokens, RegionSpec.top_p(0.99))
    sum((getattr(ref, f) * w[f]).sum() for f in w).backward()
    assert torch.allclose(leaf.grad.float().cpu(), ref_leaf.grad, atol=1e-3, rtol=1e-2)


def test_leading_shape_and_rows_are_independent():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5, 50, generator=gen).to(DEVICE)
    tokens = torch.randint(50, (3, 5), generator=gen).to(DEVICE)
    whole = _fused(logits, tokens, RegionSpec.top_p(0.9))
    assert whole.entropy.shape == (3, 5)
    one = _fused(logits[1:2, 2:3], tokens[1:2, 2:3], RegionSpec.top_p(0.9))
    for a, b in zip(whole[:6], one[:6]):  # the kernels' six outputs (no tail mass)
        assert torch.equal(a[1, 2], b[0, 0])


def test_dispatch_rules():
    z32 = torch.randn(2, 8)
    assert applies(z32, None) and applies(z32.bfloat16(), RegionSpec.top_p(0.9))
    assert not applies(z32.double(), None)
    assert not applies(z32, RegionSpec.top_p(0.9, released_code_compat=True))
    assert fused_or_none(z32, None, None, 1.0) is None  # host tensors: the reference


def test_an_unknown_region_kind_raises_instead_of_running_as_the_nucleus():
    z = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unknown trust region kind 'q'"):
        fused_token_stats(z, None, RegionSpec("q"), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (native Triton)")
def test_token_stats_uses_the_kernels_on_cuda_and_the_switch_turns_them_off():
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(64, 1000, generator=gen) * 3).to("cuda", torch.bfloat16)
    tokens = torch.randint(1000, (64,), generator=gen).to("cuda")
    spec = RegionSpec.top_p(0.9)
    fused = _fused(logits, tokens, spec)
    via_api = token_stats(logits, tokens, spec)
    for a, b in zip(fused[:6], via_api[:6]):
        assert torch.equal(a, b)
    os.environ["TRE_KERNELS"] = "0"
    try:
        ref = token_stats(logits, tokens, spec)
    finally:
        del os.environ["TRE_KERNELS"]
    _check_reference(fused, ref)


_COMPILE_FOR_H100 = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tre_cli.kernels import token_stats as K

target = GPUTarget("cuda", 90, 32)
f32 = "*fp32"
fwd = {"x_ptr": "*bf16", "tok_ptr": "*i64", "V": "i32", "temperature": "fp32", "target_ptr": "*fp64",
       "log_vocab": "fp32", "logprob_ptr": f32, "entropy_ptr": f32, "pmax_ptr": f32, "minent_ptr": f32,
       "size_ptr": f32, "regent_ptr": f32, "lse_ptr": f32, "argmax_ptr": "*i32", "tau_ptr": f32,
       "ties_ptr": "*i32", "lse_loc_ptr": f32, "h_loc_ptr": f32, "scale_ptr": f32}
bwd = {"x_ptr": "*bf16", "grad_ptr": "*bf16", "tok_ptr": "*i64", "V": "i32", "temperature": "fp32",
       "lse_ptr": f32, "argmax_ptr": "*i32", "tau_ptr": f32, "ties_ptr": "*i32", "lse_loc_ptr": f32,
       "h_loc_ptr": f32, "c_p_ptr": f32, "c_logp_ptr": f32, "c_tok_ptr": f32, "c_max_ptr": f32, "w_reg_ptr": f32}
cases = [(K._forward_kernel, fwd, dict(HAS_TOKENS=True, HAS_TEMPERATURE=ht, MODE=mode, SHIFT=shift, R=K.SEARCH_BITS,
                                       BLOCK=K.BLOCK, SEARCH_BLOCK=K.SEARCH_BLOCK))
         for mode, shift, ht in [(0, 16, False), (1, 16, False), (2, 16, False), (2, 0, True)]]
cases.append((K._backward_kernel, bwd, dict(HAS_TOKENS=True, HAS_TEMPERATURE=False, HAS_REGION=True, BLOCK=K.BLOCK)))
for fn, sig, consts in cases:
    compiled = triton.compile(ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                        constexprs=consts), target=target)
    assert "cubin" in compiled.asm
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_an_h100_without_one():
    """The interpreter runs Python, not the compiler: this catches what only compilation rejects
    (non-constexpr globals, reassigned constexprs, type mismatches) on a machine with no GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
