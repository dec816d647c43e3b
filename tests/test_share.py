"""Shared setups: query parameters -> widget values (pure parsing), and in a real browser."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, urlsplit

import pytest
from apputil import app_server, launch_chromium, open_app  # noqa: F401  (app_server is a fixture)

from ui.inside import INSIDE_FIELDS
from ui.lab import LAB_DEFAULTS, LAB_FIELDS, LabHandlers
from ui.share import query_string, read_fields


class _Req:
    def __init__(self, **query: str) -> None:
        self.query_params = query


@pytest.mark.parametrize(("query", "expected"), [
    ({"emb_dim": "64", "n_heads": "8", "causal": "1"}, {"emb_dim": 64, "n_heads": 8, "causal": True}),
    ({"dropout": "0.25", "seed": "7", "multi_head": "false"}, {"dropout": 0.25, "seed": 7, "multi_head": False}),
    ({"sentence": "A bird sang"}, {"sentence": "A bird sang"}),
    ({"emb_dim": "64.0"}, {"emb_dim": 64}),
    ({"other_view": "x"}, {}),
])
def test_good_values_are_read(query, expected):
    values, problems = read_fields(LAB_FIELDS, query)
    assert values == expected and problems == []


@pytest.mark.parametrize(("name", "raw"), [
    ("sentence", "<script>alert(1)</script>"),
    ("sentence", "<img src=x onerror=alert(1)>"),
    ("sentence", "javascript:alert(1)"),
    ("sentence", "x" * 301),
    ("sentence", "bell\x07"),
    ("emb_dim", "1e999"),
    ("emb_dim", "30"),  # not a multiple of 4
    ("emb_dim", "-4"),
    ("emb_dim", "nan"),
    ("n_heads", "abc"),
    ("n_heads", "99999999999999999999"),
    ("dropout", "0.9"),
    ("dropout", "inf"),
    ("causal", "maybe"),
    ("seed", "3.5"),
])
def test_hostile_or_wrong_values_are_refused_without_echo(name, raw):
    values, problems = read_fields(LAB_FIELDS, {name: raw})
    assert values == {}
    assert len(problems) == 1 and f"'{name}'" in problems[0]
    assert raw not in problems[0]  # the value itself is never shown back


def test_query_string_round_trips_and_leaves_defaults_out():
    defaults = [f.default for f in LAB_FIELDS]
    assert query_string(LAB_FIELDS, defaults) == "?"
    values = ["Hello & goodbye", False, 64, 8, 2, 0.1, 5, True, 3]
    q = query_string(LAB_FIELDS, values)
    parsed, problems = read_fields(LAB_FIELDS, dict(parse_qsl(q[1:])))
    assert problems == [] and [parsed[f.name] for f in LAB_FIELDS] == values


def test_apply_setup_sets_fields_or_falls_back_to_the_default():
    lab = LabHandlers()
    out = lab.apply_setup(_Req(emb_dim="64", n_heads="8", causal="1"))
    names = [f.name for f in LAB_FIELDS]
    assert out[names.index("emb_dim")] == 64 and out[names.index("causal")] is True
    assert out[names.index("head")].value == 0 and out[names.index("head")].maximum == 7
    assert out[names.index("n_heads")].value == 8 and "8" in [c[0] for c in out[names.index("n_heads")].choices]
    # 8 heads cannot split 12 dimensions: the whole link is refused, the default setup stays
    with pytest.warns(UserWarning, match="do not fit together"):
        out = lab.apply_setup(_Req(emb_dim="12", n_heads="8"))
    assert all(_is_skip(v) for v in out)
    assert all(_is_skip(v) for v in lab.apply_setup(_Req()))


def _is_skip(v) -> bool:
    return isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1


# ---------------------------------------------------------------------------------------------
# In the browser


def _slider(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def test_a_shared_link_restores_every_lab_slider_and_the_button_writes_it(app_server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    query = "?sentence=A+bird+sang+at+dawn&emb_dim=64&n_heads=8&n_kv_heads=2&seed=7&causal=1&head=5"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            _, page, off_host = open_app(browser, app_server.url + "/" + query)
            page.wait_for_function("document.querySelector('#lab-text textarea').value === 'A bird sang at dawn'")
            assert _slider(page, "emb-dim") == "64" and _slider(page, "n-kv-heads") == "2"
            assert _slider(page, "lab-seed") == "7" and page.locator("#causal input").is_checked()
            assert page.locator("#n-heads input").input_value() == "8"
            page.wait_for_function("document.querySelector('#lab-message').innerText.includes('5 tokens')")
            # the heatmaps were drawn with the link's setup: 8 heads, 2 K/V heads, causal
            page.wait_for_function("document.querySelector('#lab-head input[type=number]').value === '5'")
            page.click("#share-btn")
            page.wait_for_function("document.querySelector('#share-link textarea').value.startsWith('http')")
            link = page.locator("#share-link textarea").input_value()
            got = dict(parse_qsl(urlsplit(link).query))
            assert got == {"sentence": "A bird sang at dawn", "emb_dim": "64", "n_heads": "8", "n_kv_heads": "2",
                           "seed": "7", "causal": "1", "head": "5"}
            assert urlsplit(page.url).query == urlsplit(link).query  # the address bar holds it too
            assert not off_host
        finally:
            browser.close()


def test_a_hostile_link_warns_and_keeps_the_default_setup(app_server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    query = "?sentence=%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E&emb_dim=1e999&n_heads=abc&layer=-3"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            _, page, _ = open_app(browser, app_server.url + "/" + query)
            # one toast from the lab's fields, one from the inside view's
            toasts = page.get_by_text("This link's setup was partly ignored")
            page.wait_for_function("document.body.innerText.split(\"This link's setup was partly ignored\").length > 2",
                                   timeout=30_000)
            text = " ".join(toasts.all_inner_texts())
            assert "'sentence' was ignored" in text and "'emb_dim' was ignored" in text and "'layer'" in text
            assert "<script>" not in text and "pwned" not in text
            assert page.evaluate("window.pwned === undefined")
            assert page.locator("#lab-text textarea").input_value() == LAB_DEFAULTS["sentence"]
            assert _slider(page, "emb-dim") == str(LAB_DEFAULTS["emb_dim"])
            assert _slider(page, "inspect-layer") == "0"
            time.sleep(0.5)
            assert "pwned" not in page.locator("body").inner_html()  # not in the page in any form
        finally:
            browser.close()


def test_inside_fields_are_shareable_too():
    values, problems = read_fields(INSIDE_FIELDS, {"inspect_text": "Paris is big", "layer": "5", "hide_special": "0"})
    assert values == {"inspect_text": "Paris is big", "layer": 5, "hide_special": False} and not problems
