"""The teaching views in a real browser (Debian's chromium + Playwright against `python app.py`):
every layer at once (click a thumbnail, download the figures), switching heads off (a shared link, a
preset, no heads), and what a chat reply looked at while it was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from apputil import event_id, held_event, open_app, send_chat, set_number, wait_changed
from apputil import wait_reply_done, wait_until

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(600)

DEFAULT_LAYER_KINDS = ["global" if i % 6 == 5 else "sliding" for i in range(18)]  # Gemma 3 270m


def open_panel(pg, accordion: str) -> None:
    """Open one of the teaching accordions (their content is only laid out once open)."""
    pg.locator(f"#{accordion} > button.label-wrap").click()


def src(pg, selector: str) -> str | None:
    loc = pg.locator(selector)
    return loc.get_attribute("src") if loc.count() else None


def slider_value(pg, elem_id: str) -> str:
    return pg.locator(f"#{elem_id} input[type=number]").input_value()


def download(pg, button: str) -> tuple[str, bytes]:
    """Click a download button; (suggested file name, the file's bytes)."""
    with pg.expect_download(timeout=30_000) as info:
        pg.click(f"#{button}")
    d = info.value
    return d.suggested_filename, Path(d.path()).read_bytes()


def grid_cells(n_tokens: int) -> tuple[dict, tuple[int, int]]:
    """Where the UI's grid puts each thumbnail for the default model and a text of n_tokens shown
    tokens: the layout depends on the shape and labels only, so random weights give the same one."""
    import torch

    from attention.plot import model_view_cells
    from generation.inside import ModelView
    from ui.teaching import grid_figure

    t = n_tokens
    mv = ModelView(tokens=["x"] * t, token_ids=[0] * t, weights=torch.rand(18, 4, t, t),
                   layer_kinds=DEFAULT_LAYER_KINDS, window=512, kv_groups=[0] * 4, n_kv_heads=1, capped=False,
                   n_text_tokens=t + 1, hidden_tokens=["<bos>"], hidden_mass=torch.zeros(18, 4, t), notice="",
                   model_id="google/gemma-3-270m")
    fig = grid_figure(mv, "each", (0, 0))
    w, h = fig.get_size_inches() * fig.dpi
    return model_view_cells(fig), (round(w), round(h))


def test_model_view_click_a_thumbnail_and_download(page):
    open_panel(page, "mv-accordion")
    page.click("#mv-btn")
    page.wait_for_selector("#mv-big img", timeout=120_000)
    notes = page.locator("#mv-notes").inner_text()
    assert "(18, 4, 11, 11)" in notes and "one forward pass" in notes  # 11 tokens: <bos> hidden
    assert (slider_value(page, "mv-layer"), slider_value(page, "mv-head")) == ("5", "0")

    # A click on the thumbnail of layer 11, head 2 shows that head large.
    cells, size = grid_cells(11)
    natural = page.evaluate("(() => { const i = document.querySelector('#mv-grid img');"
                            " return [i.naturalWidth, i.naturalHeight]; })()")
    assert all(abs(n - s) <= 1 for n, s in zip(natural, size)), f"grid {natural}, not laid out as {size}"
    box = page.locator("#mv-grid img").bounding_box()
    ratio = box["width"] / natural[0]
    x0, y0, x1, y1 = cells[11, 2]
    before_big, before_grid = src(page, "#mv-big img"), src(page, "#mv-grid img")
    page.mouse.click(box["x"] + (x0 + x1) / 2 * ratio, box["y"] + (y0 + y1) / 2 * ratio)
    wait_changed(lambda: src(page, "#mv-big img"), before_big)
    assert (slider_value(page, "mv-layer"), slider_value(page, "mv-head")) == ("11", "2")
    assert src(page, "#mv-grid img") != before_grid  # redrawn with the new thumbnail outlined

    # The sliders are the accessible way to the same place.
    before_big = src(page, "#mv-big img")
    set_number(page, "mv-layer", 3)
    wait_changed(lambda: src(page, "#mv-big img"), before_big)
    assert page.locator("#mv-summary").inner_text().startswith("Layer 3, head 2 mostly attends to")  # in words

    # A head picked while the drawing of another layer waits (held at the server's queue) is kept:
    # that drawing, when it ends, leaves the sliders as the student left them, and the page's
    # deferred redraw then draws what they say.
    with held_event(page, lambda: set_number(page, "mv-layer", 7), only=event_id(page, "model_view_pick")):
        set_number(page, "mv-head", 1)
    wait_until(lambda: page.locator("#mv-summary").inner_text(), lambda t: t.startswith("Layer 7, head 1 "))
    assert (slider_value(page, "mv-layer"), slider_value(page, "mv-head")) == ("7", "1")
    set_number(page, "mv-layer", 3)
    set_number(page, "mv-head", 2)
    wait_until(lambda: page.locator("#mv-summary").inner_text(), lambda t: t.startswith("Layer 3, head 2 "))

    name, data = download(page, "mv-grid-png")
    assert name == "model_view.png" and data.startswith(b"\x89PNG\r\n\x1a\n")
    name, data = download(page, "mv-grid-svg")
    assert name == "model_view.svg" and data.startswith(b"<?xml") and b"<svg" in data[:500]
    name, data = download(page, "mv-big-svg")
    assert name == "attention_layer3_head2.svg" and b"<svg" in data[:500]
    name, data = download(page, "mv-big-csv")
    lines = data.decode().splitlines()
    assert name == "attention_layer3_head2.csv"
    assert lines[0] == "query \\ key,The,cat,sat,on,the,mat,because,it,was,tired,."
    assert len(lines) == 12 and lines[1].startswith("The,")


def test_ablation_from_a_shared_link_then_a_preset_then_no_heads(browser, app_server):  # noqa: F811
    # A link that names an ablation opens its panel and runs it (the model is loaded).
    context, pg, off_host = open_app(browser, app_server.url + "/?ablate_prompt=The+capital+of+France+is"
                                                               "&ablate_heads=0:*")
    try:
        pg.wait_for_function("document.querySelector('#ablate-summary')?.innerText.includes('0:3')", timeout=120_000)
        assert pg.locator("#ablate-heads input, #ablate-heads textarea").first.input_value() == "0:*"

        # Preset "all heads of layer 5": the spec fills in and both sides are shown with their KL.
        pg.locator("#ablate-layer input").fill("5")
        pg.click("#preset-layer-btn")
        pg.wait_for_function("document.querySelector('#ablate-summary').innerText.includes('5:0, 5:1, 5:2, 5:3')",
                             timeout=120_000)
        assert pg.locator("#ablate-heads input, #ablate-heads textarea").first.input_value() == "5:*"
        summary = pg.locator("#ablate-summary").inner_text()
        kl = float(summary.split("=", 1)[1].split("nats", 1)[0])
        assert kl > 0.1, summary
        plain = pg.locator("#ablate-plain [role='gridcell'][data-col='1']").all_inner_texts()
        off = pg.locator("#ablate-off [role='gridcell'][data-col='1']").all_inner_texts()
        assert len(plain) == 10 and len(off) == 10 and plain != off
        plain_text = pg.locator("#ablate-plain-text textarea").input_value()
        off_text = pg.locator("#ablate-off-text textarea").input_value()
        assert plain_text.startswith("The capital of France is ") and off_text.startswith("The capital of France is ")
        assert plain_text != off_text

        # No head switched off: both sides are the plain model.
        box = pg.locator("#ablate-heads input, #ablate-heads textarea").first
        box.fill("")
        box.press("Enter")
        pg.wait_for_function("document.querySelector('#ablate-summary').innerText.includes('No head is switched off')",
                             timeout=120_000)
        assert "= 0.0000 nats" in pg.locator("#ablate-summary").inner_text()
        assert pg.locator("#ablate-off-text textarea").input_value() == plain_text
        assert not off_host
    finally:
        context.close()


def test_reply_tokens_show_what_they_looked_at(page):
    page.get_by_role("tab", name="4-bit Chat").click()
    set_number(page, "max-new", 16)
    set_number(page, "temperature", 0)
    reply = wait_reply_done(page, send_chat(page, "What is the capital of France?"))
    assert "Paris" in reply
    page.get_by_role("tab", name="Attention Lab").click()
    open_panel(page, "writing-accordion")
    page.click("#writing-btn")
    page.wait_for_selector("#writing-strip img", timeout=120_000)
    notes = page.locator("#writing-notes").inner_text()
    assert "Prompt:" in notes and "reply:" in notes and "layer 5 of 0-17 (global)" in notes
    token_box = page.locator("#writing-token input")
    first = token_box.input_value().split(": ", 1)[1]  # "position: token", the first reply token
    assert first and reply.strip().startswith(first)
    assert f"In words: '{first}' (writing it, average of all heads) attended most to" in notes

    # Click another token of the reply (the second): its strip is drawn and the list follows.
    second = page.locator("#writing-reply .token .text").nth(1)
    other = second.inner_text().strip()
    before = src(page, "#writing-strip img")
    second.click()
    wait_changed(lambda: src(page, "#writing-strip img"), before)
    assert token_box.input_value().endswith(f": {other}")

    # The list is the other way to choose; one head instead of the average.
    before = src(page, "#writing-strip img")
    token_box.click()
    third = page.get_by_role("option").nth(2)  # the third reply token, from the list
    label = third.inner_text().strip()
    third.click()
    wait_until(lambda: (token_box.input_value(), src(page, "#writing-strip img")),
               lambda now: now[0] == label and now[1] != before)
    before = src(page, "#writing-strip img")
    page.locator("#writing-head input").click()
    page.get_by_role("option", name="head 2").click()
    wait_until(lambda: (token_box.input_value(), page.locator("#writing-notes").inner_text()),
               lambda now: now[0] == label and "(writing it, head 2)" in now[1])
    assert src(page, "#writing-strip img") != before

    name, data = download(page, "writing-png")
    assert name.startswith("reply_attention_layer5_pos") and data.startswith(b"\x89PNG\r\n\x1a\n")
    name, data = download(page, "writing-csv")
    header = data.decode().splitlines()[0]
    assert header.startswith("query \\ key,<bos>,") and data.decode().splitlines()[1].startswith("head 0,")

    # Having read one reply, the next one is read as soon as it is written.
    first_tokens = page.locator("#writing-reply").inner_text()
    page.get_by_role("tab", name="4-bit Chat").click()
    wait_reply_done(page, send_chat(page, "Write a haiku about transformers."))
    page.get_by_role("tab", name="Attention Lab").click()
    wait_changed(lambda: page.locator("#writing-reply").inner_text(), first_tokens)


def test_the_layer_maps_files_are_made_on_request(page):
    page.click("#inspect-files-btn")  # the one-layer view above: its figures and weights as files
    page.wait_for_function("document.querySelectorAll('#inspect-files a[download]').length === 5", timeout=120_000)
    names = [a.get_attribute("download") for a in page.locator("#inspect-files a[download]").all()]
    assert names == ["attention_layer0_heads.png", "attention_layer0_heads.svg", "attention_layer0_head0.png",
                     "attention_layer0_head0.svg", "attention_layer0_head0.csv"]
    with page.expect_download(timeout=30_000) as info:
        page.locator("#inspect-files a[download$='.csv']").click()
    lines = Path(info.value.path()).read_text().splitlines()
    assert lines[0] == "query \\ key,The,cat,sat,on,the,mat,because,it,was,tired,." and len(lines) == 12
    with page.expect_download(timeout=30_000) as info:
        page.locator("#inspect-files a[download$='heads.png']").click()
    assert Path(info.value.path()).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
