"""The chat opened up, in a real browser: a reply's tokens coloured and clicked, a branch from
another token (the original kept), a sent message edited and answered again, the live
"Inside the server" panel."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from apputil import bot_texts, send_chat, set_number, user_texts, wait_reply_done, wait_until

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(600)

QUESTION = "What is the capital of France?"


def greedy_chat(pg, message: str, max_new: int = 20) -> tuple[str, int]:
    """Send `message` with greedy decoding; (the finished reply, the replies finished before it)."""
    pg.get_by_role("tab", name="4-bit Chat").click()
    set_number(pg, "temperature", 0)
    set_number(pg, "max-new", max_new)
    before = send_chat(pg, message)
    return wait_reply_done(pg, before), before


def test_reply_tokens_open_up_and_a_branch_keeps_the_original(page):
    original, before = greedy_chat(page, QUESTION)
    page.click("#tokens-toggle input")
    page.wait_for_selector("#reply-tokens .token", timeout=120_000)
    pieces = page.locator("#reply-tokens .token .text").all_inner_texts()
    assert "".join(pieces).strip() == original.strip()
    # The same tokens download as CSV, each with its probability, rank and alternatives.
    page.wait_for_selector("#reply-tokens-csv:not([disabled])", timeout=60_000)
    with page.expect_download(timeout=30_000) as info:
        page.click("#reply-tokens-csv")
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text(encoding="utf-8"))))
    assert info.value.suggested_filename == "reply_tokens.csv" and len(rows) == len(pieces)
    assert "".join(r["token"] for r in rows).strip() == original.strip()
    for r in rows:
        assert 0 < float(r["probability"]) <= 1 and int(r["rank"]) >= 1 and r["alternative 10"]
        assert float(r["p 1"]) >= float(r["p 2"]) >= float(r["p 10"]) and float(r["p 1"]) >= float(r["probability"])
        if r["rank"] == "1":  # the model's most likely token there is the first alternative
            assert r["token"].strip() == r["alternative 1"].strip() or r["alternative 1"].startswith("<0x")
    # The first token: what the model weighed there, under the sliders (greedy: one is taken).
    page.locator("#reply-tokens .token").nth(0).click()
    page.wait_for_function("document.querySelector('#token-alts-head').innerText.includes('Token 1')",
                           timeout=120_000)
    statuses = [s.strip() for s in page.locator("#token-alts [role='gridcell'][data-col='4']").all_inner_texts()]
    assert statuses[0] == "kept" and "not taken (greedy)" in statuses
    # The line above the table quotes the table's own probability of that token (one of its rows).
    said = re.search(r"the model gave it ([\d.]+ %)", page.locator("#token-alts-head").inner_text()).group(1)
    assert said in [p.strip() for p in page.locator("#token-alts [role='gridcell'][data-col='1']").all_inner_texts()]
    # Continue with the most likely other token: a new branch, written by the chat engine.
    page.click("#branch-btn")
    branch = wait_reply_done(page, before + 1)
    assert branch != original and user_texts(page) == [QUESTION] and len(bot_texts(page)) == 1
    original_choice = page.locator("#branches label", has_text="1 (original)")
    original_choice.wait_for(timeout=60_000)
    original_choice.click()
    wait_until(lambda: bot_texts(page)[-1], lambda t: t.strip() == original.strip())
    page.locator("#branches label", has_text=re.compile(r"^\s*2\s*$")).click()
    wait_until(lambda: bot_texts(page)[-1], lambda t: t.strip() == branch.strip())


def test_edit_a_sent_message_answers_it_again(page):
    _, before = greedy_chat(page, QUESTION, max_new=12)
    page.locator("#chatbot [data-testid='user']").first.hover()
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    box = page.locator("#chatbot textarea").first
    box.fill("What is the capital of Italy?")
    page.locator("#chatbot button[aria-label='Submit']").first.click()
    wait_reply_done(page, before + 1)
    assert user_texts(page) == ["What is the capital of Italy?"]
    assert len(bot_texts(page)) == 1 and bot_texts(page)[0].strip()


def test_inside_the_server_shows_this_chat_being_written(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    page.get_by_text("Inside the server: how this class's chats are batched").click()
    summary = page.locator("#server-summary")
    summary.wait_for(timeout=60_000)
    assert "rows busy" in summary.inner_text() and "tokens/s" in summary.inner_text()
    set_number(page, "max-new", 512)
    set_number(page, "min-new", 512)
    send_chat(page, "Tell me a long story about a dragon.")
    # Refreshed by its timer: this reply's row appears, writing.
    wait_until(lambda: page.locator("#server-panel").inner_text(), lambda t: "decode" in t and "writing:" in t)
    text = page.locator("#server-panel").inner_text()
    assert "dragon" not in text  # only counts, never anyone's text
    page.click("#stop-btn")
    wait_until(lambda: page.locator("#server-panel").inner_text(), lambda t: "No reply is being written" in t)


def test_a_lesson_asks_before_it_tells(page):
    page.get_by_role("tab", name="Lessons").click()
    page.locator("#lesson-pick label", has_text="What temperature does").click()
    page.wait_for_function("document.querySelector('#lesson-head').innerText.includes('Step 1 of 2')")
    # No prediction yet: the lesson says so and reveals nothing.
    page.click("#lesson-check")
    page.get_by_text("Pick your prediction first").wait_for(timeout=30_000)
    assert page.locator("#lesson-reveal").inner_text().strip() == ""
    page.locator("#lesson-choice label", has_text="lower").click()
    page.click("#lesson-check")
    page.wait_for_function("document.querySelector('#lesson-reveal').innerText.includes('You predicted')",
                           timeout=120_000)
    reveal = page.locator("#lesson-reveal").inner_text()
    assert "the model: higher" in reveal and "T = 0.5" in reveal
    cells = page.locator("#lesson-evidence [role='gridcell']")
    assert cells.count() >= 5
    assert "0 of 1" in page.locator("#lesson-score").inner_text()
    # The table downloads as CSV: the same headers and cells as shown.
    page.wait_for_selector("#lesson-csv:not([disabled])", timeout=30_000)
    with page.expect_download(timeout=30_000) as info:
        page.click("#lesson-csv")
    rows = list(csv.reader(io.StringIO(Path(info.value.path()).read_text(encoding="utf-8"))))
    assert info.value.suggested_filename == "lesson_temperature_step1.csv"
    shown = [c.strip() for c in cells.all_inner_texts()]
    assert len(rows) >= 2 and len(rows[0]) >= 2 and sum(len(r) for r in rows[1:]) == len(shown)
    assert [c.strip() for r in rows[1:] for c in r] == shown
    page.click("#lesson-next")
    page.wait_for_function("document.querySelector('#lesson-head').innerText.includes('Step 2 of 2')")
    assert "top-p 0.9" in page.locator("#lesson-question").inner_text()
    assert page.locator("#lesson-reveal").inner_text().strip() == ""
    assert page.locator("#lesson-csv").is_disabled()  # no table yet for this step
