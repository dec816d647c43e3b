"""GPTQ's column loop on the NF4 grid in C (gptq.c), its binding, the check against torch, and
torch's own ops (`torch_batch`).

GPTQ rounds a weight one column at a time and moves each column's rounding error onto the columns
not yet rounded (generation/rounding/nf4grid.py). In torch each column costs several small ops
whose Python dispatch outweighs their arithmetic, for every column of every layer on the first
start. `gptq_batch()` gives one call per lazy batch of columns instead, with the same
indices: the C code replays torch's operations in torch's order, and is checked against
`torch_batch` on random problems before it is used (torch's ops run where they differ, where it
cannot be built, or with ATTN_LAB_NATIVE=0).
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Callable

import torch

from .build import KernelStatus, load_checked

__all__ = ["GptqBatch", "check_against_torch", "gptq_batch", "torch_batch"]

NATIVE = "native GPTQ column loop"
FALLBACK = "torch ops"

GptqBatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      torch.Tensor], None]

_lock = threading.Lock()
_state: dict[str, object] = {}


def torch_batch(wb: torch.Tensor, scale: torch.Tensor, ub: torch.Tensor, code: torch.Tensor, mid: torch.Tensor,
                index: torch.Tensor, err: torch.Tensor) -> None:
    """One lazy batch, in place. wb (bn, out) fp32: the batch's columns as rows (updated); scale
    (bn, out) fp32: each value's block scale; ub (bn, bn) fp32: the batch's block of the upper
    Cholesky factor of the inverse Hessian; code (16,), mid (15,) fp32: the NF4 codes and their
    midpoints. Writes index (bn, out) int64 (the chosen codes) and err (bn, out) fp32 (each
    column's scaled rounding error, for the columns after the batch)."""
    for j in range(wb.shape[0]):
        col, s = wb[j], scale[j]  # (out,)
        idx = torch.bucketize((col / s).clamp(-1, 1), mid)  # (out,) the nearest code
        index[j] = idx
        e = torch.div(col - code[idx] * s, ub[j, j], out=err[j])  # (out,)
        # The error, onto the batch's later columns: products rounded, then subtracted (addr_ would
        # leave the fusing of the two to whatever BLAS torch carries, and C could not replay it).
        wb[j + 1 :].sub_(torch.outer(ub[j, j + 1 :], e))


class _Native:
    """gptq.c's gptq_nf4_batch with `torch_batch`'s signature (no checks: gptq_nf4 passes fp32
    tensors with contiguous rows, int64 index)."""

    def __init__(self, lib: ct.CDLL) -> None:
        self.fn = lib.gptq_nf4_batch

    def __call__(self, wb, scale, ub, code, mid, index, err) -> None:
        bn, out = wb.shape
        self.fn(bn, out, wb.data_ptr(), scale.data_ptr(), ub.data_ptr(), ub.stride(0), code.data_ptr(),
                mid.data_ptr(), index.data_ptr(), err.data_ptr())


def _bind(lib: ct.CDLL) -> _Native:
    i64, ptr = ct.c_int64, ct.c_void_p
    # void gptq_nf4_batch(int64_t bn, int64_t out, float *wb, const float *scale, const float *ub, int64_t ld_u,
    #                     const float *code, const float *mid, int64_t *index, float *err);
    lib.gptq_nf4_batch.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr]
    lib.gptq_nf4_batch.restype = None
    return _Native(lib)


def _problem(bn: int, out: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random batch as gptq_nf4 makes one: a column block of a larger upper triangular factor with
    a positive diagonal (row stride > bn)."""
    x = torch.randn(4 * bn + 8, bn + 3, generator=gen)
    u = torch.linalg.cholesky(x.T @ x, upper=True).contiguous()
    wb = torch.randn(bn, out, generator=gen) * 0.05
    scale = (torch.rand(bn, out, generator=gen) * 0.1 + 0.01)
    return wb, scale, u[2 : 2 + bn, 2 : 2 + bn]


def check_against_torch(kernel: GptqBatch, sizes: tuple[tuple[int, int], ...] = ((1, 1), (5, 70), (128, 130), (37, 640)),
                        seed: int = 0) -> str | None:
    """None if `kernel` gives `torch_batch`'s indices, errors and updated columns bit for bit on
    random batches of these (columns, outputs) sizes and a random grid of 16 codes, else what differed."""
    gen = torch.Generator().manual_seed(seed)
    code = torch.cat([torch.tensor([-1.0]), torch.rand(14, generator=gen) * 2 - 1, torch.tensor([1.0])]).sort().values
    mid = (code[1:] + code[:-1]) / 2
    for bn, out in sizes:
        wb, scale, ub = _problem(bn, out, gen)
        got = (wb.clone(), torch.empty(bn, out, dtype=torch.long), torch.empty(bn, out))
        want = (wb.clone(), torch.empty(bn, out, dtype=torch.long), torch.empty(bn, out))
        kernel(got[0], scale, ub, code, mid, got[1], got[2])
        torch_batch(want[0], scale, ub, code, mid, want[1], want[2])
        for name, a, b in zip(("columns", "indices", "errors"), got, want):
            if not torch.equal(a, b):
                return f"{name} of a {bn} x {out} batch"
    return None


def gptq_batch() -> tuple[GptqBatch, KernelStatus]:
    """What runs one lazy batch here: the C loop where it is built and gives torch's bits, else
    `torch_batch`; and why. ATTN_LAB_NATIVE is read at every call; the build and the check happen
    once per process."""
    kernel, status = load_checked(_state, _lock, "gptq", native=NATIVE, fallback=FALLBACK, bind=_bind,
                                  check=check_against_torch, agrees="torch's bits, checked here", differs="GPTQ loop",
                                  extra_flags=("-ffp-contract=off", "-fno-fast-math"))
    return (kernel or torch_batch), status
