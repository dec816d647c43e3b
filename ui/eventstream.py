"""A browser page's event stream, kept open while the page is (an ASGI middleware).

The page reads every queued event's updates from one server-sent-event stream (GET
`/gradio_api/queue/data`). gradio 6.31's server ends that stream (a `close_stream` message) as soon
as the session has no event left, and the page decides whether to open a new one when an event's
join is answered: open only if it counts the old one closed. The join's answer and the
`close_stream` travel on two connections, so the page can see them in either order. When the join
is answered first (the server had already decided to close), the page files the event under the
stream that is about to close and opens none, and that event's updates wait at the server for
good: a message sent just as the previous reply's last updates arrive is never answered, with
nothing on screen to say so.

Here the stream of a browser page never ends while the page and the server run: where gradio ends
it, the same response goes on with a new stream from gradio's own route, and the page never sees
`close_stream`, so every event it joins has an open stream. A page costs one idle connection (it
already holds one for gradio's heartbeat). Other clients (gradio_client, scripts) keep gradio's
behaviour: their readers stop at `close_stream`. When the server stops, the stream ends with
`close_stream`, as gradio's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware import Middleware

_DATA = re.compile(r"/gradio_api/queue/data/?$")
CLOSE_STREAM = b'data: {"msg":"close_stream","event_id":null}\n\n'
STOP_POLL_S = 0.25  # how soon a kept stream notices that the server is stopping


def from_a_page(scope: dict[str, Any]) -> bool:
    """A browser's fetch: browsers send Sec-Fetch-Mode (scripts cannot set it) and other clients do not."""
    return any(k.lower() == b"sec-fetch-mode" for k, _ in scope.get("headers", ()))


def is_close_stream(event: bytes) -> bool:
    """Whether one server-sent event (its lines, without the blank line after it) is gradio's close_stream."""
    if b"close_stream" not in event:
        return False
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            with contextlib.suppress(ValueError):
                message = json.loads(line[5:])
                return isinstance(message, dict) and message.get("msg") == "close_stream"
    return False


class StreamRelay:
    """The `send` of one of gradio's streams inside the kept response: passes its events on, except
    close_stream (noted in `closed`) and the stream's end when it closed; the first stream's head only."""

    def __init__(self, send: Any, head_sent: bool) -> None:
        self.send, self.head_sent = send, head_sent
        self.closed = False  # gradio ended this stream with close_stream
        self.refused = False  # a later stream did not start (not 200): the response ends here
        self.detached = False  # the server is stopping: nothing more goes out through this relay
        self._partial = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.detached or self.refused:
            return
        kind = message["type"]
        if kind == "http.response.start":
            if not self.head_sent:
                self.head_sent = True
                await self.send(message)
            elif message["status"] != 200:
                self.refused = True
            return
        if kind != "http.response.body":
            await self.send(message)
            return
        events, _, self._partial = (self._partial + message.get("body", b"")).rpartition(b"\n\n")
        kept = [e for e in events.split(b"\n\n") if e] if events else []
        self.closed = self.closed or any(is_close_stream(e) for e in kept)
        body = b"".join(e + b"\n\n" for e in kept if not is_close_stream(e))
        more = message.get("more_body", False)
        if more or self.closed:
            if body:
                await self.send({"type": "http.response.body", "body": body, "more_body": True})
        else:
            await self.send({"type": "http.response.body", "body": body + self._partial, "more_body": False})


class KeptPageStreams:
    """ASGI middleware: browser pages' GET .../queue/data responses continue across gradio's stream ends."""

    def __init__(self, app: Any, blocks: Any) -> None:
        self.app, self.blocks = app, blocks
        self._stopped: asyncio.Event | None = None  # set once the server stops (one watcher for all pages)

    def _stopping(self) -> bool:
        queue = getattr(self.blocks, "_queue", None)
        return queue is not None and queue.stopped  # gradio's close() stops the queue first

    def _session_alive(self, session: str) -> bool:
        return session in self.blocks._queue.pending_messages_per_session

    def _stop_event(self) -> asyncio.Event:
        if self._stopped is None:
            self._stopped = asyncio.Event()
            asyncio.get_running_loop().create_task(self._watch_for_stop(self._stopped))
        return self._stopped

    async def _watch_for_stop(self, stopped: asyncio.Event) -> None:
        while not self._stopping():
            await asyncio.sleep(STOP_POLL_S)
        stopped.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != "GET" or not _DATA.search(scope["path"])
                or not from_a_page(scope)):
            await self.app(scope, receive, send)
            return
        session = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [""])[0]
        head_sent = False
        while True:
            relay = StreamRelay(send, head_sent)
            await self._serve_until_stopped(relay, scope, receive)
            head_sent = relay.head_sent
            if not head_sent:  # stopped before gradio answered: nothing was sent, nothing to end
                return
            if relay.refused or relay.detached or (relay.closed and not self._session_alive(session)):
                await send({"type": "http.response.body", "body": CLOSE_STREAM, "more_body": False})
                return
            if not relay.closed:  # ended as gradio ends it otherwise (the page left, an error): as is
                return

    async def _serve_until_stopped(self, relay: StreamRelay, scope: dict[str, Any], receive: Any) -> None:
        """One of gradio's streams into `relay`; cut short (relay.detached) when the server stops."""
        task = asyncio.ensure_future(self.app(scope, receive, relay))
        stop = asyncio.ensure_future(self._stop_event().wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request cancelled: gradio's stream goes with it
            task.cancel()
            raise
        finally:
            stop.cancel()
        if not task.done():
            relay.detached = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return
        task.result()


def stream_middleware(blocks: Any) -> list[Middleware]:
    """For `demo.launch(app_kwargs={"middleware": [..., *stream_middleware(demo)]})`."""
    return [Middleware(KeptPageStreams, blocks=blocks)]
