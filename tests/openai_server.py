"""Real OpenAI-compatible servers for the tests, on loopback, offline.

* `start_transformers_serve(folder)`: `transformers serve <folder>` in a subprocess on a free port
  (real HTTP, real tokens). The session fixture `openai_server` serves the app's default model
  (the cached Gemma 3 270m snapshot) this way, once per session; import it in a test module:
  `from openai_server import openai_server  # noqa: F401`.
* `start_proxy(upstream)`: a small reverse proxy in its own process, in front of a real server,
  that behaves like vLLM's front door where `transformers serve` does not: it checks an API key
  (401 otherwise; like OpenAI's own API it quotes the key it was given, so tests can prove the
  client scrubs it), lists a model at /v1/models (transformers serve cannot list offline), can
  misbehave mid-stream (stall, end the stream early, send an error event), counts client
  disconnects, and can be SIGKILLed mid-reply: to the client that is exactly a server dying (the
  kernel closes its sockets).

Run `python tests/openai_server.py` to serve the default model by hand (prints its URL).
`PLAIN_CHAT_TEMPLATE` lets the chat API talk to the base model, which has no template of its own.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
# Loading the 270M model is seconds; importing torch/transformers/fastapi on a busy 2-core box is ~15 s.
READY_TIMEOUT_S = float(os.environ.get("OPENAI_SERVER_READY_TIMEOUT", "180"))
PROXY_KEY_ENV = "OPENAI_TEST_PROXY_KEY"  # the proxy's key travels in its environment, not argv (ps)

# The app's plain dialogue format (generation/prompt.py) as a chat template, for the chat API on a base
# model: `chat_template_kwargs={"chat_template": PLAIN_CHAT_TEMPLATE}`.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET `url`, None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(wait_s)


def _spawn(cmd: list[str], env: dict[str, str], prefix: str) -> tuple[subprocess.Popen, Path]:
    fd, log_name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, Path(log_name)


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited (rc={proc.returncode}) before serving:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            _kill_group(proc)
            raise RuntimeError(f"{what} not serving after {timeout:g} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# transformers serve


@dataclass
class ServedModel:
    """A running OpenAI-compatible server: `url` is the API base (".../v1"), `model` the name to send."""

    proc: subprocess.Popen
    root: str  # http://127.0.0.1:PORT
    model: str
    log_path: Path
    started_s: float = 0.0  # seconds from launch to /health answering 200

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the server's process group (idempotent)."""
        _kill_group(self.proc)


def start_transformers_serve(
    model_dir: Path | str,
    *,
    continuous_batching: bool = False,
    extra_args: tuple[str, ...] = (),
    timeout: float = READY_TIMEOUT_S,
    port: int | None = None,
    threads: int | None = 1,
) -> ServedModel:
    """`transformers serve model_dir` on 127.0.0.1 (CPU, bf16); returns once /health answers 200.

    threads: torch's intra-op threads in the server (None = torch's default, all cores). 1 by
    default: on a 2-core box shared with other busy processes (the tests' app server, other
    jobs), two threads that wait on each other decode 4-6x slower than one (measured: 20 greedy
    tokens in 26-31 s with 2 threads vs 4-7 s with 1, load average 9); on an idle box one thread
    costs ~1.7x.

    Without continuous batching (the default here) every request gets its own sampling settings and
    stop strings, and requests run one after another, so a cancelled one visibly frees the server.
    With it (`--continuous-batching`, what a load test wants) the server takes the sampling settings of
    its first request for all later ones and ignores stop strings; its paged KV cache is sized
    by `extra_args` such as ("--cb-num-blocks", "64").
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
           "--device", "cpu", "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "info", *(["--continuous-batching"] if continuous_batching else []), *extra_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.monotonic()
    proc, log_path = _spawn(cmd, env, "transformers-serve-")
    served = ServedModel(proc, f"http://127.0.0.1:{port}", str(model_dir), log_path)
    atexit.register(served.stop)
    _wait_ready(proc, f"{served.root}/health", log_path, timeout, "transformers serve")
    served.started_s = time.monotonic() - t0
    return served


def default_model_folder() -> Path:
    """The app's default model as a Hugging Face folder (the cached snapshot; converted on first use)."""
    from generation import Settings
    from generation.model import default_snapshot

    folder, _ = default_snapshot(Settings.from_env())
    return folder


_shared: ServedModel | None = None


def shared_openai_server() -> ServedModel:
    """The session's one `transformers serve` of the default model (started on first use)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_transformers_serve(default_model_folder())
    return _shared


try:
    import pytest

    @pytest.fixture(scope="session")
    def openai_server() -> ServedModel:
        """`transformers serve` of the default Gemma snapshot (no chat template: completions API)."""
        server = shared_openai_server()
        yield server
        server.stop()

except ImportError:  # the helper also runs as a plain script
    pass


# ---------------------------------------------------------------------------------------------
# The proxy


@dataclass
class Proxy:
    """A running proxy process in front of `upstream`; `url` is its API base (".../v1")."""

    proc: subprocess.Popen
    root: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def stats(self) -> dict[str, int]:
        """{"requests", "active", "client_disconnects", "upstream_closed"} so far."""
        with urllib.request.urlopen(f"{self.root}/proxy/stats", timeout=5) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, the kernel closes its connections (a crashed server)."""
        _kill_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _kill_group(self.proc)

    def relaunch(self, upstream: str, **options) -> None:
        """Stop this proxy and start another in its place, on the same port, with `options` as
        start_proxy takes them: a server restarted at the same address, perhaps misbehaving."""
        port = int(self.root.rsplit(":", 1)[1])
        self.stop()
        new = start_proxy(upstream, port=port, **options)
        self.proc, self.log_path = new.proc, new.log_path


def start_proxy(
    upstream: str,
    *,
    api_key: str | None = None,
    model: str | None = None,
    after_events: int | None = None,
    then: str = "stall",
    port: int | None = None,
    timeout: float = 30.0,
) -> Proxy:
    """Start the proxy (its own process) in front of `upstream` (http://host:port); see the module doc.

    api_key: required as "Authorization: Bearer <key>" (401 otherwise). model: answered at /v1/models.
    after_events: forward that many SSE events of a streamed reply, then (dropping the upstream
    request) `then`: "stall" = hold the connection open in silence (a hung server), "end" = end the
    response cleanly with no finish reason and no [DONE] (a server that gave up), "error" = send
    an SSE error event and end (what servers do when generation fails mid-reply).
    """
    if then not in MISBEHAVIOURS:
        raise ValueError(f"then must be one of {MISBEHAVIOURS}, got {then!r}")
    port = port or free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "proxy", "--upstream", upstream, "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if after_events is not None:
        cmd += ["--after-events", str(after_events), "--then", then]
    env = {k: v for k, v in os.environ.items() if k != PROXY_KEY_ENV}
    if api_key is not None:
        env[PROXY_KEY_ENV] = api_key
    proc, log_path = _spawn(cmd, env, "openai-proxy-")
    proxy = Proxy(proc, f"http://127.0.0.1:{port}", log_path)
    atexit.register(proxy.stop)
    _wait_ready(proc, f"{proxy.root}/proxy/stats", log_path, timeout, "proxy")
    return proxy


MISBEHAVIOURS = ("stall", "end", "error")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host", "authorization"}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, fmt: str, *args) -> None:  # method, path, status only: never headers
        sys.stderr.write(f"proxy: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _handle(self) -> None:
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/proxy/stats":
            with srv.lock:
                return self._json(200, dict(srv.counts))
        if srv.api_key is not None:
            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {srv.api_key}":
                given = auth.removeprefix("Bearer ") or "(none)"
                return self._json(401, {"error": {
                    "message": f"Incorrect API key provided: {given}.", "type": "invalid_request_error",
                    "code": "invalid_api_key"}})
        if srv.model and self.path.rstrip("/") == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": srv.model, "object": "model", "created": 0, "owned_by": "openai_server.py"}]})
        with srv.lock:
            srv.counts["requests"] += 1
            srv.counts["active"] += 1
        up = http.client.HTTPConnection(srv.upstream_host, srv.upstream_port, timeout=600)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            up.request(self.command, self.path, body=body or None, headers=headers)
            resp = up.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = 0
            while True:
                line = resp.readline()  # SSE is line-based; JSON bodies pass through just the same
                if not line:
                    break
                self._chunk(line)
                if line in (b"\n", b"\r\n"):
                    events += 1
                    if srv.after_events is not None and events >= srv.after_events:
                        up.close()  # drop the upstream request: from here on the proxy misbehaves
                        if srv.then == "stall":
                            time.sleep(3600)
                        if srv.then == "error":
                            self._chunk(b'data: {"error": {"message": "generation failed on the server"}}\n\n')
                        break
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            with srv.lock:
                srv.counts["client_disconnects"] += 1
            self.close_connection = True
        finally:
            up.close()  # a client gone mid-stream: the upstream sees its connection close too
            with srv.lock:
                srv.counts["active"] -= 1
                srv.counts["upstream_closed"] += 1


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, upstream: str, api_key: str | None, model: str | None,
                 after_events: int | None, then: str) -> None:
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.api_key = api_key
        self.model = model
        self.after_events = after_events
        self.then = then
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "active": 0, "client_disconnects": 0, "upstream_closed": 0}


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("proxy", help="run the proxy in the foreground (API key from $" + PROXY_KEY_ENV + ")")
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model")
    p.add_argument("--after-events", type=int)
    p.add_argument("--then", choices=MISBEHAVIOURS, default="stall")
    s = sub.add_parser("serve", help="serve the app's default model with transformers serve (the default)")
    s.add_argument("--continuous-batching", action="store_true")
    s.add_argument("--port", type=int)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.cmd == "proxy":
        server = _ProxyServer(args.port, args.upstream, os.environ.get(PROXY_KEY_ENV), args.model,
                              args.after_events, args.then)
        server.serve_forever()
        return
    served = start_transformers_serve(default_model_folder(), port=getattr(args, "port", None),
                                      continuous_batching=getattr(args, "continuous_batching", False),
                                      threads=getattr(args, "threads", None))
    print(f"serving {served.model} at {served.url} (ready after {served.started_s:.1f} s; log {served.log_path}); "
          "Ctrl+C stops it", flush=True)
    try:
        served.proc.wait()
    except KeyboardInterrupt:
        served.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
