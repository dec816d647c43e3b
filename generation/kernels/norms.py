"""The decode step's small per-layer maths (RMSNorms, residual adds, q/k norms and RoPE) in C
(norms.c), giving torch's own bits: bindings, the check against torch, torch's own ops. Two norm
forms, as transformers writes them: "gemma" (normed in fp32 times 1 + w, one rounding) and "llama"
(normed, rounded to bf16, times the bf16 weight: Llama, Qwen2/3, Mistral).

At one row a decode step of the 270M model spends ~1.5 ms of its ~6 in these: torch runs each
RMSNorm of a (1, 640) row as ~10 small ops (pow, sum, div, add, rsqrt, mul, mul, casts), ~14 us
in all, 90 of them a step. Here each layer makes three calls instead:

* `add_rms`: x <- bf16(x + bf16(rms(o) * w1)); h <- bf16(rms(x) * w2) (a residual add with its
  post-norm, then the next pre-norm; without w1 a plain residual add);
* `qk_norm_rope`: every q and k head normed with its own weight (where the family has q/k norms),
  then rotated, in place;
* `rms`: one RMSNorm (the first layer's input norm).

The kernels replay ATen's order of operations (see norms.c). That order is ATen's
implementation, not its contract, so `norm_kernels()` checks the kernels against torch on random
rows of the model's sizes before the engine uses them, and falls back to torch's ops where they
differ (another torch, another CPU), where they cannot be built, or with ATTN_LAB_NATIVE=0.
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .build import OFF_REASON, KernelStatus, load_library, native_enabled, read_source

__all__ = ["NORM_FORMS", "NormKernels", "check_against_torch", "norm_kernels", "norm_weight", "torch_qk_norm_rope",
           "torch_rms"]

NATIVE = "native norm kernels"
FALLBACK = "torch ops"
# The RMSNorm forms and their code in norms.c.
NORM_FORMS = {"gemma": 0, "llama": 1}

_lock = threading.Lock()
_state: dict[object, object] = {}


@dataclass(frozen=True)
class NormKernels:
    """The compiled kernels (ctypes functions) for one norm form ("gemma" or "llama", see
    `torch_rms`); each call checks nothing, the caller passes contiguous bf16 rows and fp32
    weights of the sizes `norm_kernels()` verified."""

    lib: ct.CDLL
    form: str = "gemma"

    @property
    def _code(self) -> int:
        return NORM_FORMS[self.form]

    def rms(self, x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        """out (n, d) bf16 = torch_rms(x, w, eps, form); x (n, d) bf16 with contiguous rows (any
        row stride), w (d,) fp32."""
        n, d = x.shape
        if self.lib.rms_rows(n, d, x.data_ptr(), x.stride(0), w.data_ptr(), eps, out.data_ptr(), out.stride(0),
                             self._code):
            raise MemoryError("rms_rows: no memory for its scratch row")
        return out

    def add_rms(self, x: torch.Tensor, o: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor, eps: float,
                h: torch.Tensor) -> None:
        """In place: x += rms(o) * w1 (bf16, as `x + torch_rms(o, w1)`; w1 None: x += o), then
        h = rms(x) * w2. x, h (n, d) contiguous bf16; o (n, d) bf16 rows (any row stride); w1, w2 (d,) fp32."""
        n, d = x.shape
        if self.lib.add_rms_rows(n, d, x.data_ptr(), o.data_ptr(), o.stride(0), _ptr(w1), w2.data_ptr(), eps,
                                 h.data_ptr(), self._code):
            raise MemoryError("add_rms_rows: no memory for its scratch rows")

    def qk_norm_rope(self, qk: torch.Tensor, heads: int, hd: int, w: torch.Tensor | None, eps: float,
                     cos: torch.Tensor, sin_signed: torch.Tensor, pos: torch.Tensor) -> None:
        """In place on qk (n, >= heads * hd) bf16 (contiguous heads, any row stride): each head
        normed with its row of w (heads, hd) fp32 in this form (None: no q/k norm), then rotated at
        position pos[b] ((n,) int64) with the (len, hd) bf16 tables cos and signed sin."""
        n = qk.shape[0]
        if self.lib.qk_norm_rope(n, heads, hd, qk.data_ptr(), qk.stride(0), _ptr(w), eps, cos.data_ptr(),
                                 sin_signed.data_ptr(), pos.data_ptr(), self._code):
            raise MemoryError("qk_norm_rope: no memory for its scratch rows")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bind(lib: ct.CDLL) -> NormKernels:
    i64, f32, ptr = ct.c_int64, ct.c_float, ct.c_void_p
    # int rms_rows(int64_t n, int64_t d, const uint16_t *x, int64_t xs, const float *w, float eps,
    #              uint16_t *out, int64_t os, int form);
    lib.rms_rows.argtypes = [i64, i64, ptr, i64, ptr, f32, ptr, i64, ct.c_int]
    # int add_rms_rows(int64_t n, int64_t d, uint16_t *x, const uint16_t *o, int64_t ostride, const float *w1,
    #                  const float *w2, float eps, uint16_t *h, int form);
    lib.add_rms_rows.argtypes = [i64, i64, ptr, ptr, i64, ptr, ptr, f32, ptr, ct.c_int]
    # int qk_norm_rope(int64_t n, int64_t heads, int64_t hd, uint16_t *qk, int64_t qs, const float *w, float eps,
    #                  const uint16_t *cos, const uint16_t *sin, const int64_t *pos, int form);
    lib.qk_norm_rope.argtypes = [i64, i64, i64, ptr, i64, ptr, f32, ptr, ptr, ptr, ct.c_int]
    for fn in (lib.rms_rows, lib.add_rms_rows, lib.qk_norm_rope):
        fn.restype = ct.c_int  # -1: out of memory for its scratch rows
    return NormKernels(lib)


def _load() -> tuple[NormKernels | None, KernelStatus]:
    """Build and bind the kernels once per process (the caller holds _lock)."""
    if "kernels" not in _state:
        _state["kernels"], _state["status"] = load_library(
            "norms", read_source("norms.c"), native=NATIVE, fallback=FALLBACK,
            extra_flags=("-ffp-contract=off", "-fno-fast-math"), bind=_bind)
    return _state["kernels"], _state["status"]  # type: ignore[return-value]


# --- torch's own ops: what the kernels must equal ----------------------------------------------


def norm_weight(norm: torch.nn.Module | None, form: str) -> torch.Tensor | None:
    """A norm module's weight as these kernels and `torch_rms` take it: fp32 1 + w (form "gemma")
    or the weight's own values in fp32 ("llama")."""
    if norm is None:
        return None
    w = norm.weight.detach().float()
    return 1.0 + w if form == "gemma" else w


def torch_rms(x: torch.Tensor, w: torch.Tensor, eps: float, form: str = "gemma") -> torch.Tensor:
    """An RMSNorm of bf16 rows x (n, d) -> (n, d) bf16. "gemma": Gemma3RMSNorm, w = 1 + weight (d,)
    fp32, applied before the one rounding; "llama": LlamaRMSNorm (Qwen2/3, Mistral alike), w the
    bf16 weight's values (d,) fp32, applied after the rounding to bf16 (their product is exact in
    fp32, so one more rounding gives the bf16 multiply's bits)."""
    if form == "gemma":
        return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)
    return (F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype).float() * w).to(x.dtype)


def torch_qk_norm_rope(qk: torch.Tensor, w: torch.Tensor | None, eps: float, cos: torch.Tensor,
                       sin_signed: torch.Tensor, form: str = "gemma") -> torch.Tensor:
    """qk (n, heads, hd) bf16, w (heads, hd) fp32 (None: no q/k norm), cos/sin_signed (n, 1, hd)
    bf16 -> (n, heads, hd) bf16."""
    hd = qk.shape[-1]
    if w is not None:  # F.rms_norm without weight, then each head's own weight
        normed = F.rms_norm(qk.float(), (hd,), None, eps)
        qk = (normed * w if form == "gemma" else normed.to(qk.dtype).float() * w).to(qk.dtype)
    return qk * cos + torch.roll(qk, hd // 2, -1) * sin_signed


def check_against_torch(k: NormKernels, d: int, heads: int, hd: int, eps: float, rows: Sequence[int] = (1, 3, 30),
                        seed: int = 0) -> str | None:
    """None if the kernels (in their form, with and without the post-norm and the q/k norm) give
    torch's bits on random rows of these sizes, else what differed."""
    g = torch.Generator().manual_seed(seed)
    form = k.form
    # weights as the form has them: 1 + w in fp32, or the values of a bf16 weight
    weight = (lambda *s: 1 + torch.randn(*s, generator=g) * 0.3) if form == "gemma" else (
        lambda *s: (1 + torch.randn(*s, generator=g) * 0.3).bfloat16().float())
    for n in rows:
        # Activations of several magnitudes, as a residual stream has them.
        x = (torch.randn(n, d, generator=g) * torch.logspace(-2, 2, d)[torch.randperm(d, generator=g)]).bfloat16()
        o = (torch.randn(n, d, generator=g) * 30).bfloat16()
        w1, w2 = weight(d), weight(d)
        if not torch.equal(k.rms(x, w1, eps, torch.empty_like(x)), torch_rms(x, w1, eps, form)):
            return f"rms of {n} x {d}"
        for post in (w1, None):
            want_x = x + (torch_rms(o, post, eps, form) if post is not None else o)
            want_h = torch_rms(want_x, w2, eps, form)
            got_x, got_h = x.clone(), torch.empty_like(x)
            k.add_rms(got_x, o, post, w2, eps, got_h)
            if not (torch.equal(got_x, want_x) and torch.equal(got_h, want_h)):
                return f"add + rms of {n} x {d}"
        length = 64
        qk = (torch.randn(n, heads + 1, hd, generator=g) * 4).bfloat16()  # one head more: a strided row
        cos = torch.randn(length, hd, generator=g).bfloat16()
        sin = torch.randn(length, hd, generator=g).bfloat16()
        pos = torch.randint(0, length, (n,), generator=g)
        for w in (weight(heads, hd), None):
            want = torch_qk_norm_rope(qk[:, :heads], w, eps, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1), form)
            got = qk.clone()
            k.qk_norm_rope(got.view(n, -1), heads, hd, w, eps, cos, sin, pos)
            if not (torch.equal(got[:, :heads], want) and torch.equal(got[:, heads:], qk[:, heads:])):
                return f"q/k norm + RoPE of {n} x {heads} x {hd}"
    return None


def norm_kernels(d: int, heads: int, hd: int, eps: float, form: str = "gemma") -> tuple[NormKernels | None,
                                                                                          KernelStatus]:
    """The kernels for hidden size d and `heads` q+k heads of hd in norm form `form` ("gemma" or
    "llama"), checked against torch here, and their status; (None, torch ops and why) where they
    are off (ATTN_LAB_NATIVE=0, read at every call), cannot be built here, or differ from torch."""
    if form not in NORM_FORMS:
        raise ValueError(f"norm form must be one of {sorted(NORM_FORMS)}, got {form!r}")
    if not native_enabled():
        return None, KernelStatus(FALLBACK, False, OFF_REASON)
    with _lock:
        k, status = _load()
        if k is None:
            return None, status
        k = replace(k, form=form)
        key = ("checked", d, heads, hd, eps, form)
        if key not in _state:
            _state[key] = check_against_torch(k, d, heads, hd, eps)
        diff = _state[key]
    if diff is not None:
        return None, KernelStatus(FALLBACK, False, f"the native norm kernels differ from this torch in the {diff}")
    return k, KernelStatus(NATIVE, True, "torch's bits, checked here")
