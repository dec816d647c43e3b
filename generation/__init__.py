"""Chat generation with a 4-bit (NF4) quantized causal LM: loading, prompts, sampling, the chat
backends (the local continuous-batching engine, a remote server), the decode machinery.

No gradio here; app.py wires these into the UI. Sub-packages: `generation.backends` (who answers
the chat), `generation.decode` (the engine's cache, decode steps, int8 head, NF4 kernel calls),
`generation.kernels` (the native C kernels), `generation.rounding` (NF4 codes chosen for each
layer's output), `generation.inside` (looking inside the model).
"""

from __future__ import annotations

from .backends import (
    BackendNotReady,
    BackendSlot,
    ChatBackend,
    ChatEngine,
    EngineRequest,
    RemoteChat,
    ReplyStats,
    make_backend,
    throttled,
)
from .model import LoadedModel, load_model
from .prompt import DEFAULT_SYSTEM, Prompt, build_prompt, shown_system
from .sampling import MAX_SEED, SamplingParams
from .settings import DEFAULT_MODEL_ID, Settings
from .tokens import TokenPreview, preview_tokens

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_SYSTEM",
    "MAX_SEED",
    "BackendNotReady",
    "BackendSlot",
    "ChatBackend",
    "ChatEngine",
    "EngineRequest",
    "LoadedModel",
    "Prompt",
    "RemoteChat",
    "ReplyStats",
    "SamplingParams",
    "Settings",
    "TokenPreview",
    "build_prompt",
    "shown_system",
    "load_model",
    "make_backend",
    "preview_tokens",
    "throttled",
]
