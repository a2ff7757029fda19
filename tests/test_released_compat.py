"""`released_code_compat=True` against the released code's TRE-P rule as its runtime computed it
(tests/brute.py `released_row`: bf16 logits, float32 softmax, top 256, float32 cumulative sum
compared with P in float32)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import brute
from tre_cli.losses.stats import RegionSpec, token_stats

# Two float32 evaluations of a row's mass (different orders of summation of thousands of terms)
# differ by a few dozen float32 ulps of 1 at most: a boundary decision closer to P than this can go
# either way, in the released runtime itself (eager or compiled) as here.
NEAR_TIE = 2e-6


def _compat(logits: torch.Tensor, p: float):
    return token_stats(logits, region=RegionSpec.top_p(p, released_code_compat=True))


def _value_tolerance(row: list[float], ref: dict) -> float:
    """Float32 rounding of the released value, log|V|/log n * (logsumexp - sum q z) over n
    tokens, with L the largest |z|: the sum's n + 4 roundings of L, and the logsumexp's rounding
    (~L ulps) times the z it multiplies in sum q z, times the scale."""
    n = ref["region_size"]
    if n == 1:
        return 0.0
    largest = max(abs(row[i]) for i in ref["region"])
    return math.log(len(row)) / math.log(n) * 2.0**-23 * (1.0 + largest) * (n + 4 + largest)


def _agrees(ours, i: int, row: list[float], ref: dict) -> bool:
    return (int(ours.region_size[i]) == ref["region_size"]
            and abs(float(ours.region_entropy[i]) - float(ref["region_entropy"])) <= _value_tolerance(row, ref))


def test_the_issue_cases():
    # z_i = -0.5 i, V = 50, P = 0.999: the mass before token n + 1 is ~1 - e^(-n/2) < 0.999 up to n = 13.
    z = (-0.5 * torch.arange(50.0)).to(torch.bfloat16)[None]
    ours = _compat(z, 0.999)
    ref = brute.released_row(z.float()[0].tolist(), 0.999)
    assert int(ours.region_size) == ref["region_size"] == 14
    assert float(ours.region_entropy) == pytest.approx(float(ref["region_entropy"]), abs=1e-5)
    assert float(ours.region_entropy) == pytest.approx(2.5144, abs=1e-4)
    # Probabilities [0.5, 0.399, 0.101], P = 0.9: 0.5 + 0.399 < 0.9 in float32, so all three are in
    # (from the float32 logits, rounded to bf16 inside, and from bf16 logits).
    z = torch.tensor([[0.5, 0.399, 0.101]]).log()
    for logits in (z, z.to(torch.bfloat16)):
        assert int(_compat(logits, 0.9).region_size) == 3
    assert brute.released_row(z[0].tolist(), 0.9)["region_size"] == 3


def test_p_is_compared_in_float32():
    """P just above the top token's float32 probability but rounding to it in float32: the
    released comparison (a float32 tensor against a Python float) finds the mass before token 2
    not below P, so the nucleus is one token; P one float32 step higher lets token 2 in."""
    z = torch.tensor([[1.0, 0.0, -1.0]])
    e = torch.exp(z - z.amax(-1, keepdim=True))
    top = float((e / e.sum(-1, keepdim=True))[0, 0])  # a float32 number, as compat computes it
    rounds_to_top = top + 1e-9
    assert np.float32(rounds_to_top) == np.float32(top) and rounds_to_top > top
    assert int(_compat(z, rounds_to_top).region_size) == 1
    assert brute.released_row(z[0].tolist(), rounds_to_top)["region_size"] == 1
    one_step_up = float(np.nextafter(np.float32(top), np.float32(1.0)))
    assert int(_compat(z, one_step_up).region_size) == 2


def _random_rows(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """bf16 logits with a spread of shapes: scales from 0.5 to 8 (nuclei from one token to the
    whole row), a quarter of the rows with one dominant token."""
    scale = torch.exp(torch.empty(n, 1).uniform_(math.log(0.5), math.log(8.0), generator=gen))
    z = torch.randn(n, vocab, generator=gen) * scale
    peaked = torch.rand(n, generator=gen) < 0.25
    z[peaked, torch.randint(vocab, (int(peaked.sum()),), generator=gen)] += 8.0
    return z.to(torch.bfloat16)


@pytest.mark.parametrize("p", [0.9, 0.99, 0.999])
def test_random_bf16_rows_match_the_released_rule(p):
    """Region size and value on 3 x 120 random bf16 rows (V = 50, 500, 3,000) against the float32
    definition: at least 99.5% agree, and every row that does not has a boundary decision within
    NEAR_TIE of P. The float64 exact nucleus capped at 256 gives the same sizes on as many rows,
    the others again near-ties."""
    agree, agree_exact, total = 0, 0, 0
    shapes = {"capped": 0, "one token": 0}
    for vocab in (50, 500, 3000):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((p, vocab)).encode()))
        z = _random_rows(120, vocab, gen)
        ours = _compat(z, p)
        rows = z.float().tolist()
        exact = brute.stats(z, None, "p", p=p)
        for i, row in enumerate(rows):
            ref = brute.released_row(row, p)
            total += 1
            shapes["capped"] += ref["region_size"] == brute.RELEASED_TOP
            shapes["one token"] += ref["region_size"] == 1
            if _agrees(ours, i, row, ref):
                agree += 1
            else:
                assert ref["margin"] <= NEAR_TIE, (vocab, i, int(ours.region_size[i]), ref["region_size"])
            if min(exact[i]["region_size"], brute.RELEASED_TOP) == int(ours.region_size[i]):
                agree_exact += 1
            else:
                assert exact[i]["margin"] <= NEAR_TIE, (vocab, i)
    assert agree >= 0.995 * total and agree_exact >= 0.995 * total, (agree, agree_exact, total)
    assert shapes["capped"] > 0.05 * total and shapes["one token"] > 0  # the rows reach the cap and the floor


def test_float32_logits_are_rounded_to_bf16_for_the_search():
    """Float32 logits: the nucleus size is the one their bf16 values give (what the released
    runtime saw), and the region is that many of the largest logits as given, with the value of
    the local entropy over them (the same as TRE-K with that K)."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(200, 40, generator=gen) * 2.0
    ours = _compat(z, 0.9)
    as_bf16 = _compat(z.to(torch.bfloat16), 0.9)
    assert torch.equal(ours.region_size, as_bf16.region_size)
    unrounded = [min(r["region_size"], 256) for r in brute.stats(z, None, "p", p=0.9)]
    assert unrounded != ours.region_size.long().tolist()  # rounding moves some rows here
    for i in range(0, 200, 7):
        size = int(ours.region_size[i])
        top_k = token_stats(z[i:i + 1], region=RegionSpec.top_k(size)).region_entropy
        assert float(ours.region_entropy[i]) == pytest.approx(float(top_k), rel=1e-6, abs=1e-7)


def test_gradient_flows_into_the_released_region():
    gen = torch.Generator().manual_seed(9)
    z = (torch.randn(24, 300, generator=gen) * 3.0).to(torch.bfloat16).float()
    refs = [brute.released_row(row, 0.99) for row in z.tolist()]
    assert all(r["margin"] > NEAR_TIE for r in refs)
    weights = torch.randn(24, generator=gen, dtype=torch.float64)
    logits = z.clone().requires_grad_(True)
    (_compat(logits, 0.99).region_entropy.double() * weights).sum().backward()
    want = brute.grad_of(z, None, refs, {"region_entropy": weights.tolist()})
    assert torch.allclose(logits.grad.double(), want, atol=1e-5, rtol=1e-4)
