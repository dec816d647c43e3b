"""The small C kernels: the fast decode's int8 LM head (int8_head.c), per-layer norms, residual
adds and RoPE (norms.c) and attention over every row of the batch (attention.c), the calibrated
rounding's GPTQ column loop (gptq.c) and block-scale refit (refit.c), their ctypes bindings, and
the one module that builds, caches and loads them (build.py). Each reports a `KernelStatus`: what
runs (the kernel or its torch fallback) and why."""

from __future__ import annotations

from .attention import AttentionKernel, attention_kernel
from .build import KernelBuildError, KernelStatus, build_library, kernel_cache_dir, load_library, native_enabled
from .gptq import GptqBatch, gptq_batch
from .int8_head import Int8HeadKernel, native_int8_kernel, native_int8_status
from .norms import (
    NORM_FORMS, NormKernels, check_against_torch, norm_kernels, norm_weight, torch_qk_norm_rope, torch_rms,
)
from .refit import BlockGram, block_gram

__all__ = [
    "NORM_FORMS",
    "AttentionKernel",
    "BlockGram",
    "GptqBatch",
    "Int8HeadKernel",
    "KernelBuildError",
    "KernelStatus",
    "NormKernels",
    "attention_kernel",
    "block_gram",
    "build_library",
    "check_against_torch",
    "gptq_batch",
    "kernel_cache_dir",
    "load_library",
    "native_enabled",
    "native_int8_kernel",
    "native_int8_status",
    "norm_kernels",
    "norm_weight",
    "torch_qk_norm_rope",
    "torch_rms",
]
