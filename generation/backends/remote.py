"""Chat replies from a remote OpenAI-compatible server (vLLM, TGI, llama.cpp's server, SGLang, ...).

`RemoteChat` implements the same `ChatBackend` interface as the local engine, so the Chat tab,
`/chat`, Stop, Retry and the stats line do not care who answers. It talks to the server through
the `openai` client library, always streaming:

* API: "chat" (/chat/completions; the server renders its model's chat template) or "completions"
  (/completions with the app's own plain dialogue prompt and its stop strings, for base models
  like the default Gemma, which have no template). "auto" sends one 1-token chat request the
  first time it is needed and keeps the chat API if the server takes it, else completions:
  a server whose model has no template refuses it (vLLM with a 400, `transformers serve` a 500).
* Sampling: temperature, top-p, max tokens, seed and stop strings are OpenAI parameters; top-k and
  repetition penalty go as the extra body fields vLLM and SGLang accept, and only when they are
  not "off", so a plain server never sees them unless the user asks for them.
* Stop: setting `stop_event` or closing the generator shuts the HTTP connection down at once
  (the server sees the client go away and cancels the request), even while a read is blocked.
* Prompt budget: remote tokenizers are unknown here, so `max_input_tokens` trims history by an
  estimate (about 3 characters per token, on the safe side); the server's own limit is the
  real one and its refusal is reported.
* The API key is never in `describe()`, `repr()`, error messages or logs; error texts from the
  server or the client library are scrubbed of it.
No gradio here.
"""

from __future__ import annotations

import math
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..prompt import PLAIN_STOP_STRINGS, check_history, plain_dialogue
from ..sampling import SamplingParams
from ..settings import CHAT_BACKEND_APIS, Settings, normalize_backend_url
from .base import ReplyStats, ReplyText, stopped_by, visible_text

DEFAULT_TIMEOUT_S = 60.0
# Connecting is quick or hopeless; waiting for tokens may take long (queues, prefill of big prompts).
CONNECT_TIMEOUT_S = 5.0
# The health probe must stay cheap for a status line that refreshes.
CHECK_TIMEOUT_S = 3.0
CHECK_TTL_S = 5.0
# How often the consumer looks at stop_event while waiting for the next chunk.
POLL_S = 0.05
# After we find a stop string ourselves: how long to wait for the server's finish + usage report.
DRAIN_S = 0.5
# Bound for the reader thread to finish once its connection is shut down.
JOIN_TIMEOUT_S = 2.0
# History trimming without the server's tokenizer: English runs ~4 characters per token, so 3
# over-counts and trims a little early rather than overflowing the server's context.
APPROX_CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4
# Every reader thread has this name, so a server (or a test) can count the live ones.
READER_THREAD_NAME = "remote_reply"
_MAX_ERROR_CHARS = 400
_DEFAULT_MAX_INPUT_TOKENS: int = Settings.__dataclass_fields__["max_input_tokens"].default


def _approx_tokens(text: str) -> int:
    return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)


@dataclass
class _Call:
    """One streaming request, shared by the consumer (the generator) and its reader thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    aborted: bool = False
    finished: bool = False  # the reader is done with the response
    response: Any = None  # the httpx response once the headers are in
    events: queue.Queue = field(default_factory=queue.Queue)


def _shutdown(response: Any) -> None:
    """Shut the response's socket down: wakes a read blocked in another thread and sends the server
    a FIN right away (closing alone would wait for that read to return)."""
    try:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError, ValueError):
        pass  # already closed: nothing left to stop


class RemoteChat:
    """A `ChatBackend` whose replies come from an OpenAI-compatible server. Thread-safe.

    RemoteChat(Settings.from_env()) uses CHAT_BACKEND_URL/_MODEL/_API_KEY/_API/_TIMEOUT;
    RemoteChat("http://vllm:8000/v1", "Qwen/Qwen2.5-3B-Instruct") sets them directly.
    model None = the first model the server lists; api "auto" | "chat" | "completions";
    chat_template_kwargs are sent with chat requests (vLLM, SGLang and `transformers serve` read
    them, e.g. {"enable_thinking": False}). Raises ValueError for a bad URL or option.
    """

    def __init__(
        self,
        settings_or_url: Settings | str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        api: str | None = None,
        timeout: float | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        max_input_tokens: int | None = None,
        check_ttl_s: float = CHECK_TTL_S,
    ) -> None:
        if isinstance(settings_or_url, Settings):
            s = settings_or_url
            if s.chat_backend_url is None:
                raise ValueError("CHAT_BACKEND_URL is not set: there is no remote chat server to talk to")
            url = s.chat_backend_url
            model = model if model is not None else s.chat_backend_model
            api_key = api_key if api_key is not None else s.chat_backend_api_key
            api = api if api is not None else s.chat_backend_api
            timeout = timeout if timeout is not None else s.chat_backend_timeout
            max_input_tokens = max_input_tokens if max_input_tokens is not None else s.max_input_tokens
        else:
            url = normalize_backend_url(settings_or_url)
        # Settings validates the same way; a direct call gets the same checks and messages.
        checked = Settings(
            chat_backend_url=url,
            chat_backend_model=model,
            chat_backend_api_key=api_key,
            chat_backend_api=api if api is not None else "auto",
            chat_backend_timeout=timeout if timeout is not None else DEFAULT_TIMEOUT_S,
            max_input_tokens=max_input_tokens if max_input_tokens is not None else _DEFAULT_MAX_INPUT_TOKENS,
            chat_concurrency=1,
            torch_threads=1,
        )
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise ValueError(f"chat_template_kwargs must be a mapping, got {type(chat_template_kwargs).__name__}")
        if isinstance(check_ttl_s, bool) or not isinstance(check_ttl_s, (int, float)) or check_ttl_s < 0:
            raise ValueError(f"check_ttl_s must be >= 0 seconds, got {check_ttl_s!r}")
        self.url: str = checked.chat_backend_url  # type: ignore[assignment]
        parts = urlsplit(self.url)
        self.host: str = parts.netloc
        self.timeout: float = float(checked.chat_backend_timeout)
        self.max_input_tokens: int = checked.max_input_tokens
        self._model = checked.chat_backend_model
        self._api = checked.chat_backend_api
        self._api_key = checked.chat_backend_api_key
        self._chat_template_kwargs = dict(chat_template_kwargs) if chat_template_kwargs else None
        self._check_ttl_s = float(check_ttl_s)
        self._lock = threading.Lock()  # resolved model/api, active count, health cache (held briefly)
        self._check_lock = threading.Lock()  # one GET /models at a time (<= CHECK_TIMEOUT_S)
        self._api_lock = threading.Lock()  # one chat-API probe at a time (a 1-token generation)
        self._resolved_model: str | None = None
        self._resolved_api: str | None = None
        self._active = 0
        self._health: tuple[float, str | None] | None = None
        self._client = self._make_client()

    def _make_client(self) -> Any:
        import httpx2
        import openai

        # Explicit everything: the client library would otherwise pick up OPENAI_API_KEY,
        # OPENAI_ORG_ID, OPENAI_PROJECT_ID from the environment and send them to this server.
        headers: dict[str, Any] = {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
        # No key: no Authorization header at all (the library accepts that only per request).
        self._headers = {"Authorization": openai.Omit()} if self._api_key is None else {}
        timeout = openai.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT_S))
        # No keep-alive: Stop shuts a stream's socket down from another thread, and a socket must
        # never be one that the pool has meanwhile handed to another request. A new connection per
        # reply costs a round trip, nothing next to generating it.
        http = openai.DefaultHttpxClient(
            timeout=timeout, limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=0)
        )
        return openai.OpenAI(
            api_key=self._api_key or "unused",
            base_url=self.url,
            timeout=timeout,
            max_retries=0,  # a retried generation would run twice; the user can press Retry
            default_headers=headers,
            http_client=http,
        )

    # ------------------------------------------------------------------------------------------
    # Description and health

    @property
    def model(self) -> str | None:
        """The model's name: configured, or the one the server listed first (None until known)."""
        return self._model or self._resolved_model

    @property
    def api(self) -> str:
        """"chat" or "completions", or "auto" until the server has been asked."""
        return self._resolved_api or self._api

    def describe(self) -> str:
        """Secret-free status text, e.g. "remote: vllm:8000 · Qwen/Qwen2.5-3B-Instruct · chat API"."""
        model = self.model or "first listed model"
        return f"remote: {self.host} · {model} · {self.api} API"

    def __repr__(self) -> str:
        return f"RemoteChat({self.describe()!r})"

    def active(self) -> int:
        """Replies being streamed from the server right now (all users)."""
        with self._lock:
            return self._active

    def check(self) -> str | None:
        """None if the server answers, else a one-line reason ("... is unreachable (connection refused)").

        Cached for `check_ttl_s` seconds (every reply also refreshes it), so a status line may call
        it on every refresh; after the TTL it asks again, so "unreachable" clears when the server
        is back. Never raises for network trouble. At most CHECK_TIMEOUT_S when the server does not answer.
        """
        with self._lock:
            if self._health is not None and time.monotonic() - self._health[0] < self._check_ttl_s:
                return self._health[1]
        with self._check_lock:
            with self._lock:  # another thread may have probed while we waited
                if self._health is not None and time.monotonic() - self._health[0] < self._check_ttl_s:
                    return self._health[1]
            reason = self._probe()
            self._set_health(reason)
            return reason

    def _set_health(self, reason: str | None) -> None:
        with self._lock:
            self._health = (time.monotonic(), reason)

    def _forget_health(self) -> None:
        """The next check() asks the server again (it was there, then failed)."""
        with self._lock:
            self._health = None

    def _probe(self) -> str | None:
        import openai

        timeout_s = min(self.timeout, CHECK_TIMEOUT_S)
        client = self._client.with_options(timeout=timeout_s, max_retries=0)
        try:
            ids = [m.id for m in client.models.list(extra_headers=self._headers).data]
        except openai.APIStatusError as exc:
            # Refused key; a gateway without its backend or an endpoint scaled to zero (502-504).
            if exc.status_code in (401, 403, 502, 503, 504):
                return self._explain(exc, responded=True)
            if self.model is None:
                return self._scrub(
                    f"the chat server at {self.host} answered HTTP {exc.status_code} to GET /models, "
                    "so the model to use is unknown: set CHAT_BACKEND_MODEL"
                )
            return None  # it answered: reachable (some servers list no models, e.g. offline)
        except openai.APIError as exc:
            return self._explain(exc, responded=False, timeout_s=timeout_s)
        if self.model is None:
            if not ids:
                return f"the chat server at {self.host} lists no models: set CHAT_BACKEND_MODEL"
            with self._lock:
                self._resolved_model = ids[0]
        return None

    # ------------------------------------------------------------------------------------------
    # Resolving the model and the API

    def resolve(self) -> tuple[str, str]:
        """(model, api) as they will be used, asking the server once if needed (RuntimeError if it can't).

        Called by the first reply anyway; an app may call it at start (in a thread) to warm up.
        """
        return self._resolve_model(), self._resolve_api()

    def _resolve_model(self) -> str:
        if self.model is not None:
            return self.model
        with self._check_lock:
            if self.model is None:
                reason = self._probe()
                if reason is not None:
                    self._set_health(reason)
                    raise RuntimeError(reason)
            assert self.model is not None
            return self.model

    def _resolve_api(self) -> str:
        import openai

        if self._api != "auto":
            return self._api
        with self._api_lock:
            if self._resolved_api is not None:
                return self._resolved_api
            model = self.model
            assert model is not None, "resolve the model first"
            extra = {"chat_template_kwargs": self._chat_template_kwargs} if self._chat_template_kwargs else None
            # No sampling fields: `transformers serve --continuous-batching` keeps the first request's
            # sampling settings for all later ones, and a probe must not pin them.
            try:
                self._client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body=extra,
                    extra_headers=self._headers,
                )
                api = "chat"
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.RateLimitError) as exc:
                raise RuntimeError(self._explain(exc, responded=True)) from None
            except openai.APIStatusError as exc:
                if exc.status_code in (502, 503, 504):  # a gateway or an overloaded server: ask again later
                    raise RuntimeError(self._explain(exc, responded=True)) from None
                api = "completions"  # no chat template (or no chat endpoint)
            except openai.APIError as exc:
                msg = self._explain(exc, responded=False)
                self._set_health(msg)
                raise RuntimeError(msg) from None
            with self._lock:
                self._resolved_api = api
            return api

    # ------------------------------------------------------------------------------------------
    # Errors

    def _scrub(self, text: str) -> str:
        """One line, bounded, with the API key (and any bearer token) blanked out."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        text = " ".join(text.split())
        return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"

    @staticmethod
    def _detail(body: object, fallback: str) -> str:
        """The server's own words from an error body (vLLM: message, FastAPI: detail, TGI: error)."""
        if isinstance(body, Mapping):
            for key in ("message", "detail", "error"):
                value = body.get(key)
                if isinstance(value, Mapping):
                    value = value.get("message", value)
                if value:
                    return str(value)
            return str(dict(body))
        if isinstance(body, str) and body.strip():
            return body.strip()
        return fallback

    @staticmethod
    def _transport_reason(exc: BaseException, timeout_s: float) -> str:
        """What the root cause of a connection failure says, in a few words."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return f"no answer within {timeout_s:g} s"
        seen: set[int] = set()
        cur: BaseException = exc
        while id(cur) not in seen:  # the root cause says most
            seen.add(id(cur))
            if isinstance(cur, socket.gaierror):
                return "unknown host"
            if isinstance(cur, ConnectionRefusedError):
                return "connection refused"
            if isinstance(cur, TimeoutError):
                return f"no answer within {timeout_s:g} s"
            nxt = cur.__cause__ or cur.__context__
            if nxt is None:
                break
            cur = nxt
        text = str(cur).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text:
            return "unknown host"
        return str(cur) or type(cur).__name__

    @staticmethod
    def _is_down(exc: BaseException) -> bool:
        """Whether `exc` (before any response) means the status line should say "unreachable"."""
        import openai

        return isinstance(exc, openai.APIConnectionError) or (
            isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403, 502, 503, 504)
        )

    def _explain(
        self, exc: BaseException, *, responded: bool, extras: Sequence[str] = (), timeout_s: float | None = None
    ) -> str:
        """A clear, secret-free, one-line message for what went wrong talking to the server."""
        import openai

        where = f"the chat server at {self.host}"
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = self._detail(exc.body, exc.message)
            if status in (401, 403):
                hint = "check CHAT_BACKEND_API_KEY" if self._api_key else "it needs CHAT_BACKEND_API_KEY"
                msg = f"{where} refused the API key (HTTP {status}: {detail}); {hint}"
            elif status == 404:
                msg = (f"{where} answered HTTP 404 ({detail}); check CHAT_BACKEND_URL (usually ending in /v1) "
                       f"and CHAT_BACKEND_MODEL ({self.model})")
            elif status in (400, 413, 422):
                msg = f"{where} rejected the request (HTTP {status}: {detail})"
                if extras:
                    what = " and ".join(extras) + (" are engine-specific extras" if len(extras) > 1
                                                   else " is an engine-specific extra")
                    msg += f"; {what} (vLLM and SGLang take them): set top-k 0 and repetition penalty 1 for this server"
            elif status == 429:
                msg = f"{where} is busy (HTTP 429: {detail}); try again"
            else:
                msg = f"{where} failed (HTTP {status}: {detail})"
        elif isinstance(exc, openai.APIConnectionError):
            timeout_s = self.timeout if timeout_s is None else timeout_s
            reason = self._transport_reason(exc, timeout_s)
            if not responded:
                msg = f"{where} is unreachable ({reason})"
            elif isinstance(exc, openai.APITimeoutError) or reason.startswith("no answer"):
                msg = f"{where} went silent mid-reply: nothing for {timeout_s:g} s (CHAT_BACKEND_TIMEOUT)"
            else:
                msg = f"{where} closed the connection before the reply was finished ({reason})"
        elif isinstance(exc, openai.APIError):
            msg = f"{where} reported an error mid-reply: {self._detail(exc.body, exc.message)}"
        else:
            msg = f"talking to {where} failed: {type(exc).__name__}: {exc}"
        return self._scrub(msg)

    # ------------------------------------------------------------------------------------------
    # Streaming

    def _fit_history(
        self, message: str, turns: list[dict[str, str]], system: str | None, api: str, budget: int
    ) -> tuple[list[dict[str, str]], int]:
        """Drop the oldest history (a reply left without its question too) until the estimate fits."""

        def estimate(h: list[dict[str, str]]) -> int:
            if api == "completions":
                return _approx_tokens(plain_dialogue(message, h, system))
            texts = [t["content"] for t in h] + [message] + ([system] if system else [])
            return sum(_approx_tokens(t) + MESSAGE_OVERHEAD_TOKENS for t in texts)

        dropped = 0
        while turns and estimate(turns) > budget:
            turns.pop(0)
            dropped += 1
            while turns and turns[0]["role"] != "user":
                turns.pop(0)
                dropped += 1
        return turns, dropped

    def _request(
        self, api: str, model: str, message: str, turns: list[dict[str, str]], system: str | None,
        params: SamplingParams,
    ) -> tuple[dict[str, Any], tuple[str, ...], list[str]]:
        """(kwargs for create(), the client-side stop strings, the engine-specific extras sent)."""
        kw: dict[str, Any] = {
            "model": model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_headers": self._headers,
        }
        extra: dict[str, Any] = {}
        extras: list[str] = []
        if not params.greedy:
            kw["top_p"] = params.top_p
            if params.seed is not None:
                kw["seed"] = params.seed
            if params.top_k > 0:
                extra["top_k"] = params.top_k
                extras.append("top_k")
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
            extras.append("repetition_penalty")
        if params.min_new_tokens:
            extra["min_tokens"] = params.min_new_tokens  # vLLM's and SGLang's name
            extras.append("min_tokens")
        if api == "chat":
            messages = ([{"role": "system", "content": system}] if system else []) + turns
            kw["messages"] = messages + [{"role": "user", "content": message}]
            if self._chat_template_kwargs:
                extra["chat_template_kwargs"] = self._chat_template_kwargs
            stops: tuple[str, ...] = ()
        else:
            kw["prompt"] = plain_dialogue(message, turns, system)
            stops = PLAIN_STOP_STRINGS
            kw["stop"] = list(stops)
        if extra:
            kw["extra_body"] = extra
        return kw, stops, extras

    def _read(self, call: _Call, api: str, kw: dict[str, Any]) -> None:
        """Reader thread: sends the request and puts ("chunk", chunk, t) / ("end",) / ("error", exc)."""
        out = call.events
        stream = None
        try:
            create = self._client.chat.completions.create if api == "chat" else self._client.completions.create
            stream = create(**kw)
            with call.lock:
                call.response = stream.response
                aborted = call.aborted
            if aborted:
                return
            for chunk in stream:
                out.put(("chunk", chunk, time.perf_counter()))
                if call.aborted:
                    return
            out.put(("end", None, time.perf_counter()))
        except BaseException as exc:  # handed to the consumer, which explains it
            out.put(("error", exc, time.perf_counter()))
        finally:
            with call.lock:
                call.finished = True
            if stream is not None:
                try:
                    stream.close()
                except Exception:
                    pass

    @staticmethod
    def _abort(call: _Call) -> None:
        with call.lock:
            call.aborted = True
            response = None if call.finished else call.response
        if response is not None:
            _shutdown(response)

    def stream_reply(
        self,
        message: str,
        history: Sequence[Mapping[str, str]] = (),
        *,
        system: str | None = None,
        params: SamplingParams = SamplingParams(),
        max_input_tokens: int | None = None,
        stats: ReplyStats | None = None,
        stop_event: threading.Event | None = None,
        reply_prefix: str = "",
    ) -> Iterator[str]:
        """Yield the growing reply (each a prefix of the next), as `ChatBackend.stream_reply`
        (reply_prefix: ValueError, an OpenAI-compatible chat API takes no assistant prefix).

        Setting `stop_event` or closing the generator closes the HTTP stream within ~POLL_S.
        `stats`: prompt_tokens from the server's usage report (0 if it sends none), new_tokens
        (usage, else one per streamed chunk), first_token_s, tokens_per_s, stopped_by,
        trimmed_turns (estimated, see the module docstring). system=None: DEFAULT_SYSTEM in the plain
        format, none with the chat API; "" = none. ValueError for bad input; RuntimeError with a clear
        message when the server is unreachable, refuses the key or a parameter, fails, stalls past the
        timeout, or closes the stream early.
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string")
        if reply_prefix:
            raise ValueError("continuing a reply from a chosen token needs the local engine: the remote chat "
                             "server's API takes no assistant prefix")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {type(system).__name__}")
        budget = self.max_input_tokens if max_input_tokens is None else max_input_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"max_input_tokens must be a positive integer, got {budget!r}")
        turns = check_history(history)
        stats = stats if stats is not None else ReplyStats()
        t0 = time.perf_counter()
        with self._lock:
            self._active += 1
        call = _Call()
        reader: threading.Thread | None = None
        outcome = ""  # how the reply ended, once known
        error: str | None = None
        health: str | None = None  # an "unreachable" reason for check(), if this reply found one
        down_mid_reply = False
        times: list[float] = []
        usage: tuple[int, int] | None = None
        try:
            try:
                model = self._resolve_model()
                api = self._resolve_api()
            except RuntimeError:
                outcome = "error"
                raise
            turns, stats.trimmed_turns = self._fit_history(message, turns, system, api, budget)
            kw, stops, extras = self._request(api, model, message, turns, system, params)
            if stop_event is not None and stop_event.is_set():  # stopped already: send nothing
                outcome = "stopped"
                return
            reader = threading.Thread(target=self._read, args=(call, api, kw), name=READER_THREAD_NAME, daemon=True)
            reader.start()
            raw = ""
            reply = ReplyText(stops, params.min_new_tokens)
            finish: str | None = None
            stop_reason: object = None
            drain_until: float | None = None  # set once we found a stop string ourselves
            while True:
                if stop_event is not None and stop_event.is_set() and drain_until is None:
                    outcome = "stopped"
                    break
                if drain_until is not None and time.perf_counter() > drain_until:
                    break
                try:
                    kind, payload, t = call.events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if kind == "error":
                    if drain_until is not None:
                        break  # the reply is complete already
                    error = self._explain(payload, responded=call.response is not None, extras=extras)
                    outcome = "error"
                    if self._is_down(payload):
                        if call.response is None:
                            health = error
                        else:
                            down_mid_reply = True
                    break
                if kind == "end":
                    if finish is None and drain_until is None:
                        error = self._scrub(
                            f"the chat server at {self.host} ended the stream before the reply was finished "
                            "(no finish reason)"
                        )
                        outcome = "error"
                    break
                chunk = payload
                if getattr(chunk, "usage", None) is not None:
                    usage = (int(chunk.usage.prompt_tokens or 0), int(chunk.usage.completion_tokens or 0))
                for choice in chunk.choices or ():
                    if getattr(choice, "index", 0) != 0:
                        continue
                    piece = choice.delta.content if api == "chat" else choice.text
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
                        # vLLM names the stop string it matched; others just say "stop".
                        stop_reason = getattr(choice, "stop_reason", None)
                    if not piece:
                        continue
                    if drain_until is not None:  # text past the stop: the server ignores stop strings
                        drain_until = 0.0
                        break
                    times.append(t)
                    raw += piece
                    # min_new_tokens: stop strings count once that many pieces (a token each, as
                    # servers stream) have arrived; the server itself ignores them before that.
                    reply.tokens_written(len(times), len(raw))
                    grown = reply.update(raw)
                    if grown is not None:
                        yield grown
                    if reply.hit:
                        # The reply is complete. A server that honours stop strings (but, unlike vLLM,
                        # sends them) finishes right now with its usage report: wait briefly for it.
                        outcome = "stop_string"
                        drain_until = time.perf_counter() + DRAIN_S
                        break
            if not outcome:  # the server ended the reply: on a stop string it matched (and did not send)?
                matched = finish == "stop" and (isinstance(stop_reason, str)
                                                or visible_text(raw, stops, reply.count_from or 0)[1])
                outcome = stopped_by(stop_string=matched, max_tokens=finish == "length")
        finally:
            self._abort(call)
            if reader is not None:
                reader.join(JOIN_TIMEOUT_S)
            with self._lock:
                self._active -= 1
            stats.stopped_by = outcome or "stopped"  # no outcome: the generator was closed
            completed = usage is not None and stats.stopped_by in ("eos", "max_new_tokens", "stop_string")
            stats.prompt_tokens = usage[0] if usage is not None else 0
            stats.new_tokens = usage[1] if completed and usage[1] else len(times)
            stats.total_s = time.perf_counter() - t0
            stats.set_timing(t0, times[0] if times else None, times[-1] if times else None,
                             max(stats.new_tokens, len(times)))
        if health is not None:
            self._set_health(health)
        elif down_mid_reply:
            self._forget_health()
        elif call.response is not None:  # it answered
            self._set_health(None)
        if error is not None:
            raise RuntimeError(error)


__all__ = ["CHAT_BACKEND_APIS", "READER_THREAD_NAME", "RemoteChat"]
