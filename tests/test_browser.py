"""The app in a real browser: Debian's chromium driven by Playwright against `python app.py`.

Covers what a classroom does: both tabs load, sliders redraw the heatmaps, a bad combination
explains itself, the real 4-bit model streams a reply, Stop halts it, two users chat at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from apputil import PAGE_IDLE, bot_texts, event_id, event_ids, held_event, joins_event, open_app, send_chat, set_number
from apputil import replies_done, runs_event, user_texts, wait_changed, wait_event_read, wait_reply_done
from apputil import QUEUE_JOIN, wait_held, wait_until

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(600)

LONG_PROMPT = "Tell me a long story about a dragon who learns to fly."


def trace_column(pg, col: int) -> list[str]:
    """One column of the debug-trace table (Gradio draws it as a virtual grid of cells)."""
    cells = pg.locator(f"#lab-trace [role='gridcell'][data-col='{col}']")
    return [c.strip() for c in cells.all_inner_texts()]


def heatmap_src(pg) -> str:
    return pg.locator("#lab-heatmaps img").get_attribute("src")


def start_long_reply(pg) -> None:
    """Ask for a reply that cannot end before 512 tokens (min new tokens = max new tokens) and
    wait until the server is writing it: its own counts, not the page's text, which can trail the
    server by seconds on a loaded machine. What follows (Stop, Clear) then has the reply's
    remaining ~500 decode steps to reach the server in, against one click's round trip."""
    pg.get_by_role("tab", name="4-bit Chat").click()
    set_number(pg, "max-new", 512)
    set_number(pg, "min-new", 512)
    before = model_status(pg)["tokens_generated"]
    send_chat(pg, LONG_PROMPT)
    wait_until(lambda: model_status(pg), lambda s: s["generating"] == 1 and s["tokens_generated"] > before)


def short_replies(pg, max_new: int) -> None:
    """Back to replies the model may end, of at most max_new tokens."""
    set_number(pg, "min-new", 0)
    set_number(pg, "max-new", max_new)


def test_page_loads_with_both_tabs(page):
    assert page.get_by_role("tab", name="Attention Lab").is_visible()
    assert page.get_by_role("tab", name="4-bit Chat").is_visible()
    page.wait_for_selector("#lab-steps img", timeout=30_000)  # drawn by the chained step-view event
    page.locator("#lab-trace").scroll_into_view_if_needed()
    assert trace_column(page, 0) == ["Q", "K", "V", "scores", "weights", "context", "concat", "out"]
    assert trace_column(page, 1)[3] == "(1, 4, 11, 11)"  # scores: (B, H, T, T) for the 11-token sentence
    page.wait_for_function("document.querySelector('#status-line').innerText.includes('4-bit: on')")
    status = page.locator("#status-line").inner_text()
    assert "google/gemma-3-270m" in status and "4-bit: on" in status and "MiB" in status


def test_moving_a_slider_redraws_the_heatmaps(page):
    before = heatmap_src(page)
    set_number(page, "lab-seed", 7)
    after = wait_changed(lambda: heatmap_src(page), before)
    assert after.startswith("data:image/png;base64,")
    # a narrower model: the trace follows (emb_dim 12 / 4 heads = d_k 3) and n_heads choices follow emb_dim
    set_number(page, "emb-dim", 12)
    page.locator("#lab-trace").scroll_into_view_if_needed()
    assert wait_changed(lambda: trace_column(page, 1)[:1], ["(1, 4, 11, 8)"]) == ["(1, 4, 11, 3)"]
    page.locator("#n-heads input").click()
    options = page.get_by_role("option").all_inner_texts()
    assert [o.replace("✓", "").strip() for o in options] == ["1", "2", "3", "4", "6", "12"]  # ✓ marks 4


def test_a_head_picked_while_the_maps_redraw_is_kept(page):
    """A redraw that ends after the student picked another head must not put the old head back.
    Forced: the redraw (a new seed) is held at the server's queue until the pick is made."""
    before = heatmap_src(page)
    with held_event(page, lambda: set_number(page, "lab-seed", 7), only=event_id(page, "lab_update")):
        set_number(page, "lab-head", 2)
    wait_changed(lambda: heatmap_src(page), before)  # the held redraw has ended (one update, head included)
    assert page.locator("#lab-head input[type=number]").input_value() == "2"


def test_invalid_combination_shows_a_message(page):
    before = heatmap_src(page)
    set_number(page, "n-kv-heads", 3)  # 3 K/V heads cannot be shared evenly by 4 query heads
    toast = page.get_by_text("n_kv_heads=3 does not divide n_heads=4")
    toast.first.wait_for(timeout=30_000)
    # the toast is shown while the event runs; the message under the maps is its output, at its end
    page.wait_for_function("document.querySelector('#lab-message').innerText.includes('does not divide')",
                           timeout=30_000)
    assert heatmap_src(page) == before  # the last valid picture stays
    set_number(page, "n-kv-heads", 2)  # and a valid value draws again
    wait_changed(lambda: heatmap_src(page), before)
    message = page.locator("#lab-message").inner_text()
    assert message.startswith("11 tokens") and "Head 0 mostly attends to" in message  # the maps in words


def test_typed_message_gets_a_streamed_reply(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    # a reply that runs the full 200 tokens: long enough to arrive in several pieces (10 a second)
    set_number(page, "max-new", 200)
    set_number(page, "min-new", 200)
    before = send_chat(page, LONG_PROMPT)
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and replies_done(page) == before:
        texts = bot_texts(page)
        if texts and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        time.sleep(0.03)
    final = wait_reply_done(page, before)
    assert user_texts(page) == [LONG_PROMPT]
    assert final.strip()
    assert page.locator("#chat-input textarea").input_value() == ""
    # the tokenization preview shows what was just sent, as the model's tokenizer cut it
    preview = page.locator("#token-preview").inner_text()
    assert "Just sent" in preview and "dragon" in preview
    assert "last reply (#1)" in page.locator("#status-line").inner_text()
    assert len(final) > 80
    growing = [s for s in seen if s.strip()]
    assert len(growing) >= 3, growing  # it arrived in pieces, each extending the last
    assert all(b.startswith(a[:-1]) for a, b in zip(growing, growing[1:])), growing


def model_status(pg) -> dict:
    """The server's /model_status, fetched by the page (replies generating, tokens written, ...)."""
    return pg.evaluate("""async () => {
        const r = await fetch('/gradio_api/call/model_status', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({data: []})});
        const {event_id} = await r.json();
        const text = await (await fetch('/gradio_api/call/model_status/' + event_id)).text();
        const line = text.split('\\n').find(l => l.startsWith('data:'));
        return JSON.parse(line.slice(5))[0];
    }""")


def live_generations(pg) -> int:
    """Replies being generated on the server, all users together."""
    return model_status(pg)["generating"]


def test_send_while_a_reply_is_being_written_is_refused_and_keeps_the_text(page):
    """A Send (Enter or the button) while this page's reply is still being written is refused with
    a warning, and the typed text stays. Forced: the reply's own event is held at the server's queue
    (the Send that asked for it has registered it, so it counts as being written until it ends)."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    send_id, reply_id = event_id(page, "user_turn"), event_id(page, "bot_turn")
    before = replies_done(page)

    def refused_send(press) -> None:
        # the end signal: the page has read the server's answer to that Send
        with page.expect_response(lambda r: joins_event(r.request, send_id), timeout=120_000) as join:
            press()
        wait_event_read(page, join.value)

    with held_event(page, lambda: send_chat(page, "What is the capital of France?"), only=reply_id):
        page.fill("#chat-input textarea", "Second question")
        refused_send(lambda: page.press("#chat-input textarea", "Enter"))
        page.get_by_text("A reply is still being written").first.wait_for(timeout=30_000)
        refused_send(lambda: page.click("#send-btn"))
        assert user_texts(page) == ["What is the capital of France?"], "a second user turn slipped in"
        assert page.locator("#chat-input textarea").input_value() == "Second question"
    wait_reply_done(page, before)
    # once the reply has ended, the kept text is sent and gets its own reply
    before = replies_done(page)
    page.click("#send-btn")
    wait_reply_done(page, before)
    assert user_texts(page) == ["What is the capital of France?", "Second question"] and len(bot_texts(page)) == 2


def test_stop_while_the_reply_waits_its_turn_frees_the_chat(page):
    """Stop pressed before the server has started the reply (it waits behind the class), then a
    new message: the stopped reply's step, reaching the server only after the new Send, writes
    nothing, and the new message is answered. Forced: both reply steps are held at the queue and
    let through one after the other."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    stops, send_id, reply_id = event_ids(page, "stop"), event_id(page, "user_turn"), event_id(page, "bot_turn")
    held: list = []

    def hold(route) -> None:
        if joins_event(route.request, reply_id):
            held.append(route)
        else:
            route.continue_()

    before = replies_done(page)
    page.route(QUEUE_JOIN, hold)
    try:
        send_chat(page, "What is the capital of France?")
        wait_held(page, held, 1)
        with page.expect_response(lambda r: runs_event(r.request, stops), timeout=120_000):
            page.click("#stop-btn")
        with page.expect_response(lambda r: joins_event(r.request, send_id), timeout=120_000) as join:
            send_chat(page, "Hello!")
        wait_event_read(page, join.value)
        wait_held(page, held, 2)
        with page.expect_response(lambda r: joins_event(r.request, reply_id), timeout=120_000) as late:
            held[0].continue_()  # the stopped reply's step, after the new Send
        wait_event_read(page, late.value)
        assert bot_texts(page) == [] and replies_done(page) == before, "the stopped reply's step wrote a reply"
        held[1].continue_()
    finally:
        page.unroute(QUEUE_JOIN, hold)
    wait_reply_done(page, before)
    assert user_texts(page) == ["What is the capital of France?", "Hello!"] and len(bot_texts(page)) == 1


def test_inspect_text_follows_the_chat_unless_the_user_typed(page):
    inspect_box = page.locator("#inspect-text textarea")
    assert inspect_box.input_value() == "The cat sat on the mat because it was tired."
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    reply = wait_reply_done(page, send_chat(page, "What is the capital of France?"))
    page.wait_for_function("document.querySelector('#inspect-text textarea').value.startsWith('What is')",
                           timeout=30_000)
    filled = inspect_box.input_value()  # the untouched default went: question, then the (raw) reply
    assert filled.startswith("What is the capital of France?\n") and len(filled) > 31 and reply.strip()
    # the next exchange replaces the one filled in automatically
    wait_reply_done(page, send_chat(page, "Hello!"))
    page.wait_for_function("document.querySelector('#inspect-text textarea').value.startsWith('Hello!')",
                           timeout=30_000)
    # text the user typed is never overwritten
    page.get_by_role("tab", name="Attention Lab").click()
    inspect_box.fill("My own sentence.")
    page.get_by_role("tab", name="4-bit Chat").click()
    fills = event_ids(page, "fill_inspect")  # runs after every reply step, outside the queue
    with page.expect_response(lambda r: runs_event(r.request, fills), timeout=120_000) as filled:
        wait_reply_done(page, send_chat(page, "Write a haiku about transformers."))
    # the end signal: the server's answer after this reply, which leaves the text box as it is
    answer = filled.value.json()["data"][0]
    assert answer == {"__type__": "update"}, f"the server wrote into the user's text: {answer!r}"
    assert inspect_box.input_value() == "My own sentence."


def test_stop_halts_a_long_reply_and_the_next_message_works(page):
    before = model_status(page)["tokens_generated"]
    start_long_reply(page)
    page.click("#stop-btn")
    # Not only the text: the server-side request ends (a cancels= alone would leave it generating).
    deadline = time.monotonic() + 120
    while live_generations(page) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_generations(page) == 0, "the request kept generating after Stop"
    written = model_status(page)["tokens_generated"] - before
    assert 0 < written < 512, "the reply ran to its end: Stop did not stop it"
    page.wait_for_function(PAGE_IDLE, timeout=120_000)  # every update the server sent has been read
    stopped = bot_texts(page)[-1]
    # the worker is free again: a new message gets its own reply, and the stopped one stays as it was
    short_replies(page, 12)
    reply = wait_reply_done(page, send_chat(page, "What is the capital of France?"), timeout_s=120)
    assert reply.strip() and reply != stopped
    assert user_texts(page)[-1] == "What is the capital of France?"
    assert bot_texts(page)[-2] == stopped, "the reply kept growing after Stop"


def test_clear_while_a_reply_streams_stays_cleared(page):
    start_long_reply(page)
    page.click("#clear-btn")
    # the stopped reply's worker ends on its own; nothing it sends may bring the chat back
    deadline = time.monotonic() + 120
    while live_generations(page) and time.monotonic() < deadline:
        time.sleep(0.1)
    page.wait_for_function(PAGE_IDLE, timeout=120_000)  # every update the server sent has been read
    assert user_texts(page) == [] and bot_texts(page) == [], "the cleared chat came back"
    short_replies(page, 8)
    before = send_chat(page, "What is the capital of France?")
    wait_reply_done(page, before, timeout_s=120)
    assert user_texts(page) == ["What is the capital of France?"] and len(bot_texts(page)) == 1


def test_two_pages_chatting_at_once_each_get_their_own_reply(browser, app_server):  # noqa: F811
    ctx_a, a, _ = open_app(browser, app_server.url)
    ctx_b, b, _ = open_app(browser, app_server.url)
    try:
        for pg in (a, b):
            pg.get_by_role("tab", name="4-bit Chat").click()
            set_number(pg, "max-new", 24)
        before_a = send_chat(a, "What is the capital of France?")
        before_b = send_chat(b, "Write a haiku about transformers.")
        reply_a = wait_reply_done(a, before_a)
        reply_b = wait_reply_done(b, before_b)
        assert user_texts(a) == ["What is the capital of France?"]
        assert user_texts(b) == ["Write a haiku about transformers."]
        assert len(bot_texts(a)) == 1 and len(bot_texts(b)) == 1
        assert reply_a.strip() and reply_b.strip()
    finally:
        ctx_a.close()
        ctx_b.close()


def test_empty_message_warns_and_clear_empties_the_chat(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    send_chat(page, "   ")
    page.get_by_text("Type a message first").first.wait_for(timeout=30_000)
    assert bot_texts(page) == [] and user_texts(page) == []
    set_number(page, "max-new", 8)
    wait_reply_done(page, send_chat(page, "Hello!"))
    page.click("#undo-btn")
    page.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='user']\").length === 0")
    assert page.locator("#chat-input textarea").input_value() == "Hello!"  # back in the box
    page.press("#chat-input textarea", "Enter")
    wait_reply_done(page, 1)  # the second reply of this page (the first was undone)
    page.click("#clear-btn")
    page.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='bot']\").length === 0")


def test_text_typed_while_a_message_is_sent_stays_in_the_box(page):
    """Send clears the box, but not the next question a student types while the server takes the
    first one. Forced: the send is held at the server's queue while they type."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    before = replies_done(page)
    with held_event(page, lambda: send_chat(page, "Hello!"), only=event_id(page, "user_turn")):
        page.fill("#chat-input textarea", "And what is the capital of Peru?")
    wait_reply_done(page, before)
    assert user_texts(page) == ["Hello!"]
    assert page.locator("#chat-input textarea").input_value() == "And what is the capital of Peru?"
    # A message sent and not typed over is cleared, as ever.
    wait_reply_done(page, send_chat(page, "Thanks!"))
    assert page.locator("#chat-input textarea").input_value() == ""


def test_a_message_sent_while_the_previous_send_is_at_the_server_is_answered(page):
    """A student who presses Enter again before the server has taken the previous Send (an empty
    one, refused with a warning) gets the new message answered, not silently dropped. Forced: the
    first Send is held at the server's queue while they type and send the second."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    before = replies_done(page)
    with held_event(page, lambda: send_chat(page, "   "), only=event_id(page, "user_turn")):
        send_chat(page, "Hello!")
        wait_reply_done(page, before)
    assert user_texts(page) == ["Hello!"]
    page.get_by_text("Type a message first").first.wait_for(timeout=30_000)  # the held one, refused


def test_an_empty_message_mid_chat_keeps_the_chat(page):
    """An empty Send is refused with a warning and changes nothing: its reply step, which has
    nothing to write, must not empty the chat (a generator that yields nothing ends with None for
    every output). The end signal: the page joins the events chained after that reply step."""
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 8)
    wait_reply_done(page, send_chat(page, "Hello!"))
    reply = bot_texts(page)
    after_reply = event_id(page, "follow")  # runs .then() after every reply step, so after this one
    with page.expect_request(lambda r: joins_event(r, after_reply), timeout=60_000):
        send_chat(page, "   ")
    page.get_by_text("Type a message first").first.wait_for(timeout=30_000)
    assert user_texts(page) == ["Hello!"] and bot_texts(page) == reply
    assert replies_done(page) == 1  # the status line kept its count


def test_inside_the_chat_model_renders_and_follows_a_layer_change(page):
    page.click("#inspect-btn")
    page.wait_for_selector("#inspect-big img", timeout=120_000)
    notes = page.locator("#inspect-notes").inner_text()
    assert "layer 0 of 0-17" in notes and "share 1 KV head" in notes and "<bos>" in notes
    before = page.locator("#inspect-grid img").get_attribute("src")
    set_number(page, "inspect-layer", 5)  # Gemma 3 270m: layer 5 is a global one
    page.wait_for_function(
        "document.querySelector('#inspect-notes').innerText.includes('layer 5 of 0-17 · global attention')",
        timeout=120_000,
    )
    wait_changed(lambda: page.locator("#inspect-grid img").get_attribute("src"), before)
    # A head picked while the drawing of another layer waits (held at the server's queue) is kept.
    with held_event(page, lambda: set_number(page, "inspect-layer", 11), only=event_id(page, "inspect_update")):
        set_number(page, "inspect-head", 2)
    wait_until(lambda: page.locator("#inspect-notes").inner_text(), lambda t: "Layer 11, head 2 " in t)
    assert page.locator("#inspect-head input[type=number]").input_value() == "2"


def test_next_token_table_follows_the_chat_sliders(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    page.click("#next-btn")
    page.wait_for_function("document.querySelector('#next-notes').innerText.includes('temperature 0.7')",
                           timeout=60_000)
    set_number(page, "temperature", 0)
    page.wait_for_function("document.querySelector('#next-notes').innerText.includes('temperature 0 ')",
                           timeout=60_000)
    statuses = page.locator("#next-table [role='gridcell'][data-col='4']").all_inner_texts()
    assert statuses[0].strip() == "kept" and "not taken (greedy)" in [s.strip() for s in statuses[1:]]


def test_what_4bit_costs_loads_full_precision_on_demand(page):
    # The full-precision copy (bf16 on CPU, ~0.5 GB) loads on this first click, not at start.
    page.click("#quant-btn")
    page.wait_for_function("document.querySelector('#quant-summary').innerText.includes('nats')", timeout=180_000)
    summary = page.locator("#quant-summary").inner_text()
    kl = float(summary.split("=", 1)[1].split("nats", 1)[0].strip())
    assert 1e-3 < kl < 1.0, summary  # NF4 moves the distribution, measurably but not wildly
    # side by side: the chat's calibrated rounding, bitsandbytes' plain one, full precision
    assert "NF4 4-bit, calibrated" in summary and "NF4 4-bit, plain" in summary and "KL(full ‖ this)" in summary
    # what each of the three writes next, one cell each (…and the model's own text, never markup)
    written = page.locator("#quant-summary tr", has_text="writes next (greedy)").locator("td").all_inner_texts()
    assert len(written) == 4 and all(cell.startswith("…") and len(cell) > 1 for cell in written[1:]), written
    table = page.locator("#quant-table").inner_text()
    assert "Paris" in table and "%" in table


def test_the_lab_setup_downloads_as_png_svg_and_csv(page):
    set_number(page, "emb-dim", 16)  # the files follow the sliders as they are now
    page.locator("#causal input").check()
    page.click("#lab-files-btn")
    page.wait_for_function("document.querySelectorAll('#lab-files a[download]').length === 5", timeout=60_000)
    names = [a.get_attribute("download") for a in page.locator("#lab-files a[download]").all()]
    assert names == ["lab_16d_4heads_causal_seed0.png", "lab_16d_4heads_causal_seed0.svg",
                     "lab_16d_4heads_causal_seed0_head0_steps.png", "lab_16d_4heads_causal_seed0_head0_steps.svg",
                     "lab_16d_4heads_causal_seed0_weights.csv"]
    with page.expect_download(timeout=30_000) as info:
        page.locator("#lab-files a[download$='.csv']").click()
    lines = Path(info.value.path()).read_text().splitlines()
    assert lines[0] == "head,query_pos,query,key_pos,key,weight" and len(lines) == 1 + 4 * 11 * 11
    # causal: no query looks ahead, and each (head, query) row sums to 1
    rows = [line.split(",") for line in lines[1:]]
    assert all(float(r[5]) == 0.0 for r in rows if int(r[3]) > int(r[1]))
    sums: dict[tuple[str, str], float] = {}
    for r in rows:
        sums[(r[0], r[1])] = sums.get((r[0], r[1]), 0.0) + float(r[5])
    assert all(abs(v - 1.0) < 1e-4 for v in sums.values())
    with page.expect_download(timeout=30_000) as info:
        page.locator("#lab-files a[download$='seed0.svg']").click()
    assert b"<svg" in Path(info.value.path()).read_bytes()[:400]
    with page.expect_download(timeout=30_000) as info:
        page.locator("#lab-files a[download$='steps.png']").click()
    assert Path(info.value.path()).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
