"""Per-session stop events for the chat: Stop, Undo and Clear halt *this* user's reply at the next
token, and Undo and Clear wait for its end before they change the chat."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRegistry:
    """Per-session stop events, so Stop halts *this* user's generation at the next token."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._streaming: dict[str, threading.Event] = {}  # the stop event of the reply each session streams now
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)

    def begin(self, key: str) -> threading.Event | None:
        """Register a generation for `key`; None while one is still live there (registered, not stopped)."""
        with self._lock:
            ev = self._events.get(key)
            if ev is not None and not ev.is_set():
                return None
            ev = self._events[key] = threading.Event()
        return ev

    @contextmanager
    def streaming(self, key: str) -> Iterator[threading.Event]:
        """The reply's own side: its stop event (the one `begin` registered, a fresh one if none),
        marked as streaming until the block ends, however it ends (finished, stopped, or closed by
        a cancel)."""
        with self._lock:
            ev = self._streaming[key] = self._events.setdefault(key, threading.Event())
        try:
            yield ev
        finally:
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
            if self._streaming.get(key) is ev:
                del self._streaming[key]
            self._ended.notify_all()
