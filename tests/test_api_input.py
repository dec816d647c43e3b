"""Hostile and odd input to every named endpoint: each error names the input and says what it
accepts, short and without markup; the API info says what the endpoints really take.

First the helpers in-process (quoting, type checks, the API gate's decisions; no server, no
model), then the real app through gradio_client and raw HTTP (httpx).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterator

import gradio as gr
import httpx
import pytest
from apputil import app_server  # noqa: F401  (a fixture)
from gradio_client import Client
from gradio_client.exceptions import AppError

from ui.apigate import Param, Refusal, check_join, check_named, fill_data
from ui.common import api_error, as_bool, as_float, as_int, as_text, quote, safe_text, typed_api

SCRIPT = "<script>alert(1)</script>"
HUGE_TEXT = "x" * 100_000
MAX_MESSAGE = 500


def assert_safe(message: str, name: str | None = None) -> None:
    """An error message that names the input, is short, carries no markup and no traceback."""
    assert message and message.strip(), "an error without a message"
    assert len(message) < MAX_MESSAGE, f"{len(message)} characters: {message[:200]}…"
    assert "<script" not in message.lower() and "<" not in message, message
    assert "Traceback" not in message and 'File "' not in message, message
    if name is not None:
        assert name in message, f"{name!r} not named in {message!r}"


# ---------------------------------------------------------------------------------------------
# Quoting (in-process)


@pytest.mark.parametrize("value", [SCRIPT, HUGE_TEXT, "<" * 1000, "\x00" * 500, 10**308, -(10**400), 1e308,
                                   [True] * 1000, {"k": SCRIPT * 100}, list(range(100_000)), ("<b>",) * 50])
def test_quote_is_short_and_inert(value):
    shown = quote(value)
    assert len(shown) <= 90 and "<" not in shown and ">" not in shown, shown


def test_quote_keeps_short_values_readable():
    assert quote("four") == "'four'" and quote(4) == "4" and quote(2.5) == "2.5" and quote(True) == "True"
    assert quote(None) == "None" and quote(math.inf) == "inf" and quote([1, 2]) == "[1, 2]"
    assert quote(SCRIPT) == r"'\x3cscript\x3ealert(1)\x3c/script\x3e'"  # as a Python literal would escape it


def test_quote_cuts_long_text_and_says_how_long():
    shown = quote(HUGE_TEXT)
    assert shown.startswith("'" + "x" * 40) and "…" in shown and "100,000 characters" in shown


def test_quote_writes_huge_integers_as_powers_of_ten():
    assert quote(10**308) == "1.00e+308 (an integer of 309 digits)"
    assert quote(-(10**20)).startswith("-1.00e+20")
    assert quote(10**15 - 1) == str(10**15 - 1)  # 15 digits are still written out


@pytest.mark.parametrize("text", [
    " Paris. The capital of France is Paris.",
    " *bold* _it_ `code` [link](http://x) # head - item 1. > quote ~~gone~~ \\ back",
    " a | b || c",
    " <b>tag</b> &amp; <script>alert(1)</script>",
    "\nFirst line\r\nsecond line\n",
    " $$x^2$$ and {braces} (parens) !bang +plus",
])
def test_model_text_in_a_table_cell_shows_as_written(text):
    """What a model writes goes into the Markdown table of "What 4-bit costs": rendered as a table
    cell, it must read as the model's own characters (a line break as ↵), never as markup."""
    from markdown_it import MarkdownIt

    from ui.inside import table_text

    page = MarkdownIt("commonmark").enable("table").render(f"| a | b |\n|---|---|\n| {table_text(text)} | end |\n")
    cells = re.findall(r"<td>(.*?)</td>", page, flags=re.S)
    assert cells[1] == "end", page  # the text stayed inside its own cell
    assert "<" not in cells[0].replace("&lt;", ""), page  # no element made of the text
    assert html.unescape(cells[0]) == text.replace("\r", "").replace("\n", " ↵ ").strip()


def test_safe_text_strips_markup_and_cuts_long_runs():
    text = safe_text(f"cannot read {HUGE_TEXT!r} as {SCRIPT}")
    assert "<" not in text and "‹script›" in text and len(text) < 200
    assert len(safe_text("word " * 1000)) <= 401


# ---------------------------------------------------------------------------------------------
# Type checks (in-process)


@pytest.mark.parametrize(("value", "expected"), [
    (True, "got True (a boolean)"), (False, "got False (a boolean)"), ([4], "got [4] (a list)"),
    ({"a": 1}, "got {'a': 1} (an object)"), ("abc", "must be a number, got 'abc'"),
    ("NaN", "must be a finite number, got 'NaN'"), ("", "is empty"), (None, "is empty"), (2.5, "whole number"),
    (1e308, "must be an integer in [1, 512], got 1e+308"), (10**400, "got 1.00e+400 (an integer of 401 digits)"),
    ("1e308", "must be an integer in [1, 512], got '1e308'"), (0, "must be an integer in [1, 512], got 0"),
])
def test_as_int_refuses_with_the_name_and_what_it_accepts(value, expected):
    with pytest.raises(ValueError) as err:
        as_int(value, "max_new_tokens", 1, 512)
    assert str(err.value).startswith("max_new_tokens ") and expected in str(err.value)
    assert_safe(str(err.value))


def test_as_int_and_as_float_accept_numbers_and_numeric_text():
    assert as_int(4, "n") == 4 and as_int(4.0, "n") == 4 and as_int("4", "n") == 4 and as_int(" 8 ", "n") == 8
    assert as_float("0.25", "p") == 0.25 and as_float(1, "p", 0, 1) == 1.0
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 0.5\], got 1.0"):
        as_float(1.0, "dropout", 0, 0.5)
    with pytest.raises(ValueError, match="a boolean"):
        as_float(True, "dropout")


@pytest.mark.parametrize("value", ["maybe", -1, 0, 1, [True], None, "", "yes", 1.0])
def test_as_bool_refuses_anything_but_a_boolean_or_its_name(value):
    with pytest.raises(ValueError, match="hide_special must be true or false, got"):
        as_bool(value, "hide_special")


def test_as_bool_reads_booleans_and_the_words_true_and_false():
    assert as_bool(True, "b") is True and as_bool(False, "b") is False
    assert as_bool("True", "b") is True and as_bool(" false ", "b") is False and as_bool("TRUE", "b") is True


@pytest.mark.parametrize(("value", "expected"), [
    (5, "got 5"), (["hi"], "got ['hi'] (a list)"), ({"text": "hi"}, "(an object)"), (None, "got None (null)"),
    (True, "got True (a boolean)"),
])
def test_as_text_refuses_non_strings(value, expected):
    with pytest.raises(ValueError) as err:
        as_text(value, "message")
    assert "message must be text (a string)" in str(err.value) and expected in str(err.value)


def test_as_text_caps_the_length_without_quoting_the_text():
    assert as_text(None, "system", none_ok=True) == "" and as_text("hi", "m", max_chars=2) == "hi"
    with pytest.raises(ValueError) as err:
        as_text(HUGE_TEXT, "prompt", max_chars=10_000)
    assert str(err.value) == "prompt is 100,000 characters long; at most 10,000 are accepted"


def test_api_errors_are_gr_errors_with_safe_messages():
    def bad(x: int) -> int:
        raise ValueError(f"x={HUGE_TEXT!r} is {SCRIPT}")

    def broken(x: int) -> int:
        return {}["missing"]

    def stream(x: int) -> Iterator[str]:
        yield "a"
        raise gr.Error(f"stopped at {SCRIPT}")

    with pytest.raises(gr.Error) as err:
        typed_api(bad)(1)
    assert_safe(err.value.message)
    with pytest.raises(gr.Error) as err:
        typed_api(broken)(1)
    assert err.value.message.startswith("The request failed on the server (KeyError)")
    gen = typed_api(stream)(1)
    assert next(gen) == "a"
    with pytest.raises(gr.Error) as err:
        next(gen)
    assert_safe(err.value.message)
    assert api_error(gr.Error("x", title="Model not ready")).title == "Model not ready"


# ---------------------------------------------------------------------------------------------
# The API gate's decisions (in-process)

CHAT = [Param("message", False, None), Param("system", True, ""), Param("max_new_tokens", True, 128)]
ENDPOINTS = {"chat": CHAT, "model_status": []}


def test_gate_fills_in_documented_defaults():
    assert fill_data("chat", CHAT, ["hi"]) == ["hi", "", 128]
    assert fill_data("chat", CHAT, ["hi", "be brief", 4]) == ["hi", "be brief", 4]
    assert check_named("call", "chat", {"data": ["hi"]}, ENDPOINTS, {7}, {7: "chat"}) == {"data": ["hi", "", 128]}
    assert check_join({"data": ["hi"], "fn_index": 7}, ENDPOINTS, {7, 8}, {7: "chat"})["data"] == ["hi", "", 128]
    assert check_join({"data": [1], "fn_index": 8}, ENDPOINTS, {7, 8}, {7: "chat"})["data"] == [1]  # a UI event


@pytest.mark.parametrize(("kind", "name", "body", "status", "expected"), [
    ("call", "lab_update", {"data": []}, 404, "there is no API endpoint '/lab_update'; the endpoints are /chat"),
    ("call/v2", "nope", {}, 404, "no API endpoint '/nope'"),
    ("run", SCRIPT, {"data": []}, 404, r"'/\x3cscript\x3ealert(1)\x3c/script\x3e'"),
    ("call", "chat", {"data": []}, 422, "/chat needs a value for message (no default)"),
    ("call", "chat", {"data": [1, 2, 3, 4]}, 422, "/chat takes at most 3 values"),
    ("call", "chat", {"message": "hi"}, 422, '{"data": [/chat\'s values in order]}'),
    ("call", "chat", {"data": SCRIPT}, 422, r'"data" must be a list'),
    ("call", "chat", [1, 2], 422, "must be a JSON object"),
    ("call/v2", "chat", {"mesage": "hi"}, 422, "/chat has no parameter 'mesage'"),
    ("call/v2", "chat", {"system": "x"}, 422, "/chat needs a value for message"),
    ("run", "predict", {"data": [], "fn_index": 99}, 404, "no event with fn_index 99"),
])
def test_gate_refuses_with_a_message(kind, name, body, status, expected):
    verdict = check_named(kind, name, body, ENDPOINTS, {7}, {7: "chat"})
    assert isinstance(verdict, Refusal) and verdict.status == status and expected in verdict.message
    assert_safe(verdict.message)


def test_gate_passes_the_page_s_own_calls():
    body = {"data": ["x"], "fn_index": 3, "session_hash": "abc"}
    assert check_named("run", "predict", body, ENDPOINTS, {3, 7}, {7: "chat"}) is body
    assert check_named("call/v2", "chat", {"message": "hi"}, ENDPOINTS, {7}, {7: "chat"}) == {"message": "hi"}


def test_handlers_check_types_before_the_model_is_needed():
    import app
    from ui.lab import LabHandlers

    state = app.AppState.create()  # nothing loaded: a bad value is refused before "not loaded"
    for call, name in [(lambda: list(state.chat.chat_api(5)), "message"),
                       (lambda: list(state.chat.chat_api("hi", max_new_tokens=True)), "max_new_tokens"),
                       (lambda: state.chat.next_token_api("hi", top_k=10**18), "top_k"),
                       (lambda: state.inside.model_attention_api("hi", hide_special="maybe"), "hide_special"),
                       (lambda: state.inside.teaching.model_view_api("hi", hide_special=-1), "hide_special"),
                       (lambda: state.inside.teaching.ablate_api(heads=[True]), "heads")]:
        with pytest.raises(gr.Error) as err:
            call()
        assert_safe(err.value.message, name)
    payload = LabHandlers().attention_api(multi_head="True", seed=3)  # the word "True" is read as true
    assert payload["type"] == "matplotlib" and payload["plot"].startswith("data:image/png;base64,")


# ---------------------------------------------------------------------------------------------
# The real app: gradio_client

# (endpoint, keyword arguments, the input the message must name). Values that pass these checks
# would run the model; none here does.
HOSTILE = [
    ("/attention", {"text": 5}, "text"), ("/attention", {"text": ["a"]}, "text"), ("/attention", {"text": None}, "text"),
    ("/attention", {"text": HUGE_TEXT}, "text"),
    ("/attention", {"emb_dim": "abc"}, "emb_dim"), ("/attention", {"emb_dim": "NaN"}, "emb_dim"),
    ("/attention", {"emb_dim": ""}, "emb_dim"), ("/attention", {"emb_dim": None}, "emb_dim"),
    ("/attention", {"emb_dim": True}, "emb_dim"), ("/attention", {"emb_dim": [32]}, "emb_dim"),
    ("/attention", {"n_heads": SCRIPT}, "n_heads"), ("/attention", {"n_heads": 10**30}, "n_heads"),
    ("/attention", {"n_kv_heads": -1}, "n_kv_heads"), ("/attention", {"n_kv_heads": 2.5}, "n_kv_heads"),
    ("/attention", {"dropout": HUGE_TEXT}, "dropout"), ("/attention", {"dropout": 1.0}, "dropout"),
    ("/attention", {"seed": 1e308}, "seed"), ("/attention", {"seed": "1e308"}, "seed"), ("/attention", {"seed": -1}, "seed"),
    ("/attention", {"causal": "maybe"}, "causal"), ("/attention", {"causal": -1}, "causal"),
    ("/attention", {"causal": [True]}, "causal"), ("/attention", {"multi_head": 2}, "multi_head"),
    ("/chat", {"message": 5}, "message"), ("/chat", {"message": ["hi"]}, "message"),
    ("/chat", {"message": {"text": "hi"}}, "message"), ("/chat", {"message": None}, "message"),
    ("/chat", {"message": HUGE_TEXT}, "message"), ("/chat", {"message": SCRIPT, "system": 5}, "system"),
    ("/chat", {"message": "hi", "max_new_tokens": True}, "max_new_tokens"),
    ("/chat", {"message": "hi", "max_new_tokens": 1e308}, "max_new_tokens"),
    ("/chat", {"message": "hi", "temperature": "NaN"}, "temperature"),
    ("/chat", {"message": "hi", "temperature": [1]}, "temperature"),
    ("/chat", {"message": "hi", "top_p": None}, "top_p"), ("/chat", {"message": "hi", "top_k": 1e18}, "top_k"),
    ("/chat", {"message": "hi", "top_k": True}, "top_k"),
    ("/chat", {"message": "hi", "repetition_penalty": SCRIPT}, "repetition_penalty"),
    ("/chat", {"message": "hi", "seed": 1e308}, "seed"), ("/chat", {"message": "hi", "seed": "x"}, "seed"),
    ("/next_token", {"prompt": 5}, "prompt"), ("/next_token", {"prompt": ["a"]}, "prompt"),
    ("/next_token", {"prompt": HUGE_TEXT}, "prompt"), ("/next_token", {"prompt": "a", "temperature": True}, "temperature"),
    ("/next_token", {"prompt": "a", "top_k": 1e18}, "top_k"), ("/next_token", {"prompt": "a", "k": 0}, "k"),
    ("/next_token", {"prompt": "a", "k": 10**40}, "k"),
    ("/model_attention", {"text": 5}, "text"), ("/model_attention", {"text": SCRIPT, "layer": "abc"}, "layer"),
    ("/model_attention", {"layer": 1e308}, "layer"), ("/model_attention", {"layer": 10**40}, "layer"),
    ("/model_attention", {"layer": True}, "layer"), ("/model_attention", {"hide_special": "maybe"}, "hide_special"),
    ("/model_attention", {"hide_special": -1}, "hide_special"), ("/model_attention", {"hide_special": [True]}, "hide_special"),
    ("/model_view", {"text": 5}, "text"), ("/model_view", {"hide_special": "maybe"}, "hide_special"),
    ("/model_view", {"hide_special": -1}, "hide_special"), ("/model_view", {"hide_special": [True]}, "hide_special"),
    ("/model_view", {"max_tokens": True}, "max_tokens"), ("/model_view", {"max_tokens": HUGE_TEXT}, "max_tokens"),
    ("/ablate", {"prompt": 5}, "prompt"), ("/ablate", {"prompt": None}, "prompt"), ("/ablate", {"heads": 5}, "heads"),
    ("/ablate", {"heads": SCRIPT}, "head"), ("/ablate", {"heads": HUGE_TEXT}, "heads"),
    ("/ablate", {"heads": "x" * 5000}, "head"), ("/ablate", {"new_tokens": True}, "new_tokens"),
    ("/ablate", {"k": 1e18}, "k"),
    ("/lesson", {"lesson": 5}, "lesson"), ("/lesson", {"lesson": SCRIPT}, "lesson"),
    ("/lesson", {"lesson": HUGE_TEXT}, "lesson"), ("/lesson", {"step": 99}, "step"),
    ("/lesson", {"step": True}, "step"), ("/lesson", {"prediction": 3}, "prediction"),
    ("/lesson", {"prediction": SCRIPT}, "prediction"), ("/lesson", {"prediction": HUGE_TEXT}, "prediction"),
]


@pytest.fixture(scope="module")
def client(app_server):  # noqa: F811
    return Client(app_server.url, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize(("api_name", "kwargs", "name"), HOSTILE,
                         ids=[f"{a}-{next(iter(k))}-{i}" for i, (a, k, _) in enumerate(HOSTILE)])
def test_hostile_input_is_a_short_error_naming_the_input(client, api_name, kwargs, name):
    with pytest.raises(AppError) as err:
        client.predict(**kwargs, api_name=api_name)
    assert_safe(str(err.value), name)


@pytest.mark.slow
def test_the_server_still_answers_after_hostile_input(client):
    status = client.predict(api_name="/model_status")
    assert status["ready"] is True
    assert client.predict(api_name="/attention")["type"] == "matplotlib"
    assert isinstance(client.predict("Hi", max_new_tokens=2, temperature=0.0, api_name="/chat"), str)


# ---------------------------------------------------------------------------------------------
# The real app: the API info

DOCUMENTED = {
    "/attention": [("text", "str"), ("emb_dim", "int"), ("n_heads", "int"), ("n_kv_heads", "int"),
                   ("dropout", "float"), ("seed", "int"), ("causal", "bool"), ("multi_head", "bool")],
    "/chat": [("message", "str"), ("system", "str"), ("max_new_tokens", "int"), ("temperature", "float"),
              ("top_p", "float"), ("top_k", "int"), ("repetition_penalty", "float"), ("seed", "int"),
              ("min_new_tokens", "int")],
    "/next_token": [("prompt", "str"), ("temperature", "float"), ("top_p", "float"), ("top_k", "int"),
                    ("repetition_penalty", "float"), ("k", "int")],
    "/model_status": [],
    "/model_attention": [("text", "str"), ("layer", "int"), ("hide_special", "bool")],
    "/model_view": [("text", "str"), ("hide_special", "bool"), ("max_tokens", "int")],
    "/ablate": [("prompt", "str"), ("heads", "str"), ("new_tokens", "int"), ("k", "int")],
    "/logit_lens": [("text", "str"), ("max_tokens", "int")],
    "/quant_lens": [("text", "str")],
    "/head_roles": [("text", "str")],
    "/reply_tokens": [("message", "str"), ("reply", "str"), ("system", "str")],
    "/continue": [("message", "str"), ("reply_prefix", "str"), ("system", "str"), ("max_new_tokens", "int"),
                  ("temperature", "float"), ("top_p", "float"), ("top_k", "int"), ("repetition_penalty", "float"),
                  ("seed", "int")],
    "/engine_state": [],
    "/lesson": [("lesson", "str"), ("step", "int"), ("prediction", "str")],
}


@pytest.mark.slow
def test_api_info_lists_the_endpoints_with_their_real_types(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert info["unnamed_endpoints"] == {}
    named = info["named_endpoints"]
    assert set(named) == set(DOCUMENTED)  # nothing internal (/lab_update, /load_example) is listed
    for api_name, params in DOCUMENTED.items():
        got = [(p["parameter_name"], p["python_type"]["type"]) for p in named[api_name]["parameters"]]
        assert got == params, api_name
    assert named["/attention"]["returns"][0]["python_type"]["type"].startswith("dict(type: Literal[matplotlib]")
    defaults = {p["parameter_name"]: p["parameter_default"] for p in named["/attention"]["parameters"]}
    assert defaults["multi_head"] is True and defaults["causal"] is False and defaults["emb_dim"] == 32


@pytest.mark.slow
def test_attention_called_as_documented(client):
    a = client.predict("The cat sat.", 32, 4, 4, 0.0, 0, False, True, api_name="/attention")
    b = client.predict("The cat sat.", 32, 4, 4, 0.0, 0, False, "True", api_name="/attention")  # the word too
    assert a == b and a["type"] == "matplotlib"
    single = client.predict("The cat sat.", 32, 4, 4, 0.0, 0, False, False, api_name="/attention")
    assert single != a


# ---------------------------------------------------------------------------------------------
# The real app: raw HTTP


def _raw_call(url: str, name: str, body: object, *, v2: bool = False) -> tuple[str, object]:
    """POST /gradio_api/call[/v2]/<name>, then read its event stream: (last event, its data)."""
    route = f"{url}/gradio_api/call/{'v2/' if v2 else ''}{name}"
    r = httpx.post(route, json=body, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    text = httpx.get(f"{route}/{r.json()['event_id']}", timeout=300).text
    events = [block for block in text.strip().split("\n\n") if block.startswith("event:")]
    event, data = events[-1].split("\n", 1)
    return event.removeprefix("event: "), json.loads(data.removeprefix("data: "))


@pytest.mark.slow
@pytest.mark.parametrize("route", ["call/{}", "call/v2/{}", "run/{}", "api/{}"])
@pytest.mark.parametrize("name", ["no_such_endpoint", "lab_update", "load_example", "steps_update",
                                  "<img src=x onerror=alert(1)>"])
def test_unknown_and_internal_endpoints_are_a_404(app_server, route, name):  # noqa: F811
    body = {} if route.startswith("call/v2") else {"data": []}
    r = httpx.post(f"{app_server.url}/gradio_api/{route.format(name)}", json=body, timeout=30)
    assert r.status_code == 404, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert_safe(detail)
    assert "/chat" in detail  # it lists what there is


@pytest.mark.slow
@pytest.mark.parametrize(("path", "body", "status"), [
    ("call/chat", {"data": SCRIPT}, 422),
    ("call/chat", [SCRIPT], 422),
    ("call/chat", {"data": []}, 422),  # message has no default
    ("call/chat", {"data": ["hi", "", 4, 0.7, 0.9, 0, 1.0, -1, 0, "extra"]}, 422),
    ("call/v2/chat", {"mesage": SCRIPT}, 422),
    ("queue/join", {"data": [], "fn_index": 10_000, "session_hash": "abc"}, 404),
    ("queue/join", {"data": SCRIPT, "fn_index": 0, "session_hash": "abc"}, 422),
])
def test_malformed_requests_are_a_4xx_with_a_message(app_server, path, body, status):  # noqa: F811
    r = httpx.post(f"{app_server.url}/gradio_api/{path}", json=body, timeout=30)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert_safe(r.json()["detail"])


@pytest.mark.slow
def test_a_raw_call_gets_the_documented_defaults(app_server, client):  # noqa: F811
    event, data = _raw_call(app_server.url, "attention", {"data": []})
    assert event == "complete" and data[0] == client.predict(api_name="/attention")  # the same figure
    event, data = _raw_call(app_server.url, "model_view", {"data": []})
    assert event == "complete" and data[1]["shape"] == [18, 4, 11, 11]
    event, data = _raw_call(app_server.url, "model_attention", {"data": ["The cat sat."]})
    assert event == "complete" and data[0]["type"] == "matplotlib"
    event, data = _raw_call(app_server.url, "chat", {"data": ["What is the capital of France?"]})
    assert event == "complete" and isinstance(data[0], str) and data[0].strip()
    event, data = _raw_call(app_server.url, "chat", {"message": "Hi", "max_new_tokens": 2}, v2=True)
    assert event == "complete" and isinstance(data[0], str)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data", "input_name"), [
    ("attention", ["x", "abc"], "emb_dim"),
    ("attention", ["x", 32, 4, 4, None], "dropout"),
    ("attention", ["x", 32, 4, 4, 0.0, 0, False, "maybe"], "multi_head"),
    ("chat", [7], "message"),
    ("chat", [[1, 2]], "message"),
    ("next_token", [{"a": SCRIPT}], "prompt"),
    ("ablate", [["x"]], "prompt"),
    ("model_view", ["x", "no"], "hide_special"),
])
def test_raw_hostile_values_are_errors_naming_the_input(app_server, name, data, input_name):  # noqa: F811
    event, payload = _raw_call(app_server.url, name, {"data": data})
    assert event == "error" and isinstance(payload, dict)
    assert_safe(payload["error"], input_name)


@pytest.mark.parametrize(("p", "shown"), [(0.0, "0 %"), (0.5, "50.00 %"), (0.0001, "0.01 %"), (3e-8, "3.0e-06 %"),
                                          (1.0, "100.00 %")])
def test_a_probability_reads_as_a_percentage_and_a_cut_token_as_zero(p, shown):
    from ui.common import pct

    assert pct(p) == shown
