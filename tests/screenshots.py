"""Regenerate assets/attention_lab.png, assets/inside_model.png and assets/chat.png from the real app (`python tests/screenshots.py`).

Starts `python app.py` on a free port, drives Debian's chromium through both tabs (with a real
reply from the default model), saves full-page screenshots and stops the server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apputil import REPO, launch_chromium, open_app, send_chat, set_number, start_app, wait_reply_done  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ASSETS = REPO / "assets"


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
            send_chat(page, "What is the capital of France?")
            wait_reply_done(page, 1)
            page.click("#next-btn")
            page.wait_for_function("document.querySelector('#next-notes').innerText.includes('temperature')")
            time.sleep(1.0)
            page.screenshot(path=str(ASSETS / "chat.png"), full_page=True)
            context.close()
            browser.close()
    finally:
        server.stop()
    print("wrote", *(ASSETS / n for n in ("attention_lab.png", "inside_model.png", "chat.png")))


if __name__ == "__main__":
    main()
