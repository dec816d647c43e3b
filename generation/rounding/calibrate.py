"""Choose NF4 codes and scales for a whole decoder model, layer after layer, on calibration text.

The model (full precision) runs its decoder layers one at a time on the calibration batch. For each
layer: the inputs of its linear layers give each one's Hessian H = X^T X / n; every linear is rounded
onto the NF4 grid (nf4grid.gptq_nf4, then nf4grid.refit_scales, in turn `rounds` times; the linears
that share an input in one pass); the layer's weights are replaced by
what the codes stand for, and the layer runs again so the next layer calibrates on the inputs the
*rounded* model gives it (errors are corrected, not compounded: GPTQ's sequential order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .nf4grid import BLOCK, GptqConfig, block_absmax, dequantize, double_quantize, gptq_factor, gptq_nf4, refit_scales


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


def _hessians(layer: torch.nn.Module, hidden: Tensor, kwargs: dict) -> list[tuple[list[str], Tensor]]:
    """The layer's linears grouped by the input they share (q/k/v; gate/up), each group with that
    input's Hessian X^T X / n."""
    groups: dict[tuple, tuple[list[str], Tensor]] = {}
    seen: list[Tensor] = []  # held until the end: a freed input's address could be reused by another

    def hook(name: str):
        def fn(_mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in groups:
                seen.append(x)
                flat = x.reshape(-1, x.shape[-1]).float()  # (n, in)
                groups[key] = ([], flat.T @ flat / flat.shape[0])  # (in, in)
            groups[key][0].append(name)
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in _linears(layer).items()]
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return list(groups.values())


def round_linears(weights: list[Tensor], h: Tensor, cfg: GptqConfig = GptqConfig()) -> list[Rounded]:
    """Round linears that share their input (Hessian h) together: starting from plain NF4's
    (double-quantized) scales, `cfg.rounds` times the codes by GPTQ under the scales bitsandbytes
    will multiply by, then the scales by least squares for those codes (both on the damped
    objective). Each row is its own problem, so the rows of all the weights go through at once;
    double quantization stays per weight, as stored."""
    w = torch.cat([x.float() for x in weights])  # (sum of outs, in)
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
    prefix = next(n for n, m in model.named_modules() if m is layers)
    chosen: dict[str, Rounded] = {}
    for i, layer in enumerate(layers):
        linears = _linears(layer)
        for names, h in _hessians(layer, hidden, kwargs[i]):
            for name, r in zip(names, round_linears([linears[n].weight for n in names], h, cfg)):
                scales = double_quantize(r.scales)[0]  # what bitsandbytes will multiply by
                linears[name].weight.copy_(dequantize(r.index, scales).to(linears[name].weight.dtype))
                chosen[f"{prefix}.{i}.{name}"] = r
        out = layer(hidden, **kwargs[i])
        hidden = out[0] if isinstance(out, tuple) else out
        if progress:
            progress(f"layer {i + 1}/{len(layers)} rounded ({time.perf_counter() - t0:.0f} s)")
    return chosen
