"""The app with its chat served by a remote OpenAI-compatible server (CHAT_BACKEND_URL).

Real servers on loopback: `transformers serve` of the default model (tests/openai_server.py),
behind the test proxy that checks an API key and lists the model name (the offline server cannot),
and the real `python app.py` pointing at the proxy. The chat goes through the server; the local
model loads only when an inside-the-model view asks for it.
"""

from __future__ import annotations

import time

import pytest
from apputil import launch_chromium, send_chat, start_app, wait_reply_done
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from openai_server import openai_server, start_proxy  # noqa: F401  (openai_server is a fixture)

from generation import SamplingParams
from generation.backends import RemoteChat

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # each test starts the real app

SECRET = "sk-app-SECRET-9876543210"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def proxy(openai_server):  # noqa: F811
    # The proxy lists the served model by the name `transformers serve` insists on: its folder.
    p = start_proxy(openai_server.root, api_key=SECRET, model=openai_server.model)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def remote_app(proxy):
    server = start_app({"CHAT_BACKEND_URL": proxy.url, "CHAT_BACKEND_API_KEY": SECRET}, wait_model=False)
    yield server
    assert server.stop() == 0 and "Traceback" not in server.log(), server.log()[-4000:]  # a clean stop


@pytest.fixture(scope="module")
def client(remote_app):
    return Client(remote_app.url, verbose=False)


def status(client: Client) -> dict:
    return client.predict(api_name="/model_status")


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_the_chat_is_the_servers_reply_and_no_local_model_is_loaded(client, proxy, remote_app, openai_server):  # noqa: F811
    before = proxy.stats()["requests"]
    reply = client.predict(QUESTION, max_new_tokens=16, temperature=0.0, api_name="/chat")
    direct = ""
    for direct in RemoteChat(proxy.url, openai_server.model, SECRET).stream_reply(
            QUESTION, params=SamplingParams(max_new_tokens=16, temperature=0.0)):
        pass
    assert reply.strip() and reply == direct  # greedy: the app shows exactly what the server wrote
    assert proxy.stats()["requests"] >= before + 2
    st = status(client)
    assert st["ready"] is True and st["generating"] == 0
    assert st["backend"].startswith("remote: 127.0.0.1:") and openai_server.model in st["backend"]
    assert st["fast_decode"] is None  # no local engine
    assert st["summary"] is None  # a chat-only deployment loaded no local weights
    assert "Loading model" not in remote_app.log()
    assert "Chat backend remote: 127.0.0.1:" in remote_app.log() and "reachable" in remote_app.log()


def test_a_cancelled_chat_closes_the_http_stream(client, proxy):
    disconnects = proxy.stats()["client_disconnects"]
    job = client.submit("Tell me a long story about a dragon who learns to fly.", max_new_tokens=300,
                        temperature=1.2, top_p=1.0, seed=3, api_name="/chat")
    deadline = time.monotonic() + 120
    while job.status().code != Status.ITERATING:
        assert time.monotonic() < deadline and job.status().code != Status.FINISHED, "no reply streamed"
        time.sleep(0.05)
    assert status(client)["generating"] == 1
    job.cancel()
    wait_for(lambda: status(client)["generating"] == 0, 15, "the app let go of the remote reply")
    wait_for(lambda: proxy.stats()["client_disconnects"] > disconnects, 15, "the server saw the client leave")


def test_the_api_key_is_never_shown(client, remote_app):
    reply = client.predict(QUESTION, max_new_tokens=4, temperature=0.0, api_name="/chat")
    assert SECRET not in reply and SECRET not in str(status(client))
    assert SECRET not in remote_app.log()


def test_a_wrong_key_is_a_clear_message_in_the_chat_and_the_status(proxy, caplog, capfd):
    """The app's own handlers (what /chat and the page call), in-process, with a key the server
    refuses: a gr.Error and a status that say so, and the key nowhere in what the app prints."""
    import gradio as gr

    import app
    from generation.settings import Settings

    state = app.AppState.create(Settings(chat_backend_url=proxy.url, chat_backend_api_key="sk-wrong-key-000"))
    with pytest.raises(gr.Error, match="refused the API key") as err:
        list(state.chat.chat_api(QUESTION, max_new_tokens=4, temperature=0.0))
    st = state.chat.model_status_api()
    assert st["ready"] is False and "refused the API key" in st["error"]
    printed = capfd.readouterr()
    for text in (str(err.value), str(st), caplog.text, printed.out, printed.err):
        assert "sk-wrong-key-000" not in text


def test_a_dead_server_is_a_clear_message_and_the_app_keeps_serving(client, proxy, openai_server):  # noqa: F811
    """The server behind the running app dies mid-reply (the proxy forwards a few events, then the
    kernel closes its socket), then is gone, then comes back at the same address."""
    served = dict(api_key=SECRET, model=openai_server.model)
    proxy.relaunch(openai_server.root, after_events=3, then="end", **served)
    try:
        with pytest.raises(AppError, match="before the reply was finished|closed the connection|ended"):
            client.predict("Tell me a long story about a dragon.", max_new_tokens=40, temperature=0.0, api_name="/chat")
        proxy.kill()
        with pytest.raises(AppError, match="unreachable"):
            client.predict(QUESTION, max_new_tokens=4, temperature=0.0, api_name="/chat")
        # the app itself is fine: the lab answers, the status says why the chat cannot
        assert client.predict(api_name="/attention")["type"] == "matplotlib"
        wait_for(lambda: "unreachable" in (status(client)["error"] or ""), 20, "the status to say unreachable")
    finally:
        proxy.relaunch(openai_server.root, **served)  # the module's server, back in its place
    assert client.predict(QUESTION, max_new_tokens=4, temperature=0.0, api_name="/chat").strip()
    assert status(client)["error"] is None


def test_inside_views_load_the_local_model_on_first_use(client, remote_app):
    with pytest.raises(AppError, match="still loading"):
        client.predict("The cat sat on the mat.", 0, True, api_name="/model_attention")
    wait_for(lambda: status(client)["summary"] is not None, 300, "the local model to load")
    assert "Loading model google/gemma-3-270m" in remote_app.log()
    grid = client.predict("The cat sat on the mat.", 3, True, api_name="/model_attention")
    assert grid["type"] == "matplotlib"
    assert status(client)["backend"].startswith("remote:")  # the chat stays remote


@pytest.mark.browser
def test_the_chat_tab_with_the_remote_backend_in_a_browser(remote_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(remote_app.url)
            page.wait_for_function(
                "(document.querySelector('#status-line')?.innerText || '').includes('remote: 127.0.0.1')",
                timeout=60_000)
            line = page.locator("#status-line").inner_text()
            # The local model beside the remote chat: still lazy, or (once an inside view has
            # loaded it, as the test above does, and the page's first status tick has come) loaded.
            assert "chat: remote: 127.0.0.1:" in line
            assert ("local model google/gemma-3-270m: loads on first use" in line
                    or "google/gemma-3-270m · 4-bit: on (NF4)" in line), line
            page.get_by_role("tab", name="4-bit Chat").click()
            page.locator("#temperature input[type=number]").fill("0")
            page.locator("#temperature input[type=number]").press("Tab")
            page.locator("#max-new input[type=number]").fill("16")
            page.locator("#max-new input[type=number]").press("Tab")
            reply = wait_reply_done(page, send_chat(page, QUESTION), timeout_s=180)
            assert reply.strip() and "last reply (#1)" in page.locator("#status-line").inner_text()
            assert SECRET not in page.content()
        finally:
            browser.close()
