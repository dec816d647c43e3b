"""Chat generation with a 4-bit (NF4) quantized causal LM: loading, prompts, sampling, streaming.

No gradio here; app.py wires these into the UI.
"""

from __future__ import annotations

from .model import LoadedModel, load_model
from .prompt import Prompt, build_prompt
from .sampling import SamplingParams
from .settings import DEFAULT_MODEL_ID, Settings
from .backends import ReplyStats
from .stream import stream_reply
from .tokens import TokenPreview, preview_tokens

__all__ = [
    "DEFAULT_MODEL_ID",
    "LoadedModel",
    "Prompt",
    "ReplyStats",
    "SamplingParams",
    "Settings",
    "TokenPreview",
    "build_prompt",
    "load_model",
    "preview_tokens",
    "stream_reply",
]
