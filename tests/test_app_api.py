"""The app's named endpoints through gradio_client, against the real app and the real default model.

One `python app.py` serves the whole session (tests/apputil.py); the in-process tests at the end
check the wiring logic that a running server cannot reach deterministically (e.g. "still loading").
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
from apputil import REPO, assert_same_picture, plot_png, start_app
from gradio_client import Client
from gradio_client.utils import Status
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.timeout(600)


_png = plot_png


# ---------------------------------------------------------------------------------------------
# Starting


def test_serves_where_settings_say_and_says_so(app_server):  # noqa: F811
    port = app_server.url.rsplit(":", 1)[1]
    assert f"serving on http://127.0.0.1:{port}" in app_server.log()
    assert "Model ready: google/gemma-3-270m" in app_server.log()


def test_import_app_has_no_side_effects():
    code = (
        "import threading, app\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "import os; assert os.environ['GRADIO_ANALYTICS_ENABLED'] == 'False'\n"
        "import sys; assert 'gradio' in sys.modules\n"
        "d = app.build_demo()\n"
        "assert d.app_state.model.started_at is None and d.app_state.model.lm is None\n"
        "assert not d.is_running\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "clean" in out.stdout


def test_model_status_reports_the_loaded_model(client):
    status = client.predict(api_name="/model_status")
    assert status["ready"] is True and status["error"] is None
    assert status["generating"] == 0  # no reply is being written
    assert "NF4 4-bit" in status["summary"] and "MiB" in status["summary"]
    deadline = time.monotonic() + 120  # the engine sets its fast decode up once, in the background
    while not (status["fast_decode"] or "").startswith(("on:", "off:")) and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.predict(api_name="/model_status")
    assert status["fast_decode"].startswith(
        "on: lean batched step (gemma3_text, native norm kernels, native attention kernel), int8 LM head"), \
        status["fast_decode"]
    assert "fast CPU decode" in status["backend"]


# ---------------------------------------------------------------------------------------------
# /chat


def test_chat_returns_the_reply_text(client):
    reply = client.predict("What is the capital of France?", max_new_tokens=12, temperature=0.0, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    assert "What is the capital" not in reply  # the prompt is not echoed back
    again = client.predict("What is the capital of France?", max_new_tokens=12, temperature=0.0, api_name="/chat")
    assert again == reply  # greedy decoding is deterministic


def test_chat_seed_makes_sampling_repeatable(client):
    kw = dict(max_new_tokens=8, temperature=1.2, top_p=1.0, seed=7, api_name="/chat")
    a = client.predict("Write a haiku about transformers.", **kw)
    b = client.predict("Write a haiku about transformers.", **kw)
    assert a == b and a.strip()


@pytest.mark.parametrize(
    ("message", "kwargs", "expected"),
    [
        ("", {}, "Type a message first"),
        ("   \n ", {}, "Type a message first"),
        ("x" * 100_000, {}, "100,000 characters"),
        ("hello", {"temperature": 5.0}, "temperature must be in"),
        ("hello", {"top_p": 0.0}, "top_p must be in"),
        ("hello", {"max_new_tokens": 0}, "max_new_tokens must be"),
        # The UI slider stops at 512: the API may not hold the chat slot for longer.
        ("hello", {"max_new_tokens": 513}, re.escape("max_new_tokens must be an integer in [1, 512]")),
        ("hello", {"max_new_tokens": 4096}, re.escape("max_new_tokens must be an integer in [1, 512]")),
    ],
)
def test_chat_bad_input_is_a_clear_error(client, message, kwargs, expected):
    t0 = time.perf_counter()
    with pytest.raises(AppError, match=expected):
        client.predict(message, api_name="/chat", **kwargs)
    assert time.perf_counter() - t0 < 30  # refused, not a hang


def test_message_just_under_the_char_cap_but_over_the_token_budget_is_refused(client):
    # 7,000 characters pass the cheap length check but need far more than 1024 tokens.
    with pytest.raises(AppError, match="too long"):
        client.predict("word " * 1400, max_new_tokens=4, api_name="/chat")


def test_chat_still_works_after_bad_input(client):
    with pytest.raises(AppError):
        client.predict("", api_name="/chat")
    assert client.predict("Hello!", max_new_tokens=4, api_name="/chat").strip()


def _generating(client) -> int:
    return client.predict(api_name="/model_status")["generating"]


def _wait_generating(client, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    n = _generating(client)
    while n != want and time.monotonic() < deadline:
        time.sleep(0.1)
        n = _generating(client)
    return n


def start_endless_chat(app_server, client):  # noqa: F811
    """A chat that cannot end before MAX_NEW_TOKENS (min_new_tokens = max_new_tokens), once it is
    generating; (its job, the engine's token count before it)."""
    from ui.chat import MAX_NEW_TOKENS

    assert _wait_generating(client, 0, 120.0) == 0, "another chat is still running"
    before = client.predict(api_name="/model_status")["tokens_generated"]
    job = Client(app_server.url, verbose=False).submit(
        "Tell me a long story about a dragon.", max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
        api_name="/chat")
    deadline = time.monotonic() + 120.0
    # A client's /model_status call waits in the queue like any call: the polls below start once
    # the chat has left the queue, or one of them could fill a one-place queue (small_app) first.
    while job.status().code in (Status.STARTING, Status.JOINING_QUEUE, Status.IN_QUEUE) and not job.done():
        assert time.monotonic() < deadline, "the chat never left the queue"
        time.sleep(0.02)
    while _generating(client) != 1:
        if job.done():
            pytest.fail(f"the chat ended before it generated: {job.exception()!r}")
        assert time.monotonic() < deadline, "the chat never started generating"
        time.sleep(0.1)
    return job, before


def test_cancelled_chat_job_frees_the_worker(app_server, client):  # noqa: F811
    from ui.chat import MAX_NEW_TOKENS

    job, before = start_endless_chat(app_server, client)
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:  # some tokens in: the job is streaming
        time.sleep(0.05)
    assert not job.done()
    job.cancel()
    assert _wait_generating(client, 0, 120.0) == 0, "the request kept generating after cancel"
    written = client.predict(api_name="/model_status")["tokens_generated"] - before
    assert 0 < written < MAX_NEW_TOKENS, "the request ran to its end: cancel did not stop it"
    # and the slot serves the next caller
    assert client.predict("Hello!", max_new_tokens=4, api_name="/chat").strip()


def test_simultaneous_chats_are_answered_together(app_server, client):  # noqa: F811
    """Several /chat calls at once share the engine's batch: all answer, the greedy ones exactly
    as when alone, and the server has more than one reply in flight at a time (not one by one)."""
    alone = client.predict("What is the capital of France?", max_new_tokens=24, temperature=0.0, api_name="/chat")
    clients = [Client(app_server.url, verbose=False) for _ in range(6)]
    jobs = []
    for i, c in enumerate(clients):
        if i % 2 == 0:
            jobs.append(c.submit("What is the capital of France?", max_new_tokens=24, temperature=0.0,
                                 api_name="/chat"))
        else:
            # cannot end early: the stories are still being written while the others arrive, on any machine
            jobs.append(c.submit("Write a long story about a dragon.", max_new_tokens=200, temperature=0.9,
                                 seed=i, min_new_tokens=200, api_name="/chat"))
    most = 0
    deadline = time.monotonic() + 300
    while not all(j.done() for j in jobs) and time.monotonic() < deadline:
        most = max(most, client.predict(api_name="/model_status")["generating"])
        time.sleep(0.1)
    replies = [j.result(timeout=300) for j in jobs]
    assert all(isinstance(r, str) and r.strip() for r in replies)
    assert replies[0] == replies[2] == replies[4] == alone
    assert most >= 2, "the chats were answered one after another"


# ---------------------------------------------------------------------------------------------
# /attention


def lab_picture(*args):
    """The lab's figure for these slider values, drawn here from attention/ directly."""
    from attention.lab import run_lab
    from ui.lab import lab_config, lab_figure

    cfg = lab_config(*args)
    return lab_figure(cfg, run_lab(cfg))


def test_attention_returns_the_heatmap_figure(client):
    default = ("The cat sat on the mat because it was tired.", 32, 4, 4, 0.0, 0, False, True)
    assert_same_picture(client.predict(api_name="/attention"), lab_picture(*default))
    args = ("The cat sat on the mat because it was tired.", 32, 4, 4, 0.0, 5, False, True)
    other = client.predict(*args, api_name="/attention")
    assert_same_picture(other, lab_picture(*args))
    assert _png(other).tobytes() != _png(client.predict(api_name="/attention")).tobytes()  # another seed


@pytest.mark.parametrize(
    ("emb_dim", "n_heads", "n_kv_heads", "multi_head"),
    [(32, 8, 2, True), (12, 3, 3, True), (16, 1, 1, True), (8, 4, 4, False)],
)
def test_attention_layouts(client, emb_dim, n_heads, n_kv_heads, multi_head):
    args = ("Attention is all you need.", emb_dim, n_heads, n_kv_heads, 0.1, 1, True, multi_head)
    assert_same_picture(client.predict(*args, api_name="/attention"), lab_picture(*args))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n_heads": 6}, "n_heads=6 does not divide emb_dim=32"),
        ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
        ({"text": "   "}, "text has no words"),
        ({"dropout": 1.0}, re.escape("dropout must be a number in [0, 0.5], got 1.0")),  # the slider's range
    ],
)
def test_attention_bad_combination_is_a_clear_error(client, kwargs, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(api_name="/attention", **kwargs)


# Values a typed dropdown or an API client can send that float()/int() choke on: each must name the
# field and say what is wrong, not end in gradio's bare "Error".
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n_heads": "inf"}, "n_heads must be a finite number, got 'inf'"),
        ({"n_heads": "1e400"}, "n_heads must be a finite number, got '1e400'"),
        ({"n_heads": "nan"}, "n_heads must be a finite number, got 'nan'"),
        ({"n_heads": "four"}, "n_heads must be a number, got 'four'"),
    ],
)
def test_attention_non_numbers_are_a_clear_error(client, kwargs, expected):
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict(api_name="/attention", **kwargs)


# JSON cannot carry nan/inf and gradio's own Slider preprocessing refuses None before the app sees
# it, so these slider values are checked where the app receives them (the UI's lab_update path).
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("emb_dim", math.nan, "emb_dim must be a finite number, got nan"),
     ("dropout", None, "dropout is empty"),
     ("seed", math.inf, "seed must be a finite number, got inf"),
     ("n_kv_heads", "1e400", "n_kv_heads must be a finite number, got '1e400'")],
)
def test_lab_update_non_numbers_warn_with_the_field(field, value, expected):
    from ui.lab import DEFAULT_SENTENCE, LabHandlers

    values = dict(text=DEFAULT_SENTENCE, emb_dim=32, n_heads=4, n_kv_heads=4, dropout=0.0, seed=0,
                  causal=False, multi_head=True, head=0)
    values[field] = value
    with pytest.warns(UserWarning, match=re.escape(expected)):
        _, _, notice, _, result = LabHandlers().lab_update(**values)
    assert expected in notice and result is None


@pytest.mark.parametrize(("n_heads", "head", "shown"), [(4, 2, None), (4, 0, None), (2, 3, 1), (4, None, 0)])
def test_lab_redraw_moves_the_head_slider_only_when_it_must(n_heads, head, shown):
    """A redraw leaves the head slider as the student left it (they may have moved it while it ran);
    a head the new head count does not have, or none, is corrected."""
    from ui.lab import DEFAULT_SENTENCE, LabHandlers

    *_, slider, _ = LabHandlers().lab_update(DEFAULT_SENTENCE, 32, n_heads, 1, 0.0, 0, False, True, head)
    assert slider.constructor_args.get("value") == shown and slider.constructor_args["maximum"] == n_heads - 1


@pytest.mark.parametrize(("emb_dim", "n_heads", "shown"), [(12, 4, None), (12, 6, None), (16, 6, 4), (12, 8, 6)])
def test_head_count_choices_keep_a_count_that_still_divides(emb_dim, n_heads, shown):
    from attention.lab import valid_head_counts
    from ui.lab import LabHandlers

    box = LabHandlers().head_choices(emb_dim, n_heads)
    assert box.constructor_args.get("value") == shown and box.constructor_args["choices"] == valid_head_counts(emb_dim)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"seed": "inf"}, "seed must be a finite number, got 'inf'"),
        ({"temperature": None}, "temperature is empty"),
        ({"top_p": "nan"}, "top_p must be a finite number, got 'nan'"),
        ({"max_new_tokens": "1e400"}, "max_new_tokens must be a finite number, got '1e400'"),
        ({"top_k": "many"}, "top_k must be a number, got 'many'"),
        ({"repetition_penalty": None}, "repetition_penalty is empty"),
    ],
)
def test_chat_non_numbers_are_a_clear_error(client, kwargs, expected):
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict("hello", api_name="/chat", **kwargs)


# ---------------------------------------------------------------------------------------------
# /model_attention and /next_token


@pytest.fixture(scope="module")
def inside(lm4):
    """The inside view's handlers here, over this process's copy of the same model."""
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.inside import InsideHandlers

    settings = Settings.from_env()
    return InsideHandlers(settings, ModelSlot(settings, lm=lm4))


def test_model_attention_returns_the_grid_and_follows_the_layer(client, inside):
    a = client.predict("The cat sat on the mat.", 0, True, api_name="/model_attention")
    b = client.predict("The cat sat on the mat.", 5, True, api_name="/model_attention")
    assert_same_picture(a, inside.model_attention_api("The cat sat on the mat.", 0, True))
    assert_same_picture(b, inside.model_attention_api("The cat sat on the mat.", 5, True))
    assert _png(a).tobytes() != _png(b).tobytes()


@pytest.mark.parametrize(("args", "expected"), [
    (("   ", 0, True), "Type a text"),
    # The range check is the library's, from the loaded model's own layer count (18 for Gemma 3
    # 270m), not a slider bound frozen at build time: another MODEL_ID reaches all its layers.
    (("hello", 18, True), "layer 18 is out of range: this model has 18 layers, valid 0 to 17"),
    (("hello", 99, True), "layer 99 is out of range: this model has 18 layers, valid 0 to 17"),
    (("hello", -1, True), "layer -1 is out of range: this model has 18 layers, valid 0 to 17"),
    (("hello", 2.5, True), "layer must be a whole number"),
])
def test_model_attention_bad_input_is_a_clear_error(client, args, expected):
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict(*args, api_name="/model_attention")


def test_model_attention_reaches_the_last_layer(client, inside):
    last = client.predict("The cat sat on the mat.", 17, True, api_name="/model_attention")
    assert_same_picture(last, inside.model_attention_api("The cat sat on the mat.", 17, True))


def test_next_token_follows_the_sampling_settings(client):
    free = client.predict("The capital of France is", temperature=1.0, top_p=1.0, k=5, api_name="/next_token")
    assert len(free) == 5 and all(c["removed_by"] is None for c in free)
    assert [c["prob"] for c in free] == sorted((c["prob"] for c in free), reverse=True)
    greedy = client.predict("The capital of France is", temperature=0.0, k=5, api_name="/next_token")
    assert greedy[0]["sampling_prob"] == 1.0 and all(c["removed_by"] == "greedy" for c in greedy[1:])
    top2 = client.predict("The capital of France is", temperature=1.0, top_p=1.0, top_k=2, k=5, api_name="/next_token")
    second = top2[1]["prob"]  # top-k keeps every token at least as likely as the k-th (ties too)
    assert [c["removed_by"] for c in top2] == [None if c["prob"] >= second else "top_k" for c in top2]
    assert top2[0]["removed_by"] is None and top2[-1]["removed_by"] == "top_k"
    assert abs(sum(c["sampling_prob"] for c in top2) - 1.0) < 1e-6


def test_next_token_bad_input_is_a_clear_error(client):
    with pytest.raises(AppError, match="Type a text"):
        client.predict("", api_name="/next_token")
    with pytest.raises(AppError, match="temperature must be in"):
        client.predict("Hi", temperature=9.0, api_name="/next_token")


# ---------------------------------------------------------------------------------------------
# Many users


def test_lab_is_not_stuck_behind_a_chat(app_server, client):  # noqa: F811
    """The lab has its own slots: it answers while a chat that cannot end early is generating."""
    job, _ = start_endless_chat(app_server, client)
    try:
        Client(app_server.url, verbose=False).predict(api_name="/attention")
        assert not job.done() and _generating(client) == 1, "the lab call waited for the chat"
    finally:
        job.cancel()
        assert _wait_generating(client, 0, 120.0) == 0


@pytest.fixture(scope="module")
def small_app():
    """An app of its own with one chat slot and one waiting place (the last test here stops it)."""
    server = start_app({"QUEUE_SIZE": "1", "CHAT_CONCURRENCY": "1"})
    yield server
    server.stop()


@pytest.mark.slow
def test_full_queue_gives_a_clear_message(small_app):
    clients = [Client(small_app.url, verbose=False) for _ in range(3)]
    # A first chat that cannot end before the full queue is tested holds the only chat slot;
    # then the one waiting place is filled and a third knocks at the full queue.
    first = clients[0].submit("Write a long story.", max_new_tokens=512, min_new_tokens=512, api_name="/chat")
    deadline = time.monotonic() + 120
    while first.status().code not in (Status.PROCESSING, Status.ITERATING):
        assert time.monotonic() < deadline, "the first chat never started"
        time.sleep(0.02)
    second = clients[1].submit("Write a long story.", max_new_tokens=20, api_name="/chat")
    while second.status().code not in (Status.IN_QUEUE, Status.PROCESSING, Status.ITERATING, Status.FINISHED):
        assert time.monotonic() < deadline, "the second chat never joined the queue"
        time.sleep(0.01)
    assert not first.done()
    with pytest.raises(Exception, match="[Qq]ueue is full"):
        clients[2].predict("Hi", max_new_tokens=2, api_name="/chat")
    first.cancel()
    assert isinstance(second.result(timeout=300), str)  # the waiting one is served next


@pytest.mark.slow
def test_a_stop_request_ends_the_app_cleanly_mid_chat(small_app):
    """SIGTERM (a Space restarting, a container stopping) while a chat is generating: the app closes
    as on Ctrl+C, exit status 0 and no traceback, and the waiting client gets an answer, not a hang."""
    client = Client(small_app.url, verbose=False)
    job, _ = start_endless_chat(small_app, client)
    os.kill(small_app.proc.pid, signal.SIGTERM)
    assert small_app.proc.wait(120) == 0, small_app.log()[-4000:]
    assert "Traceback" not in small_app.log(), small_app.log()[-4000:]
    try:
        job.result(timeout=120)
    except Exception:  # noqa: BLE001 (an error for a server that went away is an answer too)
        pass
    assert job.done()


# ---------------------------------------------------------------------------------------------
# In-process: states a running server cannot be held in on purpose


def test_chat_says_loading_while_the_model_loads():
    import gradio as gr

    import app
    from ui.common import session_key
    from ui.lab import DEFAULT_SENTENCE

    state = app.AppState.create()
    state.model.started_at = time.perf_counter()  # "loading": started, not finished
    with pytest.raises(gr.Error, match="still loading"):
        list(state.chat.chat_api("Hello"))
    with pytest.warns(UserWarning, match="still loading"):
        box, history, _ = state.chat.user_turn("Hello", [], None)
    assert box == "" and history == gr.skip()
    assert state.chat.stops.begin(session_key(None)) is not None  # no reply was registered
    assert "Loading" in state.chat.status_markdown()
    # where the first start is, as load_model reports it, in both the status line and the message
    from generation.model import ROUNDING

    state.model._at_stage(f"{ROUNDING} · layer 7/18 rounded (31 s)")
    assert f"{ROUNDING} · layer 7/18 rounded (31 s)" in state.chat.status_markdown()
    with pytest.raises(gr.Error, match=re.escape(f"so far). Now: {ROUNDING} · layer 7/18")):
        list(state.chat.chat_api("Hello"))
    # the Attention Lab works meanwhile
    heat, rows, notice, _, result = state.lab.lab_update(DEFAULT_SENTENCE, 32, 4, 4, 0.0, 0, False, True, 0)
    assert heat is not None and [r[0] for r in rows][:3] == ["Q", "K", "V"]
    assert notice.startswith("11 tokens") and state.lab.steps_update(result, 2) is not None


def test_model_that_fails_to_load_is_reported(tmp_path):
    import gradio as gr

    import app
    from generation.settings import Settings

    state = app.AppState.create(Settings(model_id=str(tmp_path / "no-such-model")))
    state.model.start()
    assert state.model.wait(120) is False
    assert "Model failed to load" in state.model.status()
    with pytest.raises(gr.Error, match="could not be loaded"):
        list(state.chat.chat_api("Hello"))


def test_queue_polls_gently_in_this_gradio_version():
    import gradio as gr

    from ui.common import QUEUE_ANALYTICS_EVERY, QUEUE_POLL_S, tune_queue

    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    assert demo._queue.sleep_when_free < QUEUE_POLL_S  # gradio's own: a wake-up every millisecond
    assert tune_queue(demo) == []  # a gradio that renamed them would fail here, not slow down unseen
    assert demo._queue.sleep_when_free == QUEUE_POLL_S
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == QUEUE_ANALYTICS_EVERY


def test_a_view_drawn_from_widgets_is_drawn_again_for_a_change_made_while_it_draws():
    """Gradio drops a trigger that comes while the same event is still running ("once", its default
    for most events). A picture drawn from sliders, lists or clicks must instead be drawn once more
    after it ("always_last"), or it stays at the earlier setting, and so must what is chained to
    it. Buttons that start a run keep "once": a double click is not two requests. Send takes every
    press ("multiple"): its handler refuses one made while a reply is written, with a warning,
    where "once" would drop it without a word (tests/test_browser.py forces that case)."""
    import app

    config = app.build_demo().get_config_file()
    deps = {d["id"]: d for d in config["dependencies"]}
    redraws = [d for d in deps.values() if any(event in ("input", "release", "select", "change")
                                                for _, event in d["targets"])]
    assert len(redraws) >= 20  # every view's sliders, lists and clickable pictures
    chained = [d for d in deps.values() if d["trigger_after"] in {r["id"] for r in redraws}]
    assert len(chained) >= 2  # the lab's step view after its heatmaps, the tokens view after a branch switch
    assert {d["api_name"]: d["trigger_mode"] for d in redraws + chained} == \
        {d["api_name"]: "always_last" for d in redraws + chained}
    runs = [d for d in deps.values() if any(event == "click" for _, event in d["targets"]) and d["api_name"]
            in ("retry", "read", "check")]
    assert len(runs) >= 3 and {d["trigger_mode"] for d in runs} == {"once"}
    (send,) = [d for d in deps.values() if d["api_name"] == "user_turn"]
    assert send["trigger_mode"] == "multiple"


def test_history_sent_to_the_model_alternates():
    import app
    from ui.common import model_history

    history = [
        {"role": "user", "content": "first"},  # stopped before any reply
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "third"},
    ]
    assert model_history(history) == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "third"},
    ]
    chat = app.AppState.create().chat
    assert chat.retry(history[:3], None) == history[:2]
    assert chat.undo(history[:3], None) == (history[:1], "second")


@pytest.mark.parametrize("message", ["What is the capital of France?", "def f():\n    return 1",
                                     "  a list:\n\n  - one\n  - two\n", "<b>bold</b> & *stars* 🙂"])
def test_a_message_is_the_same_turn_after_the_chatbot_hands_it_back(message):
    """The reply step matches its chat to the reply the Send registered (`reply_turn`); the chat
    it gets is the Chatbot's value as the page sends it back, which gradio re-indents."""
    import gradio as gr

    from ui.common import reply_turn

    chatbot = gr.Chatbot()
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": message.strip()}]
    back = chatbot.preprocess(chatbot.postprocess(history))
    assert reply_turn(back) == reply_turn(history)
    assert reply_turn(back + [{"role": "assistant", "content": "..."}]) == reply_turn(history)
    assert reply_turn(history[:1]) != reply_turn(history)


def test_retry_with_nothing_to_retry_registers_no_reply():
    import gradio as gr

    import app
    from ui.common import session_key

    chat = app.AppState.create().chat
    with pytest.warns(UserWarning, match="Nothing to retry"):
        assert chat.retry([{"role": "assistant", "content": "Hello"}], None) == gr.skip()
    assert chat.stops.begin(session_key(None)) is not None  # the next Send is taken


@pytest.mark.parametrize("case", ["send refused", "empty chat", "last turn answered", "model not loaded",
                                  "branch refused", "branch step after a send"])
def test_a_reply_step_with_nothing_to_write_changes_nothing(case):
    """gradio ends a generator that yielded nothing with None for every output (the chat emptied):
    each reply step that writes nothing yields one "no change" instead, and leaves no reply
    registered (a Send after it is taken)."""
    import gradio as gr

    import app
    from ui.common import reply_turn, session_key

    chat = app.AppState.create().chat  # the model is not loaded
    answered = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    sampling = ("", 8, 0.7, 0.95, 0, 1.0, -1, 0, None)  # system, max new, temperature, ..., request
    steps = {  # each step, the reply registered before it (by Send, Retry, an edit or a branch), its chat
        "send refused": (None, answered, lambda: chat.bot_turn(answered, 1, *sampling)),
        "empty chat": ("reply", [], lambda: chat.bot_turn([], 0, *sampling)),
        "last turn answered": ("reply", answered, lambda: chat.bot_turn(answered, 1, *sampling)),
        "model not loaded": ("reply", answered[:1], lambda: chat.bot_turn(answered[:1], 0, *sampling)),
        "branch refused": (None, answered, lambda: chat.continue_turn("Hel", answered, 1, *sampling)),
        "branch step after a send": ("reply", answered, lambda: chat.continue_turn("Hel", answered, 1, *sampling)),
    }
    kind, history, step = steps[case]
    if kind is not None:
        assert chat.stops.begin(session_key(None), kind=kind, turn=reply_turn(history)) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        assert list(step()) == [(gr.skip(),) * 4]
    if case == "branch step after a send":  # not its reply to write: still registered for the Send's step
        assert chat.stops.begin(session_key(None)) is None
        assert list(chat.bot_turn(answered, 1, *sampling)) == [(gr.skip(),) * 4]
    assert chat.stops.begin(session_key(None)) is not None


def test_undo_and_clear_stop_the_reply_before_they_change_the_chat():
    """The stop is set when Undo or Clear returns the new chat, so the reply's worker sends no
    update after it (a late one would bring the removed exchange back)."""
    import app
    from ui.common import session_key

    chat = app.AppState.create().chat
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for press in (lambda: chat.undo(history, None), lambda: chat.clear(None)):
        writing = chat.stops.begin(session_key(None))  # a reply is being written for this session
        assert writing is not None and not writing.is_set()
        press()
        assert writing.is_set()
    assert chat.clear(None) == ([], "")


@pytest.fixture
def chat4(lm4):
    """The chat's handlers on the real 4-bit model, as the app builds them; its engine closed after."""
    from generation.settings import Settings
    from ui.chat import ChatHandlers
    from ui.common import ModelSlot

    settings = Settings.from_env()
    chat = ChatHandlers(settings, ModelSlot(settings, lm=lm4))
    yield chat
    chat.backend.close()


SHORT_GREEDY = ("", 6, 0.0, 1.0, 0, 1.0, -1, 0, None)  # a reply step's system, max new, temperature, ..., request


def test_clear_returns_only_once_the_stopped_reply_has_ended(chat4, monkeypatch):
    """Clear stops the reply and empties the chat only once the reply has ended. The update the
    reply yielded just before (gradio may still be sending it) is then on its way to the page
    ahead of the empty chat, and after the stop the reply sends nothing but one "no change"."""
    import gradio as gr

    import ui.chat
    from ui.common import reply_turn, session_key

    monkeypatch.setattr(ui.chat, "REPLY_END_WAIT_S", 600.0)  # no bound reached on a slow machine
    chat = chat4
    history = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    writing = chat.stops.begin(session_key(None), turn=reply_turn(history))  # as Send registers the reply
    turn = chat.bot_turn(history, 0, "", 64, 0.0, 1.0, 0, 1.0, -1, 64, None)  # 64 tokens, no early end
    streamed, *_ = next(turn)  # the reply waits at its yield, as while gradio sends this update
    assert streamed[-1]["role"] == "assistant"
    cleared = []
    clearing = threading.Thread(target=lambda: cleared.append(chat.clear(None)))
    clearing.start()
    assert writing.wait(60)  # Clear has set the stop ...
    clearing.join(timeout=1.0)
    assert clearing.is_alive() and not cleared, "Clear returned before the reply's last update was sent"
    # ... and gradio takes the next value: one last update that changes nothing (gradio sends
    # a generator's last values again at its end)
    assert list(turn) == [(gr.skip(),) * 4]
    clearing.join(timeout=60)
    assert cleared == [([], "")]


def test_a_send_refused_while_the_reply_waits_in_the_queue_leaves_that_reply_to_be_written(chat4):
    """A student presses Enter again while the server, busy with the class, has not yet started
    their reply: the second Send is refused, and the first reply is still written when its turn
    comes (the refusal does not cancel it, nor leave the chat refusing every Send after)."""
    import gradio as gr

    from ui.chat import BUSY_MESSAGE

    chat = chat4
    sent, history, _ = chat.user_turn("What is the capital of France?", [], None)
    assert sent and history[-1]["role"] == "user"
    with pytest.warns(UserWarning, match=BUSY_MESSAGE.split(":")[0]):
        assert chat.user_turn("And of Peru?", history, None)[:2] == ("", gr.skip())
    refused_step = list(chat.bot_turn(history, 0, *SHORT_GREEDY))  # the refused Send's own step ...
    *_, (written, _, _, replies) = refused_step  # ... may be the one that writes the reply
    assert written[-1]["role"] == "assistant" and replies == 1
    assert list(chat.bot_turn(history, 0, *SHORT_GREEDY)) == [(gr.skip(),) * 4]  # and only once
    assert chat.user_turn("And of Peru?", written, None)[0] == "And of Peru?"  # the next Send is taken


def test_a_stopped_replys_step_reaching_the_server_late_does_not_write_the_next_one(chat4):
    """Stop before the reply began, then a new Send: the stopped reply's step, should it reach the
    server only now, writes nothing (not the new Send's reply into the old chat); the new Send's own
    step writes its reply."""
    import gradio as gr

    chat = chat4
    _, first, _ = chat.user_turn("What is the capital of France?", [], None)
    chat.stop(None)
    _, second, _ = chat.user_turn("Hello!", first, None)
    assert list(chat.bot_turn(first, 0, *SHORT_GREEDY)) == [(gr.skip(),) * 4]  # the stopped one, late
    *_, (written, _, _, replies) = list(chat.bot_turn(second, 0, *SHORT_GREEDY))
    assert [m["content"] for m in written[:2]] == ["What is the capital of France?", "Hello!"]
    assert written[-1]["role"] == "assistant" and replies == 1


def test_stop_waits_for_a_streaming_reply_only():
    from ui.stops import StopRegistry

    reg = StopRegistry()
    queued = reg.begin("alice")  # Send registered a reply that is still queued, not streaming
    reg.stop("alice", wait_s=600)  # returns at once (a cancelled queued reply never ends by itself)
    assert queued.is_set()
    with reg.streaming("alice") as late:  # its step, run after the Stop: nothing to write
        assert late is None
    reg.stop("nobody", wait_s=600)  # nothing registered: at once too
    first = reg.begin("bob")
    with reg.streaming("bob") as stop:
        assert stop is first
        stopping = threading.Thread(target=reg.stop, args=("bob",), kwargs={"wait_s": 600})
        stopping.start()
        assert stop.wait(60)
        stopping.join(timeout=1.0)
        assert stopping.is_alive()  # the reply is still streaming: Stop waits for its end
    stopping.join(timeout=60)
    assert not stopping.is_alive()
    reg.begin("bob")
    with reg.streaming("bob") as again:  # a new reply: a fresh stop event
        assert again is not stop and not again.is_set()


def test_stop_registry_is_per_session():
    from ui.stops import StopRegistry

    reg = StopRegistry()
    a, b = reg.begin("alice"), reg.begin("bob")
    reg.stop("alice")
    assert a.is_set() and not b.is_set()
    reg.done("bob", b)  # a finished generation's event is set and forgotten
    assert b.is_set()
    c = reg.begin("bob")
    reg.stop("carol")  # someone else's Stop never reaches bob
    assert not c.is_set()


def test_a_send_is_refused_while_the_reply_is_queued_or_streaming():
    from ui.stops import StopRegistry

    reg = StopRegistry()
    queued = reg.begin("alice")
    assert reg.begin("alice") is None  # the reply a Send registered has not started yet
    with reg.streaming("alice", kind="branch") as other:  # a step of another kind does not write it
        assert other is None
    with reg.streaming("alice", turn=(3, "earlier")) as stale:  # nor one of another turn
        assert stale is None
    with reg.streaming("alice") as writing:
        assert writing is queued and reg.begin("alice") is None  # it is being written
        with reg.streaming("alice") as twice:  # and by one step only
            assert twice is None
    assert reg.begin("alice") is not None  # it has ended: the next Send is taken
