"""One decode-step interface for the chat engine's loop, with its two implementations side by side.

The loop only ever calls a `DecodeStep`: `prefill` (a chunk of prompt tokens of every row of a
prefill group), `step` (one new token of every running row) and `pick` (the next token of each
row from what those return). Behind it:

* `ModelStep`: the model's own forward (transformers), on the engine's `SlotKVCache` with per-row
  positions and masks (`attention_masks`); returns each row's last logits. Any model the engine
  takes, any device.
* `LeanStep`: where an NF4 model of a family the lean step describes (`generation.decode.family`:
  Gemma 3, Qwen2, Qwen3, Llama, Mistral) runs on CPU with sdpa, prefill through the model's body
  (its last hidden states), decode through `BatchDecodeStep` (bit for bit the model path's
  numbers, without its per-step machinery), and every token through the int8 LM head, chosen
  exactly (`pick_tokens`). `lean_step` builds it, or says why not.

Both return one tensor per call and write keys/values straight into the caller's cache; nothing
is copied between them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from ..model import LoadedModel
from .sampler import BatchSampler, RowSampling
from .cache import SlotKVCache, attention_masks

__all__ = ["DecodeStep", "LeanStep", "ModelStep", "attention_delegate", "lean_step"]

log = logging.getLogger(__name__)


@runtime_checkable
class DecodeStep(Protocol):
    """What the engine's loop calls for every forward; owned by the loop thread."""

    n_layers: int
    device: torch.device  # where the model's layers are (inputs go there)
    lean: bool  # the lean NF4 decode (counted as the engine's fast steps)

    def prefill(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                span: int, ends: list[int], counts: list[int]) -> torch.Tensor:
        """One forward of ids (n, T) at positions (n, T), writing K/V at write_positions (n, T) of
        `cache`; row b's real tokens are its last counts[b], the last at position ends[b] - 1 (left
        padding), over keys 0..span-1 -> each row's last output (n, ...) for `pick`."""
        ...

    def step(self, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens (n,), row b's at position positions[b] (n,) (rows 0..n-1 of
        `cache`, each attending to its positions [0, positions[b]]) -> (n, ...) for `pick`."""
        ...

    def pick(self, out: torch.Tensor, rows: Sequence[RowSampling], sampler: BatchSampler) -> list[int]:
        """The next token of each row from `prefill`'s or `step`'s output."""
        ...


def attention_delegate(config) -> str:
    """The attention implementation that actually runs ("sdpa" / "eager"), looking through the
    project's "attention_lab" dispatcher; ValueError for any other."""
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == "attention_lab":
        from ..inside import delegate_name

        return delegate_name(config)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"the chat engine needs sdpa or eager attention, the model uses {impl!r}")
    return impl


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


class ModelStep:
    """The model's own forward behind `DecodeStep`: logits (n, V) of each row's last position.

    ValueError for a model the engine cannot batch (attention layers other than full and sliding
    window, an attention implementation other than sdpa or eager)."""

    lean = False

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = model_device(lm.model)
        cfg = getattr(lm.model.config, "text_config", None) or lm.model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"the chat engine supports full and sliding-window attention layers, not {sorted(unknown)}")
        self.window = getattr(cfg, "sliding_window", None)
        # A family whose every layer attends within its window (Mistral with a sliding_window) has
        # no layer types: its one mask is the sliding one.
        from .family import FAMILIES

        family = FAMILIES.get(getattr(cfg, "model_type", ""))
        self.all_sliding = bool(self.window) and not self.layer_types and family is not None and family.windows == "all"
        heads = int(cfg.num_attention_heads)
        self.n_rep = heads // int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.additive_mask = attention_delegate(lm.model.config) == "eager"
        # The dtype of the keys (eager's additive mask takes it): known once a cache holds keys.
        self._dtype: torch.dtype | None = None

    def _mask_dtype(self, cache: SlotKVCache) -> torch.dtype:
        if cache.keys[0] is not None:
            self._dtype = cache.keys[0].dtype
        if self._dtype is not None:
            return self._dtype
        return next(self.model.parameters()).dtype if self.lm.quantization == "none" else torch.bfloat16

    def _inputs(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                span: int, ends: list[int], counts: list[int]) -> dict:
        dev = self.device
        positions = positions.to(dev)
        cache.prepare(ids.shape[0], write_positions.to(dev), span)
        masks = attention_masks(positions, span, ends, counts,
                                layer_types=("sliding_attention",) if self.all_sliding else self.layer_types,
                                window=self.window,
                                n_rep=self.n_rep,
                                additive_dtype=self._mask_dtype(cache) if self.additive_mask else None)
        if self.all_sliding:
            masks = masks["sliding_attention"]
        return dict(input_ids=ids.to(dev), position_ids=positions, attention_mask=masks, past_key_values=cache,
                    use_cache=True)

    def prefill(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                span: int, ends: list[int], counts: list[int]) -> torch.Tensor:
        kw = self._inputs(cache, ids, positions, write_positions, span, ends, counts)
        return self.model(**kw, logits_to_keep=1).logits[:, -1, :]

    def step(self, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ends = [p + 1 for p in positions.tolist()]
        pos = positions.unsqueeze(1)
        return self.prefill(cache, tokens.unsqueeze(1), pos, pos, max(ends), ends, [1] * len(ends))

    def pick(self, out: torch.Tensor, rows: Sequence[RowSampling], sampler: BatchSampler) -> list[int]:
        return sampler.sample(out, rows).tolist()


class LeanStep(ModelStep):
    """The lean NF4 decode behind `DecodeStep`: final hidden states (n, D) out of both calls,
    tokens through the int8 LM head. Prefill keeps the model's forward (its body only)."""

    lean = True

    def __init__(self, lm: LoadedModel, batch_step, head) -> None:
        super().__init__(lm)
        self.batch_step = batch_step  # BatchDecodeStep
        self.head = head  # QuantizedHead
        self._logits: torch.Tensor | None = None  # (rows, V) fp32, reused by every pick

    def prefill(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                span: int, ends: list[int], counts: list[int]) -> torch.Tensor:
        kw = self._inputs(cache, ids, positions, write_positions, span, ends, counts)
        return self.model.model(**kw).last_hidden_state[:, -1, :]

    def step(self, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.batch_step(tokens, positions, cache)

    def pick(self, out: torch.Tensor, rows: Sequence[RowSampling], sampler: BatchSampler) -> list[int]:
        from .head import pick_tokens

        n, v = out.shape[0], self.head.shape[0]
        if self._logits is None or self._logits.shape[0] < n:
            self._logits = torch.empty(max(n, 8), v, dtype=torch.float32)
        return pick_tokens(out, self.head, rows, sampler, out=self._logits[:n])


def lean_step(base: ModelStep) -> tuple[DecodeStep, str]:
    """(the lean step, "on: ...") where the model allows it, else (base, "off: why"). Builds the
    lean step and the int8 LM head copy: seconds, so the engine does it once, in its loop thread."""
    lm = base.lm
    why = None
    if base.device.type != "cpu":
        why = f"the model is on {base.device.type}"
    elif lm.quantization != "nf4":
        why = "the model is not 4-bit NF4"
    elif base.additive_mask:
        why = "the model uses eager attention"
    else:
        from .nf4 import fast_path_supported

        why = fast_path_supported(lm.model)
    if why is not None:
        return base, f"off: {why}"
    t0 = time.perf_counter()
    try:
        from ..kernels import native_int8_status
        from .head import quantize_lm_head
        from .lean import BatchDecodeStep

        batch_step = BatchDecodeStep(lm.model)
        head = quantize_lm_head(lm.model)
    except Exception as exc:  # the model's own path serves instead
        log.warning("fast CPU decode unavailable, using the model's forward", exc_info=True)
        return base, f"off: {type(exc).__name__}: {exc}"
    status = (f"on: lean batched step ({batch_step.arch.family.model_type}, {batch_step.norm_status.short}, "
              f"{batch_step.attention_status.short}), "
              f"int8 LM head ({head.nbytes / 2**20:.0f} MiB, {native_int8_status().short}), "
              f"ready in {time.perf_counter() - t0:.1f} s")
    return LeanStep(lm, batch_step, head), status
