"""One generation in the chat engine (`EngineRequest`): its prompt, sampling state, stop strings
and the text it has written so far, which the engine's loop fills in and its consumer reads."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..decode.sampler import RowSampling
from ..sampling import SamplingParams
from .base import ReplyText

class EngineRequest:
    """One generation in the engine: prompt ids, sampling parameters, stop strings.

    Read the reply from `updates` (the raw decoded text so far, growing; None once finished) or
    `wait()` and then `token_ids`, `text`, `stopped_by`, `error`. `cancel()` ends it within one step.
    """

    def __init__(self, engine: Any, prompt_ids: torch.Tensor, params: SamplingParams,
                 stop_strings: Sequence[str], stop_event: threading.Event | None, *, ignore_eos: bool = False,
                 lead: Sequence[int] = (), lead_text: str = "") -> None:
        self._engine = engine  # the ChatEngine that owns it (Any: engine.py imports this module)
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_event = stop_event
        self.ignore_eos = ignore_eos
        self.updates: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.done = threading.Event()
        self.token_ids: list[int] = []
        self.stopped_by = ""
        self.error: BaseException | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        # loop-private
        self._cancel = threading.Event()
        self._sampling = RowSampling(params, prompt_ids)
        self._prefilled = 0
        self.is_warmup = False  # the warm-up reply: prefilled in a group of its own, its prompt kept
        # An assistant prefix the reply continues (the last tokens of prompt_ids): its text starts
        # `text`, and the detokenizer reads its last tokens so the first new one gets its space.
        self._text_ids = list(lead)
        self.text = lead_text
        self._prefix_off = max(0, len(self._text_ids) - 6)
        self._read_off = len(self._text_ids)
        # Its stop strings (and where they start to count: after the prefix); the consumer's visible text.
        self.reply = ReplyText(stop_strings, params.min_new_tokens)
        if self.reply.count_from is not None:
            self.reply.count_from = len(lead_text)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.reply.stop_strings

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.numel())

    def cancel(self) -> None:
        """Ask the loop to end this request ("stopped") at its next step."""
        self._cancel.set()
        self._engine._wake()

    def wants_stop(self) -> bool:
        return self._cancel.is_set() or (self.stop_event is not None and self.stop_event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished; False on timeout."""
        return self.done.wait(timeout)

    def stats(self) -> dict[str, float]:
        """new_tokens, first_token_s (from submit), tokens_per_s ((n-1) / (t_last - t_first))."""
        n = len(self.token_ids)
        first = (self.t_first - self.t_submit) if self.t_first is not None else 0.0
        tps = (n - 1) / (self.t_last - self.t_first) if n > 1 and self.t_last > self.t_first else 0.0
        return {"new_tokens": n, "first_token_s": first, "tokens_per_s": tps}
