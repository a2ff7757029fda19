"""The mechanism diagnostics (issue 19) against brute-force definitions: the policy's mass
outside its top-k tokens (`tail_mass`, from token_stats' one pass) and draws from the tail
(`tail_draws`, from the sampled tokens' log-probs)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import brute
from test_stats import _rows  # the same random flavours of rows as the statistics tests
from tre_cli.losses.stats import RegionSpec, tail_draws, token_stats


@pytest.mark.parametrize("flavour", ["normal", "flat", "peaked", "ties", "bf16"])
@pytest.mark.parametrize("k", [1, 2, 20, 97, 500])
@pytest.mark.parametrize("vocab", [97, 448])  # a prime (blocks of one id) and the testbed's width
def test_tail_mass_matches_brute_force(flavour, k, vocab):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((flavour, k, vocab)).encode()))
    logits = _rows(flavour, 11, vocab, gen)
    got = token_stats(logits, region=RegionSpec.top_p(0.9), tail_k=k, chunk_rows=4).tail_mass.double()
    want = torch.tensor([brute.tail_mass(z, k) for z in logits.double().tolist()], dtype=torch.float64)
    # The row's normaliser is a float32 sum (a few ulps of 1 off) and the head is summed in
    # float64 against it: the tail to about 1e-7 absolute, however small it is.
    assert torch.allclose(got, want, rtol=1e-5, atol=5e-7), (got - want).abs().max()
    if k >= vocab:
        assert torch.all(got == 0)


def test_tail_mass_is_relative_to_the_temperature_and_any_region():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 64, generator=gen) * 3
    want = torch.tensor([brute.tail_mass(z, 5) for z in (logits / 0.6).double().reshape(-1, 64).tolist()])
    for region in (None, RegionSpec.top_k(2), RegionSpec.top_p(0.5)):
        got = token_stats(logits, region=region, temperature=0.6, tail_k=5).tail_mass
        assert got.shape == (3, 4)
        assert torch.allclose(got.reshape(-1).double(), want.double(), atol=5e-7)


def test_tail_mass_changes_no_other_output_and_no_gradient():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 50, generator=gen) * 2).requires_grad_(True)
    tokens = torch.randint(50, (6,), generator=gen)
    plain = token_stats(logits, tokens, RegionSpec.top_p(0.9))
    with_tail = token_stats(logits, tokens, RegionSpec.top_p(0.9), tail_k=3)
    assert plain.tail_mass is None and with_tail.tail_mass is not None
    assert not with_tail.tail_mass.requires_grad
    for a, b in zip(plain[:6], with_tail[:6]):
        assert torch.equal(a, b)
    (with_tail.entropy + with_tail.region_entropy).sum().backward()
    g_with = logits.grad.clone()
    logits.grad = None
    (plain.entropy + plain.region_entropy).sum().backward()
    assert torch.equal(g_with, logits.grad)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_tail_k(bad):
    with pytest.raises(ValueError, match="tail_k"):
        token_stats(torch.zeros(2, 5), tail_k=bad)


def test_an_entropy_step_feeds_the_tail_and_a_trust_region_step_does_not_touch_it():
    """The mechanism in one gradient step on peaked rows (V = 448, the testbed's width). The full
    entropy's gradient raises every logit outside the top 20 against the top token's; TRE-K's
    (K = 2) is exactly 0 outside the top 2, so the tail's mass moves only through the
    normaliser, and by less than under Ent for a step of the same length."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 448, generator=gen)
    logits[:, 0] += 8.0
    logits[:, 1] += 6.0
    order = torch.argsort(logits, -1, descending=True)

    def unit_step(bonus: str) -> tuple[torch.Tensor, torch.Tensor]:
        z = logits.clone().requires_grad_(True)
        s = token_stats(z, region=RegionSpec.top_k(2))
        (s.entropy if bonus == "ent" else s.region_entropy).sum().backward()
        g = z.grad / z.grad.norm(dim=-1, keepdim=True)
        return g.gather(-1, order), token_stats(z.detach() + 0.1 * g, tail_k=20).tail_mass

    before = token_stats(logits, tail_k=20).tail_mass
    g_ent, tail_ent = unit_step("ent")
    g_tre, tail_tre = unit_step("tre-k")
    assert torch.all(g_ent[:, 20:] > g_ent[:, :1])
    assert torch.all(g_tre[:, 2:] == 0)
    assert torch.all(tail_ent - before > 1.2 * (tail_tre - before))


@pytest.mark.parametrize("seed", range(4))
def test_tail_draws_match_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n, width = 9, 13
    logprob = -torch.rand(n, width, generator=gen) * 12  # probabilities from 1 down to 6e-6
    lengths = torch.randint(0, width + 1, (n,), generator=gen)
    lengths[0] = 0  # an empty response does not count
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    logprob = logprob * mask  # padding holds log-prob 0, probability 1: never a tail draw
    for p in (1e-3, 0.05, 0.5):
        got = tail_draws(logprob, mask, p)
        want = brute.tail_draws(logprob.double().tolist(), lengths.tolist(), p)
        assert got == pytest.approx(want, abs=1e-12)


def test_tail_draws_edges():
    mask = torch.zeros(3, 4)
    assert tail_draws(torch.zeros(3, 4), mask, 1e-3) == (0.0, 0.0)
    logprob = torch.full((2, 3), math.log(1e-4))
    assert tail_draws(logprob, torch.ones(2, 3), 1e-3) == (1.0, 3.0)
    assert tail_draws(logprob, torch.ones(2, 3), 1e-5) == (0.0, 0.0)
    for bad in (0.0, 1.0, -1.0):
        with pytest.raises(ValueError, match="tail threshold"):
            tail_draws(logprob, torch.ones(2, 3), bad)


def test_the_tail_mass_beside_the_fused_kernels_matches_brute_force():
    """On CUDA the Triton kernels give the six other outputs and the tail mass is computed beside
    them (`_tail_mass_of`, plain torch): the same definition, checked here on the CPU."""
    from tre_cli.losses.stats import _tail_mass_of

    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(9, 300, generator=gen) * 3).to(torch.bfloat16)
    for k, temperature in ((1, 1.0), (20, 0.7), (300, 1.0)):
        got = _tail_mass_of(logits, temperature, k).double()
        want = torch.tensor([brute.tail_mass(z, k) for z in (logits.double() / temperature).tolist()])
        assert torch.allclose(got, want.double(), rtol=1e-5, atol=5e-7)
        reference = token_stats(logits, temperature=temperature, tail_k=k).tail_mass.double()
        assert torch.allclose(got, reference, atol=5e-7)
