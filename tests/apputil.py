"""Start the real app (`python app.py`) once per test session, in a subprocess on a free port.

Used by tests/test_app_api.py and tests/test_browser.py. Both request the session fixture
`app_server`; the server itself is a process-wide singleton, so the two modules share ONE server
(and one model load), and it is killed at session end (or at interpreter exit, whatever happens).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Cached snapshot: seconds; first run converts the GGUF (~1 min on 2 cores, more when the box is busy).
MODEL_READY_TIMEOUT_S = float(os.environ.get("APP_TEST_READY_TIMEOUT", "600"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    """A running `python app.py` and where it listens."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop the server's process group as a container stop does (SIGTERM, then SIGKILL after
        10 s); idempotent. -> the app's exit status (0: it closed cleanly)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        return self.proc.returncode


def start_app(env: dict[str, str] | None = None, *, wait_model: bool = True,
              timeout: float = MODEL_READY_TIMEOUT_S) -> AppServer:
    """Run `python app.py` on a free port; return once it serves (and, by default, once the model is ready).

    Raises RuntimeError with the server's log if it dies, the model fails, or time runs out. Two
    start-up failures that say nothing about the app mean another try: a port taken between choosing
    it and binding it, and gradio's own check of its fresh server timing out on a saturated machine.
    """
    transient = ("Cannot find empty port", "When localhost is not accessible")
    for attempt in range(3):
        try:
            return _start_app(env, wait_model=wait_model, timeout=timeout)
        except RuntimeError as exc:
            if not any(t in str(exc) for t in transient) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_app(env: dict[str, str] | None, *, wait_model: bool, timeout: float) -> AppServer:
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="attention-lab-app-", suffix=".log")
    full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = AppServer(proc, f"http://127.0.0.1:{port}", Path(log_name))
    atexit.register(server.stop)
    deadline = time.monotonic() + timeout
    try:
        _wait(server, deadline, lambda: _http_ok(server.url), "serving")
        if wait_model:
            _wait(server, deadline, lambda: "Model ready:" in server.log(), "model ready")
    except BaseException:
        server.stop()
        raise
    return server


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(server: AppServer, deadline: float, ok, what: str) -> None:
    while not ok():
        if server.proc.poll() is not None:
            raise RuntimeError(f"app exited (rc={server.proc.returncode}) before {what}:\n{server.log()[-4000:]}")
        if "Model failed to load" in server.log():
            raise RuntimeError(f"model failed to load:\n{server.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"app not {what} in time:\n{server.log()[-4000:]}")
        time.sleep(0.25)


_shared: AppServer | None = None


def shared_server() -> AppServer:
    """The session's one app server (started on first use)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_app()
    return _shared


@pytest.fixture(scope="session")
def app_server():
    """The running app (default model loaded), shared by every module that imports this fixture."""
    server = shared_server()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# Figures from the API


def plot_png(payload: dict):
    """A gr.Plot API payload (a matplotlib figure sent as a PNG data URL) -> PIL image."""
    import base64
    import io

    from PIL import Image

    assert payload["type"] == "matplotlib"
    head, data = payload["plot"].split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def assert_same_picture(payload: dict, fig) -> None:
    """The API's figure is `fig` (a matplotlib Figure drawn here by the same code, or a payload).

    Same size, and pixels equal up to anti-aliasing: the server may compute the weights on another
    number of threads, which can move a colour by a level in a cell (mean difference < 1 of 255),
    while another figure (other weights, tokens or layout) differs by far more."""
    import io

    import numpy as np
    from PIL import Image

    from attention.plot import figure_bytes

    got = plot_png(payload).convert("RGB")
    if isinstance(fig, dict):
        want = plot_png(fig).convert("RGB")
    else:
        want = Image.open(io.BytesIO(figure_bytes(fig, "png"))).convert("RGB")
    assert got.size == want.size, (got.size, want.size)
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
    assert diff.mean() < 1.0, f"the pictures differ (mean {diff.mean():.2f} of 255)"


# ---------------------------------------------------------------------------------------------
# Browser helpers (Debian's chromium driven by Playwright; never `playwright install`)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1000}


QUEUE_JOIN = "**/gradio_api/queue/join*"  # where the page sends each event for the server's queue


def launch_chromium(playwright):
    """The system chromium, headless, with nothing phoning home."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_app(browser, url: str, timeout_ms: int = 60_000):
    """A fresh context (= its own Gradio session) and page, once the first heatmaps are drawn.

    Returns (context, page, off_host_requests): the list collects every request that left 127.0.0.1.
    """
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    off_host: list[str] = []
    page.on("request", lambda r: off_host.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(url)
    page.wait_for_selector("#lab-heatmaps img", timeout=timeout_ms)
    return context, page, off_host


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright, one per test module (skips without playwright)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@contextlib.contextmanager
def app_page(browser, url: str, ready_js: str | None = None):
    """A page on the app in its own session (open_app), closed afterwards; `ready_js`: a JS
    condition to wait for first. Asserts at the end that nothing left this machine."""
    context, page, off_host = open_app(browser, url)
    try:
        if ready_js:
            page.wait_for_function(ready_js, timeout=120_000)
        yield page
    finally:
        context.close()
    assert off_host == [], f"the page made requests off this machine: {off_host}"


def _app_events(page) -> list[dict]:
    """The app's events as the page's config lists them."""
    return page.request.get(page.url.split("?")[0].rstrip("/") + "/config").json()["dependencies"]


def event_id(page, api_name: str) -> int:
    """The id of the app's event `api_name` (what the page's queue join names as fn_index)."""
    (dep,) = [d for d in _app_events(page) if d.get("api_name") == api_name]
    return dep["id"]


def event_ids(page, api_name: str) -> set[int]:
    """The ids of every event of the app named `api_name`, and of those gradio named `api_name_1`,
    `api_name_2`, ... (one handler wired after several events)."""
    named = re.compile(rf"{re.escape(api_name)}(_\d+)?")
    return {d["id"] for d in _app_events(page) if named.fullmatch(d.get("api_name") or "")}


# The page has read every update the server sent for its events (ui/eventstream.js): the end signal
# to wait for before asserting that nothing more arrives.
PAGE_IDLE = "!window.__keptEventStream.connected && window.__keptEventStream.waitingFor === 0"


def wait_event_read(page, join, timeout_s: float = 120.0) -> None:
    """Wait until the page has read the server's end of the event its queue `join` (the Playwright
    response) started: that event's end signal as the page sees it."""
    event = json.dumps(join.json()["event_id"])
    page.wait_for_function(f"window.__keptEventStream.completed({event})", timeout=timeout_s * 1000)


def _calls_event(request, path: str, fn_indices: set[int]) -> bool:
    """Whether a request of the page POSTs to `path` for one of the events `fn_indices`."""
    if request.method != "POST" or path not in request.url:
        return False
    body = request.post_data_json
    return isinstance(body, dict) and body.get("fn_index") in fn_indices


def joins_event(request, fn_index: int) -> bool:
    """Whether a request of the page is its queue join of event `fn_index` (`event_id`)."""
    return _calls_event(request, "/gradio_api/queue/join", {fn_index})


def runs_event(request, fn_indices: set[int]) -> bool:
    """Whether a request of the page runs one of the events `fn_indices` outside the queue (an
    event wired with queue=False: the page posts it to /run/predict and the answer is its outputs)."""
    return _calls_event(request, "/run/predict", fn_indices)


def wait_held(page, held: list, n: int = 1, timeout_s: float = 60.0) -> None:
    """Wait until a route handler has put `n` requests in `held` (route callbacks run only inside
    Playwright calls: wait in one)."""
    deadline = time.monotonic() + timeout_s
    while len(held) < n:
        assert time.monotonic() < deadline, f"the page sent {len(held)} of {n} held requests within {timeout_s} s"
        page.wait_for_timeout(50)


@contextlib.contextmanager
def held_event(page, trigger, timeout_s: float = 60.0, only: int | None = None):
    """Hold the event `trigger()` sends to the server's queue until the block ends, as a server busy
    with other users holds it: what the block does happens while that event has not yet run and the
    page counts it as running (a redraw the student keeps moving sliders through). Events sent
    meanwhile go through (the page itself defers one of the same kind until the held one ends).
    `only`: hold the first join of that event id (`event_id`), not whatever event joins first."""
    held: list = []

    def hold(route) -> None:
        if held or (only is not None and not joins_event(route.request, only)):
            route.continue_()
        else:
            held.append(route)

    page.route(QUEUE_JOIN, hold)
    try:
        trigger()
        wait_held(page, held, 1, timeout_s)
        yield
    finally:
        for route in held:
            route.continue_()
        page.unroute(QUEUE_JOIN, hold)


def wait_until(get, ok, timeout_s: float = 120.0):
    """Poll get() until ok(value); that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = get()
        if ok(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"not reached within {timeout_s} s; last: {value!r}")


def wait_changed(get, old, timeout_s: float = 180):
    """Poll get() until it returns something truthy and different from old; that value. The limit
    only ends a broken run: a view drawn beside two busy test workers can take over a minute."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = get()
        if new and new != old:
            return new
        time.sleep(0.1)
    raise AssertionError(f"value did not change within {timeout_s} s (still {old!r})")


def set_number(page, elem_id: str, value: float) -> None:
    """Type into a slider's number box and leave it: Gradio fires the slider's `release` on blur."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot [data-testid='bot']").all_inner_texts()


def user_texts(page) -> list[str]:
    """The user messages as a reader sees them. The app sends and shows them stripped; a bubble's
    innerText can still end in a line break of the bubble's own layout while the chatbot re-renders
    (seen once on a busy machine: 'Hello!\n'), which is not part of the message."""
    return [text.strip() for text in page.locator("#chatbot [data-testid='user']").all_inner_texts()]


def replies_done(page) -> int:
    """This page's finished chat replies, as the status line numbers them ("last reply (#3)"); 0
    before the first. The number changes with a reply's last update, the end signal to wait for
    (a streamed reply arrives in pieces, and the text may pause between them on a busy machine)."""
    match = re.search(r"last reply \(#(\d+)\)", page.locator("#status-line").inner_text())
    return int(match.group(1)) if match else 0


def send_chat(page, message: str) -> int:
    """Type `message` in the chat tab and press Enter; the finished replies before it (for wait_reply_done)."""
    page.get_by_role("tab", name="4-bit Chat").click()
    before = replies_done(page)
    page.fill("#chat-input textarea", message)
    page.press("#chat-input textarea", "Enter")
    return before


def wait_reply_done(page, after: int, timeout_s: float = 180, replies: int = 1) -> str:
    """Wait until `replies` more replies have finished than the `after` that send_chat (or
    replies_done) returned before they were asked for; the last assistant message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if replies_done(page) >= after + replies:
            return bot_texts(page)[-1]
        time.sleep(0.1)
    raise AssertionError(f"reply #{after + replies} did not finish within {timeout_s} s; "
                         f"bot messages: {bot_texts(page)}")
