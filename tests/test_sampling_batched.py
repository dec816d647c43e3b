"""BatchSampler: per-row temperature / top-k / top-p / repetition penalty and per-row generators.

Kept sets are compared with transformers' own warpers on random (B, 262,144) logits and on the
real model's logits; draws are checked by the statistics of many rows and for independence from
the batch a row is in.
"""

from __future__ import annotations

import math

import pytest
from conftest import hf_kept_mask
import torch
from scipy import stats as scipy_stats
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from generation.decode.sampler import BatchSampler, RowSampling
from generation.sampling import SamplingParams, exact_kept_ids, make_generator

V = 262_144


def hf_kept(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Ids (ascending) transformers keeps after TopK then TopP on one row of scaled scores (V,)."""
    return torch.nonzero(hf_kept_mask(scores, top_k, top_p)).reshape(-1)


def random_rows(b: int, seed: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """(b, V) logits with a per-row spread (peaked to flat) and per-row top-k / top-p, some off."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, V, generator=g) * torch.linspace(12.0, 1.5, b).unsqueeze(1)
    top_k = [[0, 0, 40, 1, 500, 0, 7, 0][i % 8] for i in range(b)]
    top_p = [[0.95, 0.5, 0.9, 1.0, 0.8, 0.99, 1.0, 0.3][i % 8] for i in range(b)]
    return x, top_k, top_p


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_sets_equal_transformers_on_random_logits(seed):
    x, top_k, top_p = random_rows(8, seed)
    sampler = BatchSampler()
    got = sampler.kept_ids(x, top_k, top_p)
    for r in range(x.shape[0]):
        ref = hf_kept(x[r], top_k[r], top_p[r])
        if top_k[r] == 0 and top_p[r] == 1.0:
            assert got[r].numel() == V  # plain temperature: the whole vocabulary
        else:
            assert torch.equal(got[r], ref), f"row {r}: top_k={top_k[r]} top_p={top_p[r]}"
    # the flat rows needed wider candidates, the peaked ones not
    assert sampler.stats["widened"] >= 1


@pytest.mark.parametrize("k0", [2, 64])
def test_widening_from_few_candidates_is_still_exact(k0):
    x, top_k, top_p = random_rows(8, 5)
    got = BatchSampler(k0=k0, k_max=4096).kept_ids(x, top_k, top_p)
    for r in range(8):
        if top_k[r] or top_p[r] < 1.0:
            assert torch.equal(got[r], hf_kept(x[r], top_k[r], top_p[r]))


def test_ties_at_the_boundary():
    """bf16-like logits with many equal values: top-k keeps every tie of the k-th value (as
    transformers); top-p keeps as many tokens as transformers does, and exactly the ones a stable
    sort keeps (transformers' own choice among equal values follows torch.sort's unstable order)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, V, generator=g)  # a tail holding ~5 % of the mass
    head = torch.randint(0, V, (6, 50), generator=g)
    x.scatter_(1, head, torch.randint(10, 15, (6, 50), generator=g).float())  # integers: big tie groups
    sampler = BatchSampler()
    for tk in (5, 20, 49):
        got = sampler.kept_ids(x, [tk] * 6, [1.0] * 6)
        for r in range(6):
            assert torch.equal(got[r], hf_kept(x[r], tk, 1.0))
    straddles = 0
    for tp in (0.3, 0.8, 0.9):
        got = sampler.kept_ids(x, [0] * 6, [tp] * 6)
        for r in range(6):
            ref = hf_kept(x[r], 0, tp)
            edge = x[r][ref].min()
            straddles += int((x[r] == edge).sum() > (x[r][ref] == edge).sum())  # ties cut by the boundary
            assert got[r].numel() == ref.numel()
            assert torch.equal(x[r][got[r]].sort().values, x[r][ref].sort().values)
            assert torch.equal(got[r], exact_kept_ids(x[r], 0, tp))
    assert straddles >= 6  # the case this test is about really occurs


def test_kept_sets_on_real_logits(lm4):
    """Real next-token logits of the 4-bit model (every position of a prompt), the notebook's
    sampling and others: same kept sets as transformers up to the order of equal values."""
    ids = lm4.tokenizer("User: Write a haiku about transformers, please. Assistant:", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = lm4.model(ids).logits[0, -8:].float()  # (8, V): the last 8 positions
    sampler = BatchSampler()
    for temperature, top_k, top_p in ((0.7, 0, 0.95), (1.0, 40, 0.9)):
        scaled = logits / temperature
        got = sampler.kept_ids(scaled, [top_k] * len(scaled), [top_p] * len(scaled))
        for r in range(len(scaled)):
            ref = hf_kept(scaled[r], top_k, top_p)
            assert got[r].numel() == ref.numel()
            assert torch.equal(got[r], exact_kept_ids(scaled[r], top_k, top_p))
            same_values = torch.equal(scaled[r][got[r]].sort().values, scaled[r][ref].sort().values)
            assert same_values


def _rows(params: list[SamplingParams], seeds: list[int], prompt_ids=None) -> list[RowSampling]:
    return [RowSampling(p, prompt_ids, make_generator(s)) for p, s in zip(params, seeds)]


def test_greedy_rows_take_argmax_after_repetition_penalty():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    prompt = torch.tensor([5, 17, int(logits[1].float().argmax())])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.7),
              SamplingParams(temperature=0.0, repetition_penalty=1.3)]
    rows = [RowSampling(p, prompt) for p in params]
    got = BatchSampler().sample(logits, rows)
    for r, p in enumerate(params):
        s = logits[r : r + 1].float()
        if p.repetition_penalty != 1.0:
            s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(prompt.unsqueeze(0), s)
        assert int(got[r]) == int(s.argmax())
    assert int(got[1]) != int(logits[1].float().argmax())  # the penalty changed that row's choice


def test_penalty_and_temperature_match_transformers_rounding():
    """The kept set after penalty -> temperature -> top-k -> top-p equals transformers' pipeline."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, V, generator=g) * 4).to(torch.bfloat16)
    prompt = torch.randint(0, V, (300,), generator=g)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r)
              for t, k, p, r in ((0.7, 0, 0.95, 1.3), (1.2, 50, 0.9, 1.1), (0.5, 0, 0.6, 2.0), (0.9, 0, 0.9, 1.0))]
    sampler = BatchSampler()
    scaled = sampler._scale(logits, [RowSampling(p, prompt) for p in params]).clone()
    for r, p in enumerate(params):
        s = logits[r : r + 1].float()
        if p.repetition_penalty != 1.0:
            s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(prompt.unsqueeze(0), s)
        s = TemperatureLogitsWarper(p.temperature)(None, s)
        assert torch.equal(scaled[r], s[0])  # bit for bit
    kept = sampler.kept_ids(scaled, [p.top_k for p in params], [p.top_p for p in params])
    for r, p in enumerate(params):  # bf16 logits tie a lot: equal up to the order of equal values
        assert torch.equal(kept[r], exact_kept_ids(scaled[r], p.top_k, p.top_p))
        assert kept[r].numel() == hf_kept(scaled[r], p.top_k, p.top_p).numel()


def _chi2_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of token draws to probs (V,): tokens with expected count >= 5 get their own
    bin, the rest share one."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    return float(scipy_stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.8, 0, 0.9), (1.0, 0, 1.0), (1.5, 20, 1.0), (0.7, 30, 0.8)],
    ids=["top_p", "plain_temperature", "top_k", "top_k_top_p"],
)
def test_draw_statistics(temperature, top_k, top_p):
    """Many rows with the same logits and their own seeds: the draws follow transformers' filtered
    softmax (chi-square), and plain temperature sampling reaches tokens outside the candidates."""
    vocab, n = 2048, 6000
    g = torch.Generator().manual_seed(7)
    row = torch.randn(vocab, generator=g) * 2.0
    logits = row.expand(n, vocab).contiguous()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = BatchSampler(k0=16).sample(logits, _rows([params] * n, list(range(n))))
    s = TemperatureLogitsWarper(temperature)(None, row.unsqueeze(0))
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(None, s)
    probs = torch.softmax(s[0], -1)
    assert bool((probs[draws] > 0).all())  # never a filtered token
    assert _chi2_pvalue(draws, probs) > 1e-4
    if top_k == 0 and top_p == 1.0:
        top16 = torch.topk(row, 16).indices
        outside = (~torch.isin(draws, top16)).double().mean().item()
        expected = 1.0 - probs[top16].sum().item()
        assert expected > 0.3 and abs(outside - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_seeded_row_is_independent_of_its_batch():
    """Same seed => same tokens whatever the other rows are (their count, params, logits)."""
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(6, V, generator=g) * 5 for _ in range(4)]
    mine = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=7, seed=1),
              SamplingParams(temperature=0.7, top_p=1.0, seed=2), SamplingParams(temperature=1.0, top_p=0.3, seed=3),
              SamplingParams(temperature=2.0, top_k=3000, seed=4)]
    alone_row = RowSampling(mine)
    mixed_rows = [RowSampling(p) for p in others[:2]] + [RowSampling(mine)] + [RowSampling(p) for p in others[2:]]
    alone = [int(BatchSampler().sample(s[2:3], [alone_row])[0]) for s in steps]
    sampler = BatchSampler()
    mixed = [int(sampler.sample(s, mixed_rows)[2]) for s in steps]
    assert alone == mixed
    # and the draw is the inverse CDF at the row's own uniform
    u = float(torch.rand((), generator=make_generator(42), dtype=torch.float64))
    kept = exact_kept_ids(steps[0][2] / 0.9, 0, 0.9)
    w = torch.exp((steps[0][2] / 0.9)[kept].double() - (steps[0][2] / 0.9).max().double())
    expect = int(kept[int(torch.searchsorted(w.cumsum(0), torch.tensor([u * w.sum().item()], dtype=torch.float64), right=True))])
    assert alone[0] == expect


def test_global_rng_untouched_and_unseeded_rows_differ():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    logits = torch.zeros(2, 5000)  # uniform: two unseeded rows agreeing 8 times in a row is ~1e-30
    rows = [RowSampling(SamplingParams(temperature=1.0, top_p=1.0)) for _ in range(2)]
    sampler = BatchSampler()
    draws = torch.stack([sampler.sample(logits, rows) for _ in range(8)])
    assert not torch.equal(draws[:, 0], draws[:, 1])
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("rows", [1, 30])
def test_notebook_sampling_avoids_the_full_sort(rows):
    """The notebook's sampling on peaked (rows, 262,144) logits never needs the exact full-sort
    path (bench/load.py measures the speed)."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(rows, V, generator=g) * 4).to(torch.bfloat16)
    sampler = BatchSampler()
    out = sampler.sample(logits, _rows([SamplingParams()] * rows, list(range(rows))))
    assert out.shape == (rows,) and sampler.stats["exact"] == 0
