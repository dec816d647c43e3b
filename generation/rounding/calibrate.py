"""Choose NF4 codes and scales for a whole decoder model, layer after layer, on calibration text.

The model (full precision) runs its decoder layers one at a time on the calibration batch. For each
layer: the inputs of its linear layers give each one's Hessian H = X^T X / n; every linear is rounded
onto the NF4 grid (nf4grid.gptq_nf4, then nf4grid.refit_scales); the layer's weights are replaced by
what the codes stand for, and the layer runs again so the next layer calibrates on the inputs the
*rounded* model gives it (errors are corrected, not compounded: GPTQ's sequential order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .nf4grid import BLOCK, GptqConfig, block_absmax, dequantize, double_quantize, gptq_nf4, refit_scales


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
    (masks, rotary embeddings), from one forward pass of `ids` (N, T)."""
    layers = decoder_layers(model)
    first: list[Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]

    def grab(i: int):
        def hook(_mod, args, kw):
            if i == 0:
                first.append(args[0] if args else kw["hidden_states"])
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first[0], kwargs


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}


def _hessians(layer: torch.nn.Module, hidden: Tensor, kwargs: dict) -> tuple[dict[str, Tensor], Tensor]:
    """Each linear's input Hessian X^T X / n (inputs shared by several linears counted once), and
    the layer's output for `hidden`."""
    sums: dict[tuple, Tensor] = {}
    counts: dict[tuple, int] = {}
    key_of: dict[str, tuple] = {}

    def hook(name: str):
        def fn(_mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            key_of[name] = key
            if key not in sums:
                flat = x.reshape(-1, x.shape[-1]).float()  # (n, in)
                sums[key] = flat.T @ flat  # (in, in)
                counts[key] = flat.shape[0]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in _linears(layer).items()]
    try:
        out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    return {name: sums[key] / counts[key] for name, key in key_of.items()}, out


def round_linear(weight: Tensor, h: Tensor, cfg: GptqConfig = GptqConfig()) -> Rounded:
    """NF4 codes by GPTQ under plain NF4's (double-quantized) scales, then least-squares scales."""
    w = weight.float()
    start = double_quantize(block_absmax(w))[0]  # (out, G)
    index = gptq_nf4(w, h, start, cfg)
    return Rounded(index=index, scales=refit_scales(w, h, index))


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
        hessians, _ = _hessians(layer, hidden, kwargs[i])
        for name, lin in _linears(layer).items():
            r = round_linear(lin.weight, hessians[name], cfg)
            scales = double_quantize(r.scales)[0]  # what bitsandbytes will multiply by
            lin.weight.copy_(dequantize(r.index, scales).to(lin.weight.dtype))
            chosen[f"{prefix}.{i}.{name}"] = r
        out = layer(hidden, **kwargs[i])
        hidden = out[0] if isinstance(out, tuple) else out
        if progress:
            progress(f"layer {i + 1}/{len(layers)} rounded ({time.perf_counter() - t0:.0f} s)")
    return chosen
