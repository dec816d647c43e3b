"""The one interface the chat streams from, whoever answers: the local engine or a remote server.

The UI (Chat tab, `/chat`, Stop, Retry, the stats line) only ever calls `ChatBackend.stream_reply`
and reads `ReplyStats`; which backend is behind it is a deployment choice (`Settings`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from .sampling import SamplingParams
from .stream import ReplyStats


@runtime_checkable
class ChatBackend(Protocol):
    """Streams chat replies; shared by every user, so it must be safe to call from many threads."""

    def stream_reply(
        self,
        message: str,
        history: Sequence[Mapping[str, str]] = (),
        *,
        system: str | None = None,
        params: SamplingParams = SamplingParams(),
        max_input_tokens: int | None = None,
        stats: ReplyStats | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the growing reply (each a prefix of the next), as `generation.stream.stream_reply`.

        Setting `stop_event` or closing the generator ends the request within one step; `stats`
        is filled in. ValueError for bad input, RuntimeError when generation itself fails.
        """
        ...

    def describe(self) -> str:
        """A short, secret-free description for the status line (e.g. "local engine, batch <= 32")."""
        ...

    def active(self) -> int:
        """Requests being generated right now (all users)."""
        ...
