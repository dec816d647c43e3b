"""Which backend answers the chat, and the local engine's lifecycle.

`make_backend(settings, lm)` decides: a remote OpenAI-compatible server when CHAT_BACKEND_URL is
set, else the local `ChatEngine` over the loaded model. `BackendSlot` is the app's shared holder:
the remote client at once, the local engine once the model has loaded (in the background), its
loop in its own thread or in the caller's (`serve_here`, the main thread of `python app.py`).
No gradio here: the UI turns `BackendNotReady` into its own message.
"""

from __future__ import annotations

import threading
from typing import Protocol

from ..model import LoadedModel
from ..settings import Settings
from .base import ChatBackend
from .engine import ChatEngine
from .remote import RemoteChat
from .state import EngineState

__all__ = ["BackendNotReady", "BackendSlot", "ModelSource", "local_engine", "make_backend"]


class BackendNotReady(RuntimeError):
    """There is no backend to stream from yet (the local model is loading, failed, or not started);
    the message says which."""


class ModelSource(Protocol):
    """What the slot needs of the app's model holder (ui.common.ModelSlot)."""

    lm: LoadedModel | None
    views_one_thread: bool

    def wait(self, timeout: float | None = None) -> bool: ...

    def not_ready_message(self) -> str: ...


def local_engine(settings: Settings, lm: LoadedModel, *, autostart: bool = True) -> ChatEngine:
    """The local engine as the settings ask for it (batch = CHAT_CONCURRENCY, FAST_DECODE)."""
    return ChatEngine(lm, max_batch=settings.chat_concurrency, fast=settings.fast_decode, autostart=autostart)


def make_backend(settings: Settings, lm: LoadedModel | None = None, *, autostart: bool = True) -> ChatBackend:
    """The chat backend the settings choose: RemoteChat when CHAT_BACKEND_URL is set, else the local
    engine over `lm` (ValueError without one). autostart=False: the engine's loop waits for
    `run_here()`."""
    if settings.chat_backend_url:
        return RemoteChat(settings)
    if lm is None:
        raise ValueError("the local chat engine needs a loaded model (or set CHAT_BACKEND_URL for a remote server)")
    return local_engine(settings, lm, autostart=autostart)


class BackendSlot:
    """The chat's backend, chosen by the settings: a remote OpenAI-compatible server, or the local
    batched engine over the shared model (created once the model is there).

    Shared by every user; `get()` raises BackendNotReady with the reason while there is no backend yet.
    """

    def __init__(self, settings: Settings, model: ModelSource) -> None:
        self.settings = settings
        self.model = model
        self.remote: RemoteChat | None = RemoteChat(settings) if settings.chat_backend_url else None
        self._engine: ChatEngine | None = None
        self._run_here = False  # serve_here() runs its loop (else the engine's own thread)
        self._lock = threading.Lock()

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def ready(self) -> bool:
        """True when a chat can be sent (remote: always, errors come per reply; local: model loaded)."""
        return self.remote is not None or self.model.lm is not None

    def not_ready_message(self) -> str:
        return self.model.not_ready_message()

    def engine(self) -> ChatEngine | None:
        """The local engine, created on first call once the model is loaded (else None); started
        in its own thread unless serve_here() runs it."""
        lm = self.model.lm
        if self.remote is not None or lm is None:
            return None
        with self._lock:
            if self._engine is None:
                self._engine = local_engine(self.settings, lm, autostart=not self._run_here)
                if not self._run_here:
                    self._engine.start()
            return self._engine

    def serve_here(self) -> None:
        """Run the local engine's decode loop in the calling thread (`python app.py`: the main
        thread, where its many small ops cost least; see ChatEngine.run_here) from the moment the
        model has loaded until `close()`, so its one-time set-up (the warm-up prompt, the fast
        decode's int8 head) is done before users come. Returns at once for a remote backend, and
        when the model failed to load."""
        if self.remote is not None:
            return
        with self._lock:
            self._run_here = True  # an engine created from now on waits for this thread
        self.model.views_one_thread = True  # the views' forwards leave the parallel regions to the engine
        if not self.model.wait():
            return
        engine = self.engine()
        if engine is not None:
            engine.run_here()

    def get(self) -> ChatBackend:
        """The backend to stream from; BackendNotReady saying why there is none yet."""
        if self.remote is not None:
            return self.remote
        engine = self.engine()
        if engine is None:
            raise BackendNotReady(self.model.not_ready_message())
        return engine

    def active(self) -> int:
        """Replies being generated right now, every user's and API call's."""
        if self.remote is not None:
            return self.remote.active()
        with self._lock:
            return self._engine.active() if self._engine is not None else 0

    def waiting(self) -> int:
        """Requests the local engine holds back until a row of its batch frees (0 for a remote server)."""
        with self._lock:
            return self._engine.waiting() if self._engine is not None else 0

    def engine_state(self) -> EngineState | None:
        """What the local engine is doing (ChatEngine.snapshot); None for a remote server, or
        while there is no engine yet (it never creates one)."""
        with self._lock:
            engine = self._engine
        return engine.snapshot() if engine is not None else None

    def close(self) -> None:
        """Stop the local engine's loop (pending replies end with a clear error)."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
