"""Route a transformers model's attention through the project's own code, one thread at a time.

`install(model)` registers ONE attention implementation, ``"attention_lab"``, in transformers'
`AttentionInterface` (the attention function) and `AttentionMaskInterface` (the mask builder),
and switches the model to it once, right after loading. From then on every attention call of the
model goes through `attention_lab_forward`, which

* by default delegates to the implementation the model had before (transformers' own ``sdpa`` or
  the model's ``eager`` function), with the masks that implementation expects, so generation is
  bit-for-bit what it was; and
* inside a `capture(...)` block opened by the *calling thread*, computes the requested layers with
  `attention.functional.scaled_dot_product` and records their softmax weights;
* inside an `ablate(...)` block opened by the calling thread, zeroes the output of the chosen
  (layer, head) pairs, i.e. their slice of the input of ``o_proj``, so the model runs as if those
  heads were switched off.

Why thread-local and not a switch of ``config._attn_implementation`` (or a hook on the shared
``o_proj``): the model is shared by every user of the app. A chat streaming in a worker thread must
keep its fast, unablated attention while another request, in its own thread, asks for a map or
switches heads off; a thread-local flag is seen only by the thread that set it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

IMPL_NAME = "attention_lab"
# Implementations we know how to delegate to: each needs its own mask format (bool / additive) and
# neither needs model-side preparation keyed on the implementation's name (flash attention does).
SUPPORTED_DELEGATES = ("sdpa", "eager")

_local = threading.local()
_install_lock = threading.Lock()
_registered = False
# id(config) -> the implementation that config used before install(); configs are not hashable.
_delegates: dict[int, str] = {}


class CaptureUnsupported(ValueError):
    """The model's attention cannot be routed through the project's code (with the reason why)."""


@dataclass
class _CaptureState:
    layers: frozenset[int] | None  # computed by the project's code; None = every layer
    record: frozenset[int] | None  # of those, the layers whose weights are kept; None = all computed
    weights: dict[int, torch.Tensor] = field(default_factory=dict)


def active_ablation() -> dict[int, tuple[int, ...]] | None:
    """This thread's open `ablate` block as {layer: heads}, or None outside one."""
    return getattr(_local, "ablation", None)


def ablated_heads(layer: int | None) -> tuple[int, ...]:
    """Heads of `layer` this thread has switched off (empty outside an `ablate` block)."""
    ablation = active_ablation()
    if not ablation or layer is None:
        return ()
    return ablation.get(layer, ())


def _zero_heads(out: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """out (B, T, H, d) with heads' slices set to 0: the o_proj input of a switched-off head.

    Out of place: the delegate's output is a fresh tensor today, but nothing promises it is not
    a view of something the model reuses.
    """
    n_heads = out.shape[2]
    bad = [h for h in heads if h >= n_heads]
    if bad:
        raise ValueError(f"cannot switch off head(s) {bad}: this layer has {n_heads} heads (0 to {n_heads - 1})")
    return out.index_fill(2, torch.tensor(heads, device=out.device), 0.0)


def delegate_name(config: object) -> str:
    """The implementation ("sdpa" | "eager") the dispatcher hands `config`'s attention to when it
    does not compute it itself: what the model used before `install`."""
    return _delegates.get(id(config), "sdpa")


def _eager_function(module: nn.Module):
    # Each modeling file defines its own eager function (Gemma's adds softcapping), so take the module's.
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def attention_lab_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one registered attention function: q (B, H, T, d), k/v (B, Hkv, S, d) -> out (B, T, H, d), weights."""
    state: _CaptureState | None = getattr(_local, "state", None)
    layer = getattr(module, "layer_idx", None)
    captured = state is not None and (state.layers is None or layer in state.layers)
    switched_off = ablated_heads(layer)
    if not captured:
        delegate = delegate_name(module.config)
        fn = _eager_function(module) if delegate == "eager" else sdpa_attention_forward
        out, weights = fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        # out (B, T, H, d) is reshaped to (B, T, H*d) and fed to o_proj: zeroing [..., h, :] zeroes
        # exactly head h's columns of o_proj's input.
        return (_zero_heads(out, switched_off) if switched_off else out), weights

    from attention.functional import make_mask, scaled_dot_product  # the project's maths, not a copy

    mask = attention_mask
    if mask is None and getattr(module, "is_causal", True):
        # Only when a caller's ready-made 4D mask bypassed our mask builder: rebuild the causal pattern.
        mask = make_mask(1, query.shape[-2], key.shape[-2], causal=True, device=query.device)  # (1, 1, T, S)
    # The model's own dtype, like transformers' eager path (softmax in float32 inside), so the map is
    # the attention this model computes, bit for bit, also in bf16.
    out, weights = scaled_dot_product(
        query,
        key,
        value,
        mask,
        scale=scaling,
        dropout_p=dropout,
        training=module.training,
        softcap=kwargs.get("softcap"),
        # Already part of transformers' mask; passed too so the window is applied by the project's code.
        sliding_window=kwargs.get("sliding_window"),
    )  # (B, H, T, d), (B, H, T, S)
    if state.record is None or layer in state.record:
        state.weights[layer] = weights.detach()  # the head's attention is still recorded when it is switched off
    out = out.transpose(1, 2).contiguous()  # (B, T, H, d)
    return (_zero_heads(out, switched_off) if switched_off else out), weights


def _attention_lab_mask(*args, **kwargs) -> torch.Tensor | None:
    """The registered mask builder: the delegate's own mask, always materialised while capturing."""
    delegate = delegate_name(kwargs.get("config"))
    if delegate == "eager":
        return eager_mask(*args, **kwargs)  # additive float, never skipped
    if getattr(_local, "state", None) is not None:
        # sdpa may return None and rely on is_causal; the project's function needs the real mask.
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)  # bool, True = keep


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(IMPL_NAME, attention_lab_forward)
        AttentionMaskInterface.register(IMPL_NAME, _attention_lab_mask)
        _registered = True


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The model's self-attention modules by layer index (modules with a ``layer_idx`` and ``q_proj``)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "q_proj") and idx not in found:
            found[idx] = module
    return found


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `install` cannot route this model's attention through the project's code, or None if it can."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return f"{name} is not a transformers PreTrainedModel"
    if not type(model).is_backend_compatible():
        return (
            f"{name} computes attention inside its own layers instead of through transformers' AttentionInterface, "
            "so its attention maps cannot be computed by the project's code"
        )
    current = model.config._attn_implementation
    if current != IMPL_NAME and current not in SUPPORTED_DELEGATES:
        return (
            f"{name} was loaded with attn_implementation={current!r}; attention maps need the model loaded with "
            f"one of {SUPPORTED_DELEGATES} (the default is 'sdpa')"
        )
    if not attention_modules(model):
        return f"{name} has no attention layers with q_proj and layer_idx"
    return None


def is_installed(model: nn.Module) -> bool:
    """True once `install` has switched this model to the dispatcher."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == IMPL_NAME


def install(model: PreTrainedModel) -> bool:
    """Switch `model` to the "attention_lab" dispatcher (idempotent). Returns False (model untouched) if unsupported.

    Call once after loading, before the model is shared: the switch itself is the only moment the
    model's configuration changes, and what it switches to computes the same attention as before.
    """
    with _install_lock:
        if is_installed(model):
            return True
        if unsupported_reason(model) is not None:
            return False
        _register()
        configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
        for key, config in configs.items():
            delegate = config._attn_implementation
            _delegates[key] = delegate if delegate in SUPPORTED_DELEGATES else "sdpa"
            weakref.finalize(config, _delegates.pop, key, None)
        model.set_attn_implementation(IMPL_NAME)
        return True


@contextmanager
def capture(
    layers: Iterable[int] | None = None, *, record: Iterable[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, this thread's forwards record attention weights {layer: (B, H, T, S)}.

    layers: the layer indices to compute with the project's code (None = all); the others run the
    model's usual attention. record: of those, the layers whose weights are kept (None = all of
    them): every layer can run through the project's code while only one layer's (B, H, T, T)
    map is held in memory. Other threads are not affected.
    """
    if getattr(_local, "state", None) is not None:
        raise RuntimeError("attention capture blocks cannot be nested")
    state = _CaptureState(
        frozenset(layers) if layers is not None else None, frozenset(record) if record is not None else None
    )
    _local.state = state
    try:
        yield state.weights
    finally:
        _local.state = None


def _normalise_heads(heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """{layer: sorted heads} from {layer: heads} or (layer, head) pairs; ValueError on anything else."""
    pairs: list[tuple[int, int]] = []
    if isinstance(heads, Mapping):
        for layer, hs in heads.items():
            if isinstance(hs, (str, bytes)) or not isinstance(hs, Iterable):
                raise ValueError(f"heads[{layer!r}] must be an iterable of head indices, got {hs!r}")
            pairs.extend((layer, h) for h in hs)
    elif isinstance(heads, Iterable) and not isinstance(heads, (str, bytes)):
        for pair in heads:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"heads must be (layer, head) pairs, got {pair!r}")
            pairs.append(pair)
    else:
        raise ValueError(f"heads must be (layer, head) pairs or {{layer: heads}}, got {type(heads).__name__}")
    out: dict[int, set[int]] = {}
    for layer, head in pairs:
        for name, v in (("layer", layer), ("head", head)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} index must be a non-negative integer, got {v!r} in ({layer!r}, {head!r})")
        out.setdefault(layer, set()).add(head)
    return {layer: tuple(sorted(hs)) for layer, hs in out.items()}


@contextmanager
def ablate(heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]) -> Iterator[dict[int, tuple[int, ...]]]:
    """Within the block, this thread's forwards run with the given heads switched off.

    heads: (layer, head) pairs or {layer: heads}. A switched-off head's attention output (its
    slice of o_proj's input, d columns) is replaced by zeros in every forward of this thread,
    prefill and decode steps alike; nothing else changes. Other threads are not affected. Empty =
    the plain model. Indices are range-checked against the layer when it runs (a head beyond the
    layer's count raises ValueError); a layer the model does not have is simply never reached, so
    callers that know the model should check layers first (`generation.inside.check_heads` does).
    Needs `install(model)`; can be combined with `capture` but not nested in another `ablate`.
    Yields the normalised {layer: heads}.
    """
    if getattr(_local, "ablation", None) is not None:
        raise RuntimeError("head ablation blocks cannot be nested")
    ablation = _normalise_heads(heads)
    _local.ablation = ablation
    try:
        yield ablation
    finally:
        _local.ablation = None
