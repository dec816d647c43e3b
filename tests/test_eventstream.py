"""A browser page's event stream stays open while the page does (ui/eventstream.py).

Against the real app over raw HTTP, as the page speaks to it: join an event on a session
(POST /gradio_api/queue/join), read its updates from the session's stream (GET /gradio_api/queue/data).
A browser's request carries Sec-Fetch-Mode; gradio_client's does not and keeps gradio's own ending.
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from apputil import start_app

from ui.eventstream import CLOSE_STREAM, StreamRelay, from_a_page, is_close_stream

pytestmark = pytest.mark.timeout(600)

PAGE_HEADERS = {"Accept": "text/event-stream", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}


def fn_index(url: str, api_name: str) -> int:
    with urllib.request.urlopen(f"{url}/config", timeout=60) as r:
        config = json.load(r)
    (dep,) = [d for d in config["dependencies"] if d.get("api_name") == api_name]
    return dep["id"]


def join_empty_send(url: str, session: str) -> str:
    """Send an empty chat message on `session` (refused at once with a warning): its event id."""
    body = {"data": ["   ", []], "fn_index": fn_index(url, "user_turn"), "session_hash": session,
            "event_data": None, "trigger_id": None}
    req = urllib.request.Request(f"{url}/gradio_api/queue/join", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["event_id"]


def open_stream(url: str, session: str, headers: dict[str, str]):
    req = urllib.request.Request(f"{url}/gradio_api/queue/data?session_hash={session}", headers=headers)
    return urllib.request.urlopen(req, timeout=300)  # the timeout only ends a broken run


def messages(stream):
    """The stream's messages, heartbeats left out, until it ends."""
    for line in stream:
        if line.startswith(b"data:"):
            message = json.loads(line[5:])
            if message.get("msg") != "heartbeat":
                yield message


def read_until_completed(stream, event: str) -> list[dict]:
    seen = []
    for message in messages(stream):
        seen.append(message)
        if message.get("msg") == "process_completed" and message.get("event_id") == event:
            return seen
    raise AssertionError(f"the stream ended before event {event} completed: {seen}")


def test_a_pages_stream_stays_open_and_carries_the_next_event(app_server):
    """The race it closes: an event joined after the session's last one ended is read from the same
    open stream (gradio would have ended the stream there, and a page that saw the join's answer
    first would never read the new event's updates)."""
    session = uuid.uuid4().hex[:11]
    first = join_empty_send(app_server.url, session)
    with open_stream(app_server.url, session, PAGE_HEADERS) as stream:
        seen = read_until_completed(stream, first)
        second = join_empty_send(app_server.url, session)  # the session has no event left now
        seen += read_until_completed(stream, second)
    kinds = [m["msg"] for m in seen]
    assert "close_stream" not in kinds, kinds
    logs = [m for m in seen if m["msg"] == "log"]
    assert len(logs) == 2 and all("Type a message first" in m["log"] for m in logs)


def test_another_clients_stream_still_ends_when_its_events_have(app_server):
    """gradio_client and scripts stop reading at close_stream: theirs keeps gradio's own ending."""
    session = uuid.uuid4().hex[:11]
    event = join_empty_send(app_server.url, session)
    with open_stream(app_server.url, session, {"Accept": "text/event-stream"}) as stream:
        seen = list(messages(stream))  # to the stream's end
    assert [(m["msg"], m.get("event_id")) for m in seen[-2:]] == [("process_completed", event), ("close_stream", None)]


@pytest.mark.slow
def test_a_stopping_server_ends_a_kept_stream_with_close_stream():
    """A page's kept stream does not hold the server up when it stops (a Space restarting): it
    ends as gradio's own stream ends, with close_stream, and the app exits cleanly."""
    server = start_app({"CHAT_BACKEND_URL": "http://127.0.0.1:9/v1"}, wait_model=False)
    try:
        session = uuid.uuid4().hex[:11]
        event = join_empty_send(server.url, session)
        with open_stream(server.url, session, PAGE_HEADERS) as stream:
            read_until_completed(stream, event)
            read_until_completed(stream, join_empty_send(server.url, session))  # kept, as above
            assert server.stop() == 0, server.log()[-3000:]
            rest = [m["msg"] for m in messages(stream)]
        assert rest[-1:] == ["close_stream"], rest
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# The relay between gradio's streams and the page's response

EVENTS = [b'data: {"msg":"estimation","event_id":"a"}', b'data: {"msg":"process_completed","event_id":"a"}',
          b'data: {"msg":"heartbeat"}']


async def relay_bytes(body: bytes, cuts: list[int]) -> tuple[bytes, StreamRelay, list[dict]]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    relay = StreamRelay(send, head_sent=False)
    await relay({"type": "http.response.start", "status": 200, "headers": []})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    for piece in pieces:
        await relay({"type": "http.response.body", "body": piece, "more_body": True})
    await relay({"type": "http.response.body", "body": b"", "more_body": False})
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return out, relay, sent


@pytest.mark.parametrize("close", [True, False])
@pytest.mark.parametrize("cut", [None, 1, 7, 30, 60, 80, 100])
def test_the_relay_passes_every_event_but_close_stream_however_the_bytes_arrive(close, cut):
    import asyncio

    events = EVENTS + ([CLOSE_STREAM.rstrip(b"\n")] if close else [])
    body = b"".join(e + b"\n\n" for e in events)
    cuts = [] if cut is None else sorted({min(cut, len(body)), min(2 * cut, len(body))})
    out, relay, sent = asyncio.run(relay_bytes(body, cuts))
    assert out == b"".join(e + b"\n\n" for e in EVENTS)
    assert relay.closed is close
    ends = [m for m in sent if m["type"] == "http.response.body" and not m.get("more_body", False)]
    assert len(ends) == (0 if close else 1)  # a closed stream's end is not the response's end
    assert [m["type"] for m in sent].count("http.response.start") == 1


def test_a_later_streams_head_is_not_sent_again():
    import asyncio

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def go() -> StreamRelay:
        relay = StreamRelay(send, head_sent=True)
        await relay({"type": "http.response.start", "status": 200, "headers": []})
        await relay({"type": "http.response.body", "body": EVENTS[0] + b"\n\n", "more_body": True})
        refused = StreamRelay(send, head_sent=True)
        await refused({"type": "http.response.start", "status": 404, "headers": []})
        await refused({"type": "http.response.body", "body": b'{"detail":"Not Found"}', "more_body": False})
        return refused

    refused = asyncio.run(go())
    assert [m["type"] for m in sent] == ["http.response.body"] and refused.refused


@pytest.mark.parametrize(("event", "closes"), [
    (CLOSE_STREAM.rstrip(b"\n"), True),
    (b'data: {"msg": "close_stream", "event_id": null}', True),
    (b'data: {"msg":"log","log":"close_stream","event_id":"a"}', False),  # the words in a message
    (b'data: {"msg":"close_stream"', False),  # not JSON
    (b"event: close_stream", False),
])
def test_close_stream_is_recognised_only_as_gradios_message(event, closes):
    assert is_close_stream(event) is closes


@pytest.mark.parametrize(("headers", "page"), [
    ([(b"sec-fetch-mode", b"cors")], True),
    ([(b"Sec-Fetch-Mode", b"cors"), (b"accept", b"text/event-stream")], True),
    ([(b"user-agent", b"gradio (https://gradio.app/; gradio-team@huggingface.co)")], False),
    ([], False),
])
def test_only_a_browsers_request_counts_as_a_page(headers, page):
    assert from_a_page({"headers": headers}) is page
