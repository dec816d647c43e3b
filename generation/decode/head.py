"""The int8 copy of the LM head, with exact greedy choice and exact top candidates for sampling.

bitsandbytes keeps the LM head in bf16 (Gemma ties its 262,144 x 640 head to the embedding; Qwen2.5
and Llama 3.2 have 151,936 and 128,256 rows, tied or a separate head), so the head alone reads
hundreds of MB per token. `quantize_lm_head` makes an int8 copy of it (one scale per
output row), used only for the output projection; the embedding keeps its exact bf16 weights
(multiplied by the AVX512-VNNI kernel of `generation.kernels` where it runs, else by torch's int8
kernel). Greedy decoding stays exactly the bf16 head's argmax (`QuantizedHead.greedy_token`: the
best candidates are recomputed from the exact weights and an error bound proves the winner);
`pick_tokens` chooses the next token of every row of a batch that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import native_int8_kernel
from .sampler import BatchSampler, RowSampling, top_candidates
from .lean import single_threaded

__all__ = ["RESCORE_K", "QuantizedHead", "QuantizedLMHead", "argmax_first", "pick_tokens", "quantize_lm_head"]


# Candidates recomputed from the exact bf16 weights in greedy_token: enough that the error bound
# decides most steps at once, while recomputing them stays far cheaper than the whole head.
RESCORE_K = 64
_TILE_ROWS, _TILE_COLS = 16, 4  # the native kernel's layout
_MAX_TILE_D = 16384  # the native kernel's int32 sums cannot overflow up to this hidden size


@dataclass(frozen=True)
class QuantizedHead:
    """int8 copy of an LM head (V, D): W[v] ~= codes[v] * scale[v], symmetric, one scale per row.

    codes: int8, as (V, D) rows (layout "rows"), or in the native kernel's tiles (ceil(V/16), D/4,
    16, 4), the rows past V zero (layout "tiles"). exact: the model's own (V, D) bf16 head weight
    (a separate head's or the tied embedding, shared, never written): rows of it recompute chosen
    logits exactly. half_step (V,) fp32: the largest
    rounding error of a weight in that row (<= scale / 2).
    """

    codes: torch.Tensor
    layout: str
    scale: torch.Tensor  # (V,) fp32, values representable in bf16
    scale_bf16: torch.Tensor  # (V,) the same values in bf16, for aten._weight_int8pack_mm
    exact: torch.Tensor
    half_step: torch.Tensor
    half_max: float
    w_max: float  # max |exact|

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.exact.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of the copy: int8 codes + per-row scale (the greedy bookkeeping not counted)."""
        return self.codes.numel() + self.scale_bf16.numel() * 2

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """int8 codes of rows idx (n,) -> (n, D), whatever the layout."""
        v, d = self.shape
        if self.layout == "rows":
            return self.codes[idx]
        tiles = self.codes.view(-1, d // _TILE_COLS, _TILE_ROWS, _TILE_COLS)
        return tiles[idx // _TILE_ROWS, :, idx % _TILE_ROWS, :].reshape(-1, d)

    def dequantized(self, idx: torch.Tensor) -> torch.Tensor:
        """The int8 head's weights for rows idx (n,) -> (n, D) fp32."""
        return self.rows(idx).float() * self.scale[idx, None]

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) fp32; `out` (M, V) fp32 is filled and returned when given."""
        v, d = self.shape
        lead = hidden.shape[:-1]
        kernel = native_int8_kernel() if self.layout == "tiles" else None
        if kernel is None:
            if self.layout != "rows":
                raise RuntimeError("tiled int8 head without the native kernel")
            h2 = hidden.reshape(-1, d).to(torch.bfloat16).contiguous()
            res = torch.ops.aten._weight_int8pack_mm(h2, self.codes, self.scale_bf16)
            res = res.reshape(*lead, v)
            return out.view(*lead, v).copy_(res) if out is not None else res.float()
        h2 = hidden.reshape(-1, d).float().contiguous()  # (M, D)
        if out is None:
            out = torch.empty(h2.shape[0], v, dtype=torch.float32)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != h2.shape[0] * v:
            raise ValueError(f"out must be a contiguous fp32 tensor of {h2.shape[0]} x {v} values")
        kernel(h2, self.codes, self.scale, out, torch.get_num_threads())
        return out.view(*lead, v)

    def logits_exact_top(
        self, hidden: torch.Tensor, k: int = RESCORE_K, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden (M, D) -> int8 logits (M, V) fp32 with each row's k largest replaced by the exact
        bf16 head's values: for sampling, where the few tokens that carry the probability mass
        then have exactly the model's logits and only the tail is approximate."""
        logits = self.logits(hidden, out=out)
        top = torch.topk(logits, k, dim=-1)
        for m in range(logits.shape[0]):
            self.make_exact(logits[m], hidden[m], top.indices[m])
        return logits

    def make_exact(self, logits: torch.Tensor, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """logits (V,) of hidden (1, D): the entries at idx (n,) replaced, in place, by the bf16
        head's exact values (`rescore`); returns logits."""
        return logits.index_copy_(0, idx, self.rescore(hidden, idx).to(logits.dtype))

    def rescore(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Exact bf16-head logits of tokens idx (n,) for hidden (1, D) -> (n,) bf16, bit-equal to the
        full bf16 head's values there (the same dot products in the same kernel; the tests check it)."""
        return F.linear(hidden.reshape(1, -1), self.exact[idx])[0]

    def error_bound(self, hidden: torch.Tensor) -> tuple[float, float]:
        """(||h||_1, slack) for hidden (1, D): |int8 logit_v - exact logit_v| before output rounding is
        at most ||h||_1 * half_step[v] + slack. slack covers the fp32 accumulation of both dot
        products (2 D 2**-24 ||h||_1 w_max) and, for the native kernel, its two-level activations
        (|h - h_hat| <= max|h| / (2 * 127 * 254) per element, times max |int8 weight|) and, above
        D = 1024, the one rounding of its integer sums to fp32 (relative 2**-24 of each level's sum)."""
        hf = hidden.float().abs()
        l1 = float(hf.sum())
        d = hidden.shape[-1]
        slack = 2 * d * 2**-24 * l1 * self.w_max
        if self.layout == "tiles":
            w_int8 = self.w_max + self.half_max  # the largest |int8 weight| in logit units
            slack += d * float(hf.max()) / (2 * 127 * 254) * w_int8 * (1 + 2**-10)
            if d > 1024:  # both levels' sums, each at most (||h||_1 + its own error) * max |weight|
                slack += 2 * 2**-24 * (l1 + d * float(hf.max()) / 127) * w_int8
        return l1, slack

    def greedy_token(self, hidden: torch.Tensor, logits: torch.Tensor, k: int = RESCORE_K,
                     top: tuple[torch.Tensor, float] | None = None) -> tuple[int, bool]:
        """The bf16 head's greedy token (torch.argmax of its logits) for hidden (1, D), given this
        head's `logits` (V,) for it. Returns (token, decided by step 1).

        Step 1: the k largest int8 logits are recomputed exactly. Any other token has an int8 logit
        <= the k-th, so its exact logit is <= a limit (the error bound plus the rounding of both
        outputs); a best candidate above the limit is the argmax. Step 2 otherwise: every token
        whose exact logit could reach the best candidate's (by its own row's bound) is recomputed
        exactly, and the argmax is among them. Ties go to the lowest token id, as with torch.argmax.
        The answer is exact either way; only the cost differs (step 2 costs more). `top`: step 1's
        candidates when the caller has them (the k largest logits' ids, the k-th largest value).
        """
        cand, kth = top if top is not None else _candidates(logits, k)
        exact = self.rescore(hidden, cand)
        best = float(exact.max())
        l1, slack = self.error_bound(hidden)
        # From an output rounded to bf16, x + 2**-8|x| bounds the value before rounding; from an
        # unrounded z, z + 2**-9|z| bounds its rounded value. Both maps are monotone.
        z = kth + 2**-8 * abs(kth) + l1 * self.half_max + slack
        g = z + 2**-9 * abs(z)
        if best > g + 2**-20 * abs(g) + 1e-6:  # the last terms: slack for this float arithmetic
            return _lowest_at_max(cand, exact), True
        a = logits.float()
        z = a + 2**-8 * a.abs() + (l1 * self.half_step + slack)
        z += 2**-9 * z.abs()
        z += 2**-20 * z.abs() + 1e-6
        idx = torch.nonzero(z >= best).flatten()
        return _lowest_at_max(idx, self.rescore(hidden, idx)), False


def _candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(the k largest logits' token ids, the k-th largest logit): every other token's logit is <= it.

    topk, not a block-maxima search: topk runs on one thread, while the block reductions go
    parallel, and a parallel region costs a whole scheduler slice whenever another process holds
    one of the cores.
    """
    top = torch.topk(logits, k)
    return top.indices, float(top.values[-1])


def _lowest_at_max(idx: torch.Tensor, values: torch.Tensor) -> int:
    """The lowest token id in idx (n,) among those whose value (n,) is the maximum."""
    best = values.max()
    return int(torch.where(values == best, idx, torch.iinfo(torch.int64).max).min())


def argmax_first(logits: torch.Tensor) -> int:
    """torch.argmax(logits) of a 1-D tensor (the lowest index among equal maxima), via topk, which
    is faster than argmax on a vocabulary of bf16 values and, like it, runs on one thread (a
    max() would go parallel); topk's own order among equal values is unspecified, hence the min."""
    top = torch.topk(logits, 4)
    ties = top.values == top.values[0]
    if bool(ties.all()):
        return int(torch.argmax(logits))
    return int(top.indices[ties].min())


def quantize_lm_head(model: torch.nn.Module, layout: str | None = None) -> QuantizedHead:
    """Symmetric int8 per output row of the model's LM head (V, D): scale = max|row| / 127.

    Any vocabulary size; the tied embedding or a separate head, whichever `get_output_embeddings()`
    gives. layout None = "tiles" where the native kernel is available (and D % 4 == 0,
    D <= 16384), else "rows". The model and its head are only read. Takes seconds: the engine does
    it once, in its loop thread, before its first job.
    """
    w = model.get_output_embeddings().weight.detach()  # (V, D): the embedding's storage when tied
    v, d = w.shape
    tiles_ok = d % _TILE_COLS == 0 and d <= _MAX_TILE_D  # the kernel's limits
    if layout is None:
        layout = "tiles" if tiles_ok and native_int8_kernel() is not None else "rows"
    if layout not in ("rows", "tiles") or (layout == "tiles" and not tiles_ok):
        raise ValueError(f"layout must be 'rows' or 'tiles' (D % 4 == 0, D <= {_MAX_TILE_D}), got {layout!r}")
    # tiles: whole tiles of 16 rows, the rows past V zero (their logits are never written)
    q = torch.zeros(-(-v // _TILE_ROWS) * _TILE_ROWS if layout == "tiles" else v, d, dtype=torch.int8)
    scale = torch.empty(v, dtype=torch.float32)
    half = torch.empty(v, dtype=torch.float32)
    w_max = 0.0
    chunk = 16384  # rows at a time (a multiple of 16): an fp32 copy of the whole head would be 671 MB at once
    for i in range(0, v, chunk):
        wf = w[i : i + chunk].float()
        # Quantise against the bf16-rounded scale itself (torch's kernel takes bf16 scales), so
        # that q * scale is the nearest grid point; the clamp costs at most 127 * 2**-9 of a step.
        s = (wf.abs().amax(dim=1).clamp_min(1e-30) / 127.0).to(torch.bfloat16).float()
        qi = torch.round(wf / s[:, None]).clamp_(-127, 127)
        scale[i : i + chunk] = s
        half[i : i + chunk] = (qi * s[:, None] - wf).abs().amax(dim=1) * (1 + 2**-20)
        w_max = max(w_max, float(wf.abs().max()))
        qi = qi.to(torch.int8)
        n = qi.shape[0]
        if layout == "tiles":  # 16 rows x 4 columns contiguous: the kernel's read order
            full = -(-n // _TILE_ROWS) * _TILE_ROWS
            qi = F.pad(qi, (0, 0, 0, full - n))
            qi = qi.view(full // _TILE_ROWS, _TILE_ROWS, d // _TILE_COLS, _TILE_COLS).transpose(1, 2).reshape(full, d)
            n = full
        q[i : i + n] = qi
    return QuantizedHead(codes=q, layout=layout, scale=scale, scale_bf16=scale.to(torch.bfloat16),
                         exact=w, half_step=half, half_max=float(half.max()), w_max=w_max)


class QuantizedLMHead(torch.nn.Module):
    """A drop-in `lm_head` module over a QuantizedHead: (B, T, D) -> (B, T, V) fp32 logits.

    For measuring the int8 head inside `generate()`; note that greedy `generate()` then takes the
    argmax of the int8 logits, not the exact one (`pick_tokens` keeps it exact).
    """

    def __init__(self, head: QuantizedHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)


def pick_tokens(hidden: torch.Tensor, head: QuantizedHead, rows: Sequence[RowSampling], sampler: BatchSampler,
                out: torch.Tensor | None = None) -> list[int]:
    """The next token of each row from final hidden states (n, D) through the int8 head.

    Greedy rows: exactly the bf16 head's argmax (`QuantizedHead.greedy_token`); with a repetition
    penalty, which reorders tokens, or suppressed tokens, the row's exact bf16 logits go through
    the sampler instead.
    Sampled rows: int8 logits with the RESCORE_K largest replaced by exact ones, then `sampler`
    (each row's own parameters and generator). Every row's numbers come from its own hidden state
    only (the candidate search treats each row of a batch alone), so a reply does not depend on
    the batch.
    out: an (n, V) fp32 buffer to reuse.
    """
    n = hidden.shape[0]
    logits = head.logits(hidden, out=out)  # (n, V) fp32
    # (n, k) descending: the block-maxima search reads the logits once, where torch.topk makes
    # several passes (in the engine's main thread, where parallel regions are cheap)
    top_values, top_ids = top_candidates(logits, RESCORE_K)
    kth = top_values[:, -1].tolist()
    tokens = [0] * n
    rest, penalised = [], []
    with single_threaded():  # one small matmul per row: a parallel region would cost more than it
        for i, r in enumerate(rows):
            p = r.params
            h = hidden[i : i + 1]
            if p.greedy and p.repetition_penalty == 1.0:
                token = head.greedy_token(h, logits[i], top=(top_ids[i], kth[i]))[0]
                # Suppressing tokens only lowers their logits: the argmax stands unless it is one.
                if r.suppress is None or not bool((r.suppress == token).any()):
                    tokens[i] = token
                else:
                    penalised.append(i)
            elif p.greedy:
                penalised.append(i)
            else:
                head.make_exact(logits[i], h, top_ids[i])
                rest.append(i)
    for i in penalised:  # the whole bf16 row (the slow way), as the model's head computes it
        logits[i].copy_(F.linear(hidden[i : i + 1], head.exact)[0])
    rest = sorted(rest + penalised)
    if rest:
        sub = logits if len(rest) == n else logits[torch.tensor(rest)]
        for i, tok in zip(rest, sampler.sample(sub, [rows[i] for i in rest]).tolist()):
            tokens[i] = tok
    return tokens
