"""Where a token is chosen: the sampling controls, the small pure functions every token-chooser
shares (scale, keep, draw; `choose` for one row), generate()'s `SeededSampler`, and the chat
engine's `BatchSampler` (the same pipeline for a batch of rows, each with its own controls)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
# `choose` is the whole pipeline for one row; BatchSampler is the same pipeline for a batch, with
# its kept sets found from candidates instead of a sort of the whole vocabulary.


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


# ---------------------------------------------------------------------------------------------
# Batched sampling for the chat engine: `choose` for every row of a (B, V) batch, each row with
# its own parameters and torch.Generator, without sorting the vocabulary.
#
# Scaling is `scale` for the whole batch at once. The kept set is `kept_mask`'s, found from the k
# largest scores of each row (`top_candidates`, k = k0 first, x4 only for rows whose nucleus those
# candidates do not provably cover, up to k_max, then the full sort):
# * top-k keeps every token >= the k-th largest value (ties included), as the warper does;
# * top-p removes tokens in ascending order while their cumulative probability is <= 1 - top_p.
#   Where the candidates' tail masses come within FILTER_MARGIN_REL of the threshold (float32
#   rounding of the softmax over the whole row could decide either way) the row is decided by
#   `exact_kept_ids` over the full sorted row;
# * ties straddling the top-p boundary, frequent with bf16 logits, are resolved as `top_p_mask`
#   resolves them (a stable sort: of equal values the higher ids are kept).
# The draw is `draw`: an inverse CDF over the kept tokens in ascending id order with one uniform
# from the row's own generator, so a row's token depends only on its own logits and seed (never on
# the batch it shares, the candidate count, or the path that found the kept set). A row with
# neither top-k nor top-p (plain temperature) draws from its k0 most likely tokens, then the rest
# of the vocabulary in 512-token blocks: the same distribution as `draw` over the whole
# vocabulary, in another order, so that no row needs a sort or a float64 copy of 262k scores.

# Relative margin on the top-p threshold within which a row is decided by the exact full sort:
# float32 softmax totals over a 262k vocabulary deviate from 1 by about 1e-6 and our float64
# tails by far less, so 2e-5 is a wide safety factor that still sends few real rows to the slow
# path (bench/load.py counts them).
FILTER_MARGIN_REL = 2e-5
_ROW_SUM_BLOCK = 512
_CAND_BLOCK = 64


class RowSampling:
    """One request's sampling state in a batch: its parameters, generator and penalty history.

    `token_ids` holds the prompt and every generated id (RepetitionPenaltyLogitsProcessor's
    input_ids); it is kept only when repetition_penalty != 1. `suppress`: token ids that cannot be
    drawn at this step (the end-of-sequence ids before min_new_tokens, as transformers'
    MinNewTokensLengthLogitsProcessor), or None.
    """

    __slots__ = ("params", "generator", "suppress", "_ids", "_n")

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.params = params
        self.generator = None if params.greedy else (generator or make_generator(params.seed))
        self.suppress: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._n = 0
        if params.repetition_penalty != 1.0:
            ids = prompt_ids.reshape(-1).to("cpu", torch.long) if prompt_ids is not None else torch.empty(0, dtype=torch.long)
            self._ids = torch.empty(max(64, 2 * ids.numel()), dtype=torch.long)
            self._ids[: ids.numel()] = ids
            self._n = ids.numel()

    def append(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty)."""
        if self._ids is None:
            return
        if self._n == self._ids.numel():
            grown = torch.empty(2 * self._n, dtype=torch.long)
            grown[: self._n] = self._ids
            self._ids = grown
        self._ids[self._n] = token_id
        self._n += 1

    @property
    def token_ids(self) -> torch.Tensor | None:
        """(L,) ids the repetition penalty applies to, or None when it is off."""
        return None if self._ids is None else self._ids[: self._n]


def _as_float32(x: float) -> float:
    """x rounded to float32, as torch compares a float32 tensor with a Python scalar."""
    return float(torch.tensor(x, dtype=torch.float32))


def _block_sums(x: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 -> (n, V / 512) float32 sums of 512-wide blocks (V a multiple of 512)."""
    return x.view(x.shape[0], -1, _ROW_SUM_BLOCK).sum(-1)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n,) float64 sums whose value does not depend on n (fixed 512-wide blocks summed
    in float32, then the blocks in float64; no intra-row thread split), so a row's draw does not
    depend on the batch it is in. (A float64 sum of the whole row would convert it first, a full
    extra pass in float64.)"""
    if x.shape[1] % _ROW_SUM_BLOCK == 0:
        return _block_sums(x).double().sum(-1)
    return x.double().sum(-1)


_EXACT = object()  # a row the candidates cannot decide within the margin: use the full sort


def top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) (n, k) of the k largest values of each row of x (n, V), descending; where
    values tie at the k-th, which of them come back is unspecified (as with torch.topk).

    Blocks of _CAND_BLOCK: every one of the k largest values lies in one of the k blocks with the
    largest maxima (a value outside them has k block maxima, hence k values, above it), so topk
    over block maxima, then over those k blocks, finds them reading x once, where torch.topk over
    the whole row costs several times more (bench/README.md).
    """
    n, v = x.shape
    if v % _CAND_BLOCK or 4 * k * _CAND_BLOCK > v:
        return torch.topk(x, k, dim=-1)
    blocks = torch.topk(x.view(n, -1, _CAND_BLOCK).amax(-1), k, dim=-1, sorted=False).indices  # (n, k)
    ids = (blocks.unsqueeze(-1) * _CAND_BLOCK + torch.arange(_CAND_BLOCK, device=x.device)).reshape(n, -1)
    vals, pos = torch.topk(x.gather(1, ids), k, dim=-1)
    return vals, ids.gather(1, pos)


@dataclass
class _Choice:
    """A row's kept set: ids ascending with float64 weights; or, for untruncated rows, a head of
    candidates plus the rest of the vocabulary (probs with the head zeroed) and its mass."""

    ids: torch.Tensor
    weights: torch.Tensor
    rest: torch.Tensor | None = None
    rest_mass: float = 0.0
    token: int | None = None  # already drawn (the vectorised fast path)


class BatchSampler:
    """Draws the next token for every row of a (B, V) logits batch with per-row parameters.

    Reuses its float32 work buffers between steps. `stats` counts rows that needed a wider top-k
    (`widened`) or the exact full sort (`exact`), for benchmarks.
    """

    def __init__(self, *, k0: int = 64, k_max: int = 16384) -> None:
        if k0 < 2 or k_max < k0:
            raise ValueError(f"need 2 <= k0 <= k_max, got k0={k0}, k_max={k_max}")
        self.k0 = k0
        self.k_max = k_max
        self._bufs: dict[str, torch.Tensor] = {}
        self.stats = {"rows": 0, "widened": 0, "exact": 0}

    def _buf(self, name: str, n: int, v: int, device: torch.device) -> torch.Tensor:
        b = self._bufs.get(name)
        if b is None or b.shape[0] < n or b.shape[1] != v or b.device != device:
            b = torch.empty(max(n, 8), v, dtype=torch.float32, device=device)
            self._bufs[name] = b
        return b[:n]

    # -- the public entry points -----------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
        """logits (B, V) (any float dtype, any device) -> next token ids (B,) int64 on CPU."""
        n, v = logits.shape
        if len(rows) != n:
            raise ValueError(f"{n} logits rows but {len(rows)} sampling rows")
        scaled = self._scale(logits, rows)  # (B, V) float32: penalised, / temperature (greedy: / 1)
        out = torch.empty(n, dtype=torch.long)
        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy_rows:
            sel = scaled if len(greedy_rows) == n else scaled[torch.tensor(greedy_rows, device=scaled.device)]
            out[torch.tensor(greedy_rows)] = greedy_ids(sel).cpu()
        if sampled:
            x = scaled if len(sampled) == n else self._rows_copy("sel", scaled, sampled)
            params = [rows[i].params for i in sampled]
            # one uniform per row and step from the row's own generator, whatever path draws with it
            us = [uniform(rows[i].generator) for i in sampled]
            choices = self._select(x, [p.top_k for p in params], [p.top_p for p in params], u=us)
            for j, i in enumerate(sampled):
                c = choices[j]
                out[i] = c.token if c.token is not None else self._draw(c, us[j])
        self.stats["rows"] += n
        return out

    @torch.inference_mode()
    def kept_ids(self, scores: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> list[torch.Tensor]:
        """The kept token ids (ascending) of each row of already-scaled scores (B, V) float32,
        as `sample` determines them (top_k 0 / top_p 1 = off; both off -> every token)."""
        choices = self._select(scores.float(), list(top_k), list(top_p))
        v = scores.shape[1]
        return [c.ids if c.rest is None else torch.arange(v) for c in choices]

    # -- the pieces ------------------------------------------------------------------------------

    def _rows_copy(self, name: str, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        dst = self._buf(name, len(rows), x.shape[1], x.device)
        torch.index_select(x, 0, torch.tensor(rows, device=x.device), out=dst)
        return dst

    def _scale(self, logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
        """`scale` for every row of logits (B, V) at once, into a reused float32 buffer, bit for bit
        (the tests check it): one division of the whole batch by per-row temperatures, then the
        penalised ids of each row overwritten with `penalised` values / T; suppressed ids -inf."""
        n, v = logits.shape
        buf = self._buf("scaled", n, v, logits.device)
        temps = [1.0 if r.params.greedy else float(r.params.temperature) for r in rows]
        if all(t == 1.0 for t in temps):
            buf.copy_(logits)
        else:
            tcol = torch.tensor(temps, dtype=torch.float32, device=logits.device).unsqueeze(1)
            if logits.dtype == torch.float32:  # one pass over the batch instead of a copy and a division
                torch.div(logits, tcol, out=buf)
            else:  # == logits.float() / T bit for bit; two plain passes are faster than one mixed-dtype div(out=)
                buf.copy_(logits)
                buf.div_(tcol)
        for i, r in enumerate(rows):
            ids = r.token_ids
            if ids is None or ids.numel() == 0:
                continue
            ids = ids.to(logits.device)
            ids = ids[ids < v]  # ids beyond the logits (a larger embedding table) cannot be drawn anyway
            pen = float(r.params.repetition_penalty)
            vals = penalised(logits[i].index_select(0, ids).float(), pen)
            if temps[i] != 1.0:
                vals = vals / temps[i]
            buf[i].index_copy_(0, ids, vals)
        for i, r in enumerate(rows):
            if r.suppress is not None:
                buf[i].index_fill_(0, r.suppress.to(buf.device), float("-inf"))
        return buf

    def _select(self, x: torch.Tensor, top_k: list[int], top_p: list[float], *,
                u: list[float] | None = None) -> list[_Choice]:
        """Kept sets for the rows of scaled scores x (n, V) float32 (see the module notes); with
        uniforms u (n,), rows settled by the candidates come back with their token drawn."""
        n, v = x.shape
        result: list[_Choice | None] = [None] * n
        todo = list(range(n))
        for i in todo:  # a top-k beyond k_max: the candidates would be the sort anyway
            if top_k[i] + 1 > self.k_max and top_k[i] < v:
                result[i] = self._exact(x[i], top_k[i], top_p[i])
        todo = [i for i in todo if result[i] is None]
        k = min(v, max(self.k0, max((top_k[i] + 1 for i in todo if top_k[i] > 0), default=0)))
        first = True
        while todo:
            if k > self.k_max:  # the nucleus is wider than k_max candidates: full sort
                for i in todo:
                    result[i] = self._exact(x[i], top_k[i], top_p[i])
                break
            idx = None if len(todo) == n else torch.tensor(todo, device=x.device)
            sub = x if idx is None else x[idx]
            done = self._fast(sub, k, [top_k[i] for i in todo], [top_p[i] for i in todo],
                              None if u is None else [u[i] for i in todo])
            for j, i in enumerate(todo):
                if done[j] is _EXACT or (done[j] is None and k == v):
                    result[i] = self._exact(x[i], top_k[i], top_p[i])
                else:
                    result[i] = done[j]
            todo = [i for i in todo if result[i] is None]
            if todo and first:
                self.stats["widened"] += len(todo)
            first = False
            k = min(v, k * 4)
        return result  # type: ignore[return-value]

    def _exact(self, row: torch.Tensor, top_k: int, top_p: float) -> _Choice:
        self.stats["exact"] += 1
        ids = exact_kept_ids(row, top_k, top_p)
        return _Choice(ids.cpu(), draw_weights(row.index_select(0, ids)).cpu())

    def _fast(self, x: torch.Tensor, k: int, top_k: list[int], top_p: list[float], u: list[float] | None) -> list[Any]:
        """One topk(k) pass over rows x (m, V): a _Choice per row, None where the candidates do not
        cover the kept set (widen k), _EXACT where float rounding could decide the boundary."""
        m, v = x.shape
        dev = x.device
        cv, ci = top_candidates(x, k)  # (m, k): the k largest values (ties at the k-th: some of them)
        # Canonical order: values descending, equal values by token id descending (a stable
        # ascending sort read backwards), so the kept prefix is what a stable sort would keep.
        ci, order = torch.sort(ci, dim=-1, descending=True, stable=True)
        cv = cv.gather(1, order)
        cv, order = torch.sort(cv, dim=-1, descending=True, stable=True)
        ci = ci.gather(1, order)
        cvd = cv.double()
        mx = cvd[:, :1]
        tk = torch.tensor(top_k, device=dev)
        tp = torch.tensor(top_p, dtype=torch.float64, device=dev)
        pos = torch.arange(k, device=dev)
        full = tk == 0  # no top-k: the pool is the whole vocabulary
        # top-k pool: values >= the k-th largest (ties kept); covered if it ends inside the candidates
        thr = cv.gather(1, (tk - 1).clamp(min=0, max=k - 1).unsqueeze(1))
        in_pool = full.unsqueeze(1) | (cv >= thr)
        pool_ok = full | (cv[:, -1] < thr.squeeze(1)) | (k == v)
        # Weights in the units transformers normalises: full-vocabulary rows use the row's softmax
        # (probabilities and the mass outside the candidates), top-k rows exp(x - max) over the pool.
        w = torch.exp(cvd - mx) * in_pool
        rest_mass = torch.zeros(m, dtype=torch.float64, device=dev)
        probs = None
        full_rows = torch.nonzero(full).reshape(-1)
        if full_rows.numel():
            fr = full_rows.tolist()
            xf = x if len(fr) == m else x[full_rows]
            probs = self._buf("probs", len(fr), v, dev)
            torch.ops.aten._softmax.out(xf, -1, False, out=probs)  # into the reused buffer
            cif = ci[full_rows]
            w[full_rows] = probs.gather(1, cif).double()
            probs.scatter_(1, cif, 0.0)  # what remains is the mass outside the candidates
            rest_mass[full_rows] = _row_sums(probs)
        total = rest_mass + w.sum(-1)
        tail = (rest_mass.unsqueeze(1) + w.flip(-1).cumsum(-1).flip(-1)) / total.unsqueeze(1)  # (m, k)
        thresh = torch.tensor([_as_float32(1 - p) for p in top_p], dtype=torch.float64, device=dev).unsqueeze(1)
        nucleus = (tp < 1.0).unsqueeze(1)
        keep = torch.where(nucleus, (tail > thresh) | (pos == 0), in_pool)
        nk = keep.sum(-1)
        last_kept = cv.gather(1, (nk - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        covered = pool_ok & (~full | ~nucleus.squeeze(1) | (last_kept > cv[:, -1]) | (k == v))
        ambiguous = nucleus.squeeze(1) & ((tail - thresh).abs() <= FILTER_MARGIN_REL * thresh).any(-1)
        ok = covered.tolist()
        amb = ambiguous.tolist()
        untruncated = (full & ~nucleus.squeeze(1)).tolist()
        # Draw weights: exp(x - max) in float64 over the kept tokens, in ascending id order (as
        # `draw_weights`; the row's maximum is its first candidate, always kept).
        wd = torch.exp(cvd - mx)
        ids_sorted, perm = torch.sort(torch.where(keep, ci, v + ci), dim=-1)
        w_sorted = torch.where(ids_sorted < v, wd.gather(1, perm), 0.0)
        nk_l = nk.tolist()
        drawn = None
        if u is not None:  # `draw`'s inverse CDF for every row at once
            cum = w_sorted.cumsum(-1)
            target = torch.tensor(u, dtype=torch.float64, device=dev) * cum[:, -1]
            pos = torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)
            pos = torch.minimum(pos, (nk - 1).clamp(min=0))
            drawn = ids_sorted.gather(1, pos.unsqueeze(1)).squeeze(1).tolist()
        out: list[Any] = []
        fr_index = {r: j for j, r in enumerate(full_rows.tolist())}
        for r in range(m):
            if amb[r]:  # widening cannot help: the tails are what they are
                out.append(_EXACT)
                continue
            if not ok[r]:
                out.append(None)
                continue
            if untruncated[r]:
                out.append(self._untruncated(cv[r], ci[r], w[r], probs[fr_index[r]], u is not None))
                continue
            if drawn is not None:
                out.append(_Choice(ids_sorted[r, :0], w_sorted[r, :0], token=drawn[r]))
                continue
            c = nk_l[r]
            out.append(_Choice(ids_sorted[r, :c].cpu(), w_sorted[r, :c].cpu()))
        return out

    def _untruncated(self, cv: torch.Tensor, ci: torch.Tensor, w: torch.Tensor, rest: torch.Tensor,
                     draw: bool) -> _Choice:
        """Plain temperature sampling: the head = candidates above the k0-th largest value (the same
        set whatever k was used), the rest of the vocabulary drawn from its probabilities."""
        head = cv > cv[min(self.k0, cv.numel()) - 1] if cv.numel() < rest.numel() else torch.ones_like(cv, dtype=torch.bool)
        ids, perm = torch.sort(ci[head])
        hw = w[head][perm]
        if not draw:
            return _Choice(ids.cpu(), hw.cpu(), rest=rest, rest_mass=0.0)
        rest = rest.clone()  # the caller's buffer is reused next step
        edge = ~head
        rest.scatter_(0, ci[edge], w[edge].float())  # candidates tied at the edge go back to the rest
        return _Choice(ids.cpu(), hw.cpu(), rest=rest.cpu(), rest_mass=float(_row_sums(rest.unsqueeze(0))[0]))

    @staticmethod
    def _draw(choice: _Choice, u: float) -> int:
        """`draw` over a kept set; for an untruncated row the inverse CDF at u over the head
        (ascending ids), then the rest (ascending ids)."""
        if choice.rest is None or choice.rest_mass <= 0.0:
            return draw(choice.ids, choice.weights, u)
        cum = choice.weights.cumsum(0)
        head_mass = float(cum[-1]) if cum.numel() else 0.0
        target = u * (head_mass + choice.rest_mass)
        if target < head_mass:
            i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64), right=True))
            return int(choice.ids[min(i, choice.ids.numel() - 1)])
        rest = choice.rest
        target -= head_mass
        v = rest.numel()
        if v % _ROW_SUM_BLOCK == 0:  # blocks first, then within the block: cheap and exact enough
            blocks = _block_sums(rest.unsqueeze(0))[0].double().cumsum(0)  # as _row_sums adds them
            b = min(int(torch.searchsorted(blocks, torch.tensor([target], dtype=torch.float64), right=True)),
                    blocks.numel() - 1)
            target -= float(blocks[b - 1]) if b > 0 else 0.0
            inner = rest[b * _ROW_SUM_BLOCK : (b + 1) * _ROW_SUM_BLOCK].double().cumsum(0)
            j = min(int(torch.searchsorted(inner, torch.tensor([target], dtype=torch.float64), right=True)),
                    _ROW_SUM_BLOCK - 1)
            while j > 0 and float(rest[b * _ROW_SUM_BLOCK + j]) == 0.0:  # never land on a zeroed head id
                j -= 1
            return b * _ROW_SUM_BLOCK + j
        cum_rest = rest.double().cumsum(0)
        j = min(int(torch.searchsorted(cum_rest, torch.tensor([target], dtype=torch.float64), right=True)), v - 1)
        return j
