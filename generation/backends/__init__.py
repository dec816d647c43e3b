"""Who answers the chat: one interface (`ChatBackend`), the local continuous-batching engine
(`ChatEngine`), a remote OpenAI-compatible server (`RemoteChat`), and which of them the settings
choose (`make_backend`, `BackendSlot`).

base.py    ChatBackend, ReplyStats, ReplyText (stop strings, visible text), stopped_by, throttled
engine.py  ChatEngine: the scheduler (admission, prefill chunks, the loop)
request.py EngineRequest: one generation (prompt, sampling state, the text written so far)
state.py   EngineState: what the engine is doing, as counts (ChatEngine.snapshot)
remote.py  RemoteChat
slot.py    BackendSlot, make_backend, local_engine
"""

from __future__ import annotations

from .base import ChatBackend, ReplyStats, ReplyText, stopped_by, throttled, visible_text
from .engine import ENGINE_THREAD_NAME, ChatEngine
from .remote import READER_THREAD_NAME, RemoteChat
from .request import EngineRequest
from .state import EngineRow, EngineState
from .slot import BackendNotReady, BackendSlot, ModelSource, local_engine, make_backend

__all__ = [
    "ENGINE_THREAD_NAME",
    "READER_THREAD_NAME",
    "BackendNotReady",
    "BackendSlot",
    "ChatBackend",
    "ChatEngine",
    "EngineRequest",
    "EngineRow",
    "EngineState",
    "ModelSource",
    "RemoteChat",
    "ReplyStats",
    "ReplyText",
    "local_engine",
    "make_backend",
    "stopped_by",
    "throttled",
    "visible_text",
]
