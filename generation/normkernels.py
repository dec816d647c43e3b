"""The decode step's small per-layer maths (Gemma 3's RMSNorms, residual adds, q/k norms and RoPE)
as a few C loops, giving torch's own bits.

At one row a decode step of the 270M model spends ~1.5 ms of its ~6 in these: torch runs each
RMSNorm of a (1, 640) row as ~10 small ops (pow, sum, div, add, rsqrt, mul, mul, casts), ~14 us
in all, 90 of them a step. Here each layer makes three calls instead:

* `add_rms`: x <- bf16(x + bf16(rms(o) * w1)); h <- bf16(rms(x) * w2) (a residual add with its
  post-norm, then the next pre-norm);
* `qk_norm_rope`: every q and k head normed with its own weight, then rotated, in place;
* `rms`: one RMSNorm (the first layer's input norm).

The numbers are torch's, bit for bit, because every step is one IEEE operation in torch's order:
the sum of squares as ATen's vectorized inner sum adds them on this CPU (8 lanes, 4 accumulators,
its cascade of levels, then the lanes in order), mean = sum / d, 1 / sqrt(mean + eps), then
(x * r) * w, and every bf16 result rounded to nearest even as c10::BFloat16 does. That order is
ATen's implementation, not its contract, so `norm_kernels()` checks the kernels against torch on
random rows of the model's sizes before the engine uses them, and falls back to torch where they
differ (another torch, another CPU). Compiled with -ffp-contract=off: a fused multiply-add would
round once where torch rounds twice.
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_SRC = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define LANES 8
#define ILP 4
#define LEVELS 4

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t b = 0; uint64_t v = (uint64_t)(x - 1);
    while (v) { b++; v >>= 1; }
    return b;
}

/* ATen's float sum of a contiguous row: vectors of LANES, ILP rows of a cascade (multi_row_sum). */
static float row_sum(const float *x, int64_t d) {
    const int64_t nvec = d / LANES, size = nvec / ILP;
    int64_t power = ceil_log2(size) / LEVELS;
    if (power < 4) power = 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[LEVELS][ILP][LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) acc[0][k][l] += x[(i * ILP + k) * LANES + l];
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) { acc[j][k][l] += acc[j - 1][k][l]; acc[j - 1][k][l] = 0.f; }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += x[(i * ILP + k) * LANES + l];
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = size * ILP; v < nvec; v++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += x[v * LANES + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += acc[0][k][l];
    float f = 0.f;
    for (int64_t t = nvec * LANES; t < d; t++) f += x[t];
    for (int l = 0; l < LANES; l++) f += acc[0][0][l];
    return f;
}

/* y = (xf * r) * w in fp32, r = 1 / sqrt(mean(xf^2) + eps): F.rms_norm(x.float(), (d,), w, eps)
   (w NULL: no weight, y = xf * r); sq: d floats of scratch */
static void rms_f32(const float *xf, int64_t d, const float *w, float eps, float *y, float *sq) {
    for (int64_t j = 0; j < d; j++) sq[j] = xf[j] * xf[j];
    const float mean = row_sum(sq, d) / (float)d;
    const float r = 1.0f / sqrtf(mean + eps);
    for (int64_t j = 0; j < d; j++) y[j] = w ? (xf[j] * r) * w[j] : xf[j] * r;
}

/* out[b] = bf16(rms(x[b]) * w) for n rows of d (row strides in elements) */
int rms_rows(int64_t n, int64_t d, const uint16_t *x, int64_t xs, const float *w, float eps,
              uint16_t *out, int64_t os) {
    float *xf = malloc(3 * d * sizeof(float)), *y = xf + d, *sq = y + d;  /* heap: any thread's stack */
    if (!xf) return -1;
    for (int64_t b = 0; b < n; b++) {
        for (int64_t j = 0; j < d; j++) xf[j] = bf2f(x[b * xs + j]);
        rms_f32(xf, d, w, eps, y, sq);
        for (int64_t j = 0; j < d; j++) out[b * os + j] = f2bf(y[j]);
    }
    free(xf);
    return 0;
}

/* x[b] = bf16(x[b] + bf16(rms(o[b]) * w1)); h[b] = bf16(rms(x[b]) * w2); x, h: (n, d) contiguous */
int add_rms_rows(int64_t n, int64_t d, uint16_t *x, const uint16_t *o, int64_t ostride, const float *w1,
                  const float *w2, float eps, uint16_t *h) {
    float *xf = malloc(3 * d * sizeof(float)), *y = xf + d, *sq = y + d;
    if (!xf) return -1;
    for (int64_t b = 0; b < n; b++) {
        for (int64_t j = 0; j < d; j++) xf[j] = bf2f(o[b * ostride + j]);
        rms_f32(xf, d, w1, eps, y, sq);
        for (int64_t j = 0; j < d; j++) {
            const uint16_t v = f2bf(bf2f(x[b * d + j]) + bf2f(f2bf(y[j])));
            x[b * d + j] = v;
            xf[j] = bf2f(v);
        }
        rms_f32(xf, d, w2, eps, y, sq);
        for (int64_t j = 0; j < d; j++) h[b * d + j] = f2bf(y[j]);
    }
    free(xf);
    return 0;
}

/* In place, row b's `heads` heads of hd at qk + b * qs: y = bf16(rms(head) * w[head]) (no weight
   inside the norm, w after it, as transformers' Gemma3RMSNorm over q/k), then RoPE at position
   pos[b]: bf16(bf16(y * cos) + bf16(roll(y, hd / 2) * sin_signed)), cos/sin rows of (len, hd). */
int qk_norm_rope(int64_t n, int64_t heads, int64_t hd, uint16_t *qk, int64_t qs, const float *w, float eps,
                  const uint16_t *cos, const uint16_t *sin, const int64_t *pos) {
    float *xf = malloc(3 * hd * sizeof(float)), *y = xf + hd, *sq = y + hd;
    if (!xf) return -1;
    const int64_t half = hd / 2;
    for (int64_t b = 0; b < n; b++) {
        const uint16_t *c = cos + pos[b] * hd, *s = sin + pos[b] * hd;
        for (int64_t hh = 0; hh < heads; hh++) {
            uint16_t *p = qk + b * qs + hh * hd;
            const float *wh = w + hh * hd;
            for (int64_t j = 0; j < hd; j++) xf[j] = bf2f(p[j]);
            rms_f32(xf, hd, NULL, eps, y, sq);  /* the norm without weight; w[head] after it */
            for (int64_t j = 0; j < hd; j++) xf[j] = bf2f(f2bf(y[j] * wh[j]));
            for (int64_t j = 0; j < hd; j++) {
                const float a = bf2f(f2bf(xf[j] * bf2f(c[j])));
                const float r = bf2f(f2bf(xf[(j + half) % hd] * bf2f(s[j])));
                p[j] = f2bf(a + r);
            }
        }
    }
    free(xf);
    return 0;
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(frozen=True)
class NormKernels:
    """The compiled kernels (ctypes functions); each call checks nothing, the caller passes
    contiguous bf16 rows and fp32 weights of the sizes `norm_kernels()` verified."""

    lib: ct.CDLL

    def rms(self, x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        """out (n, d) bf16 = bf16(F.rms_norm(x.float(), (d,), w, eps)); x (n, d) bf16 with
        contiguous rows (any row stride), w (d,) fp32."""
        n, d = x.shape
        if self.lib.rms_rows(n, d, x.data_ptr(), x.stride(0), w.data_ptr(), eps, out.data_ptr(), out.stride(0)):
            raise MemoryError("rms_rows: no memory for its scratch row")
        return out

    def add_rms(self, x: torch.Tensor, o: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float,
                h: torch.Tensor) -> None:
        """In place: x += rms(o) * w1 (bf16, as `x + _rms(o, w1)`), then h = rms(x) * w2.
        x, h (n, d) contiguous bf16; o (n, d) bf16 rows (any row stride); w1, w2 (d,) fp32."""
        n, d = x.shape
        if self.lib.add_rms_rows(n, d, x.data_ptr(), o.data_ptr(), o.stride(0), w1.data_ptr(), w2.data_ptr(), eps,
                                 h.data_ptr()):
            raise MemoryError("add_rms_rows: no memory for its scratch rows")

    def qk_norm_rope(self, qk: torch.Tensor, heads: int, hd: int, w: torch.Tensor, eps: float,
                     cos: torch.Tensor, sin_signed: torch.Tensor, pos: torch.Tensor) -> None:
        """In place on qk (n, >= heads * hd) bf16 (contiguous heads, any row stride): each head
        normed (F.rms_norm without weight, times w (heads, hd) fp32, to bf16), then rotated at
        position pos[b] ((n,) int64) with the (len, hd) bf16 tables cos and signed sin."""
        n = qk.shape[0]
        if self.lib.qk_norm_rope(n, heads, hd, qk.data_ptr(), qk.stride(0), w.data_ptr(), eps, cos.data_ptr(),
                                 sin_signed.data_ptr(), pos.data_ptr()):
            raise MemoryError("qk_norm_rope: no memory for its scratch rows")


def _load() -> NormKernels:
    from .fastpath import build_native

    lib = build_native("normkernels", _SRC, extra_flags=("-ffp-contract=off", "-fno-fast-math"))
    i64, f32, ptr = ct.c_int64, ct.c_float, ct.c_void_p
    for name, args in (("rms_rows", [i64, i64, ptr, i64, ptr, f32, ptr, i64]),
                       ("add_rms_rows", [i64, i64, ptr, ptr, i64, ptr, ptr, f32, ptr]),
                       ("qk_norm_rope", [i64, i64, i64, ptr, i64, ptr, f32, ptr, ptr, ptr])):
        fn = getattr(lib, name)
        fn.restype = ct.c_int  # -1: out of memory for its scratch rows
        fn.argtypes = args
    return NormKernels(lib)


# --- torch's own ops: what the kernels must equal ----------------------------------------------


def torch_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm of bf16 rows x (n, d) with w = 1 + weight (d,) fp32 -> (n, d) bf16."""
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)


def torch_qk_norm_rope(qk: torch.Tensor, w: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin_signed: torch.Tensor) -> torch.Tensor:
    """qk (n, heads, hd) bf16, w (heads, hd) fp32, cos/sin_signed (n, 1, hd) bf16 -> (n, heads, hd) bf16."""
    hd = qk.shape[-1]
    qk = (F.rms_norm(qk.float(), (hd,), None, eps) * w).to(torch.bfloat16)
    return qk * cos + torch.roll(qk, hd // 2, -1) * sin_signed


def check_against_torch(k: NormKernels, d: int, heads: int, hd: int, eps: float, rows: Sequence[int] = (1, 3, 30),
                        seed: int = 0) -> str | None:
    """None if the kernels give torch's bits on random rows of these sizes, else what differed."""
    g = torch.Generator().manual_seed(seed)
    for n in rows:
        # Activations of several magnitudes, as a residual stream has them.
        x = (torch.randn(n, d, generator=g) * torch.logspace(-2, 2, d)[torch.randperm(d, generator=g)]).bfloat16()
        o = (torch.randn(n, d, generator=g) * 30).bfloat16()
        w1, w2 = 1 + torch.randn(d, generator=g) * 0.3, 1 + torch.randn(d, generator=g) * 0.3
        if not torch.equal(k.rms(x, w1, eps, torch.empty_like(x)), torch_rms(x, w1, eps)):
            return f"rms of {n} x {d}"
        want_x = x + torch_rms(o, w1, eps)
        want_h = torch_rms(want_x, w2, eps)
        got_x, got_h = x.clone(), torch.empty_like(x)
        k.add_rms(got_x, o, w1, w2, eps, got_h)
        if not (torch.equal(got_x, want_x) and torch.equal(got_h, want_h)):
            return f"add + rms of {n} x {d}"
        length = 64
        qk = (torch.randn(n, heads + 1, hd, generator=g) * 4).bfloat16()  # one head more: a strided row
        w = 1 + torch.randn(heads, hd, generator=g) * 0.3
        cos = torch.randn(length, hd, generator=g).bfloat16()
        sin = torch.randn(length, hd, generator=g).bfloat16()
        pos = torch.randint(0, length, (n,), generator=g)
        want = torch_qk_norm_rope(qk[:, :heads], w, eps, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
        got = qk.clone()
        k.qk_norm_rope(got.view(n, -1), heads, hd, w, eps, cos, sin, pos)
        if not (torch.equal(got[:, :heads], want) and torch.equal(got[:, heads:], qk[:, heads:])):
            return f"q/k norm + RoPE of {n} x {heads} x {hd}"
    return None


def norm_kernels(d: int, heads: int, hd: int, eps: float) -> tuple[NormKernels | None, str]:
    """The kernels for hidden size d and `heads` q+k heads of hd, checked against torch here, and
    one line saying so; (None, why) where they cannot be built or differ from torch.
    ATTN_LAB_NATIVE=0 turns them off (as the int8 head kernel)."""
    from .fastpath import _native_enabled

    if not _native_enabled():
        return None, "torch ops (native kernels off: ATTN_LAB_NATIVE=0)"
    with _lock:
        if "kernels" not in _state:
            try:
                _state["kernels"], _state["why"] = _load(), None
            except Exception as exc:  # no compiler, a failed build: torch's ops, and say why
                _state["kernels"], _state["why"] = None, f"torch ops (native kernels unavailable: {exc})"
        k = _state["kernels"]
        if k is None:
            return None, str(_state["why"])
        key = ("checked", d, heads, hd, eps)
        if key not in _state:
            _state[key] = check_against_torch(k, d, heads, hd, eps)
        diff = _state[key]
    if diff is not None:
        return None, f"torch ops (the native norm kernels differ from this torch in the {diff})"
    return k, "native norm kernels (torch's bits, checked here)"
