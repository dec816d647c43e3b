"""Where a token is chosen: the sampling controls, the small pure functions every token-chooser
shares (scale, keep, draw; `choose` for one row) and generate()'s `SeededSampler`. The chat
engine's `BatchSampler` (generation.decode.sampler) is the same pipeline for a batch of rows, each
with its own controls."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
from transformers import TopPLogitsWarper

MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_SEED = 2**63 - 1


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling controls; defaults are the original notebook's (128 tokens, T=0.7, top-p 0.95).

    temperature 0 means greedy decoding (top_p/top_k/seed are then irrelevant); top_k 0 means off.
    min_new_tokens (vLLM's min_tokens): neither an end-of-sequence token nor a stop string ends the
    reply before this many tokens; a stop string that begins earlier is part of the reply.
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {m!r}")
        n = self.min_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
            raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens = {m}], got {n!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not 1.0 <= r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [1, {MAX_REPETITION_PENALTY}] (1 = off), got {r!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**63-1], got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        """kwargs for `model.generate()`; call once per generation (a sampled call owns a fresh RNG).

        transformers 5.23's `generate()` takes no `torch.Generator` and samples from the global RNG,
        which concurrent callers share (one call's draws shift another's). So sampling happens in our
        own last logits processor, `SeededSampler`, with a per-call `torch.Generator`; it leaves only
        the drawn token finite and `generate()` runs greedy, which then picks exactly that token.
        Repetition penalty stays with `generate()` (it comes first, as in HF's sampling order).
        """
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.min_new_tokens:  # end-of-sequence only: the caller's stopping criteria skip stop strings
            kw["min_new_tokens"] = self.min_new_tokens
        if not self.greedy:
            procs: list[LogitsProcessor] = [TemperatureLogitsWarper(self.temperature)]
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
            procs.append(SeededSampler(self.seed))
            kw["logits_processor"] = LogitsProcessorList(procs)
        return kw


# ---------------------------------------------------------------------------------------------
# Where a token is chosen. Every caller that picks or filters tokens (the chat engine's
# BatchSampler, SeededSampler in generate(), the next-token table, the teaching views' greedy
# continuations) goes through these small pure functions, in transformers' order:
#
#   scale   logits -> float32 scores: repetition penalty, then / temperature (greedy: / 1)
#   keep    top-k, then top-p: the tokens that may be drawn
#   draw    one token from the kept scores with one uniform from the request's own generator
#           (greedy: the argmax, `greedy_ids`)
#
# `choose` is the whole pipeline for one row; BatchSampler (decode/sampler.py) is the same pipeline
# for a batch, with its kept sets found from candidates instead of a sort of the whole vocabulary.


def penalised(values: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on the scores of tokens already seen: a positive score is
    divided by `penalty`, a negative one multiplied, so both become less likely."""
    return torch.where(values < 0, values * penalty, values / penalty)


def scale(logits: torch.Tensor, temperature: float = 1.0, *, penalty: float = 1.0,
          seen: torch.Tensor | None = None) -> torch.Tensor:
    """One row of logits (V,) (any float dtype) -> float32 scores, as generate() computes them:
    logits.float(), the repetition penalty on the ids in `seen` (RepetitionPenaltyLogitsProcessor),
    then / temperature (TemperatureLogitsWarper). temperature 0 (greedy) and 1 divide by nothing:
    x / 1 == x. Ids beyond V (a larger embedding table) cannot be drawn and are ignored. When
    nothing changes (float32 logits, no penalty, T 0 or 1) the result is `logits` itself: read it,
    never write into it."""
    scores = logits.float()
    if penalty != 1.0 and seen is not None and seen.numel():
        ids = seen.reshape(-1).to(scores.device, torch.long)
        ids = ids[ids < scores.shape[-1]]
        vals = penalised(scores.index_select(0, ids), penalty)
        scores = scores.clone() if scores is logits else scores  # never write into the caller's logits
        scores.index_copy_(0, ids, vals)
    if temperature not in (0.0, 1.0):
        scores = scores / temperature
    return scores


def greedy_ids(scores: torch.Tensor) -> torch.Tensor:
    """The greedy choice of each row of scores (..., V): the highest score, of equal maxima the
    lowest id (torch.argmax). The int8 head's exact greedy path (`QuantizedHead.greedy_token`)
    is the one specialised implementation of this rule, checked against it by the tests."""
    return scores.argmax(dim=-1)


def ranked_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k highest scores of each row (..., V) -> (..., k), best first, equal scores
    in id order: greedy_ids' rule, so the first id is always the greedy choice. bf16 logits tie
    often, and torch.topk's order among equal values is unspecified."""
    k = min(k, scores.shape[-1])
    rows = scores.reshape(-1, scores.shape[-1])  # (N, V)
    kth = torch.topk(rows, k, dim=-1).values[:, -1:]  # (N, 1)
    r, c = (rows >= kth).nonzero(as_tuple=True)  # every candidate, ids ascending within a row
    order = torch.argsort(rows[r, c], descending=True, stable=True)  # ties keep id order
    order = order[torch.argsort(r[order], stable=True)]  # grouped by row, each row best first
    counts = torch.bincount(r, minlength=rows.shape[0])  # (N,) candidates per row, >= k
    starts = torch.cumsum(counts, 0) - counts
    first_k = starts.unsqueeze(1) + torch.arange(k)  # (N, k) positions in `order`
    return c[order][first_k].reshape(*scores.shape[:-1], k)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(V,) -> (V,) bool: TopKLogitsWarper's kept tokens, every token >= the k-th largest score
    (ties at the k-th all kept). k 0 = off."""
    if k <= 0 or k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.topk(scores, k).values[..., -1:]
    return scores >= kth


def top_p_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """(V,) -> (V,) bool: TopPLogitsWarper's kept tokens (the nucleus). In ascending order of
    score, tokens are removed while the probability at or below them is <= 1 - p; the most likely
    token always stays. scores: already top-k filtered (-inf = removed). p 1 = off.

    Equal scores are ordered as a stable sort orders them (so of equal scores straddling the
    boundary, the higher ids are kept): transformers' own choice among them follows torch.sort's
    unstable order, which no faster search can reproduce. The kept set has the same size and the
    same values as transformers'; it is identical whenever no tie straddles the boundary."""
    if p >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    srt, idx = torch.sort(scores, descending=False, stable=True)
    remove = srt.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[..., -1] = False  # min_tokens_to_keep = 1
    return ~remove.scatter(-1, idx, remove)


def kept_mask(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) scaled scores -> (V,) bool: the tokens TopKLogitsWarper(top_k) then
    TopPLogitsWarper(top_p) leave finite (see `top_p_mask` for ties). top_k 0 / top_p 1 = off."""
    keep = top_k_mask(scores, top_k) & torch.isfinite(scores)
    if top_p < 1.0:
        keep &= top_p_mask(scores.masked_fill(~keep, float("-inf")), top_p)
    return keep


def exact_kept_ids(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The ids (ascending) of `kept_mask`: transformers' arithmetic over the full sorted row, the
    reference BatchSampler's candidate search is checked against (and its fallback)."""
    return torch.nonzero(kept_mask(scores, top_k, top_p)).reshape(-1)


def kept_probs(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(V,) float64: each token's chance to be drawn, softmax over the kept tokens (0 elsewhere).
    float64, so that over 262k tokens the chances still sum to 1 within 1e-12."""
    return scores.masked_fill(~keep, float("-inf")).double().softmax(-1)


def draw_weights(values: torch.Tensor) -> torch.Tensor:
    """The kept tokens' scores (n,) -> float64 weights exp(x - max), proportional to `kept_probs`."""
    v = values.double()
    return torch.exp(v - v.max())


def uniform(generator: torch.Generator) -> float:
    """One float64 uniform in [0, 1) from the request's own generator (never the global RNG)."""
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def draw(ids: torch.Tensor, weights: torch.Tensor, u: float) -> int:
    """The inverse CDF at u over the kept tokens `ids` (ascending) with `weights` (float64): the
    token depends only on the row's kept set, its scores and u."""
    cum = weights.cumsum(0)
    target = torch.tensor([u * float(cum[-1])], dtype=torch.float64)
    i = int(torch.searchsorted(cum, target, right=True))
    return int(ids[min(i, ids.numel() - 1)])


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None, *,
           seen: torch.Tensor | None = None, suppress: torch.Tensor | None = None) -> int:
    """The next token from one row of logits (V,): scale, then greedy, or keep and draw.

    seen: the ids the repetition penalty applies to (prompt and reply so far); suppress: ids that
    cannot be drawn at this step (end-of-sequence before min_new_tokens). generator: the request's
    own (default: one seeded from params.seed). BatchSampler picks the same token for a greedy or
    a top-k/top-p row with the same generator; a row without either draws the same distribution
    in its own order (see BatchSampler)."""
    scores = scale(logits, params.temperature, penalty=params.repetition_penalty, seen=seen)
    if suppress is not None:
        scores = scores.index_fill(0, suppress.to(scores.device), float("-inf"))
    if params.greedy:
        return int(greedy_ids(scores))
    ids = exact_kept_ids(scores, params.top_k, params.top_p)
    weights = draw_weights(scores.index_select(0, ids)).cpu()
    return draw(ids.cpu(), weights, uniform(generator or make_generator(params.seed)))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from OS entropy when seed is None."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class SeededSampler(LogitsProcessor):
    """generate()'s last logits processor: draws each row's token from the scores the warpers
    before it left finite (`draw`, with a private generator) and keeps only that token.

    scores (B, V) -> (B, V) with 0 at the drawn token and -inf elsewhere.
    """

    def __init__(self, seed: int | None) -> None:
        self.generator = make_generator(seed)  # seed None: fresh OS entropy, independent draws per call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))  # (B, V)
        rows = scores.float().cpu()  # drawn on the CPU with the CPU generator: device-independent results
        for b in range(rows.shape[0]):
            ids = torch.nonzero(torch.isfinite(rows[b])).reshape(-1)
            out[b, draw(ids, draw_weights(rows[b, ids]), uniform(self.generator))] = 0.0
        return out

