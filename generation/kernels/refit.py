"""The block-scale refit's matrices in C (refit.c), their binding, torch's einsum (`torch_block_gram`)
and the check of one against the other.

refit_scales (generation/rounding/nf4grid.py) solves, for every output row, a (G, G) system whose
matrix sums the input Hessian's (blk, blk) blocks weighted by the row's code values. As one einsum
torch makes a (rows, G, G, blk) intermediate larger than the caches, and on the first start that was
most of the refit's time; refit.c sums straight into the result for a tile of rows at a time, only
its upper half (the matrix is symmetric).

Both compute each entry as nested sums over i and j of blk terms each, but in their own order and
with or without fused multiply-adds: they differ in the last bits. `check_against_torch` holds the
difference to the rounding-error bound of such sums before the C code is used; torch's einsum runs
where they differ by more, where it cannot be built, or with ATTN_LAB_NATIVE=0.
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Callable

import torch

from .build import KernelStatus, load_checked

__all__ = ["BlockGram", "block_gram", "check_against_torch", "gram_error_bound", "torch_block_gram"]

NATIVE = "native block-scale refit"
FALLBACK = "torch einsum"

BlockGram = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

_lock = threading.Lock()
_state: dict[str, object] = {}


def torch_block_gram(c: torch.Tensor, h: torch.Tensor, blk: int) -> torch.Tensor:
    """c (r, n) fp32: each row's code values; h (n, n) fp32 -> (r, G, G) fp32, G = n // blk:
    A[r, g, k] = sum_i c[r, g*blk + i] * sum_j h[g*blk + i, k*blk + j] * c[r, k*blk + j]."""
    g = h.shape[0] // blk
    cb = c.reshape(-1, g, blk)  # (r, G, blk)
    return torch.einsum("rgi,gihj,rhj->rgh", cb, h.reshape(g, blk, g, blk), cb)  # (r, G, G)


def gram_error_bound(c: torch.Tensor, h: torch.Tensor, blk: int) -> torch.Tensor:
    """(r, G, G): how far any two ways of summing `torch_block_gram`'s entries (nested sums over
    i and j, blk terms each) may differ by rounding: 2 * gamma_(2 blk + 1) * the same sums of
    magnitudes, gamma_m = m u / (1 - m u) with fp32's unit roundoff u = 2^-24 (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1)."""
    m = 2 * blk + 1
    u = 2.0**-24
    return 2 * (m * u / (1 - m * u)) * torch_block_gram(c.abs(), h.abs(), blk)


class _Native:
    """refit.c's block_gram with `torch_block_gram`'s signature."""

    def __init__(self, lib: ct.CDLL) -> None:
        self.fn = lib.block_gram

    def __call__(self, c: torch.Tensor, h: torch.Tensor, blk: int) -> torch.Tensor:
        c = c.float().contiguous()
        h = h.float().contiguous()
        rows, n = c.shape
        out = torch.empty(rows, n // blk, n // blk)
        rc = self.fn(rows, n, blk, c.data_ptr(), h.data_ptr(), out.data_ptr())
        if rc == 1:
            raise ValueError(f"block_gram needs blk a multiple of 8 dividing n, got blk={blk}, n={n}")
        if rc != 0:
            raise MemoryError("block_gram could not allocate its tile buffer")
        return out


def _bind(lib: ct.CDLL) -> _Native:
    i64, ptr = ct.c_int64, ct.c_void_p
    # int block_gram(int64_t rows, int64_t n, int64_t blk, const float *c, const float *h, float *a);
    lib.block_gram.argtypes = [i64, i64, i64, ptr, ptr, ptr]
    lib.block_gram.restype = ct.c_int
    return _Native(lib)


def check_against_torch(kernel: BlockGram, sizes: tuple[tuple[int, int], ...] = ((1, 32), (17, 64), (40, 320)),
                        blk: int = 32, seed: int = 0) -> str | None:
    """None if `kernel` gives `torch_block_gram`'s matrices within `gram_error_bound` on random
    problems of these (rows, n) sizes (a tile's worth of rows and a part tile among them), else
    what differed."""
    gen = torch.Generator().manual_seed(seed)
    for rows, n in sizes:
        x = torch.randn(2 * n, n, generator=gen)
        h = x.T @ x / (2 * n)  # (n, n) positive semi-definite, as a Hessian
        c = torch.randn(rows, n, generator=gen)
        got, want = kernel(c, h, blk), torch_block_gram(c, h, blk)
        if got.shape != want.shape or not bool(((got - want).abs() <= gram_error_bound(c, h, blk)).all()):
            return f"matrices of {rows} rows of {n}"
    return None


def block_gram() -> tuple[BlockGram, KernelStatus]:
    """What forms the refit's matrices here: the C code where it is built and within the bound of
    torch's, else `torch_block_gram`; and why. ATTN_LAB_NATIVE is read at every call; the build and
    the check happen once per process."""
    kernel, status = load_checked(_state, _lock, "refit", native=NATIVE, fallback=FALLBACK, bind=_bind,
                                  check=check_against_torch, agrees="within rounding of torch's, checked here",
                                  differs="refit")
    return (kernel or torch_block_gram), status
