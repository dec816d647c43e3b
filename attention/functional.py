"""Scaled dot-product attention written out step by step, plus the fused fast path.

``scaled_dot_product`` is the explicit, traceable version (what the heatmaps and the debug
printout use). It follows Hugging Face's ``eager_attention_forward`` closely (GQA by repeating
K/V, additive float masks, tanh softcapping, softmax in float32 then cast back), so the same
function can stand in for a real model's attention. ``fused_attention`` is the memory-lean path
through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .trace import Trace

__all__ = ["scaled_dot_product", "fused_attention", "make_mask", "repeat_kv", "keep_from_mask"]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, d) -> (B, Hkv * n_rep, S, d); query head h reads KV head h // n_rep (as HF's repeat_kv)."""
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def _masked_threshold(dtype: torch.dtype) -> float:
    # Additive masks mark dropped keys with -inf or the dtype's lowest value (HF uses finfo(dtype).min);
    # anything at or below this threshold counts as "masked" for the fully-masked-row rule.
    return max(torch.finfo(dtype).min / 2, -1e9)


def keep_from_mask(mask: Tensor) -> Tensor:
    """Boolean keep-mask (True = attend) from a boolean or additive float mask; same shape."""
    if mask.dtype == torch.bool:
        return mask
    return mask > _masked_threshold(mask.dtype)


def make_mask(
    batch: int,
    t_q: int,
    t_k: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Boolean attention mask (B, 1, T, S), True = keep, or None when nothing is masked.

    causal: query i sees keys j <= i + (S - T) (queries are the last T positions, as with a KV cache).
    key_padding_mask: (B, S), True (or 1) = real token, False (or 0) = padding.
    """
    for label, value in (("batch", batch), ("t_q", t_q), ("t_k", t_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}={value!r} must be a positive int")
    if causal and t_q > t_k:
        raise ValueError(f"causal mask needs t_q <= t_k (queries are the last keys), got t_q={t_q}, t_k={t_k}")
    mask: Tensor | None = None
    if causal:
        i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
        j = torch.arange(t_k, device=device)[None, :]
        mask = (j <= i)[None, None].expand(batch, 1, t_q, t_k)  # (B, 1, T, S)
    if key_padding_mask is not None:
        kpm = _check_key_padding_mask(key_padding_mask, batch, t_k)
        if device is not None:
            kpm = kpm.to(device)
        pad = kpm[:, None, None, :]  # (B, 1, 1, S)
        mask = pad.expand(batch, 1, t_q, t_k) if mask is None else mask & pad  # (B, 1, T, S)
    return mask


def _check_key_padding_mask(kpm: Tensor, batch: int, t_k: int) -> Tensor:
    if not isinstance(kpm, Tensor):
        raise ValueError(f"key_padding_mask must be a torch.Tensor of shape ({batch}, {t_k}), got {type(kpm).__name__}")
    if tuple(kpm.shape) != (batch, t_k):
        raise ValueError(
            f"key_padding_mask has shape {tuple(kpm.shape)}; expected (batch, seq_len) = ({batch}, {t_k}), "
            "True (or 1) = keep the token, False (or 0) = padding"
        )
    if kpm.dtype == torch.bool:
        return kpm
    if kpm.dtype.is_floating_point or kpm.dtype.is_complex:
        raise ValueError(
            f"key_padding_mask has dtype {kpm.dtype}; use a bool tensor (True = keep) or 0/1 integers"
        )
    if not bool(((kpm == 0) | (kpm == 1)).all()):
        raise ValueError("key_padding_mask of integer dtype must hold only 0 (padding) and 1 (keep)")
    return kpm.bool()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{label} has dtype {t.dtype}; expected a floating dtype (float32, bfloat16, ...)")
    if q.dim() not in (3, 4):
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (B, H, T, d) or, for one head, (B, T, d)")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"q, k, v must have the same rank; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on all but the last axis")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: q has d={q.shape[-1]}, k has d={k.shape[-1]}")
    if q.dim() == 4 and q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads and k/v have {k.shape[1]}; the number of query heads must be "
            "a multiple of the number of KV heads (grouped-query attention)"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _check_mask(mask: Tensor, target: tuple[int, ...]) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor (bool, True = keep, or additive float), got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise ValueError(f"mask has dtype {mask.dtype}; use bool (True = keep) or an additive float mask")
    try:
        ok = mask.dim() <= len(target) and torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to the scores' shape {target}")


def _check_options(scale: float | None, dropout_p: float, softcap: float | None, sliding_window: int | None) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive number (default 1/sqrt(d))")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be a positive number or None")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive int or None")


def scaled_dot_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    softcap: float | None = None,
    sliding_window: int | None = None,
    trace: Trace | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Explicit attention: softmax(mask(q kᵀ · scale)) v, every step visible.

    q: (B, H, T, d); k, v: (B, Hkv, S, d) with H % Hkv == 0 (K/V repeated per group, like HF's
    repeat_kv). A single head may drop the head axis: q (B, T, d), k/v (B, S, d).
    mask: bool (True = keep) or additive float (0 = keep, -inf / finfo.min = drop), broadcastable
    to (B, H, T, S). scale: default 1/sqrt(d). softcap: scores -> softcap * tanh(scores / softcap)
    (Gemma 2 style). sliding_window: keys with (query position - key position) >= window are
    dropped, queries being the last T of the S positions (HF's sliding_window_overlay).
    generator: makes dropout reproducible without touching the global RNG.
    trace: records "qk", "scores", "softcapped" (if used), "masked", "weights", "dropped" (if
    dropout acts) and "context"; "scores", "weights" and "context" are the printed ones.

    Returns out (B, H, T, d) and weights (B, H, T, S): the softmax probabilities before dropout,
    computed in float32 (float64 stays float64) and cast back to q's dtype. A query row whose
    keys are all masked gets zero weights and zero output, never NaN.
    """
    _check_qkv(q, k, v)
    _check_options(scale, dropout_p, softcap, sliding_window)
    if q.dim() == 4:
        n_rep = q.shape[1] // k.shape[1]
        k = repeat_kv(k, n_rep)  # (B, H, S, d)
        v = repeat_kv(v, n_rep)  # (B, H, S, d)
    t_q, t_k = q.shape[-2], k.shape[-2]
    score_shape = (*q.shape[:-1], t_k)
    if mask is not None:
        _check_mask(mask, score_shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    # One name, rebound step by step (as nanoGPT's `att`), so that without a trace each (T, S)
    # intermediate is freed as soon as the next one exists: the explicit path's peak memory is
    # what the maths needs, not every step at once.
    att = q @ k.transpose(-2, -1)  # (B, H, T, S): raw QKᵀ
    if trace is not None:
        trace.add("qk", att, printed=False)
    att = att * scale  # (B, H, T, S): scores
    if trace is not None:
        trace.add("scores", att)
    if softcap is not None:
        att = softcap * torch.tanh(att / softcap)  # (B, H, T, S)
        if trace is not None:
            trace.add("softcapped", att, printed=False)

    keep: Tensor | None = None
    if mask is not None:
        keep = keep_from_mask(mask)  # broadcastable to (B, H, T, S)
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask  # (B, H, T, S)
    if sliding_window is not None:
        pos_q = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
        pos_k = torch.arange(t_k, device=q.device)[None, :]
        in_window = pos_q - pos_k < sliding_window  # (T, S)
        keep = in_window if keep is None else keep & in_window
        att = att.masked_fill(~in_window, float("-inf"))  # (B, H, T, S)
    if trace is not None:
        trace.add("masked", att, printed=False)

    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if keep is None:
        weights = F.softmax(att, dim=-1, dtype=softmax_dtype).to(q.dtype)  # (B, H, T, S)
    else:
        # A row with no key left would be softmax over all -inf = NaN (and NaN gradients), so give
        # it finite logits first and zero its probabilities afterwards.
        dead = ~keep.any(dim=-1, keepdim=True)  # broadcastable to (B, H, T, 1)
        weights = F.softmax(att.masked_fill(dead, 0.0), dim=-1, dtype=softmax_dtype)  # (B, H, T, S)
        weights = weights.masked_fill(dead, 0.0).to(q.dtype)  # (B, H, T, S)
    del att
    if trace is not None:
        trace.add("weights", weights)

    dropped = weights
    if training and dropout_p > 0.0:
        if generator is None:
            dropped = F.dropout(weights, p=dropout_p, training=True)  # (B, H, T, S)
        else:
            survive = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
            dropped = weights * survive.to(weights.dtype) / (1.0 - dropout_p)  # (B, H, T, S)
        if trace is not None:
            trace.add("dropped", dropped, printed=False)
    out = dropped @ v  # (B, H, T, d)
    if trace is not None:
        trace.add("context", out)
    return out, weights


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Fast path through ``F.scaled_dot_product_attention`` (no T x T weights kept: memory linear in T).

    q: (B, H, T, d) or (B, T, d); k, v: (B, Hkv, S, d) or (B, S, d); key_padding_mask: (B, S) bool
    (True = keep). Same result as :func:`scaled_dot_product`'s ``out`` (fully masked rows -> 0).
    """
    _check_qkv(q, k, v)
    _check_options(scale, dropout_p, None, None)
    b, t_q, t_k = q.shape[0], q.shape[-2], k.shape[-2]
    p = dropout_p if training else 0.0
    gqa = q.dim() == 4 and q.shape[1] != k.shape[1]
    if key_padding_mask is None:
        # is_causal lets the kernel skip the mask entirely (no (T, S) tensor at all).
        if causal and t_q != t_k:
            mask = make_mask(b, t_q, t_k, causal=True, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if q.dim() == 4 else mask[:, 0],
                                                  dropout_p=p, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = make_mask(b, t_q, t_k, causal=causal, key_padding_mask=key_padding_mask, device=q.device)  # (B, 1, T, S)
    if q.dim() == 3:
        mask = mask[:, 0]  # (B, T, S)
    # Some kernels return NaN for rows with no key: let such rows see every key, then zero them.
    dead = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | dead, dropout_p=p, scale=scale, enable_gqa=gqa)
    return out.masked_fill(dead, 0.0)  # (B, H, T, d)
