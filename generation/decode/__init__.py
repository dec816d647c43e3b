"""The decode machinery under the chat engine: its KV cache and masks, the decode step (the
model's own forward, or the lean NF4 step), the int8 LM head and the direct NF4 kernel calls.

cache.py   SlotKVCache, PrefixStore, RowAttentionMask, decode_attention_rows, attention_masks
step.py    DecodeStep: the one interface the engine's loop calls, and its implementations
family.py  Architecture, describe: what the lean step needs to know of a family (Gemma 3, Qwen2/3, Llama, Mistral)
lean.py    BatchDecodeStep (the lean NF4 step for every row), single_threaded, one_thread_here
head.py    QuantizedHead (the int8 LM head, exact greedy), quantize_lm_head, pick_tokens
sampler.py BatchSampler, RowSampling: the engine's token choice for a batch, each row its own controls
nf4.py     NF4Linear, FusedNF4Linear, accelerate_linear4bit, prepare_layers, rope_tables
"""

from __future__ import annotations

from .cache import CAPACITY_STEP, PrefixStore, RowAttentionMask, SlotKVCache, attention_masks, decode_attention_rows
from .family import FAMILIES, Architecture, Family, describe
from .head import RESCORE_K, QuantizedHead, QuantizedLMHead, argmax_first, pick_tokens, quantize_lm_head
from .lean import MANY_THREADS_ROWS, BatchDecodeStep, one_thread_here, openmp_runtime, single_threaded
from .nf4 import (
    DecoderLayer,
    FusedNF4Linear,
    NF4Linear,
    accelerate_linear4bit,
    fast_path_supported,
    prepare_layers,
    restore_linear4bit,
    rope_tables,
)
from .sampler import BatchSampler, RowSampling, top_candidates
from .step import DecodeStep, LeanStep, ModelStep, attention_delegate, lean_step

__all__ = [
    "CAPACITY_STEP",
    "FAMILIES",
    "Architecture",
    "Family",
    "MANY_THREADS_ROWS",
    "RESCORE_K",
    "BatchDecodeStep",
    "BatchSampler",
    "DecodeStep",
    "DecoderLayer",
    "LeanStep",
    "ModelStep",
    "FusedNF4Linear",
    "NF4Linear",
    "PrefixStore",
    "QuantizedHead",
    "QuantizedLMHead",
    "RowAttentionMask",
    "RowSampling",
    "SlotKVCache",
    "accelerate_linear4bit",
    "argmax_first",
    "attention_delegate",
    "attention_masks",
    "decode_attention_rows",
    "describe",
    "fast_path_supported",
    "lean_step",
    "one_thread_here",
    "openmp_runtime",
    "pick_tokens",
    "prepare_layers",
    "quantize_lm_head",
    "restore_linear4bit",
    "rope_tables",
    "single_threaded",
    "top_candidates",
]
