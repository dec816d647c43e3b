"""Output-aware rounding of one weight matrix onto bitsandbytes' NF4 grid.

bitsandbytes stores a 4-bit weight as blocks of `BLOCK` consecutive values of a row (row-major
flattening of the (out, in) matrix): a 4-bit index into the 16 NF4 code values and one fp32 scale
per block, itself stored in 8 bits ("double quantization": 256 scales share an fp32 absmax, after
subtracting the mean of all scales). A block dequantizes as code[index] * scale. Plain NF4 takes the
block's largest magnitude as its scale and rounds each value to the nearest code; nothing in the
format requires either choice, so here both are chosen to keep the layer's *output* close:

- `gptq_nf4`: the indices, column by column, each rounding error spread over the columns not yet
  rounded in proportion to the inverse input Hessian (GPTQ, Frantar et al. 2022), on the NF4 grid
  with the block scales held fixed;
- `refit_scales`: then, codes fixed, each row's block scales by least squares on the output error
  (the scale is free: "absmax" is just a name). The two can take turns (`GptqConfig.rounds`): the
  codes chosen again under the refit scales, then the scales again.

The objective for one output row w (in,) and its rounded copy q is (w - q)^T H (w - q) with
H = X^T X over calibration inputs X (n, in): the squared error the row adds to the layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import block_gram, gptq_batch

# The calibrated snapshot's NF4 blocksize: bitsandbytes' smallest, half its default of 64 (which plain
# NF4 keeps). Each scale is chosen for the output, so more of them buy more; they cost 1/8 bit more a
# weight (bench/README.md, "What was measured on the way").
BLOCK = 32
NESTED_BLOCK = 256  # bitsandbytes' blocksize for the double-quantized scales

# bitsandbytes' NF4 code book (ascending; index 7 is 0.0), as bitsandbytes.functional.get_4bit_type("nf4").
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # (15,)


def nearest_index(x: Tensor) -> Tensor:
    """Index of the nearest NF4 code for values already divided by their block scale (clipped to [-1, 1])."""
    return torch.bucketize(x.clamp(-1, 1), NF4_MIDPOINTS.to(x.device))  # same shape as x, int64


def block_absmax(w: Tensor) -> Tensor:
    """Plain NF4's scales: each block's largest magnitude. w (out, in) -> (out, in // BLOCK)."""
    out, n = w.shape
    return w.float().reshape(out, n // BLOCK, BLOCK).abs().amax(-1)  # (out, G)


def double_quantize(scales: Tensor) -> tuple[Tensor, Tensor, Tensor, object]:
    """Scales (out, G) fp32 -> (what bitsandbytes will dequantize them to (out, G), the 8-bit
    codes, the offset, the nested state), exactly as Linear4bit's double quantization stores them."""
    import bitsandbytes.functional as F

    flat = scales.reshape(-1).float().contiguous()
    offset = flat.mean()
    q8, state2 = F.quantize_blockwise(flat - offset, blocksize=NESTED_BLOCK)
    back = F.dequantize_blockwise(q8, state2) + offset
    return back.reshape(scales.shape), q8, offset, state2


def dequantize(index: Tensor, scales: Tensor) -> Tensor:
    """(out, in) indices and (out, G) scales -> the fp32 weight they stand for."""
    out, n = index.shape
    code = NF4_CODE.to(index.device)[index].reshape(out, n // BLOCK, BLOCK)
    return (code * scales.unsqueeze(-1)).reshape(out, n)  # (out, in)


def round_to_nearest(w: Tensor, scales: Tensor) -> Tensor:
    """Plain rounding with the given scales: w (out, in), scales (out, G) -> indices (out, in)."""
    out, n = w.shape
    s = scales.repeat_interleave(BLOCK, dim=1)  # (out, in)
    return nearest_index(w.float() / s.clamp(min=1e-30))


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ's knobs: damping as a fraction of the mean Hessian diagonal, columns per lazy batch,
    whether columns go in order of decreasing Hessian diagonal (scales stay per block), how many
    times codes (GPTQ) and block scales (least squares) are chosen in turn, each for the other, and
    `toward_full`: how far the target of each linear that reads the residual stream moves from its
    full-precision weight towards the one that maps the rounded model's inputs onto the
    full-precision model's outputs (calibrate.py; 0: GPTQ's usual target)."""

    damp: float = 0.01
    batch: int = 128
    act_order: bool = True
    rounds: int = 1
    toward_full: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be positive, got {self.batch!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be positive, got {self.rounds!r}")
        if not 0 <= self.toward_full <= 1:
            raise ValueError(f"toward_full must be in [0, 1], got {self.toward_full!r}")


def _damped(h: Tensor, damp: float) -> Tensor:
    """H + damp * mean(diag H) * I: GPTQ's objective, pulled towards plain rounding (a copy)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return h


def _damped_inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as GPTQ uses it."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, damp)))
    return torch.linalg.cholesky(hinv, upper=True)


def toward_full_output(w: Tensor, h: Tensor, cross: Tensor, *, damp: float, toward: float) -> Tensor:
    """The weight to round in place of w (out, in), for a layer whose input in the rounded model, X~
    (Hessian h = X~^T X~ / n), differs from the full-precision model's X (cross = X^T X~ / n): the
    rows W* minimising |X w - X~ W*|^2 + damping's pull towards w, with the damping GPTQ uses,
    W* = w (cross + lam I)(h + lam I)^-1, lam = damp * mean(diag h); then w + toward * (W* - w).
    Around W*, GPTQ's damped objective differs from the error against the full model's output by a
    constant only, so the codes and scales chosen for it need nothing else (GPTAQ's asymmetric
    calibration, Li et al. 2025; `toward` < 1 because the whole way fits the calibration text too
    closely: bench/README.md)."""
    w = w.float()
    h = h.float()
    lam = damp * h.diagonal().mean()
    rhs = cross.float().T @ w.T + lam * w.T  # (in, out): (C^T + lam I) w^T
    chol = torch.linalg.cholesky(_damped(h, damp))  # H + lam I is symmetric positive definite
    star = torch.cholesky_solve(rhs, chol).T  # (out, in): w (C + lam I)(H + lam I)^-1
    return w + toward * (star - w)  # (out, in)


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ needs of a Hessian, computed once for every weight and round that share it: the
    column order and the upper Cholesky factor of the damped inverse Hessian in that order."""

    perm: Tensor  # (in,) int64
    u: Tensor  # (in, in) fp32 upper, contiguous


def gptq_factor(h: Tensor, cfg: GptqConfig = GptqConfig()) -> GptqFactor:
    """GPTQ's column order and inverse-Hessian factor for Hessian h (in, in) (on the CPU)."""
    h = h.detach().float().cpu().clone()
    dead = h.diagonal() == 0  # inputs never seen: any code is as good; keep the plain one
    h[dead, dead] = 1
    n = h.shape[0]
    # stable: equal diagonals (the dead inputs all read 1) in index order on every CPU
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if cfg.act_order else torch.arange(n)
    return GptqFactor(perm, _damped_inverse_cholesky(h[perm][:, perm], cfg.damp).contiguous())


def gptq_nf4(w: Tensor, h: Tensor, scales: Tensor, cfg: GptqConfig = GptqConfig(), *,
             factor: GptqFactor | None = None) -> Tensor:
    """NF4 indices (out, in) for w (out, in) under fixed block scales (out, G), minimising the
    output error for inputs with Hessian h (in, in), column by column with error feedback (on the
    CPU, where the column loop can run as C). `factor`: gptq_factor(h, cfg), where calls share h."""
    f = factor or gptq_factor(h, cfg)
    perm, u = f.perm, f.u
    out, n = w.shape
    # Columns as contiguous rows (in, out): each step reads and updates whole rows, not strided columns.
    wt = w.detach().float().cpu()[:, perm].T.contiguous()  # (in, out)
    col_scale = scales.detach().float().cpu().repeat_interleave(BLOCK, dim=1)[:, perm].clamp(min=1e-30).T.contiguous()  # (in, out)
    batch, _ = gptq_batch()  # the column loop: C where it gives torch's bits
    index = torch.empty(n, out, dtype=torch.long)
    for a in range(0, n, cfg.batch):
        b = min(a + cfg.batch, n)
        err = torch.empty(b - a, out)
        # Column by column: round to the nearest code, the error onto the batch's later columns.
        batch(wt[a:b], col_scale[a:b], u[a:b, a:b], NF4_CODE, NF4_MIDPOINTS, index[a:b], err)  # wt, index in place
        wt[b:].addmm_(u[a:b, b:].T, err, alpha=-1)  # and onto every column after the batch
    return index.T[:, torch.argsort(perm)].contiguous()  # (out, in)


def refit_scales(w: Tensor, h: Tensor, index: Tensor, *, damp: float = 0.0, rows_per_chunk: int = 256) -> Tensor:
    """Least-squares block scales for fixed codes: for each row, the scales s (G,) minimising
    (w - C s)^T H (w - C s), C the (in, G) matrix of the row's code values, one per block; with
    `damp`, H + damp * mean(diag H) * I, the damped objective GPTQ's codes were chosen for.
    Returns (out, G). A block whose codes are all zero keeps scale 0 (it has nothing to scale)."""
    w = w.float()
    h = _damped(h.float(), damp)
    out, n = w.shape
    g = n // BLOCK
    code = NF4_CODE.to(w.device)[index]  # (out, in)
    scales = torch.empty(out, g)
    ridge = 1e-6 * h.diagonal().mean()
    gram, _ = block_gram()  # C^T H C per row: C where it is within rounding of torch's einsum
    for r0 in range(0, out, rows_per_chunk):
        c = code[r0 : r0 + rows_per_chunk]  # (r, in)
        hw = w[r0 : r0 + rows_per_chunk] @ h  # (r, in)
        rhs = (c * hw).reshape(-1, g, BLOCK).sum(-1)  # (r, G): C^T H w
        a = gram(c, h, BLOCK)  # (r, G, G): the blocks of H weighted by the row's codes, summed
        a.diagonal(dim1=1, dim2=2).add_(ridge)
        scales[r0 : r0 + rows_per_chunk] = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1)
    return scales
