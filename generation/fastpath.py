"""Fast decoding for the NF4 chat model on CPU: three levers, each usable on its own.

1. The logits (`quantize_lm_head` -> `QuantizedHead`). Gemma ties its 262,144 x 640 LM head to
   the embedding and bitsandbytes keeps it in bf16: 335 MB read per token, ~25 ms here. The head
   gets its own int8 copy (one scale per output row), used only for the output projection; the
   embedding keeps its exact bf16 weights (multiplied by the AVX512-VNNI kernel of
   `generation.kernels` where it runs here, else by torch's int8 kernel). Greedy decoding stays exactly the bf16 head's argmax
   (`QuantizedHead.greedy_token`: the best candidates are recomputed from the exact weights and an
   error bound proves the winner).
2. The 4-bit layers (`NF4Linear`, `accelerate_linear4bit`). bitsandbytes' own CPU NF4 kernel is
   fast; most of a `Linear4bit` call (~50 us of ~65) is Python around it. `NF4Linear` calls the
   same kernel on the same packed bytes, so its result is bitsandbytes' result bit for bit.
3. The per-token overhead (`FastDecoder`). A lean Gemma 3 forward for one stream: preallocated KV
   cache and activation buffers, no `generate()` machinery (no per-step `isin`, no mask building,
   no cache objects), single-query attention on the key/value heads directly.

The model is not changed by any of them: same `Linear4bit` modules, same packed weights, same
embedding (only `accelerate_linear4bit`, opt-in, swaps the class of the existing modules).
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import native_int8_kernel

__all__ = [
    "RESCORE_K",
    "FastDecoder",
    "FusedNF4Linear",
    "NF4Linear",
    "QuantizedHead",
    "QuantizedLMHead",
    "accelerate_linear4bit",
    "argmax_first",
    "fast_path_supported",
    "prepare_layers",
    "quantize_lm_head",
    "restore_linear4bit",
    "rope_tables",
]


# ---------------------------------------------------------------------------------------------
# Lever 1: the LM head as an int8 copy

# Candidates recomputed from the exact bf16 weights in greedy_token: enough that the error bound
# decides ~90% of steps at once; 64 rows of 640 bf16 weights cost ~50 us.
RESCORE_K = 64
_TILE_ROWS, _TILE_COLS = 16, 4  # the native kernel's layout


@dataclass(frozen=True)
class QuantizedHead:
    """int8 copy of an LM head (V, D): W[v] ~= codes[v] * scale[v], symmetric, one scale per row.

    codes: int8, as (V, D) rows (layout "rows"), or in the native kernel's tiles (V/16, D/4, 16, 4)
    (layout "tiles"). exact: the model's own (V, D) bf16 head weight (the tied embedding, shared,
    never written): rows of it recompute chosen logits exactly. half_step (V,) fp32: the largest
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
        tiles = self.codes.view(v // _TILE_ROWS, d // _TILE_COLS, _TILE_ROWS, _TILE_COLS)
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
        (|h - h_hat| <= max|h| / (2 * 127 * 254) per element, times max |int8 weight|)."""
        hf = hidden.float().abs()
        l1 = float(hf.sum())
        d = hidden.shape[-1]
        slack = 2 * d * 2**-24 * l1 * self.w_max
        if self.layout == "tiles":
            slack += d * float(hf.max()) / (2 * 127 * 254) * (self.w_max + self.half_max) * (1 + 2**-10)
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
        The answer is exact either way; only the cost differs (~0.5 ms vs ~2 ms). `top`: step 1's
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

    topk, not a block-maxima search: topk runs on one thread (~0.43 ms for 262,144 logits), while
    the block reductions go parallel, and a parallel region costs a scheduler slice (~8 ms here)
    whenever another process holds the second core.
    """
    top = torch.topk(logits, k)
    return top.indices, float(top.values[-1])


def _lowest_at_max(idx: torch.Tensor, values: torch.Tensor) -> int:
    """The lowest token id in idx (n,) among those whose value (n,) is the maximum."""
    best = values.max()
    return int(torch.where(values == best, idx, torch.iinfo(torch.int64).max).min())


def argmax_first(logits: torch.Tensor) -> int:
    """torch.argmax(logits) of a 1-D tensor (the lowest index among equal maxima), via topk, which
    is ~2x faster than argmax on 262,144 bf16 values here and, like it, runs on one thread (a
    max() would go parallel); topk's own order among equal values is unspecified, hence the min."""
    top = torch.topk(logits, 4)
    ties = top.values == top.values[0]
    if bool(ties.all()):
        return int(torch.argmax(logits))
    return int(top.indices[ties].min())


def quantize_lm_head(model: torch.nn.Module, layout: str | None = None) -> QuantizedHead:
    """Symmetric int8 per output row of the model's LM head (V, D): scale = max|row| / 127.

    layout None = "tiles" where the native kernel is available (and V % 16 == 0, D % 4 == 0,
    D <= 1024), else "rows". The model and its tied embedding are only read. ~2-8 s for Gemma 3
    270m's head on 2 cores.
    """
    w = model.get_output_embeddings().weight.detach()  # (V, D): the embedding's storage when tied
    v, d = w.shape
    tiles_ok = v % _TILE_ROWS == 0 and d % _TILE_COLS == 0 and d <= 1024  # the kernel's limits
    if layout is None:
        layout = "tiles" if tiles_ok and native_int8_kernel() is not None else "rows"
    if layout not in ("rows", "tiles") or (layout == "tiles" and not tiles_ok):
        raise ValueError(f"layout must be 'rows' or 'tiles' (V % 16 == 0, D % 4 == 0, D <= 1024), got {layout!r}")
    q = torch.empty(v, d, dtype=torch.int8)
    scale = torch.empty(v, dtype=torch.float32)
    half = torch.empty(v, dtype=torch.float32)
    w_max = 0.0
    chunk = 16384  # rows at a time: an fp32 copy of the whole head would be 671 MB at once
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
        if layout == "tiles":  # 16 rows x 4 columns contiguous: the kernel's read order
            n = qi.shape[0]
            qi = qi.view(n // _TILE_ROWS, _TILE_ROWS, d // _TILE_COLS, _TILE_COLS).transpose(1, 2).reshape(n, d)
        q[i : i + chunk] = qi
    return QuantizedHead(codes=q, layout=layout, scale=scale, scale_bf16=scale.to(torch.bfloat16),
                         exact=w, half_step=half, half_max=float(half.max()), w_max=w_max)


class QuantizedLMHead(torch.nn.Module):
    """A drop-in `lm_head` module over a QuantizedHead: (B, T, D) -> (B, T, V) fp32 logits.

    For measuring the head lever inside `generate()`; note that greedy `generate()` then takes the
    argmax of the int8 logits, not the exact one (`FastDecoder` keeps it exact).
    """

    def __init__(self, head: QuantizedHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)


# ---------------------------------------------------------------------------------------------
# Lever 2: bitsandbytes' NF4 kernel without the Python around it

_KERNEL_NAME = "gemv_4bit_inference_cpu_nf4_bf16"
_kernel_fn: Callable[..., None] | None = None


def _nf4_kernel() -> Callable[..., None] | None:
    """bitsandbytes' CPU NF4 x bf16 kernel as a plain ctypes function, or None where it is missing.

    Signature (M, N, K, x*, packed*, absmax*, out*, blocksize, x_stride, out_stride); despite its
    name it tiles any M. A private prototype (not bitsandbytes' own function object), so its
    calls are never affected; a CFUNCTYPE call releases the GIL, so several streams can run it.
    """
    global _kernel_fn
    if _kernel_fn is None:
        try:
            from bitsandbytes.cextension import lib
            from bitsandbytes.functional import has_avx512bf16

            raw = getattr(getattr(lib, "_lib", None), _KERNEL_NAME, None)
            if raw is None or not has_avx512bf16():
                return None
            proto = ct.CFUNCTYPE(None, *([ct.c_int64] * 3), *([ct.c_void_p] * 4), *([ct.c_int64] * 3))
            _kernel_fn = proto(ct.cast(raw, ct.c_void_p).value)
        except Exception:  # no bitsandbytes / no CPU library: callers fall back
            return None
    return _kernel_fn


def _linear4bit_ok(layer: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    if not isinstance(layer, bnb.nn.Linear4bit) or layer.bias is not None:
        return False
    qs = getattr(layer.weight, "quant_state", None)
    return (
        qs is not None
        and layer.weight.device.type == "cpu"
        and qs.quant_type == "nf4"
        and getattr(layer, "compute_dtype", None) == torch.bfloat16
        and bool(getattr(layer, "support_avx512bf16_for_cpu", False))
    )


def _prepare_layer(layer: torch.nn.Module):
    """The layer's quant_state in bitsandbytes' CPU packing (converted by one forward of the layer
    itself, bitsandbytes' own path, if no forward has happened yet)."""
    if not _linear4bit_ok(layer):
        raise ValueError(f"not a CPU NF4, bf16-compute Linear4bit without bias: {layer!r}")
    qs = layer.weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        with torch.inference_mode():
            layer(torch.zeros(1, 1, layer.in_features, dtype=torch.bfloat16))
        qs = layer.weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False) or qs.absmax.dtype != torch.bfloat16:
        raise ValueError("bitsandbytes did not convert the layer to its CPU packing")
    return qs


class NF4Linear:
    """A bitsandbytes Linear4bit (NF4, bf16 compute, CPU) called straight into its kernel.

    Reads the layer's own packed codes and bf16 absmax (bitsandbytes' CPU layout), nothing copied.
    `nf4(x)` equals `layer(x)` bit for bit: same kernel, same bytes, same arguments.
    """

    __slots__ = ("layer", "n", "k", "blocksize", "_w", "_absmax", "_wptr", "_aptr", "_fn")

    def __init__(self, layer: torch.nn.Module) -> None:
        fn = _nf4_kernel()
        if fn is None:
            raise RuntimeError("bitsandbytes' CPU NF4 kernel (AVX512-BF16) is not available here")
        qs = _prepare_layer(layer)
        self.layer = layer
        self.n, self.k = int(qs.shape[0]), int(qs.shape[1])
        self.blocksize = int(qs.blocksize)
        self._w = layer.weight.data  # (N, K/2) uint8; referenced so that its memory outlives us
        self._absmax = qs.absmax  # (K/blocksize, N) bf16
        self._wptr = self._w.data_ptr()
        self._aptr = self._absmax.data_ptr()
        self._fn = fn

    def still_valid(self) -> bool:
        """False once bitsandbytes repacked or replaced the layer's weights (e.g. a state_dict save)."""
        qs = getattr(self.layer.weight, "quant_state", None)
        return (
            qs is not None
            and self.layer.weight.data_ptr() == self._wptr
            and bool(getattr(qs, "packing_format_for_cpu", False))
            and qs.absmax.data_ptr() == self._aptr
        )

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) bf16 with contiguous rows -> (M, N) bf16, written into `out` (a view is fine)."""
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.k or x.stride(1) != 1:
            raise ValueError(f"NF4Linear wants (M, {self.k}) bf16 with contiguous rows, got {tuple(x.shape)} {x.dtype}")
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, self.n, dtype=torch.bfloat16)
        elif out.dtype != torch.bfloat16 or tuple(out.shape) != (m, self.n) or out.stride(1) != 1:
            raise ValueError(f"out must be ({m}, {self.n}) bf16 with contiguous rows")
        self._fn(m, self.n, self.k, x.data_ptr(), self._wptr, self._aptr, out.data_ptr(),
                 self.blocksize, x.stride(0), out.stride(0))
        return out


class FusedNF4Linear(NF4Linear):
    """Several NF4Linear layers of one input as one kernel call (q|k|v, gate|up): their packed
    codes stacked and their absmax side by side in a copy of their own (the layers' bytes are
    untouched), outputs in the order of the parts. Bit-equal to calling the parts one by one (each
    output is the same dot product over the same bytes; the tests check it); one call instead of
    three at one row saves ~12 us of q|k|v's ~29 here."""

    def __init__(self, *parts: NF4Linear) -> None:
        if not parts or any(p.k != parts[0].k or p.blocksize != parts[0].blocksize for p in parts):
            raise ValueError("fused NF4 layers need the same input size and block size")
        self.layer = None
        self.k, self.blocksize = parts[0].k, parts[0].blocksize
        self.n = sum(p.n for p in parts)
        self._w = torch.cat([p._w for p in parts]).contiguous()  # (N, K/2) uint8
        self._absmax = torch.cat([p._absmax for p in parts], dim=1).contiguous()  # (K/blocksize, N) bf16
        self._wptr, self._aptr = self._w.data_ptr(), self._absmax.data_ptr()
        self._fn = parts[0]._fn

    def still_valid(self) -> bool:
        return True  # a copy of its own

    @property
    def nbytes(self) -> int:
        return self._w.numel() * self._w.element_size() + self._absmax.numel() * self._absmax.element_size()


def _fast_linear4bit_class():
    import bitsandbytes as bnb

    class FastLinear4bit(bnb.nn.Linear4bit):
        """Linear4bit whose inference forward on CPU goes straight into bitsandbytes' kernel.

        Same module, same weights (only __class__ is swapped); anything else (training, grads,
        other devices or dtypes, repacked weights) takes Linear4bit's own forward.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nf4 = self.__dict__.get("_nf4")
            if (
                nf4 is not None
                and x.dtype == torch.bfloat16
                and x.device.type == "cpu"
                and not self.training
                and not (torch.is_grad_enabled() and x.requires_grad)
                and nf4.still_valid()
            ):
                x2 = x.reshape(-1, x.shape[-1])
                if x2.stride(-1) != 1:
                    x2 = x2.contiguous()
                return nf4(x2).view(*x.shape[:-1], nf4.n)
            return super().forward(x)

        def __reduce_ex__(self, protocol):
            # Copies and pickles are plain Linear4bit modules: the kernel call holds raw pointers
            # into this process's tensors (accelerate the copy again if wanted).
            state = self.__dict__.copy()
            state.pop("_nf4", None)
            return (_plain_linear4bit, (), state)

    return FastLinear4bit


def _plain_linear4bit():
    """An empty bitsandbytes Linear4bit for copy/pickle to fill in (FastLinear4bit.__reduce_ex__)."""
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit.__new__(bnb.nn.Linear4bit)


_FAST_CLASS = None


def accelerate_linear4bit(model: torch.nn.Module) -> int:
    """Make every eligible Linear4bit of `model` call bitsandbytes' kernel directly; returns how many.

    Converts each layer to bitsandbytes' CPU packing first (what its first forward does anyway)
    and swaps the module's class to a Linear4bit subclass, so `count_4bit_layers`, the weights,
    the state and every caller are unchanged; results are bit-equal. Idempotent.
    """
    global _FAST_CLASS
    if _nf4_kernel() is None:
        return 0
    if _FAST_CLASS is None:
        _FAST_CLASS = _fast_linear4bit_class()
    n = 0
    for module in model.modules():
        if isinstance(module, _FAST_CLASS):
            n += 1
        elif _linear4bit_ok(module):
            module.__dict__["_nf4"] = NF4Linear(module)  # not a submodule or parameter
            module.__class__ = _FAST_CLASS
            n += 1
    return n


def restore_linear4bit(model: torch.nn.Module) -> int:
    """Undo `accelerate_linear4bit` (the modules' class back to Linear4bit); returns how many."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if _FAST_CLASS is not None and type(module) is _FAST_CLASS:
            module.__class__ = bnb.nn.Linear4bit
            module.__dict__.pop("_nf4", None)
            n += 1
    return n


def fast_path_supported(model: torch.nn.Module) -> str | None:
    """None when `FastDecoder` can run `model`, else the reason why not (one line)."""
    import bitsandbytes as bnb

    cfg = model.config
    if getattr(cfg, "model_type", "") != "gemma3_text":
        return f"model type {getattr(cfg, 'model_type', '?')!r} (the fast path implements gemma3_text)"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "logit soft-capping is not implemented in the fast path"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention is not implemented in the fast path"
    if _nf4_kernel() is None:
        return "bitsandbytes' CPU NF4 kernel (AVX512-BF16) is not available"
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return "the model has no 4-bit layers"
    if not all(_linear4bit_ok(m) for m in layers):
        return "some Linear4bit layers are not CPU NF4 with bf16 compute and no bias"
    return None


# ---------------------------------------------------------------------------------------------
# Lever 3: a lean Gemma 3 decode step with a preallocated KV cache


def _rms(x: torch.Tensor, w1: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm: fp32 x * rsqrt(mean(x^2) + eps) * (1 + w), back to x's dtype. torch's fused
    rms_norm gives the same bits as transformers' op-by-op formula (checked by the tests)."""
    return F.rms_norm(x.float(), (x.shape[-1],), w1, eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor, in its bf16 op order: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


@dataclass
class _Layer:
    q: NF4Linear
    k: NF4Linear
    v: NF4Linear
    o: NF4Linear
    gate: NF4Linear
    up: NF4Linear
    down: NF4Linear
    in_norm: torch.Tensor  # (D,) fp32, 1 + weight
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    q_norm: torch.Tensor  # (head_dim,) fp32
    k_norm: torch.Tensor
    qk_norm: torch.Tensor  # (H + KV, head_dim) fp32: q_norm for the query rows, k_norm for the key rows
    sliding: bool


def prepare_layers(model: torch.nn.Module, linear: Callable | None = None) -> list[_Layer]:
    """The decoder layers of a Gemma 3 NF4 model as `_Layer`s: each projection wrapped by `linear`
    (default NF4Linear: bitsandbytes' kernel on the module's own bytes), norms as fp32 1 + w."""
    linear = linear or NF4Linear
    cfg = model.config
    nh, nkv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    one = lambda norm: 1.0 + norm.weight.detach().float()  # noqa: E731  (Gemma's 1 + w, in fp32)
    layers = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        q_norm, k_norm = one(a.q_norm), one(a.k_norm)
        layers.append(_Layer(
            q=linear(a.q_proj), k=linear(a.k_proj), v=linear(a.v_proj), o=linear(a.o_proj),
            gate=linear(m.gate_proj), up=linear(m.up_proj), down=linear(m.down_proj),
            in_norm=one(layer.input_layernorm), post_attn_norm=one(layer.post_attention_layernorm),
            pre_ff_norm=one(layer.pre_feedforward_layernorm), post_ff_norm=one(layer.post_feedforward_layernorm),
            q_norm=q_norm, k_norm=k_norm,
            qk_norm=torch.cat([q_norm.expand(nh, -1), k_norm.expand(nkv, -1)]).contiguous(),
            sliding=cfg.layer_types[i] == "sliding_attention",
        ))
    return layers


def rope_tables(rotary: torch.nn.Module, n: int, head_dim: int) -> tuple[dict, dict, dict]:
    """cos, sin and signed sin (n, head_dim) bf16 for positions 0..n-1, keyed by sliding (bool).

    Exactly as transformers computes them (its own rotary module: fp32, then bf16; one multiply per
    element, so a position's values do not depend on which others are computed with it), per layer
    kind (local and global RoPE bases differ). signed: rotate_half(x) * sin == roll(x, half) *
    [-sin_1, sin_2], bit for bit.
    """
    positions = torch.arange(n).unsqueeze(0)
    probe = torch.empty(0, dtype=torch.bfloat16)
    half = head_dim // 2
    cos, sin, signed = {}, {}, {}
    with torch.inference_mode():
        for sliding, kind in ((True, "sliding_attention"), (False, "full_attention")):
            c, s = rotary(probe, positions, kind)
            cos[sliding], sin[sliding] = c[0], s[0]  # (n, head_dim) bf16
            signed[sliding] = torch.cat([-s[0, :, :half], s[0, :, half:]], dim=-1)
    return cos, sin, signed


class _ModuleLinear:
    """Adapter with NF4Linear's call signature over the bitsandbytes module's own forward (to
    measure the decode loop without lever 2)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.n = layer.out_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer(x.unsqueeze(0))[0]
        return y if out is None else out.copy_(y)


class FastDecoder:
    """Decode one stream of a Gemma 3 NF4 model on CPU, token by token.

    `prefill(ids)` starts a sequence and `step(token)` appends one; both return the next-token
    logits (V,): fp32 with the int8 head, bf16 (as the model's own) with the exact head. `greedy`
    yields greedy tokens, always exactly those of the bf16 head. The KV cache (layers, KV heads,
    max_len, head_dim) bf16 and every per-step activation are allocated once and reused (the
    cache grows by doubling when a sequence outgrows it). The model is only read: one decoder per
    concurrent stream, sharing the weights.

    Numerics: the model's own, op for op (the tests check the logits bit for bit), except the
    single-query attention step, which by default runs the query heads that share a key/value head
    as the rows of one query (transformers' pack_gqa). sdpa's CPU kernel then reads the keys once
    instead of once per head (6-10x faster here) but may round its fp32 softmax sums differently,
    so a logit can differ from `generate()`'s by about one bf16 step; exact_attention=True makes
    the same call as transformers (enable_gqa), bit-equal and slower.

    head: None = the exact bf16 head (the tied embedding); direct_nf4=False calls the Linear4bit
    modules instead of their kernel (to measure the levers apart).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        head: QuantizedHead | None = None,
        *,
        max_len: int = 1024,
        direct_nf4: bool = True,
        exact_attention: bool = False,
    ) -> None:
        why = fast_path_supported(model)
        if why is not None:
            raise ValueError(f"fast path not supported: {why}")
        cfg = model.config
        body = model.model
        self.config = cfg
        self.head = head
        self.exact_attention = exact_attention
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.head_dim)
        self.window = int(cfg.sliding_window or 0)
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.embed = body.embed_tokens.weight.detach()  # (V, D) bf16, the model's own tensor
        self.embed_scale = body.embed_tokens.embed_scale.to(self.embed.dtype)
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.final_norm = 1.0 + body.norm.weight.detach().float()
        self._rotary = body.rotary_emb
        linear = NF4Linear if direct_nf4 else _ModuleLinear
        self.layers = prepare_layers(model, linear)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        d, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
        self.second_steps = 0  # greedy picks that needed greedy_token's second step
        self.steps = 0
        self.pos = 0
        self.max_len = 0
        # Per-step buffers, reused: the token, q|k|v side by side, o_proj out, gate|up, down out, logits.
        self._tok = torch.zeros(1, dtype=torch.long)
        self._qkv = torch.empty(1, (nh + 2 * nkv) * hd, dtype=torch.bfloat16)
        self._o = torch.empty(1, d, dtype=torch.bfloat16)
        self._gu = torch.empty(1, 2 * inter, dtype=torch.bfloat16)
        self._down = torch.empty(1, d, dtype=torch.bfloat16)
        self._logits = torch.empty(1, int(cfg.vocab_size), dtype=torch.float32)
        self.last_hidden = torch.empty(1, d, dtype=torch.bfloat16)
        self._window_mask = torch.ones(1, 1, 1, max(self.window, 1), dtype=torch.bool)
        self.k_cache = self.v_cache = torch.empty(0, dtype=torch.bfloat16)
        self._cos = self._sin = self._sin_signed = torch.empty(0)
        self._ensure_capacity(max_len)

    def _ensure_capacity(self, n: int) -> None:
        """Hold at least `n` positions: grow the KV cache (keeping its contents) and RoPE tables."""
        if n <= self.max_len:
            return
        n = max(n, 2 * self.max_len)
        shape = (len(self.layers), self.n_kv, n, self.head_dim)
        k = torch.zeros(shape, dtype=torch.bfloat16)
        v = torch.zeros(shape, dtype=torch.bfloat16)
        if self.pos:
            k[:, :, : self.pos] = self.k_cache[:, :, : self.pos]
            v[:, :, : self.pos] = self.v_cache[:, :, : self.pos]
        self.k_cache, self.v_cache = k, v
        self._cos, self._sin, self._sin_signed = rope_tables(self._rotary, n, self.head_dim)
        self.max_len = n

    # -- prefill: T new tokens at once (allocates; once per request) ------------------------------

    def _forward_many(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> last token's final-normed hidden (1, D); appends T positions to the cache.

        transformers' op order (bitsandbytes' kernel tiles the T rows, sdpa with GQA, causal).
        """
        t = int(ids.shape[0])
        p0, end = self.pos, self.pos + t
        self._ensure_capacity(end)
        eps, nh, nkv, hd = self.eps, self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed) * self.embed_scale  # (T, D)
        for li, L in enumerate(self.layers):
            h = _rms(x, L.in_norm, eps)
            q = _rms(L.q(h).view(t, nh, hd), L.q_norm, eps)  # (T, H, hd)
            k = _rms(L.k(h).view(t, nkv, hd), L.k_norm, eps)
            v = L.v(h).view(t, nkv, hd)
            cos = self._cos[L.sliding][p0:end].unsqueeze(1)  # (T, 1, hd)
            sin = self._sin[L.sliding][p0:end].unsqueeze(1)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.k_cache[li, :, p0:end] = k.transpose(0, 1)
            self.v_cache[li, :, p0:end] = v.transpose(0, 1)
            mask, causal = self._mask(L.sliding, p0, t)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), self.k_cache[li, :, :end].unsqueeze(0),
                self.v_cache[li, :, :end].unsqueeze(0), attn_mask=mask, is_causal=causal,
                scale=self.scaling, enable_gqa=nkv != nh,
            )  # (1, H, T, hd)
            attn = attn[0].transpose(0, 1).reshape(t, nh * hd)
            x = x + _rms(L.o(attn), L.post_attn_norm, eps)
            h = _rms(x, L.pre_ff_norm, eps)
            a = F.gelu(L.gate(h), approximate="tanh") * L.up(h)
            x = x + _rms(L.down(a), L.post_ff_norm, eps)
        self.pos = end
        return _rms(x[-1:], self.final_norm, eps)

    def _mask(self, sliding: bool, p0: int, t: int) -> tuple[torch.Tensor | None, bool]:
        """(bool mask (T, p0+T) or None, is_causal) for T new queries after p0 cached positions."""
        windowed = sliding and self.window > 0
        if p0 == 0 and not (windowed and t > self.window):
            return None, True
        q_pos = torch.arange(p0, p0 + t).unsqueeze(1)
        k_pos = torch.arange(p0 + t).unsqueeze(0)
        allowed = k_pos <= q_pos
        if windowed:
            allowed &= k_pos > q_pos - self.window
        return allowed, False

    # -- decode: one token, preallocated buffers -------------------------------------------------

    def _decode_one(self, token: int) -> torch.Tensor:
        """One token at position pos -> final-normed hidden (1, D); writes its K/V into the cache."""
        p = self.pos
        self._ensure_capacity(p + 1)
        eps, nh, nkv, hd = self.eps, self.n_heads, self.n_kv, self.head_dim
        qd, kd = nh * hd, nkv * hd
        qkv, gu, inter = self._qkv, self._gu, self._gu.shape[1] // 2
        q_out, k_out, v_out = qkv[:, :qd], qkv[:, qd : qd + kd], qkv[:, qd + kd :]
        gate_out, up_out = gu[:, :inter], gu[:, inter:]
        self._tok[0] = token
        x = F.embedding(self._tok, self.embed) * self.embed_scale  # (1, D)
        for li, L in enumerate(self.layers):
            h = _rms(x, L.in_norm, eps)
            L.q(h, q_out)
            L.k(h, k_out)
            L.v(h, v_out)
            # q and k heads normed and rotated together: (H + KV, hd) rows, each its own norm weight
            qk = qkv[:, : qd + kd].view(nh + nkv, hd)
            qk = (F.rms_norm(qk.float(), (hd,), None, eps) * L.qk_norm).to(torch.bfloat16)
            qk = qk * self._cos[L.sliding][p] + torch.roll(qk, hd // 2, -1) * self._sin_signed[L.sliding][p]
            self.k_cache[li, :, p] = qk[nh:]
            self.v_cache[li, :, p] = v_out.view(nkv, hd)
            start, mask = 0, None
            if L.sliding and self.window and p + 1 >= self.window:
                # The last `window` positions; transformers then passes an all-true mask, which
                # sends sdpa down its masked path: the same mask keeps the same rounding.
                start, mask = p + 1 - self.window, self._window_mask
            keys = self.k_cache[li, :, start : p + 1].unsqueeze(0)  # (1, KV, n, hd)
            vals = self.v_cache[li, :, start : p + 1].unsqueeze(0)
            if mask is None and self.exact_attention:  # transformers' call without a mask
                attn = F.scaled_dot_product_attention(
                    qk[:nh].view(1, nh, 1, hd), keys, vals, scale=self.scaling, enable_gqa=nkv != nh
                )  # (1, H, 1, hd)
            else:
                # The heads sharing a key/value head as the rows of one query (transformers'
                # pack_gqa, its own layout when it passes a mask): sdpa reads each key block once
                # instead of once per head, 6-10x faster here than enable_gqa.
                attn = F.scaled_dot_product_attention(
                    qk[:nh].view(1, nkv, nh // nkv, hd), keys, vals, attn_mask=mask, scale=self.scaling
                )  # (1, KV, H/KV, hd)
            L.o(attn.view(1, qd), self._o)
            x = x + _rms(self._o, L.post_attn_norm, eps)
            h = _rms(x, L.pre_ff_norm, eps)
            L.gate(h, gate_out)
            L.up(h, up_out)
            L.down(F.gelu(gate_out, approximate="tanh") * up_out, self._down)
            x = x + _rms(self._down, L.post_ff_norm, eps)
        self.pos = p + 1
        return _rms(x, self.final_norm, eps)

    # -- public API ------------------------------------------------------------------------------

    def _logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        self.last_hidden.copy_(hidden)
        if self.head is not None:
            return self.head.logits(self.last_hidden, out=self._logits)[0]
        return F.linear(self.last_hidden, self.lm_head)[0]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence: input_ids (1, T) or (T,) -> next-token logits (V,)."""
        self.pos = 0
        ids = input_ids.reshape(-1).to(torch.long)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        return self._logits_of(self._forward_many(ids))

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append `token` to the sequence -> next-token logits (V,)."""
        if self.pos == 0:
            raise RuntimeError("step() before prefill()")
        return self._logits_of(self._decode_one(int(token)))

    @torch.inference_mode()
    def exact_top(self, logits: torch.Tensor, k: int = RESCORE_K) -> torch.Tensor:
        """For sampling: the (V,) logits of the last prefill/step with their k largest replaced, in
        place, by the bf16 head's exact values (a no-op with the exact head)."""
        if self.head is not None:
            self.head.make_exact(logits, self.last_hidden, torch.topk(logits, k).indices)
        return logits

    @torch.inference_mode()
    def greedy_pick(self, logits: torch.Tensor) -> int:
        """The greedy token for `logits` from the last prefill/step: exactly the bf16 head's argmax."""
        self.steps += 1
        if self.head is None:
            return argmax_first(logits)
        tok, one_step = self.head.greedy_token(self.last_hidden, logits)
        self.second_steps += not one_step
        return tok

    def greedy(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield up to max_new_tokens greedy tokens; an EOS token is yielded, then it stops.

        The bf16 head's argmax at every step (also with the int8 head), so the same tokens as greedy
        `generate()` unless the attention rounding (see the class docstring) flips a near-tie; with
        exact_attention=True always the same. `should_stop()` is checked after each token.
        """
        eos = frozenset(int(e) for e in eos_token_ids)
        logits = self.prefill(input_ids)
        for i in range(max_new_tokens):
            tok = self.greedy_pick(logits)
            yield tok
            if tok in eos or i + 1 == max_new_tokens or (should_stop is not None and should_stop()):
                return
            logits = self.step(tok)
