"""bitsandbytes' CPU NF4 kernel without the Python around it, and an NF4 model's decoder layers
(any family `generation.decode.family` describes) as plain data for a lean decode step.

bitsandbytes' own CPU NF4 kernel is fast; most of a `Linear4bit` call is the Python around it.
`NF4Linear` calls the same kernel on the same packed bytes, so its result is bitsandbytes' result
bit for bit; `FusedNF4Linear` makes one call of several projections of one input;
`accelerate_linear4bit` gives a model's own modules that call (opt-in, only their class changes).
`prepare_layers` and `rope_tables` hand `generation.decode.lean` the model's weights, norms and
RoPE tables exactly as transformers computes them.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels import norm_weight

__all__ = [
    "DecoderLayer",
    "FusedNF4Linear",
    "NF4Linear",
    "accelerate_linear4bit",
    "fast_path_supported",
    "prepare_layers",
    "restore_linear4bit",
    "rope_tables",
]

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


def _linear4bit_ok(layer: torch.nn.Module, allow_bias: bool = False) -> bool:
    """A CPU NF4 Linear4bit computing in bf16 (without bias unless allow_bias: the module
    acceleration leaves biased layers to bitsandbytes' own forward)."""
    import bitsandbytes as bnb

    if not isinstance(layer, bnb.nn.Linear4bit) or (layer.bias is not None and not allow_bias):
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
    if not _linear4bit_ok(layer, allow_bias=True):
        raise ValueError(f"not a CPU NF4, bf16-compute Linear4bit: {layer!r}")
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
    `nf4(x)` equals `layer(x)` bit for bit: same kernel, same bytes, same arguments, and a bias
    added to the kernel's bf16 result in place, as bitsandbytes' CPU path adds it.
    """

    __slots__ = ("layer", "n", "k", "blocksize", "_w", "_absmax", "_wptr", "_aptr", "_fn", "_biases")

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
        bias = getattr(layer, "bias", None)
        # (first output column, bias (N_part,) bf16) of each biased part
        self._biases = [] if bias is None else [(0, bias.detach().to(torch.bfloat16))]

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
        for first, bias in self._biases:
            out[:, first : first + bias.shape[0]] += bias
        return out


class FusedNF4Linear(NF4Linear):
    """Several NF4Linear layers of one input as one kernel call (q|k|v, gate|up): their packed
    codes stacked and their absmax side by side in a copy of their own (the layers' bytes are
    untouched), outputs in the order of the parts. Bit-equal to calling the parts one by one (each
    output is the same dot product over the same bytes; the tests check it); at one row the
    call's own overhead is a good part of its cost, so one call instead of three pays."""

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
        offsets = [sum(p.n for p in parts[:i]) for i in range(len(parts))]
        # each part's bias on its own columns only (a zero bias added elsewhere would turn -0 into +0)
        self._biases = [(at + first, b) for at, p in zip(offsets, parts) for first, b in p._biases]

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
    """None when the lean decode (`BatchDecodeStep`) can run `model`, else the reason why not (one line)."""
    import bitsandbytes as bnb

    from .family import describe

    try:
        arch = describe(model.config)
    except ValueError as exc:
        return str(exc)
    if _nf4_kernel() is None:
        return "bitsandbytes' CPU NF4 kernel (AVX512-BF16) is not available"
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return "the model has no 4-bit layers"
    if not all(_linear4bit_ok(m, allow_bias=True) for m in layers):
        return "some Linear4bit layers are not CPU NF4 with bf16 compute"
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2 or (
            head.weight.dtype != torch.bfloat16) or getattr(head, "bias", None) is not None:
        return "the LM head is not a bf16 linear layer without bias"
    if arch.norm == "llama" and any(m.weight.dtype != torch.bfloat16 for m in _norms(model)):
        return "RMSNorm weights not in bf16"  # Llama's form multiplies in the weight's dtype
    return None


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    body = model.model
    out = [body.norm]
    for layer in body.layers:
        out += [m for m in (layer.input_layernorm, layer.post_attention_layernorm,
                            getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
                if m is not None]
    return out


@dataclass
class DecoderLayer:
    """One decoder layer as the lean step reads it. Norm weights in fp32, in the family's form
    (Gemma: 1 + w; Llama: the bf16 weight's values); None where the family has no such norm."""

    q: NF4Linear
    k: NF4Linear
    v: NF4Linear
    o: NF4Linear
    gate: NF4Linear
    up: NF4Linear
    down: NF4Linear
    in_norm: torch.Tensor  # (D,) fp32
    post_attn_norm: torch.Tensor | None  # Gemma's sandwich norms, else None
    pre_ff_norm: torch.Tensor  # Llama's post_attention_layernorm is this one
    post_ff_norm: torch.Tensor | None
    qk_norm: torch.Tensor | None  # (H + KV, head_dim) fp32: q_norm for the query rows, k_norm for the key rows
    sliding: bool


def prepare_layers(model: torch.nn.Module, linear: Callable | None = None) -> list[DecoderLayer]:
    """The decoder layers of an NF4 model of a described family (`generation.decode.family`) as
    `DecoderLayer`s: each projection wrapped by `linear` (default NF4Linear: bitsandbytes' kernel on
    the module's own bytes, with its bias), norms as the family applies them."""
    from .family import describe

    linear = linear or NF4Linear
    arch = describe(model.config)
    sandwich, form = arch.family.sandwich, arch.norm
    nh, nkv = arch.n_heads, arch.n_kv_heads
    layers = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        qk = None
        if arch.family.qk_norm:
            q_norm, k_norm = norm_weight(a.q_norm, form), norm_weight(a.k_norm, form)
            qk = torch.cat([q_norm.expand(nh, -1), k_norm.expand(nkv, -1)]).contiguous()
        layers.append(DecoderLayer(
            q=linear(a.q_proj), k=linear(a.k_proj), v=linear(a.v_proj), o=linear(a.o_proj),
            gate=linear(m.gate_proj), up=linear(m.up_proj), down=linear(m.down_proj),
            in_norm=norm_weight(layer.input_layernorm, form),
            post_attn_norm=norm_weight(layer.post_attention_layernorm, form) if sandwich else None,
            pre_ff_norm=norm_weight(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
                                    form),
            post_ff_norm=norm_weight(layer.post_feedforward_layernorm, form) if sandwich else None,
            qk_norm=qk,
            sliding=arch.sliding_layers[i],
        ))
    return layers


def rope_tables(rotary: torch.nn.Module, n: int, head_dim: int, by_layer_type: bool = True) -> tuple[dict, dict,
                                                                                                      dict]:
    """cos, sin and signed sin (n, head_dim) bf16 for positions 0..n-1, keyed by sliding (bool).

    Exactly as transformers computes them (its own rotary module, its inverse frequencies and
    attention scaling from transformers' rope init functions, Llama 3's scaling included: fp32,
    then bf16; one multiply per element, so a position's values do not depend on which others are
    computed with it), per layer kind where the module takes it (by_layer_type: Gemma 3's local
    and global RoPE bases differ; else both kinds share one table). signed: rotate_half(x) * sin
    == roll(x, half) * [-sin_1, sin_2], bit for bit.
    """
    positions = torch.arange(n).unsqueeze(0)
    probe = torch.empty(0, dtype=torch.bfloat16)
    half = head_dim // 2
    cos, sin, signed = {}, {}, {}
    with torch.inference_mode():
        for sliding, kind in ((True, "sliding_attention"), (False, "full_attention")):
            if by_layer_type and not hasattr(rotary, f"{kind}_inv_freq"):  # a model without this kind of layer
                kind = "full_attention" if sliding else "sliding_attention"
            c, s = rotary(probe, positions, kind) if by_layer_type else rotary(probe, positions)
            cos[sliding], sin[sliding] = c[0], s[0]  # (n, head_dim) bf16
            signed[sliding] = torch.cat([-s[0, :, :half], s[0, :, half:]], dim=-1)
    return cos, sin, signed
