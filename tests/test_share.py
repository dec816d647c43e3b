"""Shared setups: query parameters -> widget values (pure parsing), and in a real browser."""

from __future__ import annotations

import random
import time
from urllib.parse import parse_qsl, urlsplit

import pytest
from apputil import app_page, app_server, browser  # noqa: F401  (fixtures)

from generation.settings import Settings
from ui.common import ModelSlot
from ui.inside import INSIDE_FIELDS, LAYER_FIELDS, InsideHandlers
from ui.lab import LAB_DEFAULTS, LAB_FIELDS, LabHandlers, lab_config, read_setup, repair_setup
from ui.share import clamp_index, query_string, read_fields


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


def test_apply_setup_sets_fields_and_repairs_those_that_do_not_fit():
    lab = LabHandlers()
    out = lab.apply_setup(_Req(emb_dim="64", n_heads="8", causal="1"))
    names = [f.name for f in LAB_FIELDS]
    assert out[names.index("emb_dim")] == 64 and out[names.index("causal")] is True
    assert out[names.index("head")].value == 0 and out[names.index("head")].maximum == 7
    assert out[names.index("n_heads")].value == 8 and "8" in [c[0] for c in out[names.index("n_heads")].choices]
    # 8 heads cannot split 12 dimensions: emb_dim is applied, n_heads becomes the nearest that fits (6)
    # and the default 4 K/V heads the nearest divisor of 6 (3); both are named
    with pytest.warns(UserWarning, match="'n_heads' was 8.*set to 6.*'n_kv_heads' was 4.*set to 3"):
        out = lab.apply_setup(_Req(emb_dim="12", n_heads="8"))
    assert out[names.index("emb_dim")] == 12 and out[names.index("n_kv_heads")] == 3
    assert out[names.index("n_heads")].value == 6 and out[names.index("head")].maximum == 5
    # one refused value does not drop the others
    with pytest.warns(UserWarning, match="'emb_dim' was ignored"):
        out = lab.apply_setup(_Req(sentence="Hello there", emb_dim="63"))
    assert out[names.index("sentence")] == "Hello there" and _is_skip(out[names.index("emb_dim")])
    assert all(_is_skip(v) for v in lab.apply_setup(_Req()))
    assert all(_is_skip(v) for v in lab.apply_setup(_Req(layer="3")))  # another view's parameter


def _is_skip(v) -> bool:
    return isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1


# ---------------------------------------------------------------------------------------------
# Values that conflict with others: repaired (or dropped) and named, the rest applied


def _passes_lab_config(values) -> None:
    v = {**LAB_DEFAULTS, **values}
    lab_config(v["sentence"], v["emb_dim"], v["n_heads"], v["n_kv_heads"], v["dropout"], v["seed"], v["causal"],
               v["multi_head"])


@pytest.mark.parametrize(("query", "kept", "repaired"), [
    # the default 4 K/V heads do not divide 2 query heads -> 2
    ({"sentence": "Hello there", "n_heads": "2"}, {"sentence": "Hello there", "n_heads": 2}, {"n_kv_heads": 2}),
    # 8 heads do not divide 12 dimensions -> 6, then the default 4 K/V heads -> 3
    ({"emb_dim": "12", "n_heads": "8", "seed": "5"}, {"emb_dim": 12, "seed": 5}, {"n_heads": 6, "n_kv_heads": 3}),
    # more heads than dimensions -> all of them; 3 K/V heads -> the nearer divisor of 32, the smaller on a tie
    ({"n_heads": "128", "n_kv_heads": "3"}, {}, {"n_heads": 32, "n_kv_heads": 2}),
    ({"emb_dim": "128", "n_heads": "128", "n_kv_heads": "14"}, {"emb_dim": 128, "n_heads": 128}, {"n_kv_heads": 16}),
    ({"emb_dim": "64", "n_heads": "6", "n_kv_heads": "2"}, {"emb_dim": 64, "n_kv_heads": 2}, {"n_heads": 4}),
    # the link's own K/V heads that do not divide its heads
    ({"n_heads": "8", "n_kv_heads": "3", "causal": "1"}, {"n_heads": 8, "causal": True}, {"n_kv_heads": 2}),
    # a head beyond the heads is clamped; single-head has one head
    ({"head": "9"}, {}, {"head": 3}),
    ({"emb_dim": "64", "n_heads": "8", "head": "100"}, {"emb_dim": 64, "n_heads": 8}, {"head": 7}),
    ({"multi_head": "0", "head": "2", "dropout": "0.1"}, {"multi_head": False, "dropout": 0.1}, {"head": 0}),
    # the repaired head count moves the head's range too
    ({"emb_dim": "12", "n_heads": "8", "head": "7"}, {"emb_dim": 12}, {"n_heads": 6, "n_kv_heads": 3, "head": 5}),
])
def test_values_that_conflict_are_repaired_and_named(query, kept, repaired):
    values, problems = read_setup(query)
    assert values == {**kept, **repaired}
    assert len(problems) == len(repaired)
    for name, fixed in repaired.items():
        [problem] = [p for p in problems if p.startswith(f"'{name}'")]
        assert problem.endswith(f"set to {fixed}")
    _passes_lab_config(values)


def test_the_repair_message_says_what_it_chose():
    _, problems = read_setup({"sentence": "Hello there", "n_heads": "2"})
    assert problems == ["'n_kv_heads' was 4 (the default), which does not divide 2 query heads: set to 2"]
    _, problems = read_setup({"head": "9"})
    assert problems == ["'head' was 9, beyond the 4 heads (numbered from 0): set to 3"]


@pytest.mark.parametrize(("query", "kept", "dropped"), [
    # values a link cannot hold are dropped (the default stays), the others applied
    ({"sentence": "Hello there", "emb_dim": "63"}, {"sentence": "Hello there"}, "emb_dim"),
    ({"sentence": "Hello there", "n_kv_heads": "17", "seed": "3"}, {"sentence": "Hello there", "seed": 3},
     "n_kv_heads"),
    ({"sentence": "<b>hi</b>", "emb_dim": "64", "n_heads": "8"}, {"emb_dim": 64, "n_heads": 8}, "sentence"),
    # nothing to attend over is no sentence
    ({"sentence": "   ", "causal": "1"}, {"causal": True}, "sentence"),
    ({"sentence": "", "n_heads": "2", "n_kv_heads": "1"}, {"n_heads": 2, "n_kv_heads": 1}, "sentence"),
])
def test_values_invalid_on_their_own_are_dropped_and_named(query, kept, dropped):
    values, problems = read_setup(query)
    assert values == kept
    assert len(problems) == 1 and problems[0].startswith(f"'{dropped}' was ignored")
    assert query[dropped] not in problems[0] or query[dropped] == ""
    _passes_lab_config(values)


def test_a_setup_that_fits_is_left_alone():
    query = {"sentence": "A bird sang", "multi_head": "1", "emb_dim": "64", "n_heads": "8", "n_kv_heads": "2",
             "dropout": "0.25", "seed": "7", "causal": "1", "head": "7"}
    values, problems = read_setup(query)
    assert problems == [] and values == read_fields(LAB_FIELDS, query)[0]
    assert repair_setup({}) == ({}, [])


def test_any_parsed_setup_is_repaired_into_one_lab_config_accepts():
    rng = random.Random(0)
    for _ in range(2000):
        values = {"emb_dim": rng.randrange(4, 129, 4), "n_heads": rng.randint(1, 128),
                  "n_kv_heads": rng.randint(1, 16), "head": rng.randint(0, 127), "multi_head": rng.random() < 0.8}
        values = {k: v for k, v in values.items() if rng.random() < 0.7}  # some left to their default
        fixed, problems = repair_setup(values)
        _passes_lab_config(fixed)
        v = {**LAB_DEFAULTS, **fixed}
        assert 0 <= v["head"] < (v["n_heads"] if v["multi_head"] else 1)
        changed = {k for k in fixed if values.get(k, LAB_DEFAULTS[k]) != fixed[k]}
        assert {p.split("'")[1] for p in problems} == changed  # each change named, nothing else
        # a value changes only when it does not fit: emb_dim never, n_heads when it does not divide
        # emb_dim, n_kv_heads when it does not divide the heads used, head when beyond them
        given = {**LAB_DEFAULTS, **values}
        assert "emb_dim" not in changed and "multi_head" not in changed
        assert ("n_heads" in changed) == (given["emb_dim"] % given["n_heads"] != 0)
        assert ("n_kv_heads" in changed) == (v["n_heads"] % given["n_kv_heads"] != 0)
        assert ("head" in changed) == (given["head"] >= (v["n_heads"] if v["multi_head"] else 1))


def test_clamp_index_names_what_it_moved():
    assert clamp_index({"layer": 17}, "layer", 18, "layer") == ({"layer": 17}, [])
    assert clamp_index({}, "layer", 18, "layer") == ({}, [])
    assert clamp_index({"layer": 40, "x": 1}, "layer", 18, "layer") == (
        {"layer": 17, "x": 1}, ["'layer' was 40, beyond the 18 layers (numbered from 0): set to 17"])


def test_inside_layer_and_head_are_clamped_only_where_the_model_is_known():
    query = {"layer": "40", "inspect_head": "9", "inspect_text": "Hi"}
    settings = Settings.from_env()
    out = InsideHandlers(settings, ModelSlot(settings)).apply_setup(_Req(**query))  # still loading: kept
    names = [f.name for f in LAYER_FIELDS]
    assert out[names.index("layer")] == 40 and out[names.index("inspect_head")] == 9 and out[-1] is True


@pytest.mark.slow
def test_inside_layer_and_head_beyond_the_model_are_clamped_and_named(lm4):
    from generation.inside import model_layers

    info = model_layers(lm4)
    settings = Settings.from_env()
    inside = InsideHandlers(settings, ModelSlot(settings, lm=lm4))
    with pytest.warns(UserWarning) as caught:
        out = inside.apply_setup(_Req(layer="200", inspect_head="63", inspect_text="Hi"))
    names = [f.name for f in LAYER_FIELDS]
    assert out[names.index("layer")] == info["n_layers"] - 1 and out[names.index("inspect_head")] == info["n_heads"] - 1
    assert out[names.index("inspect_text")] == "Hi"
    [warning] = [str(w.message) for w in caught]
    assert f"'layer' was 200, beyond the {info['n_layers']} layers" in warning
    assert f"'inspect_head' was 63, beyond the {info['n_heads']} heads" in warning


# ---------------------------------------------------------------------------------------------
# In the browser


TOAST = "This link's setup was partly changed"


def _slider(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


@pytest.mark.slow
@pytest.mark.browser
def test_a_shared_link_restores_every_lab_slider_and_the_button_writes_it(browser, app_server):  # noqa: F811
    query = "?sentence=A+bird+sang+at+dawn&emb_dim=64&n_heads=8&n_kv_heads=2&seed=7&causal=1&head=5"
    ready = "document.querySelector('#lab-text textarea').value === 'A bird sang at dawn'"
    with app_page(browser, app_server.url + "/" + query, ready) as page:
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


@pytest.mark.slow
@pytest.mark.browser
def test_a_hostile_link_warns_and_keeps_the_default_setup(browser, app_server):  # noqa: F811
    query = "?sentence=%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E&emb_dim=1e999&n_heads=abc&layer=-3"
    with app_page(browser, app_server.url + "/" + query) as page:
        # one toast from the lab's fields, one from the inside view's
        toasts = page.get_by_text(TOAST)
        page.wait_for_function(f"document.body.innerText.split({TOAST!r}).length > 2", timeout=30_000)
        text = " ".join(toasts.all_inner_texts())
        assert "'sentence' was ignored" in text and "'emb_dim' was ignored" in text and "'layer'" in text
        assert "<script>" not in text and "pwned" not in text
        assert page.evaluate("window.pwned === undefined")
        assert page.locator("#lab-text textarea").input_value() == LAB_DEFAULTS["sentence"]
        assert _slider(page, "emb-dim") == str(LAB_DEFAULTS["emb_dim"])
        assert _slider(page, "inspect-layer") == "0"
        time.sleep(0.5)
        assert "pwned" not in page.locator("body").inner_html()  # not in the page in any form


@pytest.mark.slow
@pytest.mark.browser
def test_a_link_with_a_conflict_applies_the_rest_and_names_the_repair(browser, app_server):  # noqa: F811
    # 2 query heads cannot share the default 4 K/V heads: n_kv_heads is repaired, the sentence applied
    url = app_server.url + "/?sentence=Hello+there&n_heads=2"
    with app_page(browser, url, "document.querySelector('#lab-text textarea').value === 'Hello there'") as page:
        page.wait_for_function(f"document.body.innerText.includes({TOAST!r})", timeout=30_000)
        toast = " ".join(page.get_by_text(TOAST).all_inner_texts())
        assert "'n_kv_heads' was 4" in toast and "set to 2" in toast and "'sentence'" not in toast
        # the heatmaps were drawn with the link's sentence and the repaired heads
        page.wait_for_function("document.querySelector('#lab-message').innerText.startsWith('2 tokens')")
        assert page.locator("#n-heads input").input_value() == "2" and _slider(page, "n-kv-heads") == "2"
        assert page.get_by_text("Invalid settings").count() == 0


def test_inside_fields_are_shareable_too():
    values, problems = read_fields(INSIDE_FIELDS, {"inspect_text": "Paris is big", "layer": "5", "hide_special": "0"})
    assert values == {"inspect_text": "Paris is big", "layer": 5, "hide_special": False} and not problems
