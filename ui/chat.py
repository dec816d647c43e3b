"""The chat view: history, Send/Stop/Retry/Undo/Clear, sampling controls, status line, next-token table.

`build_status(...)` puts the status line above the tabs; `build_chat(...)` lays out the chat tab
and wires it with `/chat`, `/next_token` and `/model_status`. `ChatHandlers` holds the handlers,
plain methods tests call without a server.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from generation import MAX_SEED, LoadedModel, SamplingParams, Settings, preview_tokens, shown_system
from generation.backends import BackendNotReady, BackendSlot, ChatBackend, ReplyStats, throttled
from generation.inside import MAX_CANDIDATES, next_token_candidates

from .common import (
    API_TEXT_CHARS,
    CHAT_GROUP,
    INSPECT_EVENTS,
    LAB_EVENTS,
    PRIVATE,
    ModelSlot,
    as_float,
    as_int,
    as_text,
    content_text,
    dot,
    error_text,
    message_role,
    model_history,
    pct,
    reply_turn,
    session_key,
    typed_api,
)
from .stops import StopRegistry

DEFAULT_NEXT_PROMPT = "The capital of France is"
REMOVED_BY = {None: "kept", "top_k": "removed by top-k", "top_p": "removed by top-p",
              "greedy": "not taken (greedy)"}

# The chat's "max new tokens" slider maximum; /chat refuses more, so no client holds the slot longer.
MAX_NEW_TOKENS = 512
# top-k's cap for /chat and /next_token (the slider stops at 200): beyond a few hundred of a
# vocabulary of a quarter million tokens, top-k filters nothing a sampler would draw; 0 = off.
MAX_TOP_K = 1000

# Sampling settings as each side names them in its messages: the UI by its labels, the API by its
# parameter names.
UI_NAMES = dict(max_new_tokens="max new tokens", temperature="temperature", top_p="top-p", top_k="top-k",
                repetition_penalty="repetition penalty", seed="seed", min_new_tokens="min new tokens")
API_NAMES = {name: name for name in UI_NAMES}

# The notebook's prompts and sampling defaults.
EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Explain self-attention in one paragraph.",
    "Write a haiku about transformers.",
]
DEFAULT_PARAMS = SamplingParams()

# A single message longer than this is refused before it reaches the tokenizer: generation trims
# *history* to the token budget, but one giant message cannot be trimmed into something sensible.
# ~8 characters per token is generous for English, so this never refuses a message that fits.
CHARS_PER_TOKEN_LIMIT = 8

# A streamed reply reaches the browser at most this often (the newest text each time): every
# update costs the server a worker-thread hop, gradio's diff and an SSE message, and each browser
# a re-render of the message. 30 users at once: rounds ~4% shorter than with every token sent.
STREAM_INTERVAL_S = 0.1
# Undo and Clear wait this long at most for the reply they stop to end (within one decode step,
# as a rule), so that its last update reaches the page before their shorter chat, not after it.
REPLY_END_WAIT_S = 10.0
BUSY_MESSAGE = "A reply is still being written: wait for it or press Stop"
# After a send is taken, in the page: clear the box only if it still holds the sent text. The
# server answers after a queue that a class can make long, and a student may be typing the next
# question by then; clearing from the server would throw that away.
CLEAR_IF_SENT = "(box, sent) => (sent !== '' && box === sent) ? '' : box"

# A reply's outputs (chatbot, status line, user stats, reply count) left as they are. gradio ends a
# generator that yielded nothing with None for every output, which empties the chat, so each reply
# generator yields at least once: this, where it has nothing to show.
NO_CHANGE = (gr.skip(), gr.skip(), gr.skip(), gr.skip())


def at_least_once(updates: Iterator[Any]) -> Iterator[Any]:
    """`updates`, or NO_CHANGE when there are none (a reply refused or ended before its first token)."""
    empty = True
    for update in updates:
        empty = False
        yield update
    if empty:
        yield NO_CHANGE


def sampling_params(
    max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any, seed: Any,
    names: dict[str, str] = UI_NAMES, min_new_tokens: Any = 0,
) -> SamplingParams:
    """Widget or API values -> validated SamplingParams (ValueError naming the setting by `names`
    otherwise). A negative or empty seed means a random one; the floats' ranges are the library's."""
    n = names
    seed_val = None if seed is None or seed == "" else as_int(seed, n["seed"], hi=MAX_SEED)
    most = as_int(max_new_tokens, n["max_new_tokens"], 1, MAX_NEW_TOKENS)
    least = as_int(min_new_tokens, n["min_new_tokens"], 0, MAX_NEW_TOKENS)
    if least > most:
        raise ValueError(f"{n['min_new_tokens']} ({least}) cannot be more than {n['max_new_tokens']} ({most})")
    return SamplingParams(
        max_new_tokens=most,
        min_new_tokens=least,
        temperature=as_float(temperature, n["temperature"]),
        top_p=as_float(top_p, n["top_p"]),
        top_k=as_int(top_k, n["top_k"], 0, MAX_TOP_K),
        repetition_penalty=as_float(repetition_penalty, n["repetition_penalty"]),
        seed=None if seed_val is None or seed_val < 0 else seed_val,
    )


def token_preview_html(lm: LoadedModel | None, text: str, *, sent: bool = False, remote: bool = False) -> str:
    """The message as the model's tokenizer cuts it: alternating coloured pieces and a count.

    remote: the chat is served by another machine; the pieces shown are the local model's (loaded
    for the inside views), which may cut text differently from the server's model.
    """
    if not text:
        return "<div class='token-preview'><span class='meta'>Type a message to see its tokens.</span></div>"
    if lm is None:
        if remote:
            return ("<div class='token-preview'><span class='meta'>The chat is served remotely; the local "
                    "model's tokenizer shows here once the inside views have loaded it.</span></div>")
        return "<div class='token-preview'><span class='meta'>The tokenizer arrives with the model …</span></div>"
    p = preview_tokens(lm.tokenizer, text)
    pieces = []
    for i, piece in enumerate(p.pieces):
        shown = piece.replace("\n", "↵")
        pieces.append(
            f"<span class='tok t{i % 2}' title='id {p.ids[i]}'>{html.escape(shown)}</span>"
        )
    head = "Just sent" if sent else "Your message"
    if remote:
        head += f" (as {html.escape(lm.model_id)}, the local model, cuts it)"
    more = " (preview shows the first ones)" if p.truncated else ""
    return (
        f"<div class='token-preview'><span class='meta'>{head}: <b>{len(p.ids) if not p.truncated else str(len(p.ids)) + '+'}"
        f"</b> tokens{more} · hover a token for its id</span><br>{''.join(pieces)}</div>"
    )


def stats_line(stats: ReplyStats, number: int) -> str:
    """The last reply's speed, length, time to first token and why it stopped, for the status line.

    `number` counts this session's finished replies: it tells which reply the figures are about,
    and a browser (or a test) sees a reply end when it changes."""
    return (
        f"last reply (#{number}): **{stats.tokens_per_s:.1f} tokens/s** ({stats.new_tokens} tokens, "
        f"first token after {stats.first_token_s:.2f} s, stopped by {stats.stopped_by})"
    )


def next_token_table(nt: Any) -> list[list[str]]:
    """NextToken -> table rows: token, model p, after temperature, chance to be drawn, status."""
    rows = [[repr(c.token)[1:-1], pct(c.prob), pct(c.prob_temperature), pct(c.sampling_prob),
             REMOVED_BY.get(c.removed_by, str(c.removed_by))] for c in nt.candidates]
    rows.append([f"(the other {nt.vocab_size - len(nt.candidates):,} tokens)", pct(nt.rest_prob),
                 pct(nt.rest_prob_temperature), pct(nt.rest_sampling_prob), ""])
    return rows


def backend_status(backend: BackendSlot, model: ModelSlot) -> str:
    """The backend part of the status line (remote: host, model, reachable or why not)."""
    remote = backend.remote
    if remote is None:
        return model.status()
    reason = remote.check()
    chat = (f"{dot('#16a34a')} chat: **{html.escape(remote.describe())}**" if reason is None else
            f"{dot('#dc2626')} chat: **{html.escape(remote.describe())}**: {html.escape(reason)}")
    return f"{chat} · {model.status()}"


def backend_or_error(backend: BackendSlot) -> ChatBackend:
    """The backend to stream from, or gr.Error saying why there is none yet."""
    try:
        return backend.get()
    except BackendNotReady as exc:
        raise gr.Error(str(exc), title="Model not ready") from None


class ChatHandlers:
    """The chat's event handlers: settings, the shared model slot, the chat backend and
    per-session stop events."""

    def __init__(self, settings: Settings, model: ModelSlot) -> None:
        self.settings = settings
        self.model = model
        self.backend = BackendSlot(settings, model)
        self.stops = StopRegistry()

    def status_tick(self, user_stats: str) -> tuple[str, Any]:
        """Timer: the status line. Local: stops once loading is over (ready or failed); a remote
        backend is watched on (its reachability can change), as is a local model that is loading."""
        line = self.status_markdown(user_stats)
        if self.backend.is_remote:
            return line, gr.Timer(5.0, active=True)
        done = self.model.ready or self.model.error is not None
        if done:
            self.backend.engine()  # start the decode loop now rather than on the first user's Send
        return line, gr.Timer(active=not done)

    def status_markdown(self, user_stats: str = "") -> str:
        """The status line: the backend's (and model's) state, plus this user's last-reply stats."""
        line = backend_status(self.backend, self.model)
        return f"{line} · {user_stats}" if user_stats and self.backend.ready() else line

    def preview(self, text: str) -> Any:
        """Tokenization preview of the message being typed (kept when the box is cleared by Send)."""
        if not text:
            return gr.skip()
        try:
            return token_preview_html(self.model.lm, text, remote=self.backend.is_remote)
        except ValueError as exc:
            return f"<div class='token-preview'><span class='meta'>{html.escape(error_text(exc))}</span></div>"

    def _check_message(self, message: Any) -> str:
        message = as_text(message, "message").strip()
        if not message:
            raise ValueError("Type a message first: an empty message has nothing to answer.")
        limit = self.settings.max_input_tokens * CHARS_PER_TOKEN_LIMIT
        if len(message) > limit:
            raise ValueError(
                f"That message is {len(message):,} characters long; the model reads at most "
                f"{self.settings.max_input_tokens} tokens (about {limit:,} characters). Please shorten it."
            )
        return message

    def user_turn(self, message: str, history: list[Any], request: gr.Request) -> tuple[Any, Any, Any]:
        """Send: validate, append the user turn and register its reply (`stops`), which the reply
        step chained after it writes. Returns (sent, history, preview): `sent` is the message as it
        was sent ("" when refused), for the page to clear the box only if it still holds that text
        (`CLEAR_IF_SENT`).

        Refused (gr.Warning, text kept) while this session's previous reply is still being written.
        """
        refused = ("", gr.skip(), gr.skip())
        if not self.backend.ready():
            gr.Warning(self.backend.not_ready_message(), title="Model loading")
            return refused
        try:
            text = self._check_message(message or "")
        except ValueError as exc:
            gr.Warning(error_text(exc))
            return refused
        history = list(history or []) + [{"role": "user", "content": text}]
        if self.stops.begin(session_key(request), turn=reply_turn(history)) is None:
            gr.Warning(BUSY_MESSAGE)  # the typed text stays in the box
            return refused
        preview = token_preview_html(self.model.lm, text, sent=True, remote=self.backend.is_remote)
        return message, history, preview

    def bot_turn(
        self,
        history: list[Any],
        replies: int,
        system: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: Any,
        min_new_tokens: Any,
        request: gr.Request,
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Stream the assistant's reply to the last user turn into the chatbot, if this session has
        one registered (by Send, Retry or an edit) for a step to write; `replies` counts this
        session's finished replies (the last update carries it, one up)."""
        key = session_key(request)
        with self.stops.streaming(key, turn=reply_turn(history)) as stop:
            if stop is None:  # the Send was refused, or the reply stopped before it began
                yield NO_CHANGE
                return
            yield from at_least_once(self._bot_turn(history, replies, system, max_new_tokens, temperature, top_p,
                                                    top_k, repetition_penalty, seed, min_new_tokens, key, stop))

    def continue_turn(self, prefix: str, history: list[Any], replies: int, system: str, max_new_tokens: float,
                      temperature: float, top_p: float, top_k: float, repetition_penalty: float, seed: Any,
                      min_new_tokens: Any, request: gr.Request) -> Iterator[tuple[Any, Any, Any]]:
        """Stream a new reply to the last user turn that begins with `prefix` (a branch of the last
        reply: its start, then another token than the model wrote), if this session has a branch
        registered (`TokensHandlers.branch_start`); the history's last reply is replaced."""
        history = list(history or [])
        while history and message_role(history[-1]) == "assistant":
            history.pop()
        key = session_key(request)
        with self.stops.streaming(key, kind="branch", turn=reply_turn(history)) as stop:
            if stop is None:
                yield NO_CHANGE
                return
            yield from at_least_once(self._bot_turn(history, replies, system, max_new_tokens, temperature, top_p,
                                                    top_k, repetition_penalty, seed, min_new_tokens, key, stop,
                                                    prefix=prefix or ""))

    def _bot_turn(self, history, replies, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                  min_new_tokens, key: str, stop: threading.Event, prefix: str = "") -> Iterator[tuple[Any, Any, Any]]:
        if not history:
            return
        turns = model_history(history)
        if not turns or turns[-1]["role"] != "user":
            return
        try:
            backend = backend_or_error(self.backend)
        except gr.Error as exc:
            gr.Warning(error_text(exc), title="Model loading")
            return
        try:
            params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                                     min_new_tokens=min_new_tokens)
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Invalid sampling settings")
            return
        stats = ReplyStats()
        history = list(history)
        reply_at = len(history)
        try:
            gen = backend.stream_reply(
                turns[-1]["content"],
                turns[:-1],
                system=(system or "").strip() or None,
                params=params,
                max_input_tokens=self.settings.max_input_tokens,
                stats=stats,
                stop_event=stop,
                **({"reply_prefix": prefix} if prefix else {}),
            )
            try:
                for text in throttled(gen, STREAM_INTERVAL_S):
                    if stop.is_set():  # Stop, Undo or Clear own the chat now: not one more update
                        break
                    history[reply_at:] = [{"role": "assistant", "content": text}]
                    yield history, gr.skip(), gr.skip(), gr.skip()
            finally:
                gen.close()  # ends the request within one decode step
            stopped = stop.is_set()
        except (ValueError, RuntimeError) as exc:  # bad input / generation failed: say so, keep the history
            gr.Warning(error_text(exc), title="No reply")
            return
        finally:
            # the reply has ended: before its last update, so that a Send right after it is not refused
            self.stops.done(key, stop)
        if stopped:
            # Stop, Undo or Clear: those handlers own the chat now and cancel this event. Gradio
            # sends a generator's last values again when it ends, and that message can land after
            # theirs if the cancel comes later (restoring a cleared chat, or counting a stopped
            # reply as the next one): so the last values are "no change" for every output.
            yield NO_CHANGE
            return
        if reply_at == len(history) or not content_text(history[reply_at].get("content")).strip():
            # nothing visible (no token, or only spaces and newlines before the turn ended): say so
            # rather than leave a blank bubble
            history[reply_at:] = [{"role": "assistant", "content": "*(no text generated)*"}]
        number = (replies or 0) + 1
        user_stats = stats_line(stats, number)
        yield history, self.status_markdown(user_stats), user_stats, number

    def stop(self, request: gr.Request) -> None:
        """Stop button: halt this session's generation at the next token (cancels= does the rest)."""
        self.stops.stop(session_key(request))

    def retry(self, history: list[Any], request: gr.Request) -> Any:
        """Drop the last reply so the last user turn is answered again (refused while one is written)."""
        history = list(history or [])
        while history and message_role(history[-1]) == "assistant":
            history.pop()
        if not history:
            gr.Warning("Nothing to retry yet.")
            return gr.skip()
        if self.stops.begin(session_key(request), turn=reply_turn(history)) is None:
            gr.Warning(BUSY_MESSAGE)
            return gr.skip()
        return history

    def edit(self, history: list[Any], evt: gr.EditData, request: gr.Request) -> Any:
        """A sent message was edited: the chat from it on is replaced by the edited message, which
        is answered again (refused, the chat restored, while a reply is being written)."""
        history = list(history or [])
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(index, int) or not 0 <= index < len(history) or message_role(history[index]) != "user":
            return gr.skip()
        text = content_text(evt.value).strip()
        if not text:
            gr.Warning("An empty message has nothing to answer: the message is kept as it was.")
            history[index] = {"role": "user", "content": content_text(evt.previous_value)}
            return history
        edited = history[:index] + [{"role": "user", "content": text}]
        if self.stops.begin(session_key(request), turn=reply_turn(edited)) is None:
            gr.Warning(BUSY_MESSAGE)
            history[index] = {"role": "user", "content": content_text(evt.previous_value)}
            return history
        return edited

    def undo(self, history: list[Any], request: gr.Request) -> tuple[list[Any], Any]:
        """Undo: stop this session's reply, remove the last exchange and put the user's message back
        in the box. The reply being written is stopped, and has ended, before the shorter chat is
        returned: its last update reaches the page first (a later one would bring the undone
        exchange back)."""
        self.stops.stop(session_key(request), wait_s=REPLY_END_WAIT_S)
        history = list(history or [])
        while history and message_role(history[-1]) == "assistant":
            history.pop()
        if not history:
            return history, gr.skip()
        last = history.pop()
        return history, content_text(last.get("content") if isinstance(last, dict) else last.content)

    def clear(self, request: gr.Request) -> tuple[list[Any], str]:
        """Clear: stop this session's reply, then empty the chat and its stats line (in that order,
        as for Undo)."""
        self.stops.stop(session_key(request), wait_s=REPLY_END_WAIT_S)
        return [], ""

    def chat_api(
        self,
        message: str,
        system: str = "",
        max_new_tokens: int = DEFAULT_PARAMS.max_new_tokens,
        temperature: float = DEFAULT_PARAMS.temperature,
        top_p: float = DEFAULT_PARAMS.top_p,
        top_k: int = DEFAULT_PARAMS.top_k,
        repetition_penalty: float = DEFAULT_PARAMS.repetition_penalty,
        seed: int = -1,
        min_new_tokens: int = 0,
    ) -> Iterator[str]:
        """API /chat: one message (plus optional system prompt and sampling settings) -> the reply.

        Streams the growing reply; `client.predict` returns the final one. message, system: text;
        max_new_tokens 1-512; temperature 0-2 (0 = greedy); top_p in (0, 1]; top_k 0-1000 (0 = off);
        repetition_penalty 1-2; seed: an integer, < 0 = random; min_new_tokens 0-max_new_tokens:
        the reply cannot end (end of sequence, end of turn) before that many tokens. A cancelled job closes this
        generator, which stops the worker at the next token. Errors (model loading, empty or
        oversized message, bad values) come back as a gr.Error naming the input.
        """
        yield from self._api_stream(message, system, "", max_new_tokens, temperature, top_p, top_k,
                                    repetition_penalty, seed, min_new_tokens)

    def continue_api(
        self,
        message: str,
        reply_prefix: str,
        system: str = "",
        max_new_tokens: int = DEFAULT_PARAMS.max_new_tokens,
        temperature: float = DEFAULT_PARAMS.temperature,
        top_p: float = DEFAULT_PARAMS.top_p,
        top_k: int = DEFAULT_PARAMS.top_k,
        repetition_penalty: float = DEFAULT_PARAMS.repetition_penalty,
        seed: int = -1,
    ) -> Iterator[str]:
        """API /continue: as /chat, but the reply begins with `reply_prefix` (text, up to 10,000
        characters), which the model continues: the start of a reply, then the token you would
        have it write instead. Streams the growing reply (the prefix first); max_new_tokens counts
        the tokens after the prefix. Served by the same engine as /chat (the local one: a remote
        chat server takes no prefix, a gr.Error says so)."""
        yield from self._api_stream(message, system, reply_prefix, max_new_tokens, temperature, top_p, top_k,
                                    repetition_penalty, seed, 0)

    def _api_stream(self, message, system, reply_prefix, max_new_tokens, temperature, top_p, top_k,
                    repetition_penalty, seed, min_new_tokens) -> Iterator[str]:
        try:
            text = self._check_message(message)
            system = as_text(system, "system", none_ok=True, max_chars=API_TEXT_CHARS).strip() or None
            prefix = as_text(reply_prefix, "reply_prefix", none_ok=True, max_chars=API_TEXT_CHARS)
            params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, API_NAMES,
                                     min_new_tokens)
            backend = backend_or_error(self.backend)
            gen = backend.stream_reply(text, (), system=system, params=params,
                                       max_input_tokens=self.settings.max_input_tokens,
                                       **({"reply_prefix": prefix} if prefix.strip() else {}))
            reply = None
            try:  # closing this generator (a cancelled job) closes the backend's, which ends the request
                for reply in throttled(gen, STREAM_INTERVAL_S):
                    yield reply
            finally:
                gen.close()
            if reply is None:
                yield ""  # nothing generated: the result is still a string
        except (ValueError, RuntimeError) as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None

    def _next_token(self, prompt: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any,
                    k: int = 10, names: dict[str, str] = UI_NAMES) -> Any:
        prompt = as_text(prompt, "prompt", none_ok=True, max_chars=API_TEXT_CHARS)
        params = sampling_params(1, temperature, top_p, top_k, repetition_penalty, -1, names)
        lm = self.model.require()
        if not prompt.strip():
            raise ValueError("Type a text whose next token you want to see.")
        return next_token_candidates(lm, prompt, params, k=k)

    def next_token_update(self, prompt: str, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any):
        """UI: next-token table for the chat tab's current sampling settings."""
        try:
            nt = self._next_token(prompt, temperature, top_p, top_k, repetition_penalty)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Next token")
            return gr.skip(), gr.skip()
        head = (f"**temperature {nt.temperature:g} · top-p {nt.top_p:g} · top-k {nt.top_k or 'off'} · "
                f"repetition penalty {nt.repetition_penalty:g}** ({nt.prompt_tokens} prompt tokens).")
        return next_token_table(nt), f"{head} {html.escape(nt.notice)}".strip()

    def next_token_follow(self, prompt: str, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any):
        """UI: a sampling slider moved: the table follows, if the model is there (a slider never
        starts loading a lazy local model, nor warns that it is loading; Show does)."""
        if not self.model.ready:
            return gr.skip(), gr.skip()
        return self.next_token_update(prompt, temperature, top_p, top_k, repetition_penalty)

    def next_token_api(
        self,
        prompt: str,
        temperature: float = DEFAULT_PARAMS.temperature,
        top_p: float = DEFAULT_PARAMS.top_p,
        top_k: int = DEFAULT_PARAMS.top_k,
        repetition_penalty: float = DEFAULT_PARAMS.repetition_penalty,
        k: int = 10,
    ) -> list[dict]:
        """API /next_token: the k most likely next tokens after `prompt` (text, up to 10,000 characters),
        each {token, token_id, prob, prob_temperature, sampling_prob, removed_by} (removed_by: null,
        "top_k", "top_p" or "greedy"). k 1-1000; the sampling settings as for /chat."""
        try:
            prompt = as_text(prompt, "prompt", max_chars=API_TEXT_CHARS)  # null too is refused here
            nt = self._next_token(prompt, temperature, top_p, top_k, repetition_penalty,
                                  k=as_int(k, "k", 1, MAX_CANDIDATES), names=API_NAMES)
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        return [dict(token=c.token, token_id=c.token_id, prob=c.prob, prob_temperature=c.prob_temperature,
                     sampling_prob=c.sampling_prob, removed_by=c.removed_by) for c in nt.candidates]

    def model_status_api(self) -> dict:
        """API /model_status: {"ready", "error", "summary", "generating", "waiting", "backend"}
        (tests and benchmarks poll it).

        ready: a chat can be answered (local: the model is loaded; remote: the server answers).
        generating: replies being generated right now (all users), so a client can see Stop or a
        cancelled job really free its row; waiting: requests held until a row frees.
        summary: the local model (None until loaded); backend: "local engine ..." or the remote
        server's host and model (never its key); fast_decode: the local engine's fast CPU decode,
        "on: ..." or "off: why" (None for a remote server); tokens_generated: tokens the local
        engine has written since it started, all users together (None for a remote server).
        """
        lm = self.model.lm
        remote = self.backend.remote
        error = self.model.error if remote is None else remote.check()
        ready = lm is not None if remote is None else error is None
        engine = self.backend.engine() if remote is None else None
        return {"ready": ready, "error": error, "summary": lm.summary() if lm else None,
                "generating": self.backend.active(), "waiting": self.backend.waiting(),
                "backend": remote.describe() if remote is not None else (engine.describe() if engine else "local"),
                "fast_decode": engine.fast_status if engine is not None else None,
                "tokens_generated": engine.counters["tokens"] if engine is not None else None}


@dataclass
class StatusBar:
    """The status line above the tabs, this user's last-reply stats and the loading timer."""

    line: gr.Markdown
    user_stats: gr.State
    replies: gr.State  # this session's finished replies (never reset: Clear keeps counting)
    timer: gr.Timer


@dataclass
class ChatView:
    """What other views may read from the chat: its history and the events that write a reply."""

    chatbot: gr.Chatbot
    system: gr.Textbox  # the system prompt the replies were written under
    replies: list[Any]  # the Send, Retry and Edit chains: each ends when a reply is complete
    sampling: list[Any]  # system prompt, then the sampling widgets, in bot_turn's order
    bot: dict[str, Any]  # the reply event's settings (outputs, concurrency): a branch's reply streams the same way
    stoppers: list[Any]  # Stop, Undo, Clear: they set the stop event; a reply chain added later cancels on them too


def build_status(handlers: ChatHandlers) -> StatusBar:
    """The status line (model, 4-bit, device, weights; this user's last reply) and its timer."""
    line = gr.Markdown(handlers.status_markdown(), elem_id="status-line")
    return StatusBar(line=line, user_stats=gr.State(""), replies=gr.State(0), timer=gr.Timer(1.0))


def build_chat(demo: gr.Blocks, handlers: ChatHandlers, bar: StatusBar) -> ChatView:
    """Lay out the chat inside the current Blocks/Tab and wire it with /chat, /next_token, /model_status."""
    state = handlers
    status, user_stats, timer = bar.line, bar.user_stats, bar.timer
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Chat", height=430, elem_id="chatbot", buttons=["copy"], editable="user",
                placeholder="The model is a small *base* model: it continues text more than it "
                "follows instructions. Short questions work best.",
            )
            with gr.Row():
                msg = gr.Textbox(
                    placeholder="Type a message and press Enter", show_label=False, scale=5,
                    lines=1, max_lines=6, elem_id="chat-input", autofocus=False,
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
            with gr.Row():
                stop = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
                retry = gr.Button("↻ Retry", elem_id="retry-btn")
                undo = gr.Button("↩ Undo", elem_id="undo-btn")
                clear = gr.Button("✕ Clear", elem_id="clear-btn")
            gr.Examples(EXAMPLE_PROMPTS, inputs=[msg], label="Try one of these", api_visibility="private")
            tokens = gr.HTML(token_preview_html(None, ""), label="Tokenization", elem_id="token-preview")
            with gr.Accordion("What comes next? Next-token probabilities under these sliders", open=True):
                with gr.Row():
                    next_prompt = gr.Textbox(DEFAULT_NEXT_PROMPT, show_label=False, scale=4,
                                             elem_id="next-prompt")
                    next_btn = gr.Button("Show", scale=1, elem_id="next-btn")
                next_md = gr.Markdown("Press *Show*, then move temperature, top-p or top-k: "
                                      "the table follows.", elem_id="next-notes")
                next_table = gr.Dataframe(
                    headers=["token", "model p", "after temperature", "chance to be drawn", "status"],
                    show_label=False, interactive=False, elem_id="next-table",
                )
        with gr.Column(scale=1, min_width=280):
            system = gr.Textbox(shown_system(state.settings), label="System prompt", lines=3, max_lines=16,
                                placeholder="empty: the model's default", elem_id="system-prompt",
                                info="the text before the conversation; a base model answers best "
                                     "after a few example exchanges")
            temperature = gr.Slider(0.0, 2.0, value=DEFAULT_PARAMS.temperature, step=0.05,
                                    label="temperature", info="0 = always the most likely token",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=DEFAULT_PARAMS.top_p, step=0.05, label="top-p", elem_id="top-p")
            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_PARAMS.max_new_tokens, step=1,
                                label="max new tokens", elem_id="max-new")
            top_k = gr.Slider(0, 200, value=DEFAULT_PARAMS.top_k, step=1, label="top-k (0 = off)", elem_id="top-k")
            rep = gr.Slider(1.0, 2.0, value=DEFAULT_PARAMS.repetition_penalty, step=0.05,
                            label="repetition penalty")
            seed_chat = gr.Number(-1, precision=0, label="seed (-1 = random)", elem_id="chat-seed")
            min_new = gr.Slider(0, MAX_NEW_TOKENS, value=DEFAULT_PARAMS.min_new_tokens, step=1,
                                label="min new tokens", elem_id="min-new",
                                info="the reply cannot end before (0 = the model decides)")
    sent_text = gr.Textbox(visible=False)  # the message a send took, held in the page for CLEAR_IF_SENT

    private = PRIVATE
    lab_kw = LAB_EVENTS  # turn bookkeeping is instant: it must not wait for a chat slot
    sampling = [system, max_new, temperature, top_p, top_k, rep, seed_chat, min_new]
    bot = dict(fn=state.bot_turn, inputs=[chatbot, bar.replies, *sampling],
               outputs=[chatbot, status, user_stats, bar.replies],
               show_progress="minimal", concurrency_id=CHAT_GROUP,
               concurrency_limit=state.settings.chat_concurrency, **private)
    # Every Send reaches user_turn, which refuses what it must with a warning (a double press: one
    # reply and "still being written"). With gradio's default ("once") the page drops a Send made
    # while the previous one is still at the server, silently, and a warning arrives before its
    # event counts as ended: a student retyping after "Type a message first" on a busy server saw
    # nothing happen.
    sent = gr.on([msg.submit, send.click], state.user_turn, [msg, chatbot], [sent_text, chatbot, tokens],
                 show_progress="hidden", trigger_mode="multiple", **lab_kw, **private).then(
        None, [msg, sent_text], [msg], js=CLEAR_IF_SENT, queue=False, **private).then(**bot)
    retried = retry.click(state.retry, [chatbot], [chatbot], show_progress="hidden",
                          **lab_kw, **private).then(**bot)
    # A sent message edited in place (the pencil under it): the chat from there is answered again.
    edited = chatbot.edit(state.edit, [chatbot], [chatbot], show_progress="hidden",
                          **lab_kw, **private).then(**bot)
    # Stop sets this session's stop event at once (queue=False: not behind anything) and cancels.
    stop.click(state.stop, None, None, queue=False, cancels=[sent, retried, edited], **private)
    # Undo and Clear cancel the reply too, and stop it themselves and wait for its end before they
    # change the chat: its worker sends nothing after them, and a reply cancelled while still
    # queued does not leave this session marked as generating.
    undo.click(state.undo, [chatbot], [chatbot, msg], queue=False, cancels=[sent, retried, edited], **private)
    clear.click(state.clear, None, [chatbot, user_stats], queue=False, cancels=[sent, retried, edited], **private)
    msg.change(state.preview, [msg], [tokens], queue=False, trigger_mode="always_last",
               show_progress="hidden", **private)
    # On page load too: the Markdown's initial value is frozen at build time ("Loading ...").
    gr.on([demo.load, timer.tick], state.status_tick, [user_stats], [status, timer], queue=False,
          show_progress="hidden", **private)
    next_inputs = [next_prompt, temperature, top_p, top_k, rep]
    gr.on([next_btn.click, next_prompt.submit], state.next_token_update, next_inputs, [next_table, next_md],
          show_progress="minimal", trigger_mode="always_last", **INSPECT_EVENTS, **private)
    gr.on([temperature.release, top_p.release, top_k.release, rep.release], state.next_token_follow, next_inputs,
          [next_table, next_md], show_progress="minimal", trigger_mode="always_last", **INSPECT_EVENTS, **private)
    gr.api(typed_api(state.next_token_api), api_name="next_token", **INSPECT_EVENTS)
    gr.api(typed_api(state.chat_api), api_name="chat", concurrency_id=CHAT_GROUP,
           concurrency_limit=state.settings.chat_concurrency)
    gr.api(typed_api(state.continue_api), api_name="continue", concurrency_id=CHAT_GROUP,
           concurrency_limit=state.settings.chat_concurrency)
    gr.api(typed_api(state.model_status_api), api_name="model_status", queue=False)
    return ChatView(chatbot=chatbot, system=system, replies=[sent, retried, edited], sampling=sampling, bot=bot,
                    stoppers=[stop, undo, clear])
