"""Per-token statistics against their brute-force definitions (tests/brute.py)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import brute
from tre_cli.losses import regions as R
from tre_cli.losses import stats as S
from tre_cli.losses.stats import RegionSpec, token_stats

FIELDS = ("logprob", "entropy", "p_max", "min_entropy", "region_entropy")


def _rows(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Fresh random logits of one flavour."""
    if kind == "normal":
        return torch.randn(n, vocab, generator=gen) * 2.0
    if kind == "flat":  # nearly uniform
        return torch.randn(n, vocab, generator=gen) * 1e-3
    if kind == "peaked":  # one dominant token, a few runners-up
        z = torch.randn(n, vocab, generator=gen)
        z[torch.arange(n), torch.randint(vocab, (n,), generator=gen)] += 12.0
        return z
    if kind == "ties":  # few distinct values: heavy ties everywhere, including at the boundary
        return torch.randint(0, 4, (n, vocab), generator=gen).float()
    if kind == "bf16":  # bf16 rounding makes many equal logits
        return (torch.randn(n, vocab, generator=gen) * 3.0).to(torch.bfloat16)
    raise AssertionError(kind)


def _safe_p(logits, p, tokens=None):
    """Brute-force rows, asserting no boundary sits within float32 noise of P (such a row is
    legitimately decided either way at float32 precision, so it could not test anything)."""
    rows = brute.stats(logits, tokens, "p", p=p)
    for r in rows:
        assert r["margin"] > 1e-6, "random input landed on a knife edge; change the seed"
    return rows


def _check(ours: S.TokenStats, rows: list[dict], tol=2e-5):
    for field in FIELDS:
        want = torch.tensor([r[field] for r in rows], dtype=torch.float64)
        got = getattr(ours, field).reshape(-1).double()
        assert torch.allclose(got, want, rtol=tol, atol=tol), (field, (got - want).abs().max())
    want_size = torch.tensor([float(r["region_size"]) for r in rows], dtype=torch.float64)
    assert torch.equal(ours.region_size.reshape(-1).double(), want_size)


@pytest.mark.parametrize("flavour", ["normal", "flat", "peaked", "ties", "bf16"])
@pytest.mark.parametrize("region", [None, ("k", 1), ("k", 2), ("k", 7), ("p", 0.5), ("p", 0.9137), ("p", 0.999)])
def test_forward_matches_brute_force(flavour, region):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flavour, region)).encode()))
    vocab = 97
    logits = _rows(flavour, 12, vocab, gen)
    tokens = torch.randint(vocab, (12,), generator=gen)
    if region is None:
        spec, rows = None, brute.stats(logits, tokens, None)
    elif region[0] == "k":
        spec, rows = RegionSpec.top_k(region[1]), brute.stats(logits, tokens, "k", k=region[1])
    else:
        spec, rows = RegionSpec.top_p(region[1]), _safe_p(logits, region[1], tokens)
    _check(token_stats(logits, tokens, spec, chunk_rows=5), rows)


def _weights(n, gen):
    return {f: torch.randn(n, generator=gen, dtype=torch.float64) for f in FIELDS}


@pytest.mark.parametrize("flavour", ["normal", "flat", "peaked", "ties", "bf16"])
@pytest.mark.parametrize("region", [("k", 2), ("k", 10), ("p", 0.5), ("p", 0.9137)])
def test_gradients_match_brute_force(flavour, region):
    """The gradient of a random combination of every output, against float64 autograd on the
    textbook formulas with the brute-force region held fixed (region choice not differentiated)."""
    gen = torch.Generator().manual_seed(7 + zlib.crc32(repr((flavour, region)).encode()))
    vocab, n = 61, 9
    logits = _rows(flavour, n, vocab, gen).requires_grad_(True)
    tokens = torch.randint(vocab, (n,), generator=gen)
    if region[0] == "k":
        spec, rows = RegionSpec.top_k(region[1]), brute.stats(logits, tokens, "k", k=region[1])
    else:
        spec, rows = RegionSpec.top_p(region[1]), _safe_p(logits, region[1], tokens)
    w = _weights(n, gen)
    ours = token_stats(logits, tokens, spec, chunk_rows=4)
    total = sum((getattr(ours, f).double() * w[f]).sum() for f in FIELDS)
    total.backward()
    want = brute.grad_of(logits, tokens, rows, w)
    assert logits.grad.dtype == logits.dtype
    tol = 2e-2 if logits.dtype == torch.bfloat16 else 1e-5  # bf16 gradient storage rounds
    assert torch.allclose(logits.grad.double(), want, rtol=tol, atol=tol), (logits.grad.double() - want).abs().max()


@pytest.mark.parametrize("field", FIELDS)
def test_each_output_alone_has_the_right_gradient(field):
    gen = torch.Generator().manual_seed(3)
    logits = _rows("normal", 6, 40, gen).double().requires_grad_(True)
    tokens = torch.randint(40, (6,), generator=gen)
    rows = _safe_p(logits, 0.8, tokens)
    w = {field: torch.randn(6, generator=gen, dtype=torch.float64)}
    (getattr(token_stats(logits, tokens, RegionSpec.top_p(0.8)), field).double() * w[field]).sum().backward()
    want = brute.grad_of(logits, tokens, rows, w)
    assert torch.allclose(logits.grad, want, atol=1e-6)


def test_one_token_nucleus_gives_zero_regularizer_and_zero_gradient():
    logits = torch.tensor([[10.0, 0.0, 0.0, -1.0], [0.0, 0.1, 0.2, 0.3]], requires_grad=True)
    out = token_stats(logits, region=RegionSpec.top_p(0.99))
    assert out.region_size.tolist()[0] == 1.0  # p_top = 0.99990...
    assert out.region_entropy[0].item() == 0.0
    out.region_entropy.sum().backward()
    assert torch.all(logits.grad[0] == 0)
    assert torch.any(logits.grad[1] != 0)


def test_ties_at_the_boundary_enter_lowest_id_first():
    # Five equal logits; K = 2 takes ids 0 and 1, so only they receive gradient.
    logits = torch.zeros(1, 5, requires_grad=True)
    out = token_stats(logits, region=RegionSpec.top_k(2))
    out.region_entropy.sum().backward()
    assert out.region_entropy.item() == pytest.approx(math.log(5) / math.log(2) * math.log(2))
    # On a tie the local entropy is already maximal: gradient zero everywhere.
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-7)
    # An unequal pair inside, ties outside: ids 3 and 4 tie for the 2nd place; id 3 is in.
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 2.0]], requires_grad=True)
    out = token_stats(logits, region=RegionSpec.top_k(2))
    out.region_entropy.sum().backward()
    g = logits.grad[0]
    assert g[3] != 0 and g[5] != 0 and g[4] == 0 and torch.all(g[:3] == 0)


def test_temperature_divides_the_logits():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 30, generator=gen, requires_grad=True)
    tokens = torch.randint(30, (4,), generator=gen)
    a = token_stats(logits, tokens, RegionSpec.top_p(0.9), temperature=0.7)
    b_in = (logits.detach() / 0.7).requires_grad_(True)
    b = token_stats(b_in, tokens, RegionSpec.top_p(0.9))
    for f in FIELDS:
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-6)
    (a.entropy + a.region_entropy + a.logprob).sum().backward()
    (b.entropy + b.region_entropy + b.logprob).sum().backward()
    assert torch.allclose(logits.grad, b_in.grad / 0.7, atol=1e-6)


def test_leading_shape_and_chunking_do_not_change_results():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5, 50, generator=gen)
    tokens = torch.randint(50, (3, 5), generator=gen)
    whole = token_stats(logits, tokens, RegionSpec.top_p(0.9), chunk_rows=1000, tail_k=5)
    pieces = token_stats(logits, tokens, RegionSpec.top_p(0.9), chunk_rows=2, tail_k=5)
    assert whole.entropy.shape == (3, 5)
    for a, b in zip(whole, pieces):
        assert torch.equal(a, b)


def test_bf16_p_0999_is_not_rounded_to_one():
    """In bf16, 0.999 rounds to 1.0; neither path compares in bf16. The exact path decides the
    boundary in float64, and compat mode in float32 as the released runtime did (its softmax and
    cumsum ran in float32 under CUDA autocast): on these rows both find the nucleus below the cap."""
    assert torch.tensor(0.999, dtype=torch.bfloat16).item() == 1.0
    gen = torch.Generator().manual_seed(13)
    vocab = 2000
    z = torch.full((3, vocab), -12.0)
    z[:, :40] = torch.randn(3, 40, generator=gen) * 2  # a 40-token head with almost all the mass
    z = z.to(torch.bfloat16)
    rows = _safe_p(z, 0.999)
    ours = token_stats(z, region=RegionSpec.top_p(0.999))
    _check(ours, rows)
    assert all(r["region_size"] < 256 for r in rows)
    released = token_stats(z, region=RegionSpec.top_p(0.999, released_code_compat=True))
    assert torch.equal(released.region_size, ours.region_size)


def test_released_code_cap_of_256():
    vocab = 3000
    z = torch.zeros(1, vocab)
    z[0, :1000] = 3.0  # 1000 equal head tokens hold ~99.8% of the mass
    exact = token_stats(z, region=RegionSpec.top_p(0.9)).region_size.item()
    capped = token_stats(z, region=RegionSpec.top_p(0.9, released_code_compat=True)).region_size.item()
    assert capped == 256
    assert exact == len(brute.stats(z, None, "p", p=0.9)[0]["region"]) > 256


@pytest.mark.slow
def test_full_width_rows_with_large_nuclei():
    """151,936-wide rows whose nuclei exceed 256, 1,024 and 8,192 tokens: every candidate-growth
    stage and the full-row fallback, against the brute force."""
    gen = torch.Generator().manual_seed(18)  # a seed whose boundaries are clear of float32 noise
    vocab = 151_936
    z = torch.randn(4, vocab, generator=gen) - 14.0  # a tail with ~0.01% of the mass
    z[0, :500] += 16.0  # nucleus of a few hundred
    z[1, :3000] += 16.0  # a few thousand: beyond the first candidate set
    z[2, :20000] += 16.0  # tens of thousands: beyond the second
    z[3] = torch.randn(vocab, generator=gen) * 0.5  # nearly flat: nucleus of most of the row
    z = z.to(torch.bfloat16).float()  # bf16 values: many ties
    tokens = torch.randint(vocab, (4,), generator=gen)
    rows = _safe_p(z, 0.99, tokens)
    sizes = [r["region_size"] for r in rows]
    assert 256 < sizes[0] < R.FIRST_CANDIDATES < sizes[1] < R.FIRST_CANDIDATES * 8 < sizes[2] < sizes[3]
    z.requires_grad_(True)
    ours = token_stats(z, tokens, RegionSpec.top_p(0.99), chunk_rows=3)
    _check(ours, rows, tol=1e-4)
    gw = torch.Generator().manual_seed(1)
    w = {f: torch.randn(4, generator=gw, dtype=torch.float64) for f in ("entropy", "region_entropy", "logprob")}
    sum((getattr(ours, f).double() * w[f]).sum() for f in w).backward()
    want = brute.grad_of(z, tokens, rows, w)
    assert torch.allclose(z.grad.double(), want, atol=1e-6, rtol=1e-4)


def test_p_equal_one_is_the_whole_vocabulary():
    z = torch.randn(3, 20)
    assert torch.all(token_stats(z, region=RegionSpec.top_p(1.0)).region_size == 20)


def test_single_functions_are_views_of_token_stats():
    gen = torch.Generator().manual_seed(19)
    z = torch.randn(2, 7, 33, generator=gen)
    toks = torch.randint(33, (2, 7), generator=gen)
    all_ = token_stats(z, toks, RegionSpec.top_p(0.9))
    assert torch.equal(S.entropy(z), all_.entropy)
    assert torch.equal(S.p_max(z), all_.p_max)
    assert torch.equal(S.min_entropy(z), all_.min_entropy)
    assert torch.equal(S.token_logprobs(z, toks), all_.logprob)
    assert torch.equal(S.tre_p_entropy(z, 0.9), all_.region_entropy)
    assert torch.equal(S.tre_p_region_size(z, 0.9), all_.region_size)
    assert torch.equal(S.tre_k_entropy(z, 3), token_stats(z, region=RegionSpec.top_k(3)).region_entropy)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_k(bad):
    with pytest.raises(ValueError, match="K must be"):
        RegionSpec.top_k(bad)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, 2])
def test_bad_p(bad):
    with pytest.raises(ValueError, match="P must be"):
        RegionSpec.top_p(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating point"):
        token_stats(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens shape"):
        token_stats(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_stats(torch.randn(2, 3), temperature=0.0)


def test_backward_keeps_only_the_logits_and_per_row_numbers():
    """Memory: the graph holds the logits themselves (no copy) and O(1) numbers per row; no
    [rows, V] tensor survives the forward."""
    gen = torch.Generator().manual_seed(23)
    z = torch.randn(10, 300, generator=gen).requires_grad_(True)
    out = token_stats(z, torch.randint(300, (10,), generator=gen), RegionSpec.top_p(0.9), chunk_rows=3)
    node = out.entropy.grad_fn
    while not hasattr(node, "saved_chunks"):
        node = node.next_functions[0][0]
    assert node.saved_tensors[0].data_ptr() == z.data_ptr()
    assert len(node.saved_chunks) == 4  # ceil(10 / 3) chunks
    for saved in node.saved_chunks:
        for value in saved.values():
            for tensor in (value if isinstance(value, tuple) else (value,)):
                assert tensor.dim() == 1 and tensor.shape[0] <= 3


# ----------------------------------------------------------------------------------------------
# The search's own paths (histogram band, band narrowing, fallback, block maxima), on rows wide
# enough to take them, against the same brute force.


def _wide_rows(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """One row of each shape the nucleus search treats differently, rounded to bf16 (ties)."""
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    rows = [
        -1.8 * torch.log(rank) + 0.5 * torch.randn(vocab, generator=gen),  # Zipf: nucleus of ~100s
        -1.2 * torch.log(rank) + 0.5 * torch.randn(vocab, generator=gen),  # heavy tail: ~1,000s
        torch.randn(vocab, generator=gen) * 1e-3,  # flat: one histogram bucket holds everything
        torch.zeros(vocab),  # one repeated value: a band that cannot narrow
        torch.randint(0, 3, (vocab,), generator=gen).float(),  # three values: ties at the boundary
        torch.randn(vocab, generator=gen) * 4.0,
    ]
    z = torch.stack(rows)
    z[0, 17] += 9.0  # a dominant token that is not at id 0
    shuffle = torch.argsort(torch.rand(z.shape, generator=gen), dim=-1)
    return z.gather(-1, shuffle).to(torch.bfloat16).float()


@pytest.mark.parametrize("p", [0.6, 0.9, 0.99, 0.999])
def test_wide_rows_every_search_path(p):
    gen = torch.Generator().manual_seed(int(p * 1000) + 5)  # boundaries clear of float32 noise
    vocab = 4096
    z = _wide_rows(gen, vocab)
    tokens = torch.randint(vocab, (z.shape[0],), generator=gen)
    rows = _safe_p(z, p, tokens)
    sizes = [r["region_size"] for r in rows]
    assert max(sizes) > R.FIRST_CANDIDATES  # some band needed narrowing
    ours = token_stats(z, tokens, RegionSpec.top_p(p), chunk_rows=4)
    _check(ours, rows, tol=1e-4)


def test_wide_rows_gradients():
    gen = torch.Generator().manual_seed(29)
    vocab = 4096
    z = _wide_rows(gen, vocab).requires_grad_(True)
    tokens = torch.randint(vocab, (z.shape[0],), generator=gen)
    rows = _safe_p(z, 0.99, tokens)
    w = _weights(z.shape[0], gen)
    ours = token_stats(z, tokens, RegionSpec.top_p(0.99))
    sum((getattr(ours, f).double() * w[f]).sum() for f in FIELDS).backward()
    want = brute.grad_of(z, tokens, rows, w)
    assert torch.allclose(z.grad.double(), want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("margin", [-0.5, -1e-3, 0.5])
def test_nucleus_is_exact_whatever_the_histogram_says(margin):
    """The float32 histogram only proposes the band; a wrong proposal (here forced by a margin
    of the wrong sign or size) must be caught by the float64 checks and redone exactly."""
    gen = torch.Generator().manual_seed(31)
    vocab = 4096
    z = _wide_rows(gen, vocab)
    for p in (0.6, 0.99):
        rows = _safe_p(z, p)
        zmax = z.max(-1).values
        sum_e = torch.exp(z - zmax[:, None]).sum(-1)
        lse64 = zmax.double() + torch.log(sum_e.double())
        found = R.nucleus(z, torch.exp(z - zmax[:, None]), zmax, sum_e, lse64, p, margin=margin)
        assert found.size.tolist() == [r["region_size"] for r in rows]
        for n, r in enumerate(rows):
            region = sorted(r["region"], key=lambda i: (-z[n, i].item(), i))
            assert found.threshold[n].item() == z[n, region[-1]].item()
            assert found.ties_in[n].item() == sum(z[n, i].item() == found.threshold[n].item() for i in region)


@pytest.mark.parametrize("k", [1, 2, 7, 80])
def test_top_k_and_argmax_through_block_maxima(k):
    """Width 4,096 = 64 blocks of 64: the K largest values and the lowest-id maximiser come from
    the block maxima; ties across blocks included."""
    gen = torch.Generator().manual_seed(37 + k)
    vocab = 4096
    z = (torch.randn(5, vocab, generator=gen) * 2).to(torch.bfloat16).float()
    z[1, [100, 900, 4000]] = 20.0  # the maximum three times, in three blocks: id 100 is the argmax
    z[2] = torch.randint(0, 3, (vocab,), generator=gen).float()  # the top value ~1,365 times
    z = z.requires_grad_(True)
    tokens = torch.randint(vocab, (5,), generator=gen)
    rows = brute.stats(z, tokens, "k", k=k)
    ours = token_stats(z, tokens, RegionSpec.top_k(k))
    _check(ours, rows)
    w = _weights(5, gen)
    sum((getattr(ours, f).double() * w[f]).sum() for f in FIELDS).backward()
    assert torch.allclose(z.grad.double(), brute.grad_of(z, tokens, rows, w), atol=1e-6, rtol=1e-4)


def test_p_equal_one_with_minus_infinity_logits():
    """P = 1 is the whole vocabulary, -inf logits included: the local softmax is the full one,
    and nothing becomes NaN."""
    z = torch.randn(3, 200)
    z[:, 50:60] = -math.inf
    z.requires_grad_(True)
    out = token_stats(z, region=RegionSpec.top_p(1.0))
    assert torch.all(out.region_size == 200)
    scale = math.log(200) / math.log(200)
    assert torch.allclose(out.region_entropy, scale * out.entropy)
    (out.region_entropy + out.entropy).sum().backward()
    assert torch.all(torch.isfinite(z.grad)) and torch.all(z.grad[:, 50:60] == 0)


def test_dtype_and_layout_do_not_change_results():
    """bf16 logits, a non-contiguous view and float32 copies of them give the same outputs (the
    chunk is copied to float32 in a buffer reused across chunks)."""
    gen = torch.Generator().manual_seed(41)
    base = (torch.randn(7, 600, generator=gen) * 3).to(torch.bfloat16)
    wide = torch.zeros(7, 700, dtype=torch.bfloat16)
    wide[:, 50:650] = base
    view = wide[:, 50:650]  # rows not contiguous
    tokens = torch.randint(600, (7,), generator=gen)
    spec = RegionSpec.top_p(0.9)
    want = token_stats(base.float(), tokens, spec, tail_k=20)
    for logits in (base, view):
        got = token_stats(logits, tokens, spec, chunk_rows=3, tail_k=20)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(3, 64), (5, 49), (1, 8), (2, 4096)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_flat_nonzero_is_nonzero(shape, density):
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    mask = torch.rand(shape, generator=gen) < density
    assert torch.equal(R.flat_nonzero(mask), mask.view(-1).nonzero().squeeze(-1))
