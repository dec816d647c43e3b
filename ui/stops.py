"""Per-session replies and their stop events: a Send (Retry, an edit, a branch) registers the reply
it asks for, the reply step chained after it writes it, and Stop, Undo and Clear halt *this* user's
reply at the next token (Undo and Clear wait for its end before they change the chat)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRegistry:
    """Each session's registered reply (at most one live), its kind and its stop event.

    The registry, not a gr.State, tells a reply step whether it has a reply to write: a session's
    State is one value, and a refused Send writes it while the accepted Send's reply step may still
    wait in the server's queue (a busy class).
    """

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._replies: dict[str, tuple[str, object]] = {}  # each registered reply's kind and turn
        self._streaming: dict[str, threading.Event] = {}  # the stop event of the reply each session streams now
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)

    def begin(self, key: str, kind: str = "reply", turn: object = None) -> threading.Event | None:
        """Register a reply of `kind` ("reply", "branch") to `turn` (what it answers) for `key`;
        None while one is still live there (registered, not stopped, not ended)."""
        with self._lock:
            ev = self._events.get(key)
            if ev is not None and not ev.is_set():
                return None
            ev = self._events[key] = threading.Event()
            self._replies[key] = (kind, turn)
        return ev

    @contextmanager
    def streaming(self, key: str, kind: str = "reply", turn: object = None) -> Iterator[threading.Event | None]:
        """The reply step's side: the stop event of the reply of `kind` to `turn` registered for
        `key`, marked as streaming until the block ends, however it ends (finished, stopped, or
        closed by a cancel); None when there is none to write (its Send was refused, it was stopped
        before it began, another step writes it already, or it answers another turn: a step of a
        stopped Send that reaches the server late must not write the next Send's reply)."""
        with self._lock:
            ev = self._events.get(key)
            if ev is None or ev.is_set() or self._replies.get(key) != (kind, turn) or self._streaming.get(key) is ev:
                ev = None
            else:
                self._streaming[key] = ev
        try:
            yield ev
        finally:
            if ev is not None:
                self.done(key, ev)

    def stop(self, key: str, wait_s: float = 0.0) -> None:
        """Set `key`'s stop event: its generation halts at the next token. With `wait_s`, also wait
        (at most that long) until a reply that is streaming has ended: every update it yielded is
        then already queued for the page, ahead of whatever the caller returns next."""
        with self._lock:
            ev = self._events.get(key)
            if ev is None:
                return
            ev.set()
            self._ended.wait_for(lambda: self._streaming.get(key) is not ev, timeout=wait_s)

    def done(self, key: str, ev: threading.Event) -> None:
        """A generation ended: set its event and forget it (unless a newer one replaced it)."""
        ev.set()
        with self._lock:
            if self._events.get(key) is ev:
                del self._events[key]
                del self._replies[key]
            if self._streaming.get(key) is ev:
                del self._streaming[key]
            self._ended.notify_all()
