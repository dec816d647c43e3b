"""Single-head and multi-head self-attention modules (the notebook's two modules, grown up).

Both own q_proj / k_proj / v_proj / o_proj and hand the maths to :mod:`attention.functional`.
``debug=True`` prints the notebook's shape lines as the forward runs; ``return_trace=True`` gives
the same steps as data without printing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .functional import fused_attention, make_mask, scaled_dot_product
from .trace import Trace

__all__ = ["AttentionConfig", "MultiHeadAttention", "SingleHeadAttention", "valid_head_counts"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_head_counts(emb_dim: int) -> list[int]:
    """Head counts that divide ``emb_dim`` evenly, ascending (e.g. 64 -> [1, 2, 4, 8, 16, 32, 64])."""
    if not _is_int(emb_dim) or emb_dim < 1:
        raise ValueError(f"emb_dim={emb_dim!r} must be a positive int")
    return [n for n in range(1, emb_dim + 1) if emb_dim % n == 0]


def _choices(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class AttentionConfig:
    """Validated sizes of an attention layer.

    emb_dim: model width D; n_heads: query heads H (D % H == 0); n_kv_heads: K/V heads
    (H % n_kv_heads == 0; None = n_heads, 1 = multi-query); dropout: on the attention weights,
    in [0, 1); bias: whether the four projections have a bias.
    """

    emb_dim: int
    n_heads: int = 8
    n_kv_heads: int | None = None
    dropout: float = 0.0
    bias: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if not _is_int(self.emb_dim) or self.emb_dim < 1:
            raise ValueError(f"emb_dim={self.emb_dim!r} must be a positive int")
        if not _is_int(self.n_heads) or self.n_heads < 1:
            raise ValueError(f"n_heads={self.n_heads!r} must be a positive int dividing emb_dim={self.emb_dim}; "
                             f"choose one of {_choices(valid_head_counts(self.emb_dim))}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} does not divide emb_dim={self.emb_dim}; "
                             f"choose one of {_choices(valid_head_counts(self.emb_dim))}")
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        kv_choices = _choices(valid_head_counts(self.n_heads))
        if not _is_int(n_kv) or n_kv < 1:
            raise ValueError(f"n_kv_heads={n_kv!r} must be a positive int dividing n_heads={self.n_heads}; "
                             f"choose one of {kv_choices}")
        if self.n_heads % n_kv != 0:
            raise ValueError(f"n_kv_heads={n_kv} does not divide n_heads={self.n_heads}; choose one of {kv_choices}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias={self.bias!r} must be True or False")
        object.__setattr__(self, "n_kv_heads", n_kv)
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "head_dim", self.emb_dim // self.n_heads)

    @property
    def kv_groups(self) -> list[int]:
        """The KV head each query head reads (query head h -> h // (n_heads // n_kv_heads))."""
        group = self.n_heads // self.n_kv_heads  # type: ignore[operator]
        return [h // group for h in range(self.n_heads)]


class _SelfAttention(nn.Module):
    """Shared machinery; subclasses choose whether tensors carry a head axis."""

    multi_head: bool = True

    def __init__(self, config: AttentionConfig, debug: bool = False) -> None:
        super().__init__()
        if not isinstance(debug, bool):
            raise ValueError(f"debug={debug!r} must be True or False")
        self.config = config
        self.emb_dim = config.emb_dim
        self.n_heads = config.n_heads
        self.n_kv_heads: int = config.n_kv_heads  # type: ignore[assignment]
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.debug = debug
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.emb_dim, config.emb_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.emb_dim, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.emb_dim, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.emb_dim, config.emb_dim, bias=config.bias)

    def extra_repr(self) -> str:
        return (f"emb_dim={self.emb_dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, debug={self.debug}")

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape (B, T, {self.emb_dim}), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x has shape {tuple(x.shape)} (rank {x.dim()}); expected rank 3: (B, T, {self.emb_dim})")
        if x.shape[-1] != self.emb_dim:
            raise ValueError(f"x has width {x.shape[-1]} (shape {tuple(x.shape)}); this module expects "
                             f"emb_dim={self.emb_dim}: (B, T, {self.emb_dim})")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x has shape {tuple(x.shape)}; batch and sequence length must be at least 1")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x has dtype {x.dtype}; expected a floating dtype (float32, bfloat16, ...)")
        return x.shape[0], x.shape[1]

    def _split(self, t: Tensor, n_heads: int) -> Tensor:
        b, s, _ = t.shape
        if not self.multi_head:
            return t  # (B, T, D): one head, no head axis, as in the notebook
        return t.view(b, s, n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def forward(
        self,
        x: Tensor,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
        return_trace: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Trace] | tuple[Tensor, Tensor, Trace]:
        """Self-attention over x (B, T, D) -> out (B, T, D).

        causal: each token sees only itself and earlier tokens. key_padding_mask: (B, T) bool,
        True = real token (may combine with causal). Returns ``out``; ``(out, weights)`` with
        return_weights (weights (B, H, T, T), softmax before dropout); ``(out, trace)`` with
        return_trace; ``(out, weights, trace)`` with both. generator: reproducible dropout
        (explicit path only). Without weights, trace, debug or generator the fused
        ``F.scaled_dot_product_attention`` path runs.
        """
        for label, flag in (("causal", causal), ("return_weights", return_weights), ("return_trace", return_trace)):
            if not isinstance(flag, bool):
                raise ValueError(f"{label}={flag!r} must be True or False")
        b, t = self._check_input(x)
        p = self.dropout if self.training else 0.0

        q = self._split(self.q_proj(x), self.n_heads)  # (B, H, T, hd)
        k = self._split(self.k_proj(x), self.n_kv_heads)  # (B, Hkv, T, hd)
        v = self._split(self.v_proj(x), self.n_kv_heads)  # (B, Hkv, T, hd)

        explicit = return_weights or return_trace or self.debug or generator is not None
        if not explicit:
            context = fused_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                      dropout_p=p, training=self.training)  # (B, H, T, hd)
            return self.o_proj(self._merge(context))  # (B, T, D)

        # The trace is built only when someone will read it: it keeps every (T, T) step alive.
        trace = Trace(echo=self.debug) if (return_trace or self.debug) else None
        if trace is not None:
            trace.add("Q", q)
            trace.add("K", k)
            trace.add("V", v)
        mask = make_mask(b, t, t, causal=causal, key_padding_mask=key_padding_mask, device=x.device)  # (B, 1, T, T)
        if mask is not None and not self.multi_head:
            mask = mask[:, 0]  # (B, T, T)
        context, weights = scaled_dot_product(q, k, v, mask, dropout_p=p, training=self.training,
                                              trace=trace, generator=generator)  # (B, H, T, hd), (B, H, T, T)
        concat = self._merge(context)  # (B, T, D)
        if trace is not None and self.multi_head:
            trace.add("concat", concat)
        out = self.o_proj(concat)  # (B, T, D)
        if trace is not None:
            trace.add("out", out)
        if not self.multi_head:
            weights = weights.unsqueeze(1)  # (B, 1, T, T): heatmap code always sees a head axis
        if return_weights and return_trace:
            return out, weights, trace  # type: ignore[return-value]
        if return_weights:
            return out, weights
        if return_trace:
            return out, trace  # type: ignore[return-value]
        return out

    def _merge(self, context: Tensor) -> Tensor:
        if not self.multi_head:
            return context  # (B, T, D)
        b, _, t, _ = context.shape
        return context.transpose(1, 2).reshape(b, t, self.emb_dim)  # (B, T, D)


class MultiHeadAttention(_SelfAttention):
    """Multi-head self-attention with optional grouped-query K/V.

    q_proj: D -> D; k_proj, v_proj: D -> n_kv_heads * head_dim; o_proj: D -> D (no bias unless bias=True).
    Scores are scaled by 1/sqrt(head_dim). x (B, T, D) -> (B, T, D).
    """

    multi_head = True

    def __init__(
        self,
        emb_dim: int,
        n_heads: int = 8,
        dropout: float = 0.0,
        debug: bool = False,
        *,
        n_kv_heads: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(AttentionConfig(emb_dim, n_heads, n_kv_heads, dropout, bias), debug)


class SingleHeadAttention(_SelfAttention):
    """One attention head over the full width: Q, K, V (B, T, D), scores (B, T, T), x (B, T, D) -> (B, T, D)."""

    multi_head = False

    def __init__(self, emb_dim: int, dropout: float = 0.0, debug: bool = False, *, bias: bool = False) -> None:
        super().__init__(AttentionConfig(emb_dim, 1, 1, dropout, bias), debug)
