"""The decode step's attention for every row of a batch in one call (attention.c): bindings, the
error bound it is held to, and the check against torch that comes before any use.

A decode step attends one new query per row to that row's cached keys. torch's
`scaled_dot_product_attention` takes one call per row (the rows' lengths differ), each set up
anew, with a single query row to share out among threads: at a class's 30 rows most of a layer's
attention time is those calls' setup, on one core.
The kernel makes one call per layer: a task per (row, key/value head) over the threads, the
query heads that share the key/value head together (each key read once), in fp32 from the exact
widening of the bf16 inputs to one bf16 rounding of the result.

It does not replay sdpa's order of operations (sdpa's CPU kernel rounds its softmax weights to
bf16 before the weighted sum; this one keeps fp32), so it is held to what its own arithmetic
guarantees: `error_bound` bounds its distance from the exact attention (the float64 sdpa) from
the fp32 rounding of its sums, its exp and its division, and `attention_kernel()` checks it on
random rows before the engine uses it (torch's sdpa row by row where it differs, cannot be built,
or with ATTN_LAB_NATIVE=0).
"""

from __future__ import annotations

import ctypes as ct
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .build import OFF_REASON, KernelStatus, load_checked, native_enabled

__all__ = ["AttentionKernel", "attention_kernel", "error_bound", "exact_attention"]

NATIVE = "native attention kernel"
FALLBACK = "torch sdpa per row"
U = 2.0**-24  # fp32's unit roundoff
_BF16_U = 2.0**-8  # bf16 rounding (8 bits of precision): at most this much of the value

_lock = threading.Lock()
_state: dict[object, object] = {}


@dataclass(frozen=True)
class AttentionKernel:
    """The loaded kernel; a call checks nothing: the caller passes tensors of the layouts below."""

    lib: ct.CDLL

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: torch.Tensor,
                 end: torch.Tensor, scale: float, out: torch.Tensor, threads: int) -> torch.Tensor:
        """out (n, H, hd) bf16 contiguous <- each row b's query heads (query (n, H, hd) bf16, heads
        contiguous, any row stride) attending to keys/values (n, KV, >= end[b], hd) bf16 (contiguous
        head_dim, any other strides) at positions [first[b], end[b]); first, end (n,) int64
        contiguous, first < end; the H / KV query heads of each key/value head side by side."""
        n, h, hd = query.shape
        kv = keys.shape[1]
        if self.lib.attention_rows(n, kv, h // kv, hd, query.data_ptr(), query.stride(0),
                                   keys.data_ptr(), *keys.stride()[:3], values.data_ptr(), *values.stride()[:3],
                                   first.data_ptr(), end.data_ptr(), scale, out.data_ptr(), threads):
            raise MemoryError("attention_rows: no memory for its scratch rows")
        return out


def _bind(lib: ct.CDLL) -> AttentionKernel:
    i64, ptr = ct.c_int64, ct.c_void_p
    # int attention_rows(int64_t n, int64_t kv, int64_t G, int64_t hd, const uint16_t *q, int64_t q_row,
    #                    const uint16_t *keys, int64_t k_row, int64_t k_head, int64_t k_pos,
    #                    const uint16_t *values, int64_t v_row, int64_t v_head, int64_t v_pos,
    #                    const int64_t *first, const int64_t *end, float scale, uint16_t *out, int nthreads);
    lib.attention_rows.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, i64,
                                   ptr, ptr, ct.c_float, ptr, ct.c_int]
    lib.attention_rows.restype = ct.c_int
    return AttentionKernel(lib)


def _gamma(m: int) -> float:
    """The bound on the relative error of m fp32 roundings in a row (Higham's gamma_m)."""
    return m * U / (1 - m * U)


def exact_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: Sequence[int],
                    end: Sequence[int], scale: float) -> torch.Tensor:
    """torch's sdpa in float64 on the same bf16 values, row by row: (n, H, hd) float64."""
    n, h, hd = query.shape
    kv = keys.shape[1]
    outs = []
    for b in range(n):
        k = keys[b : b + 1, :, first[b] : end[b]].double()
        v = values[b : b + 1, :, first[b] : end[b]].double()
        q = query[b].double().view(1, kv, h // kv, hd)
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=False).view(h, hd))
    return torch.stack(outs)


def error_bound(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: Sequence[int],
                end: Sequence[int], scale: float) -> torch.Tensor:
    """(n, H, hd) float64: how far the kernel's output may lie from `exact_attention`, from its arithmetic.

    A score is an fp32 sum of hd exact products, then scaled: off by at most
    scale * gamma_(hd+1) * sum_d |q_d k_d|. Subtracting the row's maximum rounds once (u |s - m|;
    the maximum itself cancels in the normalisation) and expf is within 2u. So each weight is the
    exact one times e^delta_j, |delta_j| <= D, which moves the normalised average by at most
    (e^(2D) - 1) sum_j p_j |v_j|; the weighted sum and the sum of the weights are fp32 sums of
    len terms (gamma_(len+1) each, all weights positive), the division one rounding more; then the
    result rounds to bf16 (by at most 2^-8 of it)."""
    n, h, hd = query.shape
    kv = keys.shape[1]
    bounds = []
    for b in range(n):
        length = end[b] - first[b]
        k = keys[b, :, first[b] : end[b]].double()  # (KV, S, hd)
        v = values[b, :, first[b] : end[b]].double()
        q = query[b].double().view(kv, h // kv, hd)
        s = scale * q @ k.transpose(-1, -2)  # (KV, G, S)
        mass = scale * q.abs() @ k.abs().transpose(-1, -2)  # (KV, G, S)
        d = _gamma(hd + 1) * mass + 2 * U * (s - s.amax(-1, keepdim=True)).abs() + 2 * U
        p = torch.softmax(s, -1)
        spread = (p @ v.abs()).view(h, hd)  # sum_j p_j |v_j|
        grow = torch.expm1(2 * d.amax(-1)).reshape(h, 1)  # (H, 1)
        err = (grow + 2 * _gamma(length + 2) * (1 + grow)) * spread  # the sums over weights up to e^(2D) p_j
        o = (p @ v).view(h, hd).abs()
        bounds.append(err + _BF16_U * (o + err))
    return torch.stack(bounds)


def check_against_exact(kernel: AttentionKernel, group: int, hd: int, seed: int = 0) -> str | None:
    """None if the kernel lies within `error_bound` of the exact attention on random rows with
    `group` query heads per key/value head of size hd (rows of several lengths, one of a single
    position, a window that starts past 0, strided caches), else what differed."""
    g = torch.Generator().manual_seed(seed)
    kv, cap = 2, 96
    for n in (1, 5):
        q_buf = (torch.randn(n, kv * group + 1, hd, generator=g) * 3).bfloat16()  # one head more: a strided row
        query = q_buf[:, : kv * group]
        keys = (torch.randn(n, kv, cap, hd, generator=g) * 3).bfloat16()
        values = (torch.randn(n, kv, cap, hd, generator=g) * torch.logspace(-2, 1, hd)).bfloat16()
        end = torch.randint(1, cap + 1, (n,), generator=g)
        end[0] = 1
        first = torch.clamp(end - torch.randint(1, cap, (n,), generator=g), min=0)
        first[0] = 0
        out = torch.empty(n, kv * group, hd, dtype=torch.bfloat16)
        kernel(query, keys, values, first, end, 1 / math.sqrt(hd), out, 2)
        ends, firsts = end.tolist(), first.tolist()
        want = exact_attention(query, keys, values, firsts, ends, 1 / math.sqrt(hd))
        bound = error_bound(query, keys, values, firsts, ends, 1 / math.sqrt(hd))
        if not bool(((out.double() - want).abs() <= bound).all()):
            return f"attention of {n} rows, {group} x {hd}"
    return None


def attention_kernel(group: int, hd: int) -> tuple[AttentionKernel | None, KernelStatus]:
    """The kernel, checked here for `group` query heads per key/value head of size hd, and its
    status; (None, torch's sdpa and why) where it is off (ATTN_LAB_NATIVE=0, read at every call),
    cannot be built here, or lies outside its error bound."""
    if not native_enabled():
        return None, KernelStatus(FALLBACK, False, OFF_REASON)
    key = ("checked", group, hd)

    def first_check(k: AttentionKernel) -> str | None:  # the first shape asked for; kept for the next asks
        _state[key] = check_against_exact(k, group, hd)
        return _state[key]

    kernel, status = load_checked(_state, _lock, "attention", native=NATIVE, fallback=FALLBACK, bind=_bind,
                                  check=first_check, agrees="within its error bound", differs="attention kernel")
    if kernel is None:
        return None, status
    with _lock:
        if key not in _state:
            _state[key] = check_against_exact(kernel, group, hd)
        diff = _state[key]
    if diff is not None:
        return None, KernelStatus(FALLBACK, False, f"the native attention kernel is off its error bound in the {diff}")
    return kernel, status
