"""Regenerate the screenshots in assets/ from the real app (`python tests/screenshots.py`):
attention_lab.png, inside_model.png, chat.png (a reply's tokens opened, the server's live view),
the teaching panels model_view.png, ablation.png and reply_attention.png, lenses.png (the logit
lens and head roles) and lesson.png (a lesson step answered).

Starts `python app.py` on a free port, drives Debian's chromium through both tabs (with a real
reply from the default model), saves full-page (and panel) screenshots and stops the server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apputil import REPO, launch_chromium, open_app, send_chat, set_number, start_app, wait_reply_done  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ASSETS = REPO / "assets"
SHOTS = ("attention_lab.png", "inside_model.png", "chat.png", "model_view.png", "ablation.png", "reply_attention.png",
         "lenses.png", "lesson.png")


def teaching_panels(page) -> None:
    """The three teaching panels, each opened, run on its default (the reply: its "Paris" token)."""
    page.get_by_role("tab", name="Attention Lab").click()
    page.locator("#mv-accordion > button.label-wrap").click()
    page.click("#mv-btn")
    page.wait_for_selector("#mv-big img", timeout=120_000)
    set_number(page, "mv-head", 2)  # layer 5 (a global one), head 2, outlined in the grid
    page.wait_for_function("document.querySelector('#mv-big img')?.getAttribute('src').includes('head2')",
                           timeout=60_000)
    time.sleep(1.0)
    page.locator("#mv-accordion").screenshot(path=str(ASSETS / "model_view.png"))
    page.locator("#mv-accordion > button.label-wrap").click()  # closed again: one panel at a time

    page.locator("#ablate-accordion > button.label-wrap").click()
    page.click("#preset-layer-btn")  # all heads of layer 5
    page.wait_for_function("document.querySelector('#ablate-summary').innerText.includes('nats')", timeout=120_000)
    time.sleep(1.0)
    page.locator("#ablate-accordion").screenshot(path=str(ASSETS / "ablation.png"))
    page.locator("#ablate-accordion > button.label-wrap").click()

    page.locator("#writing-accordion > button.label-wrap").click()
    page.click("#writing-btn")
    page.wait_for_selector("#writing-strip img", timeout=120_000)
    tokens = page.locator("#writing-reply .token .text")
    france = [i for i, t in enumerate(tokens.all_inner_texts()) if t.strip() == "France"]
    if france and france[0] > 0:  # the reply's "France": what it looked at (the question's "France")
        before = page.locator("#writing-strip img").get_attribute("src")
        tokens.nth(france[0]).click()
        page.wait_for_function(f"document.querySelector('#writing-strip img').getAttribute('src') !== {before!r}",
                               timeout=60_000)
    time.sleep(1.0)
    page.locator("#writing-accordion").screenshot(path=str(ASSETS / "reply_attention.png"))
    page.locator("#writing-accordion > button.label-wrap").click()


def lenses(page) -> None:
    """The lenses accordion: the logit lens and the head roles on their default text."""
    page.get_by_role("tab", name="Attention Lab").click()
    page.locator("#lens-accordion > button.label-wrap").click()
    page.click("#lens-btn")
    page.wait_for_selector("#lens-grid img", timeout=120_000)
    page.click("#quant-lens-btn")  # the full-precision copy is loaded already (What 4-bit costs)
    page.wait_for_selector("#quant-lens-plot img", timeout=300_000)
    page.click("#roles-btn")
    page.wait_for_selector("#roles-plot img", timeout=120_000)
    time.sleep(1.0)
    page.locator("#lens-accordion").screenshot(path=str(ASSETS / "lenses.png"))


def lesson(page) -> None:
    """The induction lesson's first step, predicted and checked."""
    page.get_by_role("tab", name="Lessons").click()
    page.locator("#lesson-pick label", has_text="An induction head").click()
    page.wait_for_function("document.querySelector('#lesson-question').innerText.includes('second copy')")
    page.locator("#lesson-choice label").nth(3).click()
    page.click("#lesson-check")
    page.wait_for_function("document.querySelector('#lesson-reveal').innerText.includes('You predicted')",
                           timeout=120_000)
    time.sleep(1.0)
    page.screenshot(path=str(ASSETS / "lesson.png"), full_page=True)


def main() -> None:
    server = start_app()
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            context, page, _ = open_app(browser, server.url)
            page.locator("#causal input").check()  # the causal triangle reads well at a glance
            page.wait_for_function("document.querySelector('#lab-heatmaps img') !== null")
            time.sleep(1.5)
            page.click("#inspect-btn")
            page.wait_for_selector("#inspect-big img", timeout=120_000)
            page.click("#quant-btn")  # loads the full-precision copy once
            page.wait_for_function("document.querySelector('#quant-summary').innerText.includes('KL(full')",
                                   timeout=300_000)
            time.sleep(1.0)
            # The toy lab (top of the tab) and the "inside the chat model" section, each a readable size.
            inside_y = page.locator("#inside-title").bounding_box()["y"] + page.evaluate("window.scrollY")
            height = page.evaluate("document.body.scrollHeight")
            page.screenshot(path=str(ASSETS / "attention_lab.png"), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1400, "height": min(inside_y, 1900)})
            page.screenshot(path=str(ASSETS / "inside_model.png"), full_page=True,
                            clip={"x": 0, "y": inside_y, "width": 1400, "height": height - inside_y})
            page.get_by_role("tab", name="4-bit Chat").click()
            set_number(page, "max-new", 40)
            set_number(page, "temperature", 0)  # the greedy reply: "... Paris.", the token the panels show
            wait_reply_done(page, send_chat(page, "What is the capital of France?"))
            set_number(page, "temperature", 0.7)  # the table then shows what sampling keeps
            page.click("#next-btn")
            page.wait_for_function("document.querySelector('#next-notes').innerText.includes('temperature')")
            page.click("#tokens-toggle input")  # the reply's tokens by probability, the first one opened
            page.wait_for_selector("#reply-tokens .token", timeout=120_000)
            page.locator("#reply-tokens .token").nth(0).click()
            page.wait_for_function("document.querySelector('#token-alts-head').innerText.includes('Token 1')",
                                   timeout=120_000)
            page.get_by_text("Inside the server: how this class's chats are batched").click()
            page.locator("#server-summary").wait_for(timeout=60_000)
            time.sleep(1.5)
            page.screenshot(path=str(ASSETS / "chat.png"), full_page=True)
            teaching_panels(page)
            lenses(page)
            lesson(page)
            context.close()
            browser.close()
    finally:
        server.stop()
    print("wrote", *(ASSETS / n for n in SHOTS))


if __name__ == "__main__":
    main()
