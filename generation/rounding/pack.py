"""Chosen NF4 codes and block scales -> the packed weight and QuantState a bitsandbytes Linear4bit
holds, byte for byte as `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4",
compress_statistics=True)` lays them out, so transformers saves and loads them like any NF4 model."""

from __future__ import annotations

import torch
from torch import Tensor

from .nf4grid import BLOCK, double_quantize


def pack_indices(index: Tensor) -> Tensor:
    """(out, in) indices 0..15 -> (out * in / 2, 1) uint8, the even element in the high nibble."""
    flat = index.reshape(-1).to(torch.uint8)
    return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)


def quant_state(index: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16):
    """(packed weight, QuantState) for indices (out, in) and fp32 block scales (out, in // BLOCK),
    the scales double-quantized as bitsandbytes does it."""
    from bitsandbytes.functional import QuantState, get_4bit_type

    out, n = index.shape
    if n % BLOCK:
        raise ValueError(f"in_features must be a multiple of {BLOCK}, got {n}")
    if scales.shape != (out, n // BLOCK):
        raise ValueError(f"scales must have shape {(out, n // BLOCK)}, got {tuple(scales.shape)}")
    _, q8, offset, state2 = double_quantize(scales)
    state = QuantState(
        absmax=q8,
        shape=torch.Size((out, n)),
        code=get_4bit_type("nf4", device="cpu"),
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=dtype,
        offset=offset,
        state2=state2,
    )
    return pack_indices(index), state


def install(linear: torch.nn.Module, index: Tensor, scales: Tensor) -> None:
    """Put the chosen codes and scales into a bitsandbytes Linear4bit (in place, same layer type)."""
    import bitsandbytes as bnb

    if not isinstance(linear, bnb.nn.Linear4bit):
        raise ValueError(f"expected a bitsandbytes Linear4bit, got {type(linear).__name__}")
    packed, state = quant_state(index, scales, linear.weight.quant_state.dtype)
    linear.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=BLOCK, compress_statistics=True,
        quant_type="nf4", quant_storage=torch.uint8, bnb_quantized=True, module=linear,
    )
