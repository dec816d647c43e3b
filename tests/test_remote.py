"""The remote chat backend (generation/backends/remote.py) against real servers on loopback, offline.

The server is `transformers serve` on the app's default model (tests/openai_server.py), started
once per session; the proxy from the same helper stands in where that server lacks a feature
(API keys, a model list) or must die or hang mid-reply. Replies are greedy and short: the 2-core
box may be busy, and every token counts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import openai
import pytest
from openai_server import (  # noqa: F401  (openai_server is a fixture)
    PLAIN_CHAT_TEMPLATE,
    ServedModel,
    free_port,
    openai_server,
    start_proxy,
)

from generation import ReplyStats, SamplingParams, Settings
from generation.backends import READER_THREAD_NAME, ChatBackend, RemoteChat, visible_text
from generation.prompt import PLAIN_STOP_STRINGS, plain_dialogue

# "The capital of France is Paris." and the stop string fit in 16 tokens.
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
QUESTION = "What is the capital of France?"
SECRET = "sk-test-SECRET-0123456789"
# The chat API with the plain dialogue format as its template. The base model never ends its turn
# there (a reply as long as we like), and no stop strings are sent: `transformers serve` spends
# seconds per request preparing stop strings over Gemma's 262k-token vocabulary (4-5 s measured on
# the busy 2-core box, 0.2-0.3 s without), so only the tests about the completions API pay that.
PLAIN_CHAT = {"chat_template": PLAIN_CHAT_TEMPLATE}


def reader_threads() -> int:
    return sum(t.name == READER_THREAD_NAME for t in threading.enumerate())


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def proxies():
    """Start proxies with proxies(upstream, ...); all are stopped after the test."""
    started = []

    def start(*args, **kw):
        p = start_proxy(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


# ---------------------------------------------------------------------------------------------
# Settings


def test_settings_read_the_backend_variables():
    s = Settings.from_env({
        "CHAT_BACKEND_URL": " http://vllm:8000/v1/ ", "CHAT_BACKEND_MODEL": "Qwen/Qwen2.5-3B-Instruct",
        "CHAT_BACKEND_API_KEY": SECRET, "CHAT_BACKEND_API": "Chat", "CHAT_BACKEND_TIMEOUT": "12.5",
    })
    assert (s.chat_backend_url, s.chat_backend_model, s.chat_backend_api, s.chat_backend_timeout) == (
        "http://vllm:8000/v1", "Qwen/Qwen2.5-3B-Instruct", "chat", 12.5)
    assert s.chat_backend_api_key == SECRET and SECRET not in repr(s) and SECRET not in str(s)
    # Unset: the local engine, as before. A bare host gets the usual /v1.
    local = Settings.from_env({})
    assert local.chat_backend_url is None and local.chat_backend_api_key is None and local.chat_backend_api == "auto"
    assert Settings.from_env({"CHAT_BACKEND_URL": "https://example.org"}).chat_backend_url == "https://example.org/v1"


@pytest.mark.parametrize("var, value, words", [
    ("CHAT_BACKEND_URL", "vllm:8000", "http(s) base URL"),
    ("CHAT_BACKEND_URL", "ftp://vllm:8000/v1", "http(s) base URL"),
    ("CHAT_BACKEND_URL", "http://vllm:99999/v1", "http(s) base URL"),
    ("CHAT_BACKEND_URL", "http:///v1", "http(s) base URL"),
    ("CHAT_BACKEND_URL", "http://vllm:8000/v1?key=1", "http(s) base URL"),
    ("CHAT_BACKEND_URL", f"http://user:{SECRET}@vllm:8000/v1", "CHAT_BACKEND_API_KEY"),
    ("CHAT_BACKEND_URL", f"http://user:{SECRET}@vllm:port/v1", "CHAT_BACKEND_API_KEY"),
    ("CHAT_BACKEND_API_KEY", f"{SECRET} x", "value not shown"),
    ("CHAT_BACKEND_API", "grpc", "['auto', 'chat', 'completions']"),
    ("CHAT_BACKEND_TIMEOUT", "soon", "a number"),
    ("CHAT_BACKEND_TIMEOUT", "0", "seconds in (0, 3600]"),
])
def test_bad_backend_settings_name_the_variable_and_never_echo_a_secret(var, value, words):
    with pytest.raises(ValueError) as err:
        Settings.from_env({var: value})
    msg = str(err.value)
    assert msg.startswith(var) and words in msg and "\n" not in msg
    assert SECRET not in msg


def test_remote_chat_needs_a_url_and_checks_its_options():
    with pytest.raises(ValueError, match="CHAT_BACKEND_URL is not set"):
        RemoteChat(Settings.from_env({}))
    with pytest.raises(ValueError, match="chat_backend_url"):
        RemoteChat("not a url")
    with pytest.raises(ValueError, match="chat_backend_api"):
        RemoteChat("http://127.0.0.1:9/v1", api="rest")
    rc = RemoteChat(Settings.from_env({"CHAT_BACKEND_URL": "http://vllm:8000", "CHAT_BACKEND_MODEL": "m",
                                       "CHAT_BACKEND_API_KEY": SECRET, "MAX_INPUT_TOKENS": "77"}))
    assert (rc.url, rc.model, rc.api, rc.max_input_tokens, rc.timeout) == ("http://vllm:8000/v1", "m", "auto", 77, 60.0)
    assert isinstance(rc, ChatBackend) and rc.active() == 0


def test_describe_and_repr_are_secret_free():
    rc = RemoteChat("http://vllm.internal:8000/v1", "Qwen/Qwen2.5-3B-Instruct", api_key=SECRET, api="chat")
    assert rc.describe() == "remote: vllm.internal:8000 · Qwen/Qwen2.5-3B-Instruct · chat API"
    assert SECRET not in repr(rc) and SECRET not in str(vars(rc).get("url"))
    assert "first listed model" in RemoteChat("http://vllm:8000").describe()


def test_bad_input_is_a_value_error_before_any_request():
    rc = RemoteChat(f"http://127.0.0.1:{free_port()}/v1", "m")
    for kwargs in ({"message": " "}, {"message": "hi", "params": {"temperature": 0}},
                   {"message": "hi", "history": [{"role": "robot", "content": "x"}]},
                   {"message": "hi", "max_input_tokens": 0}, {"message": "hi", "system": 3}):
        with pytest.raises(ValueError):
            next(rc.stream_reply(**kwargs))


def test_a_reply_stopped_before_it_starts_sends_nothing():
    rc = RemoteChat(f"http://127.0.0.1:{free_port()}/v1", "m", api="completions")  # nobody listens
    stop = threading.Event()
    stop.set()
    stats = ReplyStats()
    assert list(rc.stream_reply(QUESTION, stats=stats, stop_event=stop)) == []
    assert stats.stopped_by == "stopped" and stats.new_tokens == 0 and rc.active() == 0


# ---------------------------------------------------------------------------------------------
# No server, or one that never answers


def test_unreachable_server_is_one_clear_line_from_check_and_stream_reply():
    port = free_port()
    rc = RemoteChat(f"http://127.0.0.1:{port}/v1", "m", api_key=SECRET)
    t0 = time.monotonic()
    reason = rc.check()
    assert reason == f"the chat server at 127.0.0.1:{port} is unreachable (connection refused)"
    stats = ReplyStats()
    with pytest.raises(RuntimeError) as err:
        list(rc.stream_reply(QUESTION, stats=stats))
    assert str(err.value) == reason
    assert time.monotonic() - t0 < 30  # refused at once, no retry loop
    assert stats.stopped_by == "error" and rc.active() == 0


def test_a_server_that_never_answers_times_out():
    # A real listening socket that never accepts: connecting works, no byte ever comes back.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        rc = RemoteChat(f"http://127.0.0.1:{port}/v1", "m", api="completions", timeout=1.0)
        t0 = time.monotonic()
        assert rc.check() == f"the chat server at 127.0.0.1:{port} is unreachable (no answer within 1 s)"
        stats = ReplyStats()
        with pytest.raises(RuntimeError, match=r"no answer within 1 s"):
            list(rc.stream_reply(QUESTION, stats=stats))
        assert time.monotonic() - t0 < 30  # the 1 s timeout, twice, not the default 60 s
        assert stats.stopped_by == "error"


def test_a_gateway_without_its_server_is_reported():
    # What a load balancer or an Inference Endpoint scaled to zero answers: 503 to everything.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unavailable(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"error": "Service Unavailable: the endpoint is scaled to zero"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    gateway = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        port = gateway.server_address[1]
        rc = RemoteChat(f"http://127.0.0.1:{port}/v1", "m", api="chat")
        expected = (f"the chat server at 127.0.0.1:{port} failed (HTTP 503: Service Unavailable: "
                    "the endpoint is scaled to zero)")
        assert rc.check() == expected
        with pytest.raises(RuntimeError) as err:
            list(rc.stream_reply(QUESTION))
        assert str(err.value) == expected
    finally:
        gateway.shutdown()
        gateway.server_close()


# ---------------------------------------------------------------------------------------------
# The real server


def test_streamed_reply_matches_the_servers_own_non_streamed_reply(openai_server: ServedModel):  # noqa: F811
    rc = RemoteChat(openai_server.url, openai_server.model)  # api auto: the base model has no template
    stats = ReplyStats()
    seen = list(rc.stream_reply(QUESTION, params=GREEDY, stats=stats))
    assert rc.api == "completions" and rc.describe().endswith("· completions API")
    assert seen and all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert "Paris" in seen[-1]

    direct = openai.OpenAI(base_url=openai_server.url, api_key="unused", max_retries=0).completions.create(
        model=openai_server.model, prompt=plain_dialogue(QUESTION, [], None), max_tokens=GREEDY.max_new_tokens,
        temperature=0, stop=list(PLAIN_STOP_STRINGS))
    assert visible_text(direct.choices[0].text, PLAIN_STOP_STRINGS)[0] == seen[-1]
    assert stats.prompt_tokens == direct.usage.prompt_tokens > 0
    assert stats.new_tokens == direct.usage.completion_tokens
    assert stats.stopped_by in ("stop_string", "eos") and 0 < stats.first_token_s <= stats.total_s
    assert rc.active() == 0 and reader_threads() == 0


def test_chat_api_streams_from_the_chat_endpoint(openai_server: ServedModel):  # noqa: F811
    # auto asks the server once; with a template passed along, its chat endpoint works.
    rc = RemoteChat(openai_server.url, openai_server.model, chat_template_kwargs=PLAIN_CHAT)
    assert rc.resolve() == (openai_server.model, "chat")
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    stats = ReplyStats()
    seen = list(rc.stream_reply(QUESTION, system="", params=params, stats=stats))
    direct = openai.OpenAI(base_url=openai_server.url, api_key="unused", max_retries=0).chat.completions.create(
        model=openai_server.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0,
        extra_body={"chat_template_kwargs": PLAIN_CHAT})
    assert seen[-1] == direct.choices[0].message.content.strip() != ""
    assert stats.stopped_by == "max_new_tokens" and stats.new_tokens == 4 and stats.prompt_tokens > 0


def test_rejected_parameter_is_a_clear_message(openai_server: ServedModel):  # noqa: F811
    rc = RemoteChat(openai_server.url, openai_server.model, api="completions")
    stats = ReplyStats()
    with pytest.raises(RuntimeError) as err:
        list(rc.stream_reply(QUESTION, params=SamplingParams(top_k=5, max_new_tokens=4), stats=stats))
    msg = str(err.value)
    assert "rejected the request (HTTP 422" in msg and "top_k" in msg and "set top-k 0" in msg
    assert stats.stopped_by == "error"
    assert rc.check() is None  # a refused parameter says nothing about reachability


def test_history_is_trimmed_to_the_estimated_budget(openai_server: ServedModel):  # noqa: F811
    rc = RemoteChat(openai_server.url, openai_server.model, api="chat", chat_template_kwargs=PLAIN_CHAT)
    history = []
    for i in range(4):
        history += [{"role": "user", "content": f"Question {i}: " + "words " * 20},
                    {"role": "assistant", "content": f"Answer {i}: " + "words " * 20}]
    stats = ReplyStats()
    list(rc.stream_reply(QUESTION, history, params=SamplingParams(temperature=0, max_new_tokens=1),
                         max_input_tokens=120, stats=stats))
    assert stats.trimmed_turns > 0 and stats.trimmed_turns % 2 == 0
    assert 0 < stats.prompt_tokens <= 120  # the estimate errs on the safe side


def test_stop_event_closes_the_stream_and_frees_the_server(openai_server: ServedModel):  # noqa: F811
    long = SamplingParams(temperature=0.0, max_new_tokens=400)
    rc = RemoteChat(openai_server.url, openai_server.model, api="chat", chat_template_kwargs=PLAIN_CHAT)
    stop = threading.Event()
    stats = ReplyStats()
    gen = rc.stream_reply("Tell me a long story about a dragon.", params=long, stats=stats, stop_event=stop)
    next(gen)
    assert rc.active() == 1
    # Set Stop from another thread while this one is blocked waiting for the next token.
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    for _ in gen:
        pass
    stopped_after = time.monotonic()
    timer.join()
    assert stats.stopped_by == "stopped" and stats.new_tokens < long.max_new_tokens
    assert rc.active() == 0
    wait_for(lambda: reader_threads() == 0, 2, "the reader thread ends")
    rate = stats.tokens_per_s or 1.0
    left_s = (long.max_new_tokens - stats.new_tokens) / rate
    # This server runs one request at a time: the next one is answered only if the stopped one was cancelled.
    t0 = time.monotonic()
    seen = list(rc.stream_reply(QUESTION, params=SamplingParams(temperature=0, max_new_tokens=2)))
    waited = time.monotonic() - t0
    assert seen and waited < left_s / 2, f"next reply took {waited:.1f} s; the stopped one had {left_s:.0f} s left"
    assert time.monotonic() - stopped_after < 60


def test_closing_the_generator_closes_the_http_stream(openai_server: ServedModel, proxies):  # noqa: F811
    proxy = proxies(openai_server.root)
    rc = RemoteChat(proxy.url, openai_server.model, api="chat", chat_template_kwargs=PLAIN_CHAT)
    stats = ReplyStats()
    gen = rc.stream_reply("Tell me a long story about a dragon.", stats=stats,
                          params=SamplingParams(temperature=0.0, max_new_tokens=400))
    next(gen)
    t0 = time.monotonic()
    gen.close()
    assert time.monotonic() - t0 < 10  # the stream is dropped, not read to its 400 tokens
    assert stats.stopped_by == "stopped" and rc.active() == 0
    # The server side sees the client go (at its next token) and drops its own upstream request.
    wait_for(lambda: proxy.stats()["client_disconnects"] == 1, 30, "the proxy sees the client disconnect")
    assert proxy.stats()["active"] == 0


def test_server_dying_mid_reply_is_a_clear_error_and_recovery_is_seen(openai_server: ServedModel, proxies):  # noqa: F811
    proxy = proxies(openai_server.root, model=openai_server.model)
    port = int(proxy.root.rsplit(":", 1)[1])
    rc = RemoteChat(proxy.url, api="chat", chat_template_kwargs=PLAIN_CHAT, check_ttl_s=0.2)
    assert rc.check() is None and rc.model == openai_server.model  # the first listed model
    stats = ReplyStats()
    gen = rc.stream_reply("Tell me a long story about a dragon.", stats=stats,
                          params=SamplingParams(temperature=0.0, max_new_tokens=400))
    first = next(gen)
    proxy.kill()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        for _ in gen:
            pass
    assert time.monotonic() - t0 < 10
    assert str(err.value).startswith(f"the chat server at 127.0.0.1:{port} closed the connection before the reply")
    assert first and stats.stopped_by == "error" and rc.active() == 0

    time.sleep(0.3)
    assert rc.check() == f"the chat server at 127.0.0.1:{port} is unreachable (connection refused)"
    proxies(openai_server.root, model=openai_server.model, port=port)  # the server comes back
    time.sleep(0.3)
    assert rc.check() is None
    assert list(rc.stream_reply(QUESTION, params=SamplingParams(temperature=0, max_new_tokens=2)))


@pytest.mark.parametrize("then, message", [
    ("stall", r"went silent mid-reply: nothing for 2 s \(CHAT_BACKEND_TIMEOUT\)$"),
    ("end", r"ended the stream before the reply was finished \(no finish reason\)$"),
    ("error", r"reported an error mid-reply: generation failed on the server$"),
])
def test_a_stream_that_stalls_ends_early_or_fails_is_a_clear_error(openai_server: ServedModel, proxies,  # noqa: F811
                                                                     then, message):
    # The proxy passes the headers and the first event on, then misbehaves.
    proxy = proxies(openai_server.root, after_events=1, then=then)
    rc = RemoteChat(proxy.url, openai_server.model, api="chat", chat_template_kwargs=PLAIN_CHAT, timeout=2.0)
    stats = ReplyStats()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        list(rc.stream_reply(QUESTION, stats=stats, params=SamplingParams(temperature=0, max_new_tokens=50)))
    assert stats.stopped_by == "error" and rc.active() == 0
    assert time.monotonic() - t0 < 30


def test_concurrent_replies_share_one_client(openai_server: ServedModel):  # noqa: F811
    rc = RemoteChat(openai_server.url, openai_server.model, api="chat", chat_template_kwargs=PLAIN_CHAT)
    results: dict[int, object] = {}

    def user(i: int) -> None:
        try:
            results[i] = list(rc.stream_reply(f"{QUESTION} ({i})", params=SamplingParams(temperature=0, max_new_tokens=1)))
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    peak = 0
    deadline = time.monotonic() + 120
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak = max(peak, rc.active())
        time.sleep(0.01)
    assert len(results) == 3 and all(isinstance(r, list) and r for r in results.values()), results
    assert peak >= 2 and rc.active() == 0 and reader_threads() == 0


def test_api_key_wrong_missing_and_right_and_never_shown(openai_server: ServedModel, proxies, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    right = "sk-right-KEY-9876543210"
    proxy = proxies(openai_server.root, api_key=right, model=openai_server.model)
    host = proxy.root.removeprefix("http://")

    wrong = RemoteChat(proxy.url, openai_server.model, api_key=SECRET, api="completions")
    reason = wrong.check()
    assert reason.startswith(f"the chat server at {host} refused the API key (HTTP 401")
    assert "check CHAT_BACKEND_API_KEY" in reason
    with pytest.raises(RuntimeError) as err:
        list(wrong.stream_reply(QUESTION, params=GREEDY))
    assert "refused the API key (HTTP 401: Incorrect API key provided: ***" in str(err.value)
    for text in (reason, str(err.value), wrong.describe(), repr(wrong), caplog.text):
        assert SECRET not in text

    missing = RemoteChat(proxy.url, openai_server.model, api="completions")
    with pytest.raises(RuntimeError, match="it needs CHAT_BACKEND_API_KEY"):
        list(missing.stream_reply(QUESTION, params=GREEDY))

    ok = RemoteChat(proxy.url, openai_server.model, api_key=right, api="chat", chat_template_kwargs=PLAIN_CHAT)
    assert ok.check() is None
    assert list(ok.stream_reply(QUESTION, params=SamplingParams(temperature=0, max_new_tokens=2)))
    assert right not in caplog.text


def test_model_must_be_named_when_the_server_cannot_list_it(openai_server: ServedModel):  # noqa: F811
    # transformers serve lists models from the hub cache, which fails offline.
    rc = RemoteChat(openai_server.url)
    reason = rc.check()
    assert reason is not None and reason.endswith("set CHAT_BACKEND_MODEL")
    with pytest.raises(RuntimeError, match="set CHAT_BACKEND_MODEL"):
        list(rc.stream_reply(QUESTION))


# ---------------------------------------------------------------------------------------------
# vLLM (CPU build in its own venv): runs only where VLLM_PYTHON points at that venv's python.


@pytest.mark.skipif(not os.environ.get("VLLM_PYTHON"), reason="VLLM_PYTHON (a vLLM venv's python) is not set")
def test_vllm_serves_the_default_model_with_the_extras_and_a_key(proxies):
    import subprocess

    from openai_server import _kill_group, _spawn, _wait_ready, default_model_folder

    port = free_port()
    folder = default_model_folder()
    cmd = [os.environ["VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", "gemma-3-270m", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "2048"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_API_KEY": SECRET}
    proc, log_path = _spawn(cmd, env, "vllm-")
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health", log_path, 600, "vLLM")
        wrong = RemoteChat(f"http://127.0.0.1:{port}/v1", api_key="sk-wrong")
        assert "refused the API key (HTTP 401" in (wrong.check() or "")
        rc = RemoteChat(f"http://127.0.0.1:{port}/v1", api_key=SECRET)  # model: the first listed
        assert rc.check() is None and rc.model == "gemma-3-270m"
        stats = ReplyStats()
        seen = list(rc.stream_reply(QUESTION, stats=stats, params=SamplingParams(
            temperature=0.7, top_k=20, repetition_penalty=1.1, seed=1, max_new_tokens=24)))
        assert rc.api == "completions" and seen and stats.prompt_tokens > 0 and stats.stopped_by != "error"
        assert SECRET not in subprocess.list2cmdline(cmd)
    finally:
        _kill_group(proc)
