"""No event's updates are left unread at the server (ui/eventstream.js), in a real browser.

gradio's server ends the page's event stream whenever the session has no event left; an event
whose join the page sees answered before that end was never read. Forced here: the server stream
that carries the last events of a reply is held at the browser (its whole body, close_stream
included, fetched aside) while the student sends the next message; the page sees that message's
join answered first, then the held stream with its end.
"""

from __future__ import annotations

import time

import pytest
from apputil import PAGE_IDLE, QUEUE_JOIN, VIEWPORT, event_id, joins_event, replies_done, send_chat, set_number
from apputil import user_texts, wait_reply_done

pytestmark = pytest.mark.timeout(600)

QUEUE_DATA = "**/gradio_api/queue/data*"


def kept(page) -> dict:
    """The page script's counts (ui/eventstream.js): pageStreams, serverStreams, reopenedForAnEvent,
    connected (a server stream open now), waitingFor (events joined and not yet read)."""
    return page.evaluate("({...window.__keptEventStream})")


def test_a_message_sent_as_the_last_stream_ends_is_answered(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    last = event_id(page, "follow")  # the last event chained after every reply
    seen_last, held = [], []

    def note(request) -> None:
        if joins_event(request, last):
            seen_last.append(request)

    def hold(route) -> None:  # the first server stream opened after the last event's join
        if seen_last and not held:
            held.append(route)
        else:
            route.continue_()

    page.on("request", note)
    page.route(QUEUE_DATA, hold)
    try:
        before = send_chat(page, "Hello!")
        deadline = time.monotonic() + 120  # only ends a broken run
        while not held:  # route callbacks run only inside Playwright calls
            assert time.monotonic() < deadline, "no server stream was opened after the reply's last event"
            page.wait_for_timeout(50)
        held_stream = held[0].fetch()  # the server's whole stream: the last events, then close_stream
        assert held_stream.text().rstrip().endswith('"msg":"close_stream","event_id":null}')
        with page.expect_response(QUEUE_JOIN) as joined:
            send_chat(page, "What is the capital of France?")
        assert joined.value.ok  # answered while the page's stream is still open
        held[0].fulfill(response=held_stream)
        wait_reply_done(page, before, replies=2)
    finally:
        page.unroute(QUEUE_DATA, hold)
    assert user_texts(page) == ["Hello!", "What is the capital of France?"]
    counts = kept(page)
    assert counts["pageStreams"] == 1 and counts["reopenedForAnEvent"] >= 1, counts


def test_the_page_keeps_one_stream_and_connects_only_while_events_run(page):
    """gradio's client never sees its stream end; the server streams under it come and go: once
    every event is read (the end signal), no server stream is held, also after a stopped reply."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    wait_reply_done(page, send_chat(page, "Hello!"))
    page.wait_for_function(PAGE_IDLE, timeout=120_000)
    set_number(page, "max-new", 512)
    set_number(page, "min-new", 512)  # a reply that cannot end by itself: Stop ends it
    send_chat(page, "Tell me a long story about a dragon who learns to fly.")
    page.wait_for_function("window.__keptEventStream.connected", timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_function(PAGE_IDLE, timeout=120_000)
    set_number(page, "min-new", 0)
    set_number(page, "max-new", 8)
    wait_reply_done(page, send_chat(page, "What is the capital of France?"))
    page.wait_for_function(PAGE_IDLE, timeout=120_000)
    counts = kept(page)
    assert counts["pageStreams"] == 1 and counts["serverStreams"] > 2, counts


def test_four_tabs_in_one_browser_all_load_and_chat(browser, app_server):
    """A browser opens at most six connections to one HTTP/1.1 host (`python app.py` on a laptop),
    and each tab holds one for gradio's heartbeat: a tab must not hold a second one while idle."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        tabs = []
        for _ in range(4):
            tab = context.new_page()
            tab.goto(app_server.url)
            tab.wait_for_selector("#lab-heatmaps img", timeout=120_000)
            tab.wait_for_function("document.querySelector('#status-line').innerText.includes('4-bit: on')",
                                  timeout=120_000)
            tabs.append(tab)
        for tab in tabs:
            tab.get_by_role("tab", name="4-bit Chat").click()
            set_number(tab, "max-new", 8)
            before = replies_done(tab)
            send_chat(tab, "Hello!")
            wait_reply_done(tab, before)
        assert all(user_texts(tab) == ["Hello!"] for tab in tabs)
    finally:
        context.close()
