"""Batched sampling for the chat engine: `choose` (generation.sampling) for every row of a (B, V)
batch, each row with its own parameters and torch.Generator, without sorting the vocabulary.

RowSampling     one request's sampling state (parameters, generator, penalty history)
BatchSampler    the engine's token choice for a batch of rows
top_candidates  the k largest scores of each row, reading the row once

Scaling is `scale` for the whole batch at once. The kept set is `kept_mask`'s, found from the k
largest scores of each row (`top_candidates`, k = k0 first, x4 only for rows whose nucleus those
candidates do not provably cover, up to k_max, then the full sort):
* top-k keeps every token >= the k-th largest value (ties included), as the warper does;
* top-p removes tokens in ascending order while their cumulative probability is <= 1 - top_p.
  Where the candidates' tail masses come within FILTER_MARGIN_REL of the threshold (float32
  rounding of the softmax over the whole row could decide either way) the row is decided by
  `exact_kept_ids` over the full sorted row;
* ties straddling the top-p boundary, frequent with bf16 logits, are resolved as `top_p_mask`
  resolves them (a stable sort: of equal values the higher ids are kept).
The draw is `draw`: an inverse CDF over the kept tokens in ascending id order with one uniform
from the row's own generator, so a row's token depends only on its own logits and seed (never on
the batch it shares, the candidate count, or the path that found the kept set). A row with
neither top-k nor top-p (plain temperature) draws from its k0 most likely tokens, then the rest
of the vocabulary in 512-token blocks: the same distribution as `draw` over the whole
vocabulary, in another order, so that no row needs a sort or a float64 copy of 262k scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..sampling import (
    SamplingParams,
    draw,
    draw_weights,
    exact_kept_ids,
    greedy_ids,
    make_generator,
    penalised,
    uniform,
)

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
