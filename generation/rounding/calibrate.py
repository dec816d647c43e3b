"""Choose NF4 codes and scales for a whole decoder model, layer after layer, on calibration text.

The model (full precision) runs its decoder layers one at a time on the calibration batch. For each
layer: the inputs of its linear layers give each one's Hessian H = X^T X / n; every linear is rounded
onto the NF4 grid (nf4grid.gptq_nf4, then nf4grid.refit_scales, in turn `rounds` times; the linears
that share an input in one pass); the layer's weights are replaced by
what the codes stand for, and the layer runs again so the next layer calibrates on the inputs the
*rounded* model gives it (errors are corrected, not compounded: GPTQ's sequential order). With
`toward_full`, the full model's hidden states run beside them, and the target of each linear that
reads the normalised residual stream (q/k/v, gate/up) moves towards the weight that maps the rounded
model's inputs onto the full model's outputs (nf4grid.toward_full_output).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..kernels import NORM_FORMS, NormKernels, norm_kernels, norm_weight
from .nf4grid import (
    BLOCK, GptqConfig, block_absmax, dequantize, double_quantize, gptq_factor, gptq_nf4, refit_scales, toward_full_output,
)


@dataclass(frozen=True)
class Rounded:
    """One linear layer's choice: NF4 indices (out, in) and fp32 block scales (out, in // BLOCK)."""

    index: Tensor
    scales: Tensor


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers: calibrated NF4 needs a decoder-only model")
    return layers


def _layer_inputs(model: torch.nn.Module, ids: Tensor) -> tuple[Tensor, list[dict]]:
    """The hidden states entering the first decoder layer, and every layer's keyword arguments
    (masks, rotary embeddings), for `ids` (N, T). The layers only record what they are given: the
    calibration runs them itself, one at a time."""
    layers = decoder_layers(model)
    first: list[Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]

    def recorder(i: int):
        def forward(hidden_states: Tensor, *args, **kw) -> Tensor:
            if i == 0:
                first.append(hidden_states)
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: shadows the class's forward
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return first[0], kwargs


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}


@dataclass
class _Group:
    """Linears that share one input (q/k/v; gate/up): their names, the input's Hessian X~^T X~ / n
    in the rounded model, and X^T X~ / n against the full model's input X (where that is tracked)."""

    names: list[str]
    h: Tensor  # (in, in)
    cross: Tensor | None = None  # (in, in)


def _grouped_inputs(layer: torch.nn.Module, hidden: Tensor, kwargs: dict,
                    visit: Callable[[int, Tensor, list[str], bool], None]) -> Tensor:
    """Run `layer` on `hidden`, calling visit(group number, input (..., in), names, normed) once per
    distinct linear input (in the order the layer reads them; `normed`: the input is a norm's
    output, the residual stream as q/k/v and gate/up read it) and appending each further reader's
    name to that list. Returns the layer's output."""
    names: dict[tuple, list[str]] = {}
    normed: set[tuple] = set()
    seen: list[Tensor] = []  # held until the end: a freed input's address could be reused by another

    def key(x: Tensor) -> tuple:
        return x.data_ptr(), tuple(x.shape)

    def norm_out(_mod, _args, out):
        seen.append(out)
        normed.add(key(out))

    def hook(name: str):
        def fn(_mod, args):
            x = args[0]
            k = key(x)
            if k not in names:
                seen.append(x)
                names[k] = [name]
                visit(len(names) - 1, x, names[k], k in normed)
            else:
                names[k].append(name)
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in _linears(layer).items()]
    handles += [mod.register_forward_hook(norm_out) for mod in layer.modules() if type(mod).__name__.endswith("Norm")]
    try:
        out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out[0] if isinstance(out, tuple) else out


def _gram(x: Tensor, parts: int = 4) -> Tensor:
    """x^T x (in, in) for x (n, in): each band of rows from the diagonal on, the blocks below it
    mirrored from those above (~3/4 of the products; the largest input, down_proj's, makes this the
    calibration's costliest product)."""
    d = x.shape[1]
    cuts = [d * i // parts for i in range(parts + 1)]
    h = x.new_empty(d, d)  # (in, in)
    for a, b in zip(cuts, cuts[1:]):
        band = x[:, a:b].T @ x[:, a:]  # (b - a, in - a)
        h[a:b, a:] = band
        h[b:, a:b] = band[:, b - a:].T
    return h


def _native_rms(kern: NormKernels, w: Tensor, eps: float, x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (n, d)
    return kern.rms(rows, w, eps, torch.empty_like(rows)).view(x.shape)


def _native_norm(mod: torch.nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The decode step's C RMSNorm for this norm module, where it gives the module's own bits on
    random bf16 rows (in either norm form: 1 + w as Gemma applies it, or w); else None."""
    eps = getattr(mod, "eps", getattr(mod, "variance_epsilon", None))
    weight = getattr(mod, "weight", None)
    if (not type(mod).__name__.endswith("RMSNorm") or eps is None or not isinstance(weight, Tensor)
            or weight.dim() != 1 or weight.dtype != torch.bfloat16 or weight.shape[0] % 2):
        return None
    d, eps = weight.shape[0], float(eps)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, d, generator=g) * torch.logspace(-2, 2, d)).bfloat16()  # (16, d), magnitudes as a stream's
    want = mod(x)
    for form in NORM_FORMS:
        kern, _status = norm_kernels(d, 1, d, eps, form)
        w = norm_weight(mod, form)
        if kern is not None and torch.equal(_native_rms(kern, w, eps, x), want):
            return partial(_native_rms, kern, w, eps)
    return None


@contextmanager
def _native_norms(layers: torch.nn.Module) -> Iterator[int]:
    """While the calibration runs the layers over its whole batch, their bf16 RMSNorms run as the
    decode step's C kernel, one pass over memory where torch makes ~10 (bench/README.md has the
    first start's time), and only where it gives each module's own bits: the rounding is the same.
    Yields how many norms run natively (none where the kernels are off or cannot be built)."""
    patched = []
    try:
        for mod in layers.modules():
            forward = _native_norm(mod)
            if forward is not None:
                mod.forward = forward  # an instance attribute: shadows the class's forward
                patched.append(mod)
        yield len(patched)
    finally:
        for mod in patched:
            del mod.forward


def _groups(layer: torch.nn.Module, hidden: Tensor, kwargs: dict,
            full: list[Tensor | None] | None = None) -> tuple[list[_Group], Tensor]:
    """The layer's linears grouped by shared input, each with its Hessian; with `full` (the full
    model's inputs, group by group, None where not tracked), those groups' cross terms too. And
    the layer's output (as it is, before rounding)."""
    groups: list[_Group] = []

    def visit(i: int, x: Tensor, names: list[str], _normed: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        n = x.shape[0]
        f = None if full is None else full[i]
        groups.append(_Group(names, _gram(x) / n, None if f is None else f.T @ x / n))  # (in, in)

    out = _grouped_inputs(layer, hidden, kwargs, visit)
    return groups, out


def _full_inputs(layer: torch.nn.Module, hidden: Tensor, kwargs: dict) -> tuple[list[Tensor | None], Tensor]:
    """The full-precision layer on the full model's hidden states: the inputs of the groups that
    read the normalised residual stream (None for the others), and the layer's output. Only those
    targets move towards the full model's output: moving o_proj's and down_proj's too bought no
    measurable perplexity for ~30 s more of first start, and alone they raised the KL (bench/README.md)."""
    inputs: list[Tensor | None] = []

    def visit(_i: int, x: Tensor, _names: list[str], normed: bool) -> None:
        inputs.append(x.reshape(-1, x.shape[-1]).float() if normed else None)

    out = _grouped_inputs(layer, hidden, kwargs, visit)
    return inputs, out


def round_linears(weights: list[Tensor], h: Tensor, cfg: GptqConfig = GptqConfig(), *,
                  cross: Tensor | None = None) -> list[Rounded]:
    """Round linears that share their input (Hessian h) together: starting from plain NF4's
    (double-quantized) scales, `cfg.rounds` times the codes by GPTQ under the scales bitsandbytes
    will multiply by, then the scales by least squares for those codes (both on the damped
    objective). Each row is its own problem, so the rows of all the weights go through at once;
    double quantization stays per weight, as stored. With `cross` (X^T X~ / n, the full model's
    input against the rounded one's) and cfg.toward_full, the target moves towards the full model's
    output (nf4grid.toward_full_output)."""
    w = torch.cat([x.float() for x in weights])  # (sum of outs, in)
    if cross is not None and cfg.toward_full:
        w = toward_full_output(w, h, cross, damp=cfg.damp, toward=cfg.toward_full)
    cuts = [x.shape[0] for x in weights]

    def stored(scales: Tensor) -> Tensor:  # what bitsandbytes will multiply by, weight by weight
        return torch.cat([double_quantize(s)[0] for s in scales.split(cuts)])

    scales = block_absmax(w)
    factor = gptq_factor(h, cfg)  # every round and weight shares it
    for _ in range(cfg.rounds):
        index = gptq_nf4(w, h, stored(scales), cfg, factor=factor)
        scales = refit_scales(w, h, index, damp=cfg.damp)
    return [Rounded(index=i, scales=s) for i, s in zip(index.split(cuts), scales.split(cuts))]


@torch.inference_mode()
def calibrate(model: torch.nn.Module, ids: Tensor, cfg: GptqConfig = GptqConfig(), *,
              progress: Callable[[str], None] | None = None) -> dict[str, Rounded]:
    """Round every linear layer inside the decoder layers of `model` (full precision, CPU) onto the
    NF4 grid for calibration token ids (N, T). Returns {module name: Rounded}; `model`'s weights are
    left holding what the codes stand for (its outputs are the 4-bit model's)."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.") and mod.in_features % BLOCK:
            raise ValueError(f"{name}: in_features {mod.in_features} is not a multiple of the NF4 block ({BLOCK})")
    t0 = time.perf_counter()
    hidden, kwargs = _layer_inputs(model, ids)
    hidden_full = hidden if cfg.toward_full else None  # the full model's stream, where targets need it
    prefix = next(n for n, m in model.named_modules() if m is layers)
    chosen: dict[str, Rounded] = {}
    with _native_norms(layers):
        for i, layer in enumerate(layers):
            linears = _linears(layer)
            # Until a layer is rounded both models' inputs are the same: the targets are the weights
            # themselves, and the full model's output is the one the Hessians' pass computes.
            same = hidden_full is hidden
            full = None
            if hidden_full is not None and not same:  # before this layer is rounded
                full, hidden_full = _full_inputs(layer, hidden_full, kwargs[i])
            groups, unrounded_out = _groups(layer, hidden, kwargs[i], full)
            if same:
                hidden_full = unrounded_out
            for g in groups:
                rounded = round_linears([linears[n].weight for n in g.names], g.h, cfg, cross=g.cross)
                for name, r in zip(g.names, rounded):
                    scales = double_quantize(r.scales)[0]  # what bitsandbytes will multiply by
                    linears[name].weight.copy_(dequantize(r.index, scales).to(linears[name].weight.dtype))
                    chosen[f"{prefix}.{i}.{name}"] = r
            del full
            out = layer(hidden, **kwargs[i])
            hidden = out[0] if isinstance(out, tuple) else out
            if progress:
                progress(f"layer {i + 1}/{len(layers)} rounded ({time.perf_counter() - t0:.0f} s)")
    return chosen
