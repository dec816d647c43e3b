"""The edge of the named API: a small ASGI middleware in front of gradio's routes.

gradio 6.31, left alone, answers a call to an unknown API name with HTTP 500 (its route lookup
raises), lets any event be called by its name over HTTP whatever its `api_visibility`, fails a
raw call that leaves out arguments with a message-less error (only its client libraries fill in
the documented defaults), and answers a malformed body with a 422 that echoes the body back. Here,
before gradio sees a request:

* POST `/gradio_api/{call,call/v2,run,api}/<name>`: <name> must be a public endpoint (404 naming
  them otherwise). A body that names an event by `fn_index` instead is how the page calls its own
  events (`/run/predict`); that index must exist.
* The body must be a JSON object with a "data" list (call/v2: an object of the endpoint's
  parameters). A list shorter than the parameters gets the documented defaults; a required value
  left out, or more values than parameters, is a 422 that names them.
* POST `/gradio_api/queue/join` (how clients and the page run queued events): `fn_index` must name
  an event and "data" must be a list; a public endpoint's short list gets its defaults too.

Everything else passes untouched; only these requests' (small) bodies are read and replayed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from .common import quote

# The named-call routes of gradio's API router (gradio/routes.py: /call/v2 before /call).
_NAMED = re.compile(r"/gradio_api/(call/v2|call|run|api)/([^/]+)/?$")
_JOIN = re.compile(r"/gradio_api/queue/join/?$")
MAX_BODY_BYTES = 16 * 2**20  # more than any chat message or figure setting needs


@dataclass(frozen=True)
class Param:
    """One documented parameter of a public endpoint."""

    name: str
    has_default: bool
    default: Any


@dataclass(frozen=True)
class Refusal:
    """An HTTP error with a message (sent as {"detail": message}, as FastAPI's own are)."""

    status: int
    message: str


def endpoint_params(blocks: Any) -> dict[str, list[Param]]:
    """{api name: its parameters} for every public endpoint, as the API info documents them."""
    info = blocks.get_api_info()
    return {
        path.lstrip("/"): [Param(p["parameter_name"], bool(p.get("parameter_has_default")), p.get("parameter_default"))
                           for p in ep.get("parameters", [])]
        for path, ep in info.get("named_endpoints", {}).items()
    }


def _listing(endpoints: dict[str, list[Param]]) -> str:
    return ", ".join(f"/{name}" for name in sorted(endpoints))


def fill_data(name: str, params: list[Param], data: list[Any]) -> list[Any] | Refusal:
    """A positional call's values with the documented defaults for those left out, or why not."""
    if len(data) > len(params):
        return Refusal(422, f"/{name} takes at most {len(params)} values "
                            f"({', '.join(p.name for p in params) or 'none'}), got {len(data)}")
    missing = [p.name for p in params[len(data):] if not p.has_default]
    if missing:
        return Refusal(422, f"/{name} needs a value for {', '.join(missing)} (no default)")
    return [*data, *(p.default for p in params[len(data):])]


def check_named(kind: str, name: str, body: Any, endpoints: dict[str, list[Param]], fn_ids: set[int],
                names: dict[int, str]) -> dict[str, Any] | Refusal:
    """A named call's JSON body -> the body to pass on (defaults filled in), or the refusal.
    `names`: {fn_index: api name} of the public endpoints (see check_join)."""
    if not isinstance(body, dict):
        return Refusal(422, f"the request body must be a JSON object, got {quote(body)}")
    if kind in ("run", "api") and body.get("fn_index") is not None:  # the page's own events
        return check_join(body, endpoints, fn_ids, names)
    if name not in endpoints:
        return Refusal(404, f"there is no API endpoint {quote('/' + name)}; the endpoints are "
                            f"{_listing(endpoints)} (see /gradio_api/info)")
    params = endpoints[name]
    if kind == "call/v2":  # keyword arguments: gradio fills in the defaults itself
        known = {p.name for p in params} | {"oauth_token"}
        unknown = [k for k in body if k not in known]
        if unknown:
            return Refusal(422, f"/{name} has no parameter {quote(unknown[0])}; its parameters are "
                                f"{', '.join(p.name for p in params) or 'none'}")
        missing = [p.name for p in params if not p.has_default and p.name not in body]
        if missing:
            return Refusal(422, f"/{name} needs a value for {', '.join(missing)} (no default)")
        return body
    if "data" not in body:
        return Refusal(422, f'the body must be {{"data": [/{name}\'s values in order]}}; '
                            f"/gradio_api/call/v2/{name} takes them by name instead")
    data = body["data"]
    if not isinstance(data, list):
        return Refusal(422, f'"data" must be a list of /{name}\'s values, got {quote(data)}')
    filled = fill_data(name, params, data)
    return filled if isinstance(filled, Refusal) else {**body, "data": filled}


def check_join(body: Any, endpoints: dict[str, list[Param]], fn_ids: set[int],
               names: dict[int, str]) -> dict[str, Any] | Refusal:
    """A call by fn_index (queue/join, the page's /run/predict) -> the body to pass on, or the refusal.
    `names`: {fn_index: api name} of the public endpoints (their short data gets the defaults)."""
    if not isinstance(body, dict):
        return Refusal(422, f"the request body must be a JSON object, got {quote(body)}")
    index = body.get("fn_index")
    if isinstance(index, bool) or not isinstance(index, int) or index not in fn_ids:
        return Refusal(404, f"there is no event with fn_index {quote(index)}")
    data = body.get("data")
    if not isinstance(data, list):
        return Refusal(422, f'"data" must be a list of the event\'s values, got {quote(data)}')
    name = names.get(index)
    if name is None:
        return body
    filled = fill_data(name, endpoints[name], data)
    return filled if isinstance(filled, Refusal) else {**body, "data": filled}


class ApiGate:
    """The ASGI middleware (see the module's docstring); `blocks` is the served gr.Blocks."""

    def __init__(self, app: Any, blocks: Any) -> None:
        self.app = app
        self.blocks = blocks
        self._endpoints: dict[str, list[Param]] | None = None
        self._names: dict[int, str] = {}

    def endpoints(self) -> dict[str, list[Param]]:
        # Read once, on the first call: the API info exists once the app is configured.
        if self._endpoints is None:
            public = {fn.api_name: fn._id for fn in self.blocks.fns.values()
                      if fn.api_visibility == "public" and fn.fn is not None}
            documented = endpoint_params(self.blocks)
            self._endpoints = {name: documented.get(name, []) for name in public}
            self._names = {i: name for name, i in public.items()}
        return self._endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        named, join = _NAMED.search(path), _JOIN.search(path)
        if not named and not join:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        if raw is _GONE:  # the client went away: nobody to answer
            return
        if raw is None:
            await _refuse(scope, receive, send, Refusal(413, f"the request body is over {MAX_BODY_BYTES:,} bytes"))
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            await _refuse(scope, receive, send, Refusal(422, "the request body is not valid JSON"))
            return
        endpoints, fn_ids = self.endpoints(), set(self.blocks.fns)
        if named:
            verdict = check_named(named[1], named[2], body, endpoints, fn_ids, self._names)
        else:
            verdict = check_join(body, endpoints, fn_ids, self._names)
        if isinstance(verdict, Refusal):
            await _refuse(scope, receive, send, verdict)
            return
        new = raw if verdict is body else json.dumps(verdict).encode()
        await self.app(_with_length(scope, len(new)), _replay(new, receive), send)


def gate_middleware(blocks: Any) -> list[Middleware]:
    """For `demo.launch(app_kwargs={"middleware": gate_middleware(demo)})`."""
    return [Middleware(ApiGate, blocks=blocks)]


_GONE = b"(the client disconnected)"


async def _read_body(receive: Any) -> bytes | None:
    """The whole request body; None when it is over MAX_BODY_BYTES, _GONE when the client left."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: the client's disconnect, as gradio's routes expect

    return replay


def _with_length(scope: dict, length: int) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _refuse(scope: dict, receive: Any, send: Any, refusal: Refusal) -> None:
    await JSONResponse({"detail": refusal.message}, status_code=refusal.status)(scope, receive, send)
