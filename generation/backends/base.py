"""The one interface the chat streams from, whoever answers (the local engine or a remote server),
and the bookkeeping every backend shares: what part of a reply to show, stop strings, how a reply
ended, its stats.

The UI (Chat tab, `/chat`, Stop, Retry, the stats line) only ever calls `ChatBackend.stream_reply`
and reads `ReplyStats`; which backend is behind it is a deployment choice (`Settings`,
`make_backend`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..sampling import SamplingParams

__all__ = ["ChatBackend", "ReplyStats", "ReplyText", "stopped_by", "throttled", "visible_text"]


@dataclass
class ReplyStats:
    """Filled in while a reply streams; final once the generator is exhausted or closed.

    first_token_s: seconds from the call to the first generated token (prefill included).
    tokens_per_s: decode speed, (new_tokens - 1) / (time of last token - time of first token).
    stopped_by: "eos" | "stop_string" | "max_new_tokens" | "stopped" (closed / stop_event) | "error".
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    tokens_per_s: float = 0.0
    trimmed_turns: int = 0
    stopped_by: str = ""

    def set_timing(self, t0: float, first: float | None, last: float | None, tokens: int) -> None:
        """first_token_s and tokens_per_s from the call's start t0 and the times of the first and
        last of `tokens` generated tokens (None: none came)."""
        if first is not None:
            self.first_token_s = first - t0
        if tokens > 1 and first is not None and last is not None and last > first:
            self.tokens_per_s = (tokens - 1) / (last - first)


@runtime_checkable
class ChatBackend(Protocol):
    """Streams chat replies; shared by every user, so it must be safe to call from many threads."""

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
        """Yield the growing reply, each a prefix of the next: the prompt, special tokens and any
        (partial) stop string never appear. reply_prefix: the reply begins with this text, which
        the model continues (a backend that cannot raises ValueError).

        Setting `stop_event` or closing the generator ends the request within one step; `stats`
        is filled in. max_input_tokens None = Settings' MAX_INPUT_TOKENS. ValueError for bad
        input, RuntimeError when generation itself fails.
        """
        ...

    def describe(self) -> str:
        """A short, secret-free description for the status line (e.g. "local engine, batch <= 32")."""
        ...

    def active(self) -> int:
        """Requests being generated right now (all users)."""
        ...


def stopped_by(*, error: bool = False, stopped: bool = False, stop_string: bool = False,
               max_tokens: bool = False) -> str:
    """How a reply ended (ReplyStats.stopped_by), the first that applies: "error", "stopped" (Stop,
    a closed consumer), "stop_string", "max_new_tokens", else "eos"."""
    if error:
        return "error"
    if stopped:
        return "stopped"
    if stop_string:
        return "stop_string"
    if max_tokens:
        return "max_new_tokens"
    return "eos"


def visible_text(text: str, stop_strings: Sequence[str], search_from: int = 0) -> tuple[str, bool]:
    """Return (the part of the raw reply `text` safe to show, whether a stop string occurred).

    Cuts at the first complete stop string; while streaming, holds back a tail that could still
    become a stop string (e.g. "\\nUs") and trailing whitespace, so what is shown only ever grows.
    Leading whitespace is dropped, after the search: a reply that opens with "\nUser:" is a stop,
    not a user line to show. At the end of a reply the held-back tail is simply never shown.
    Only stop strings that begin at `search_from` or later count (min_new_tokens: the text of the
    first tokens is the reply whatever it holds; past the end of `text`: none counts yet).
    """
    cut = len(text)
    hit = False
    for s in stop_strings:
        i = text.find(s, search_from)
        if i != -1 and i < cut:
            cut, hit = i, True
    text = text[:cut]
    if not hit:
        hold = 0
        for s in stop_strings:
            for n in range(min(len(s) - 1, len(text) - search_from), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        text = text[: len(text) - hold]
    return text.strip(), hit


class ReplyText:
    """One streaming reply's stop strings and what of it has been shown.

    With min_new_tokens, the text of the first tokens is the reply whatever it holds: stop strings
    count only from where that text ends (`count_from`, None until then), as transformers'
    min_new_tokens and vLLM's min_tokens hold back end-of-sequence. The producer says how many
    tokens are written (`tokens_written`); the consumer asks for the grown visible text (`update`).
    """

    def __init__(self, stop_strings: Sequence[str], min_new_tokens: int = 0) -> None:
        self.stop_strings = tuple(stop_strings)
        self.min_new_tokens = min_new_tokens
        self.count_from: int | None = 0 if min_new_tokens == 0 else None
        self.tail = max((len(s) for s in self.stop_strings), default=0)  # the longest stop string
        self.shown = ""
        self.hit = False

    def tokens_written(self, tokens: int, text_chars: int) -> None:
        """`tokens` tokens, `text_chars` characters of raw text so far: stop strings count from
        the end of the first min_new_tokens tokens' text."""
        if self.count_from is None and tokens >= self.min_new_tokens:
            self.count_from = text_chars

    def stop_in(self, text: str, start: int = 0) -> bool:
        """Whether a stop string that counts begins in `text` at `start` or later."""
        if self.count_from is None:
            return False
        start = max(start, self.count_from)
        return any(text.find(s, start) != -1 for s in self.stop_strings)

    def update(self, raw: str) -> str | None:
        """The visible part of the raw reply so far if it grew since the last call, else None;
        `hit` says whether a stop string ended it."""
        start = self.count_from
        text, self.hit = visible_text(raw, self.stop_strings, len(raw) if start is None else start)
        if len(text) > len(self.shown):
            self.shown = text
            return text
        return None


def throttled(replies: Iterable[str], min_interval_s: float) -> Iterator[str]:
    """The growing replies of a stream at most once per min_interval_s (the newest one each time),
    and always the last one. For a web UI, where every update costs the server more than a token."""
    last = -math.inf
    pending = None
    for text in replies:
        now = time.monotonic()
        if now - last >= min_interval_s:
            last, pending = now, None
            yield text
        else:
            pending = text
    if pending is not None:
        yield pending
