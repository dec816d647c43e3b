"""Streaming replies: generation in a worker thread, text through TextIteratorStreamer.

Each call owns its streamer, stop event and stopping criteria; the model is only read, so several
callers may stream at once. Closing the generator (or setting `stop_event`) ends the worker
within one token and joins it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .backends.base import ReplyStats, visible_text
from .model import LoadedModel
from .prompt import build_prompt
from .sampling import SamplingParams

# How long the consumer waits on the streamer before checking that the worker is still alive.
POLL_S = 0.5
# Bound for joining the worker once the consumer is done (it stops within one decode step).
JOIN_TIMEOUT_S = 30.0


# Every generation worker thread has this name, so a server can count the live ones.
WORKER_THREAD_NAME = "stream_reply"


class _StopCriteria(StoppingCriteria):
    """Ends generation when the consumer asks (event) or the reply contains a stop string.

    Also timestamps each generated token for ReplyStats (called once per decode step).
    """

    def __init__(
        self, events: Sequence[threading.Event], tokenizer, prompt_len: int, stop_strings: Sequence[str],
        min_new_tokens: int = 0,
    ) -> None:
        self.events = tuple(events)
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_strings = tuple(stop_strings)
        self.min_new_tokens = min_new_tokens
        # With min_new_tokens: where stop strings start to count, in the reply's text (None: not yet).
        self.min_chars: int | None = 0 if min_new_tokens == 0 else None
        # Enough trailing tokens to contain any stop string (>= 1 character per token).
        self.tail = max((len(s) for s in self.stop_strings), default=0) + 2
        self.token_times: list[float] = []
        self.hit_stop_string = False
        self.hit_event = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.token_times.append(time.perf_counter())
        done = False
        if any(e.is_set() for e in self.events):
            self.hit_event = done = True
        elif self.stop_strings and input_ids.shape[1] - self.prompt_len >= self.min_new_tokens:
            done = self.hit_stop_string = self._stop_string_in(input_ids[0, self.prompt_len :])
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def _stop_string_in(self, new: torch.Tensor) -> bool:
        decode = self.tokenizer.decode
        if self.min_new_tokens == 0:
            tail = decode(new[-self.tail :], skip_special_tokens=True)
            return any(s in tail for s in self.stop_strings)
        if self.min_chars is None:
            self.min_chars = len(decode(new[: self.min_new_tokens], skip_special_tokens=True))
        text = decode(new, skip_special_tokens=True)  # (the whole reply: a stop string must begin late enough)
        return any(text.find(s, self.min_chars) != -1 for s in self.stop_strings)


def stream_reply(
    lm: LoadedModel,
    message: str,
    history: Sequence[Mapping[str, str]] = (),
    *,
    system: str | None = None,
    params: SamplingParams = SamplingParams(),
    max_input_tokens: int | None = None,
    stats: ReplyStats | None = None,
    stop_event: threading.Event | None = None,
) -> Iterator[str]:
    """Yield the growing reply (full text so far each time; each is a prefix of the next).

    The prompt, special tokens and any (partial) stop string never appear. Setting `stop_event`
    or closing the generator stops the worker within one token. `stats` (if given) is filled in.
    max_input_tokens None = Settings' MAX_INPUT_TOKENS. Raises ValueError for bad input and
    RuntimeError if generation itself fails.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if max_input_tokens is None:
        from .settings import Settings

        max_input_tokens = Settings.from_env().max_input_tokens
    stats = stats if stats is not None else ReplyStats()
    t0 = time.perf_counter()
    tok = lm.tokenizer
    prompt = build_prompt(tok, message, history, system=system, max_input_tokens=max_input_tokens)
    stats.prompt_tokens = int(prompt.input_ids.shape[1])
    stats.trimmed_turns = prompt.trimmed_turns

    event = threading.Event()
    events = [event] if stop_event is None else [event, stop_event]
    criteria = _StopCriteria(events, tok, stats.prompt_tokens, prompt.stop_strings, params.min_new_tokens)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=POLL_S)
    device = lm.model.device if hasattr(lm.model, "device") else torch.device("cpu")
    input_ids = prompt.input_ids.to(device)
    gen_kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([criteria]),
        pad_token_id=tok.pad_token_id,
        **params.generate_kwargs(),
    )
    result: dict[str, object] = {}

    def work() -> None:
        try:
            with torch.inference_mode():
                out = lm.model.generate(**gen_kwargs)
            result["new_tokens"] = int(out.shape[1]) - stats.prompt_tokens
        except BaseException as exc:  # surfaced to the consumer below
            result["error"] = exc
        finally:
            streamer.end()  # wake the consumer even when generate() failed before streaming

    worker = threading.Thread(target=work, name=WORKER_THREAD_NAME, daemon=True)
    raw = ""
    shown = ""
    hit = False
    try:
        worker.start()
        while True:
            try:
                piece = next(streamer)
            except StopIteration:
                break
            except queue.Empty:
                if not worker.is_alive() and "error" in result:
                    break
                continue
            raw += piece
            start = criteria.min_chars
            text, hit = visible_text(raw, prompt.stop_strings, len(raw) if start is None else start)
            if hit:
                event.set()
            if len(text) > len(shown):
                shown = text
                yield shown
            if hit:
                break
    finally:
        event.set()
        worker.join(JOIN_TIMEOUT_S)
        times = criteria.token_times
        stats.new_tokens = int(result.get("new_tokens", len(times)))
        stats.total_s = time.perf_counter() - t0
        if times:
            stats.first_token_s = times[0] - t0
        if len(times) > 1:
            stats.tokens_per_s = (len(times) - 1) / (times[-1] - times[0])
        if "error" in result:
            stats.stopped_by = "error"
        elif criteria.hit_stop_string or hit:
            stats.stopped_by = "stop_string"
        elif criteria.hit_event:
            stats.stopped_by = "stopped"
        elif stats.new_tokens >= params.max_new_tokens:
            stats.stopped_by = "max_new_tokens"
        else:
            stats.stopped_by = "eos"
    if "error" in result:
        exc = result["error"]
        raise RuntimeError(f"generation failed: {type(exc).__name__}: {exc}") from exc
