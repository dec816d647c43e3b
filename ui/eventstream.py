"""A page's event stream that does not drop an event's updates (a script for the page's head).

The page reads every queued event's updates from a server-sent-event stream (GET
`/gradio_api/queue/data`). gradio 6.31's server ends that stream (a `close_stream` message) as soon
as the session has no event left, and its page client decides whether to open a new one when an
event's join is answered: only if it counts the old one closed. The join's answer and the
`close_stream` travel on two connections, so the page can see them in either order. When the join
is answered first (the server had already decided to close), the client files the event under the
stream that is about to close and opens none, and that event's updates wait at the server for
good: a message sent just as the previous reply's last updates arrive is never answered, with
nothing on screen to say so.

`eventstream.js`, run in the page before gradio's client, wraps the page's `fetch`: the client gets
one stream per page that never ends, and the script opens the server's streams under it while the
page has events to read: at each join, and again when a server stream ends while an event it saw
joined has not completed (that event's updates wait at the server until a stream reads them). The
page holds a server connection only while events run, as gradio's own client does: a browser
allows six connections to one HTTP/1.1 host, and each page of the app already holds one for
gradio's heartbeat. The server and every other client (gradio_client, scripts) are untouched.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT = Path(__file__).with_name("eventstream.js")


def stream_head() -> str:
    """For `demo.launch(head=...)`: the script, inline. gradio's page adds its head before it draws
    the app, so the script wraps `fetch` before the page's first event."""
    return f"<script>\n{SCRIPT.read_text()}</script>\n"
