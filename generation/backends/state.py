"""What the chat engine is doing, as counts a class may watch: `EngineState` (rows, waiting line,
KV cache bytes, tokens/s, step time) and `Throughput` (the recent rate, from the loop's counters).

No user's text is ever here: a row is its prompt length, tokens written, phase and sampling
settings. The loop thread copies its state between iterations (`ChatEngine.snapshot`), so a reader
never touches the lists the loop owns.
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field

from ..sampling import SamplingParams

# tokens/s and the step time are averaged over this many recent seconds: long enough to smooth a
# prefill's pause, short enough that a class sees the rate change as its requests come and go.
RATE_WINDOW_S = 3.0


@dataclass(frozen=True)
class EngineRow:
    """One request in the batch: phase "prefill" (its prompt being read, `prefilled` of
    `prompt_tokens`) or "decode" (writing, `generated` tokens so far)."""

    prompt_tokens: int
    generated: int
    phase: str
    prefilled: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    @classmethod
    def of(cls, prompt_tokens: int, generated: int, phase: str, prefilled: int, p: SamplingParams) -> EngineRow:
        return cls(prompt_tokens, generated, phase, prefilled, p.max_new_tokens, p.temperature, p.top_p, p.top_k,
                   p.repetition_penalty)


@dataclass(frozen=True)
class EngineState:
    """The engine at one moment, between two iterations of its loop.

    running: requests in the batch (decoding or being prefilled); waiting: queued for a free row.
    kv_cache_bytes: keys/values of the positions the rows hold; kv_cache_allocated_bytes: the
    buffers allocated for them (the batch's capacity grows in steps); prefix_cache_bytes: the
    stored prompt prefix every chat reuses. tok_s: tokens written per second, all rows together,
    over the last RATE_WINDOW_S seconds; step_ms: the mean time of one loop iteration there (one
    decode step for every row, plus a prefill chunk when newcomers are read).
    """

    running: int = 0
    waiting: int = 0
    rows: tuple[EngineRow, ...] = ()
    kv_cache_bytes: int = 0
    kv_cache_allocated_bytes: int = 0
    prefix_cache_bytes: int = 0
    tok_s: float = 0.0
    step_ms: float = 0.0
    max_batch: int = 0
    prefill_tokens: int = 0
    tokens_total: int = 0
    steps_total: int = 0
    fast_decode: str = ""
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        """JSON-ready: rows as dicts."""
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


class Throughput:
    """Tokens and iteration time over the last `window_s` seconds, from samples of the loop's
    running totals (taken between iterations; the loop appends, readers compute, both under the
    engine's lock)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        # (time, tokens so far, iterations so far, seconds spent in iterations so far)
        self._samples: collections.deque[tuple[float, int, int, float]] = collections.deque()

    def sample(self, now: float, tokens: int, iterations: int, busy_s: float) -> None:
        s = self._samples
        if s and s[-1][1:] == (tokens, iterations, busy_s):
            return  # nothing happened since the last sample (an idle loop waking up)
        s.append((now, tokens, iterations, busy_s))
        # One sample at or before the window's start stays: the totals there are the baseline.
        while len(s) > 2 and s[1][0] <= now - self.window_s:
            s.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        """(tokens per second, mean milliseconds per iteration) over the window ending `now` (or
        since the first sample, when that is more recent: take one when the engine starts)."""
        s = self._samples
        if not s:
            return 0.0, 0.0
        start = now - self.window_s
        t0, tok0, it0, busy0 = next((x for x in reversed(s) if x[0] <= start), s[0])
        _, tok1, it1, busy1 = s[-1]
        tok_s = (tok1 - tok0) / max(now - max(t0, start), 1e-3)
        step_ms = 1000.0 * (busy1 - busy0) / (it1 - it0) if it1 > it0 else 0.0
        return tok_s, step_ms
