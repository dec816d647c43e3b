"""The int8 LM head kernel (int8_head.c, AVX512-VNNI): bindings and its once-per-process loading.

Where it cannot run (ATTN_LAB_NATIVE=0, no C compiler, a CPU without AVX512-VNNI) the int8 head
uses torch's aten._weight_int8pack_mm on the row layout instead (`generation.decode.QuantizedHead`);
`native_int8_status()` says which runs, and why.
"""

from __future__ import annotations

import ctypes as ct
import threading
from dataclasses import dataclass

import torch

from .build import KernelStatus, load_library, read_source

__all__ = ["Int8HeadKernel", "native_int8_kernel", "native_int8_status"]

NEEDS = ("avx512f", "avx512bw", "avx512_vnni")  # the CPU flags its intrinsics compile to
NATIVE = "native AVX512-VNNI int8 kernel"
FALLBACK = "torch _weight_int8pack_mm"

_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(frozen=True)
class Int8HeadKernel:
    """The loaded kernel; a call checks nothing: the caller passes tensors of the documented
    layouts and sizes (codes padded to a multiple of 16 rows, K % 4 == 0, K <= 16384)."""

    lib: ct.CDLL

    def __call__(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                 threads: int) -> torch.Tensor:
        """out (M, N) fp32 = scale[n] * sum_k x_hat[m, k] * w[n, k]: x (M, K) fp32 contiguous (as two
        int8 levels, x_hat), codes the int8 tiles (ceil(N/16), K/4, 16, 4) in any contiguous shape
        (rows past N zero), scale (N,) fp32, out contiguous fp32 of M * N values; `threads` OpenMP threads."""
        m, k = x.shape
        n = scale.shape[0]
        if self.lib.int8_head(m, n, k, x.data_ptr(), codes.data_ptr(), scale.data_ptr(), out.data_ptr(), threads):
            raise MemoryError("int8_head: no memory for the packed activations")
        return out


def _bind(lib: ct.CDLL) -> Int8HeadKernel:
    i64, ptr = ct.c_int64, ct.c_void_p
    # int int8_head(int64_t M, int64_t N, int64_t K, const float *x, const int8_t *w, const float *wscale,
    #               float *out, int nthreads);
    lib.int8_head.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ct.c_int]
    lib.int8_head.restype = ct.c_int  # -1: no memory for the packed activations
    return Int8HeadKernel(lib)


def native_int8_kernel() -> Int8HeadKernel | None:
    """The compiled int8 head kernel, or None where it cannot run here (see native_int8_status).

    Built once per machine (cached; ~1 s), loaded once per process: the first call decides, also
    for ATTN_LAB_NATIVE.
    """
    with _lock:
        if "status" not in _state:
            _state["kernel"], _state["status"] = load_library(
                "int8_head", read_source("int8_head.c"), native=NATIVE, fallback=FALLBACK, needs=NEEDS, bind=_bind)
        return _state["kernel"]  # type: ignore[return-value]


def native_int8_status() -> KernelStatus:
    """Which int8 head kernel runs here, and why."""
    native_int8_kernel()
    return _state["status"]  # type: ignore[return-value]
