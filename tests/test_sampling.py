"""The pure functions where every token is chosen (`generation.sampling`: scale, keep, draw), each
against transformers' own processor on small random rows, and the batched and generate() samplers
built from them against the one-row pipeline `choose`."""

from __future__ import annotations

import pytest
from conftest import hf_kept_mask
import torch
from torch.testing import assert_close
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from generation.decode.sampler import BatchSampler, RowSampling
from generation.sampling import (
    SamplingParams,
    SeededSampler,
    choose,
    draw,
    draw_weights,
    exact_kept_ids,
    greedy_ids,
    kept_mask,
    kept_probs,
    make_generator,
    penalised,
    ranked_ids,
    scale,
    top_k_mask,
    top_p_mask,
    uniform,
)

SIZES = [7, 50, 1000]


def random_logits(vocab: int, seed: int, *, ties: bool = False, dtype=torch.float32) -> torch.Tensor:
    """(vocab,) logits spread like a real row's; ties=True rounds them to 0.1, so equal values abound."""
    x = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return (x.round(decimals=1) if ties else x).to(dtype)


def hf_scaled(logits: torch.Tensor, temperature: float, penalty: float, seen: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor then TemperatureLogitsWarper on one row."""
    s = RepetitionPenaltyLogitsProcessor(penalty)(seen.unsqueeze(0), logits.float().unsqueeze(0).clone())
    if temperature not in (0.0, 1.0):
        s = TemperatureLogitsWarper(temperature)(None, s)
    return s[0]


# --- scale -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 1.7])
@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0])
def test_scale_is_transformers_penalty_then_temperature_bit_for_bit(vocab, dtype, temperature, penalty):
    logits = random_logits(vocab, vocab + int(10 * penalty), dtype=dtype)
    g = torch.Generator().manual_seed(vocab)
    seen = torch.cat([torch.randint(0, vocab, (12,), generator=g), torch.tensor([0, 0, vocab + 3])])  # repeats, and an id past V
    before = logits.clone()
    got = scale(logits, temperature, penalty=penalty, seen=seen)
    assert got.dtype == torch.float32
    assert torch.equal(got, hf_scaled(logits, temperature, penalty, seen))
    assert torch.equal(logits, before)  # the caller's logits are never written


def test_penalised_makes_seen_tokens_less_likely_both_signs():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.equal(penalised(v, 2.0), torch.tensor([-4.0, -1.0, 0.0, 0.25, 1.0]))


def test_batch_sampler_scales_every_row_as_scale_does():
    """BatchSampler's one-pass batch scaling == `scale` row by row, bit for bit (fp32 and bf16)."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 3000, (40,), generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.4),
              SamplingParams(temperature=0.7, repetition_penalty=1.2), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.9, top_k=5, repetition_penalty=2.0)]
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(len(params), 3000, generator=g) * 4).to(dtype)
        got = BatchSampler()._scale(logits, [RowSampling(p, prompt) for p in params])
        for r, p in enumerate(params):
            assert torch.equal(got[r], scale(logits[r], p.temperature, penalty=p.repetition_penalty, seen=prompt))


# --- keep --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", SIZES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("k", [0, 1, 3, 50])
def test_top_k_keeps_what_the_warper_keeps_ties_included(vocab, ties, k):
    x = random_logits(vocab, vocab + k, ties=ties)
    assert torch.equal(top_k_mask(x, k), hf_kept_mask(x, k, 1.0))


@pytest.mark.parametrize("vocab", SIZES)
@pytest.mark.parametrize("k", [0, 1, 3, 50])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99, 1.0])
def test_kept_set_is_the_warpers_on_distinct_scores(vocab, k, p):
    x = random_logits(vocab, 3 * vocab + k)
    ours = kept_mask(x, k, p)
    assert torch.equal(ours, hf_kept_mask(x, k, p))
    assert torch.equal(exact_kept_ids(x, k, p), torch.nonzero(ours).reshape(-1))
    if p < 1.0:  # top_p_mask alone, on the top-k-filtered scores as the warper sees them
        after_k = x.masked_fill(~top_k_mask(x, k), float("-inf"))
        assert torch.equal(top_p_mask(after_k, p) & top_k_mask(x, k), ours)


@pytest.mark.parametrize("vocab", SIZES)
@pytest.mark.parametrize("k", [0, 3, 50])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.9])
def test_ties_at_the_top_p_boundary(vocab, k, p):
    """Equal scores straddling the boundary: as many tokens as the warper keeps, of the same values,
    and of the tied ones the highest ids (a stable sort; the warper's pick among them follows
    torch.sort's unstable order). Away from the boundary value the sets are identical."""
    for seed in range(6):
        x = random_logits(vocab, 100 * vocab + 10 * k + seed, ties=True)
        ours, ref = kept_mask(x, k, p), hf_kept_mask(x, k, p)
        assert int(ours.sum()) == int(ref.sum())
        assert torch.equal(x[ours].sort().values, x[ref].sort().values)
        edge = x[ref].min()
        assert torch.equal(ours & (x != edge), ref & (x != edge))
        tied = torch.nonzero(x == edge).reshape(-1)  # ascending ids
        n_kept = int((ref & (x == edge)).sum())
        assert torch.equal(torch.nonzero(ours & (x == edge)).reshape(-1), tied[tied.numel() - n_kept:])


def test_ties_really_straddle_the_boundary_in_those_cases():
    """The case the test above is about occurs in its inputs (rounded scores, small vocabularies)."""
    straddles = 0
    for vocab in SIZES:
        for p in (0.05, 0.3, 0.5, 0.8, 0.9):
            for seed in range(6):
                x = random_logits(vocab, 100 * vocab + seed, ties=True)
                keep = kept_mask(x, 0, p)
                edge = x[keep].min()
                straddles += int(bool(((x == edge) & ~keep).any()))
    assert straddles >= 5


def test_kept_set_skips_suppressed_tokens_and_keeps_at_least_one():
    x = torch.tensor([1.0, float("-inf"), 3.0, 2.0])
    assert kept_mask(x, 0, 1.0).tolist() == [True, False, True, True]
    assert kept_mask(x, 0, 1e-9).tolist() == [False, False, True, False]
    assert kept_mask(x, 10, 1.0).tolist() == [True, False, True, True]


@pytest.mark.parametrize("vocab", SIZES)
@pytest.mark.parametrize("k, p", [(0, 1.0), (3, 1.0), (0, 0.5), (50, 0.9)])
def test_kept_probs_is_the_softmax_of_the_warped_scores(vocab, k, p):
    x = random_logits(vocab, vocab + k)
    warped = x.unsqueeze(0)
    if k:
        warped = TopKLogitsWarper(k)(None, warped)
    if p < 1.0:
        warped = TopPLogitsWarper(p)(None, warped)
    probs = kept_probs(x, kept_mask(x, k, p))
    assert probs.dtype == torch.float64
    assert_close(probs, warped[0].double().softmax(-1), atol=1e-12, rtol=0)
    kept = exact_kept_ids(x, k, p)
    w = draw_weights(x[kept])
    assert_close(w / w.sum(), probs[kept], atol=1e-12, rtol=0)  # the draw's weights, normalised


# --- draw --------------------------------------------------------------------------------------


def test_draw_is_the_inverse_cdf_over_ascending_ids():
    ids = torch.tensor([2, 5, 9, 11])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # cumulative 0.1, 0.3, 0.6, 1.0
    assert [draw(ids, w, u) for u in (0.0, 0.09, 0.1, 0.29, 0.3, 0.59, 0.6, 0.99, 0.999999)] == \
        [2, 2, 5, 5, 9, 9, 11, 11, 11]
    assert draw(ids, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), 0.0) == 9  # never a weight-0 token


def test_uniform_is_the_generators_own_and_leaves_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = [uniform(make_generator(7)) for _ in range(2)]
    g = make_generator(7)
    assert a[0] == a[1] == uniform(g) != uniform(g)
    assert 0.0 <= a[0] < 1.0 and torch.equal(torch.get_rng_state(), before)


def test_greedy_is_the_first_of_equal_maxima():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert greedy_ids(x).tolist() == [1, 0]
    assert int(greedy_ids(x[0])) == 1


# --- the samplers built from them --------------------------------------------------------------


BATCH_CASES = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=0.7, top_p=0.95, seed=1),  # the notebook's
    SamplingParams(temperature=1.3, top_k=5, top_p=0.9, seed=2),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.5, repetition_penalty=1.3, seed=3),
    SamplingParams(temperature=1.0, top_k=3000, seed=4),
    SamplingParams(temperature=2.0, top_p=0.3, seed=5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_sampler_picks_what_choose_picks(dtype):
    """Every greedy or top-k/top-p row of a batch: the token `choose` picks for that row alone with
    the same generator (the candidate search and its vectorised draw change nothing), over steps."""
    vocab = 262_144
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, vocab, (30,), generator=g)
    rows = [RowSampling(p, prompt, make_generator(p.seed)) for p in BATCH_CASES]
    gens = [make_generator(p.seed) for p in BATCH_CASES]
    seen = [prompt.clone() for _ in BATCH_CASES]
    sampler = BatchSampler()
    for step in range(3):
        logits = (torch.randn(len(BATCH_CASES), vocab, generator=g) * 4).to(dtype)
        rows[0].suppress = torch.tensor([int(logits[0].float().argmax())]) if step == 1 else None
        got = sampler.sample(logits, rows).tolist()
        want = [choose(logits[r], p, gens[r], seen=seen[r], suppress=rows[r].suppress)
                for r, p in enumerate(BATCH_CASES)]
        assert got == want, f"step {step}"
        for r, tok in enumerate(got):
            rows[r].append(tok)
            seen[r] = torch.cat([seen[r], torch.tensor([tok])])


def test_seeded_sampler_draws_with_draw_from_what_the_warpers_left():
    scores = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
    scores[:, ::3] = float("-inf")  # filtered by the processors before it
    out = SeededSampler(11)(None, scores.clone())
    gen = make_generator(11)
    for b in range(3):
        ids = torch.nonzero(torch.isfinite(scores[b])).reshape(-1)
        tok = draw(ids, draw_weights(scores[b, ids]), uniform(gen))
        assert torch.nonzero(torch.isfinite(out[b])).reshape(-1).tolist() == [tok]


@pytest.mark.parametrize("shape,k", [((7,), 1), ((7,), 7), ((3, 50), 5), ((2, 4, 64), 9), ((1, 262144), 10)])
def test_ranked_ids_are_best_first_with_ties_in_id_order(shape, k):
    """bf16 logits tie often: of equal scores the lower id ranks first, as greedy_ids (argmax)
    picks, so a table's first row is always the greedy choice; on few distinct values most of
    the ranks are ties."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, shape, generator=g).float() if shape[-1] < 1000 else \
        torch.randn(shape, generator=g).bfloat16().float()
    ranked = ranked_ids(scores, k)
    assert ranked.shape == (*shape[:-1], k)
    assert torch.equal(ranked, torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k])
    assert torch.equal(ranked[..., 0], greedy_ids(scores))
