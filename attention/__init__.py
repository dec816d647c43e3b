"""Self-attention, traced and verified against PyTorch: the maths behind Attention Lab.

No gradio here; the app only wires these functions to its widgets.
"""

from __future__ import annotations

from .functional import fused_attention, make_mask, repeat_kv, scaled_dot_product
from .modules import AttentionConfig, MultiHeadAttention, SingleHeadAttention, valid_head_counts
from .trace import Trace, TraceStep, explain_head

__all__ = [
    "AttentionConfig",
    "MultiHeadAttention",
    "SingleHeadAttention",
    "Trace",
    "TraceStep",
    "explain_head",
    "fused_attention",
    "make_mask",
    "repeat_kv",
    "scaled_dot_product",
    "valid_head_counts",
]
