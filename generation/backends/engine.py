"""Continuous batching: one decode loop serves every chat.

A long-lived `ChatEngine` owns the model. Each chat is a request that joins the running batch
between decode steps and leaves it when it ends (EOS, a stop string, max_new_tokens, Stop), so 30
users cost one batched forward per step instead of 30 turns. No gradio here.

Layout of one engine (all of it owned by the loop thread, named ENGINE_THREAD_NAME; the cache,
masks and decode steps live in `generation.decode`):

* Every row of the batch sits in a `SlotKVCache` at its own length, with per-row RoPE positions
  and masks; with sdpa, attention runs row by row (`RowAttentionMask`), so a reply is bit for bit
  the same whatever else is in the batch.
* The running batch: rows 0..n-1 of the main cache. A finished row is removed by moving the last
  row into its slot (one row's copy, no compaction of the rest). The cache's rows double as chats
  join (up to max_batch) and its buffers are given back once no chat runs, so a lone learner holds
  one row's keys/values, not a class's.
* Newcomers are prefilled as a group in their own cache, several prompts per forward (left-padded,
  pads write to a scratch column nobody attends to), at most `prefill_tokens` tokens per forward
  (a longer prompt is cut into chunks of that size), one prefill forward then one decode step per
  iteration, so running streams stall for one chunk at most. A row whose prompt is done draws its
  first token from the prefill's logits and is copied into the main cache.
* `PrefixStore`: the engine's first job (`start()`) is a one-token warm-up reply whose prompt's
  keys/values are kept; every prompt sharing its beginning (the system prompt and dialogue format
  of the plain prompt, a chat template's header) copies them instead of recomputing them. Only
  that fixed prefix is reused, so where a prompt's prefill is split never depends on history.
* Sampling: `generation.decode.sampler.BatchSampler`, per-row parameters and per-row generators.
* Every forward goes through one `DecodeStep`: the model's own forward (`ModelStep`), or, where
  it applies (a Gemma 3 NF4 model on CPU with sdpa; on by default), the lean step the loop thread
  builds before its first job (`LeanStep`: a lean batched decode, bit for bit the model path's
  numbers, and every token through an int8 copy of the LM head, chosen exactly). `fast_status`
  says whether it is on, and why not.

The same code runs on CUDA (buffers live where the model's layers put their keys; the fast decode
is CPU-only). Keep the first forward of a freshly loaded 4-bit model single-threaded where
load_model has not repacked it already: bitsandbytes repacks its CPU weights lazily on the first
forward, and two threads doing that at once crash one of them.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence

import torch

from ..decode.cache import CAPACITY_STEP, PrefixStore, SlotKVCache
from ..decode.sampler import BatchSampler, RowSampling
from ..decode.step import DecodeStep, ModelStep, lean_step
from ..model import LoadedModel
from ..prompt import build_prompt
from ..sampling import SamplingParams
from ..tokens import reply_text_ids
from .base import ReplyStats, stopped_by
from .request import EngineRequest
from .state import EngineRow, EngineState, Throughput

log = logging.getLogger(__name__)

# The loop thread's name, so a server (or a test) can find it.
ENGINE_THREAD_NAME = "chat_engine"
DEFAULT_MAX_BATCH = 32
# Prompt tokens per prefill forward: the longest a running stream waits for a newcomer is one such
# forward, a fraction of a second for 256 tokens on a small CPU; a GPU takes thousands in one go cheaply.
DEFAULT_PREFILL_TOKENS_CPU = 256
DEFAULT_PREFILL_TOKENS_CUDA = 2048
# The shortest prompt prefix worth copying from the PrefixStore, and the warm-up reply's message.
MIN_PREFIX = 8
WARMUP_MESSAGE = "Hello"
WARMUP_PARAMS = SamplingParams(temperature=0.0, max_new_tokens=1)
# A consumer checks this often that the loop is still alive while it waits for text.
POLL_S = 0.5
# Bound for a closed consumer waiting until the loop has removed its request (one step).
CANCEL_WAIT_S = 30.0
# How long the interpreter's exit waits for each engine thread still running to end its loop.
EXIT_WAIT_S = 5.0

# Engines whose loop runs in a thread of their own (start()). That thread is a daemon, so a script
# that never calls close() still exits; but a daemon thread inside torch while the interpreter
# tears torch down can abort the process ("terminate called without an active exception", exit
# status 134). So every such loop is ended before that, as the interpreter begins to exit.
_threaded_engines: weakref.WeakSet[ChatEngine] = weakref.WeakSet()


@atexit.register
def _close_threaded_engines() -> None:
    for engine in list(_threaded_engines):
        engine.close(timeout=EXIT_WAIT_S)


class ChatEngine:
    """One decode loop for every chat: requests join the running batch between steps (continuous
    batching) and leave it when they end. Implements generation.backends.ChatBackend.

    Nothing heavy happens in the constructor; the loop thread (ENGINE_THREAD_NAME, a daemon) starts
    with `start()` or on the first request. Requests beyond `max_batch` wait in FIFO order. An
    exception inside the loop fails the requests it touched with a RuntimeError and the loop goes on;
    `close()` ends the loop and fails whatever is pending.

    max_batch: rows decoded together (the app's CHAT_CONCURRENCY). prefill_tokens: prompt tokens
    per prefill forward (default 256 on CPU, 2048 on CUDA). warmup: start() first runs a one-token
    reply whose prompt prefix every later prompt reuses (PrefixStore). fast: the fast CPU decode
    where it applies (see the module notes). autostart=False: the first request does not start a
    thread; requests wait until someone calls `run_here()` (the app's main thread).
    """

    def __init__(self, lm: LoadedModel, *, max_batch: int = DEFAULT_MAX_BATCH, prefill_tokens: int | None = None,
                 warmup: bool = True, sampler: BatchSampler | None = None, fast: bool = True,
                 autostart: bool = True) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.max_batch = max_batch
        self._decoder: DecodeStep = ModelStep(lm)  # ValueError for a model it cannot batch
        self.device = self._decoder.device
        if prefill_tokens is None:
            prefill_tokens = DEFAULT_PREFILL_TOKENS_CUDA if self.device.type == "cuda" else DEFAULT_PREFILL_TOKENS_CPU
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be positive, got {prefill_tokens!r}")
        self.prefill_tokens = prefill_tokens
        self.sampler = sampler or BatchSampler()
        self.prefixes = PrefixStore()
        self._warmup = warmup
        self._warmed = False
        self._eos = _eos_ids(lm)
        self._eos_tensor = torch.tensor(sorted(self._eos), dtype=torch.long)
        self._pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

        self._autostart = autostart
        self._loop_exited = threading.Event()
        self._cond = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        # loop-owned state
        self._running: list[EngineRequest] = []
        self._lens: list[int] = []  # tokens in the main cache per running row
        self._next: list[int] = []  # the token each running row feeds next
        self._main: SlotKVCache | None = None
        self._group: list[EngineRequest] = []
        self._gcache: SlotKVCache | None = None
        self._n_group = 0
        self.counters = {"steps": 0, "fast_steps": 0, "prefill_forwards": 0, "tokens": 0, "iterations": 0}
        self._busy_s = 0.0  # seconds spent in iterations (the step time's numerator)
        # What snapshot() reads: copied by the loop between iterations, under _cond.
        self._state = EngineState(max_batch=max_batch, prefill_tokens=prefill_tokens)
        self._rate = Throughput()
        self._rate.sample(time.perf_counter(), 0, 0, 0.0)
        # The lean decode (generation/decode/step.py) replaces the ModelStep in the loop thread, before its first job.
        self.fast_status = "not started" if fast else "off"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode loop thread (idempotent). With `warmup`, its first job is a one-token
        reply to WARMUP_MESSAGE, which leaves the prompt format's common prefix (system prompt,
        dialogue labels or chat template header) in the prefix store for the first real users."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the chat engine is closed")
            if self._thread is None or not self._thread.is_alive():
                self._queue_warmup_locked()
                self._loop_exited.clear()
                self._thread = threading.Thread(target=self._loop, name=ENGINE_THREAD_NAME, daemon=True)
                self._thread.start()
                _threaded_engines.add(self)

    def run_here(self, until_idle: bool = False) -> None:
        """Run the decode loop in the calling thread until `close()` (instead of `start()`'s thread);
        with until_idle, only until no request is left (then call it again for the next ones).

        `python app.py` runs it in the process's main thread, whose OpenMP workers keep spinning
        between parallel regions when no other thread has parallel regions of its own: the many
        small ops of a decode step then cost less (see generation/decode/lean.py
        `single_threaded`). Requests may be submitted before it starts.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the chat engine is closed")
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("the chat engine's loop is already running")
            self._queue_warmup_locked()
            self._loop_exited.clear()  # close() waits for this run, not an earlier one's end
            self._thread = threading.current_thread()
        try:
            self._loop(until_idle)
        finally:
            if until_idle:
                with self._cond:
                    self._thread = None

    def _queue_warmup_locked(self) -> None:
        if self._warmup and not self._warmed:
            self._warmed = True
            try:
                ids = build_prompt(self.tokenizer, WARMUP_MESSAGE).input_ids
                warm = EngineRequest(self, ids.reshape(-1), WARMUP_PARAMS, (), None)
                warm.is_warmup = True
                self._waiting.appendleft(warm)
            except Exception:  # a tokenizer that cannot build the prompt: no warm-up, no harm
                log.warning("chat engine warm-up skipped", exc_info=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop thread; requests still queued or running fail with a RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._loop_exited.wait(timeout)  # not join(): run_here() may run the loop in the main thread
        with self._cond:  # the loop is gone (or never ran): nobody else touches these now
            pending = list(self._waiting) + self._running + self._group
            self._waiting.clear()
        for req in pending:
            if not req.done.is_set():
                self._finish(req, "error", RuntimeError("the chat engine was closed"))

    def __enter__(self) -> ChatEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ChatBackend -----------------------------------------------------------------------------

    def describe(self) -> str:
        fast = " · fast CPU decode" if self._decoder.lean else ""
        return f"local engine · batch ≤ {self.max_batch}{fast}"

    def active(self) -> int:
        """Requests in the running batch (decoding or being prefilled)."""
        return len(self._running) + self._n_group

    def waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._waiting)

    def snapshot(self) -> EngineState:
        """What the engine is doing (rows, waiting line, KV cache bytes, tokens/s, step time), as
        of its last iteration; safe from any thread, and only counts, never a user's text."""
        with self._cond:
            state, waiting = self._state, len(self._waiting)
            tok_s, step_ms = self._rate.rates(time.perf_counter())
        return dataclasses.replace(state, waiting=waiting, tok_s=tok_s, step_ms=step_ms, fast_decode=self.fast_status,
                                   at=time.time())

    def submit(self, prompt_ids: torch.Tensor | Sequence[int], params: SamplingParams = SamplingParams(), *,
               stop_strings: Sequence[str] = (), stop_event: threading.Event | None = None,
               ignore_eos: bool = False, lead: Sequence[int] = (), lead_text: str = "") -> EngineRequest:
        """Queue a generation for `prompt_ids` ((P,) or (1, P)); returns its handle at once.
        ignore_eos (as vLLM's): an end-of-sequence token does not end the reply (benchmarks of
        fixed-length replies). lead: the last ids of the prompt are an assistant prefix the reply
        continues, shown as `lead_text` at the start of its text (stop strings count after it)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0:
            raise ValueError("the prompt is empty")
        req = EngineRequest(self, ids, params, stop_strings, stop_event, ignore_eos=bool(ignore_eos), lead=lead,
                            lead_text=lead_text)
        if self._autostart:
            self.start()
        with self._cond:
            if self._closed:
                raise RuntimeError("the chat engine is closed")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

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
        """Yield the growing reply (each a prefix of the next), as `ChatBackend.stream_reply`;
        with reply_prefix, the reply begins with it (its tokens follow the prompt, and the first
        update is the prefix itself).

        Closing the generator or setting `stop_event` removes the request within one step; `stats`
        is final once the generator is exhausted or closed. ValueError for bad input (before
        anything is queued), RuntimeError if generation fails or the engine is closed.
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(reply_prefix, str):
            raise ValueError(f"reply_prefix must be a string, got {type(reply_prefix).__name__}")
        if max_input_tokens is None:
            from ..settings import Settings

            max_input_tokens = Settings.from_env().max_input_tokens
        stats = stats if stats is not None else ReplyStats()
        t0 = time.perf_counter()
        prompt = build_prompt(self.tokenizer, message, history, system=system, max_input_tokens=max_input_tokens)
        stats.prompt_tokens = int(prompt.input_ids.shape[1])
        stats.trimmed_turns = prompt.trimmed_turns
        lead = reply_text_ids(self.tokenizer, prompt.text, reply_prefix) if reply_prefix.strip() else []
        ids = torch.cat([prompt.input_ids.reshape(-1), torch.tensor(lead, dtype=torch.long)])
        req = self.submit(ids, params, stop_strings=prompt.stop_strings, stop_event=stop_event, lead=lead,
                          lead_text=self.tokenizer.decode(lead, skip_special_tokens=True))
        req.t_submit = t0
        try:
            if lead and req.reply.update(req.text) is not None:
                yield req.reply.shown
            while True:
                try:
                    raw = req.updates.get(timeout=POLL_S)
                except queue.Empty:
                    if not self._alive() and not req.done.is_set():
                        self._finish(req, "error", RuntimeError("the chat engine's loop is not running"))
                    continue
                if raw is None:
                    break
                while True:  # only the newest text matters
                    try:
                        nxt = req.updates.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        req.updates.put(None)
                        break
                    raw = nxt
                grown = req.reply.update(raw)
                if grown is not None:
                    yield grown
        finally:
            if not req.done.is_set():
                req.cancel()
                req.wait(CANCEL_WAIT_S)
            stats.new_tokens = len(req.token_ids)
            stats.set_timing(t0, req.t_first, req.t_last, stats.new_tokens)
            stats.total_s = time.perf_counter() - t0
            stats.stopped_by = req.stopped_by or "stopped"
        if req.error is not None:
            exc = req.error
            if isinstance(exc, RuntimeError) and str(exc).startswith(("generation failed", "the chat engine")):
                raise exc
            raise RuntimeError(f"generation failed: {type(exc).__name__}: {exc}") from exc

    # -- the loop --------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _alive(self) -> bool:
        t = self._thread
        if t is None and not self._autostart:
            return not self._closed  # run_here() is yet to be called: the requests wait for it
        return t is not None and t.is_alive()

    def _setup_fast(self) -> None:
        """Switch to the lean decode step where the model allows it (a few seconds, once, here in
        the loop thread before its first job); else say why not."""
        if self.fast_status != "not started":
            return  # off, or already set up (run_here(until_idle=True) enters the loop again)
        self._decoder, self.fast_status = lean_step(self._decoder)
        log.info("chat engine fast CPU decode %s", self.fast_status)

    def _loop(self, until_idle: bool = False) -> None:
        try:
            with torch.inference_mode():
                self._setup_fast()
                while True:
                    with self._cond:
                        self._publish_locked()
                        idle = not (self._waiting or self._running or self._group)
                        if idle and until_idle:
                            break
                        while not (self._closed or self._waiting or self._running or self._group):
                            self._cond.wait()
                        if self._closed:
                            break
                        admitted = self._admit_locked() if not self._group else []
                    t0 = time.perf_counter()
                    try:
                        if admitted:
                            self._start_group(admitted)
                        self._iteration()
                    except Exception as exc:  # a bug outside the guarded phases: fail everyone in flight
                        log.exception("chat engine iteration failed")
                        self._fail_running(exc)
                        self._fail_group(exc)
                    self._busy_s += time.perf_counter() - t0
                    self.counters["iterations"] += 1
        finally:
            with self._cond:
                # Paused when idle (run_here(until_idle=True)): whatever arrived meanwhile waits
                # for the next run. Otherwise (closed, or an exception such as Ctrl-C) it fails.
                paused = until_idle and not self._closed and not self._running and not self._group
                pending = [] if paused else list(self._waiting) + self._running + self._group
                if not paused:
                    self._waiting.clear()
            closed = RuntimeError("the chat engine was closed")
            for req in pending:
                if not req.done.is_set():
                    self._finish(req, "error", closed)
            self._running, self._lens, self._next, self._group = [], [], [], []
            self._n_group = 0
            self._loop_exited.set()

    def _publish_locked(self) -> None:
        """Copy the loop's state for snapshot() (between iterations: the loop owns these lists)."""
        n = self.counters
        self._rate.sample(time.perf_counter(), n["tokens"], n["iterations"], self._busy_s)
        rows = [EngineRow.of(r.prompt_len, len(r.token_ids), "decode", r.prompt_len, r.params) for r in self._running]
        rows += [EngineRow.of(r.prompt_len, 0, "prefill", r._prefilled, r.params) for r in self._group if not r.is_warmup]
        caches = [k for k in (self._main, self._gcache) if k is not None]
        per_position = max((k.bytes_per_position() for k in caches), default=0)
        held = sum(self._lens) + sum(r._prefilled for r in self._group)
        self._state = dataclasses.replace(
            self._state, running=len(rows), rows=tuple(rows), kv_cache_bytes=per_position * held,
            kv_cache_allocated_bytes=sum(k.nbytes() for k in caches), prefix_cache_bytes=self.prefixes.nbytes(),
            tokens_total=n["tokens"], steps_total=n["steps"])

    def _admit_locked(self) -> list[tuple[EngineRequest, int]]:
        """Take waiting requests (FIFO) for a new prefill group, within the batch and the token
        budget (counting only what a cached prefix does not cover): [(request, cached tokens)]."""
        free = self.max_batch - len(self._running)
        group: list[EngineRequest] = []
        hits: list[tuple[int, int]] = []
        tokens = 0
        while self._waiting and len(group) < free:
            req = self._waiting[0]
            if req.wants_stop():
                self._waiting.popleft()
                self._finish(req, "stopped")
                continue
            cached, where = self.prefixes.lookup(req.prompt_ids)
            if cached < MIN_PREFIX:
                cached, where = 0, -1
            if group and (tokens + req.prompt_len - cached > self.prefill_tokens or req.is_warmup or group[0].is_warmup):
                break  # over budget, or the warm-up, which goes first and alone so the others reuse it
            self._waiting.popleft()
            group.append(req)
            hits.append((cached, where))
            tokens += req.prompt_len - cached
        self._n_group = sum(not r.is_warmup for r in group)  # counted as active from here on (not the warm-up)
        return [(r, cached) for r, (cached, _) in zip(group, hits)]

    def _start_group(self, admitted: list[tuple[EngineRequest, int]]) -> None:
        """Make the admitted requests the prefill group: a cache for them, cached prefixes copied in."""
        group = [r for r, _ in admitted]
        self._group = group  # from here on a failure fails these requests (_fail_group)
        cap = max(r.prompt_len for r in group) + 2  # + the scratch column for pads
        cache = SlotKVCache(self._decoder.n_layers, len(group), -(-cap // 64) * 64)
        self._gcache = cache
        for b, (req, cached) in enumerate(admitted):
            if cached:
                # looked up again: copy_into reorders the LRU list, so earlier indices are stale
                n, where = self.prefixes.lookup(req.prompt_ids)
                n = min(n, cached)
                if n >= MIN_PREFIX:
                    self.prefixes.copy_into(where, n, cache, b)
                    req._prefilled = n

    def _iteration(self) -> None:
        self._reap()
        if self._group:
            try:
                self._prefill_chunk()
            except Exception as exc:
                log.exception("chat engine prefill failed")
                self._fail_group(exc)
        if self._running:
            try:
                self._decode_step()
            except Exception as exc:
                log.exception("chat engine decode step failed")
                self._fail_running(exc)

    def _reap(self) -> None:
        """Remove stopped requests (Stop, a closed consumer) from the batch and the group."""
        # The slot is freed before the consumer hears of it: done implies active() no longer counts it.
        gone = [i for i, r in enumerate(self._running) if r.wants_stop()]
        reqs = [self._running[i] for i in gone]
        self._remove_running(gone)
        gone = [i for i, r in enumerate(self._group) if r.wants_stop()]
        reqs += [self._group[i] for i in gone]
        self._remove_group(gone)
        for r in reqs:
            self._finish(r, "stopped")

    # -- model calls -----------------------------------------------------------------------------

    def _prefill_chunk(self) -> None:
        group, cache = self._group, self._gcache
        m = len(group)
        remaining = [r.prompt_len - r._prefilled for r in group]
        # Chunk boundaries depend only on the prompt (every prefill_tokens tokens after its cached
        # prefix), never on the group, so a row's numbers do not depend on who arrived with it.
        # A group is either prompts that fit the budget together or one long prompt (_admit_locked).
        t = min(max(remaining), self.prefill_tokens)
        scratch = cache.capacity - 1
        ids = torch.full((m, t), self._pad_id, dtype=torch.long)
        qpos = torch.zeros((m, t), dtype=torch.long)
        wpos = torch.full((m, t), scratch, dtype=torch.long)
        span = 0
        ends, counts = [], []
        for b, r in enumerate(group):  # left-padded: each row's newest token is in the last column
            c = min(remaining[b], t)
            start = r._prefilled
            ids[b, t - c:] = r.prompt_ids[start : start + c]
            pos = torch.arange(start, start + c)
            qpos[b, t - c:] = pos
            wpos[b, t - c:] = pos
            span = max(span, start + c)
            ends.append(start + c)
            counts.append(c)
        out = self._decoder.prefill(cache, ids, qpos, wpos, span, ends, counts)
        self.counters["prefill_forwards"] += 1
        for b, r in enumerate(group):
            r._prefilled += min(remaining[b], t)
        ready = [b for b, r in enumerate(group) if r._prefilled == r.prompt_len]
        if not ready:
            return
        tokens = self._decoder.pick(out[ready], [self._sampling_now(group[b]) for b in ready], self.sampler)
        now = time.perf_counter()
        if self._main is None:
            self._main = SlotKVCache(self._decoder.n_layers, 1, CAPACITY_STEP)
        ended = []
        for b, tok in zip(ready, tokens):
            r = group[b]
            if r.is_warmup:  # the warm-up: the prompt format's common prefix, kept for everyone
                self.prefixes.add(r.prompt_ids, cache, b)
            end = self._accept(r, tok, now)
            if end is not None:
                ended.append((r, end))
                continue
            slot = len(self._running)
            self._main.ensure_rows(slot + 1, self.max_batch)
            self._main.copy_row(slot, cache, b, r.prompt_len)
            if not r.is_warmup:  # out of the group's count before it joins the running rows, so
                self._n_group -= 1  # active(), read from other threads, never counts a row twice
            self._running.append(r)
            self._lens.append(r.prompt_len)
            self._next.append(tok)
        self._remove_group(ready)
        for r, (reason, err) in ended:
            self._finish(r, reason, err)

    def _decode_step(self) -> None:
        positions = torch.tensor(self._lens, dtype=torch.long)  # (n,): where each new token goes
        self._main.ensure(max(self._lens) + 1)
        out = self._decoder.step(self._main, torch.tensor(self._next, dtype=torch.long), positions)
        self.counters["fast_steps"] += self._decoder.lean
        tokens = self._decoder.pick(out, [self._sampling_now(r) for r in self._running], self.sampler)
        now = time.perf_counter()
        self.counters["steps"] += 1
        done, ended = [], []
        for i, tok in enumerate(tokens):
            self._lens[i] += 1
            self._next[i] = tok
            end = self._accept(self._running[i], tok, now)
            if end is not None:
                done.append(i)
                ended.append((self._running[i], end))
        self._remove_running(done)
        for r, (reason, err) in ended:
            self._finish(r, reason, err)

    # -- per-request bookkeeping -----------------------------------------------------------------

    def _sampling_now(self, req: EngineRequest) -> RowSampling:
        """The request's sampling state for this step: end-of-sequence ids cannot be drawn before
        min_new_tokens (as transformers' min_new_tokens and vLLM's min_tokens)."""
        s = req._sampling
        early = len(req.token_ids) < req.params.min_new_tokens and not req.ignore_eos
        s.suppress = self._eos_tensor if early and self._eos else None
        return s

    def _accept(self, req: EngineRequest, token: int, now: float) -> tuple[str, BaseException | None] | None:
        """Record a generated token and publish its text; (stopped_by, error) if the request ends
        with it (the caller frees the slot, then finishes it), else None."""
        req.token_ids.append(token)
        req._text_ids.append(token)
        req._sampling.append(token)
        self.counters["tokens"] += 1
        if req.t_first is None:
            req.t_first = now
        req.t_last = now
        hit = False
        eos = token in self._eos and not req.ignore_eos
        if not eos:
            try:
                hit = self._detokenize(req)
            except Exception as exc:
                return "error", RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
        req.reply.tokens_written(len(req.token_ids), len(req.text))
        at_max = len(req.token_ids) >= req.params.max_new_tokens
        if hit or at_max or eos:
            return stopped_by(stop_string=hit, max_tokens=at_max), None
        return None

    def _detokenize(self, req: EngineRequest) -> bool:
        """Extend req.text by the new token's text (incremental, holding back incomplete UTF-8);
        True if a stop string appeared."""
        ids = req._text_ids  # the assistant prefix, if any, then the tokens written
        dec = self.tokenizer.decode
        before = dec(ids[req._prefix_off : req._read_off], skip_special_tokens=True)
        after = dec(ids[req._prefix_off :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        delta = after[len(before) :]
        req._prefix_off, req._read_off = req._read_off, len(ids)
        start = max(0, len(req.text) - req.reply.tail)  # a stop string may end in the new text
        req.text += delta
        req.updates.put(req.text)
        return req.reply.stop_in(req.text, start)

    def _finish(self, req: EngineRequest, reason: str, error: BaseException | None = None) -> None:
        if req.done.is_set():
            return
        req.stopped_by = reason
        req.error = error
        req.updates.put(None)
        req.done.set()

    def _remove_running(self, indices: Sequence[int]) -> None:
        """Drop running rows (finished): the last row moves into each freed slot."""
        for i in sorted(indices, reverse=True):
            last = len(self._running) - 1
            if i != last:
                self._main.move_row(i, last, self._lens[last])
                self._running[i], self._lens[i], self._next[i] = self._running[last], self._lens[last], self._next[last]
            self._running.pop()
            self._lens.pop()
            self._next.pop()
        if not self._running and self._main is not None and (self._main.capacity > CAPACITY_STEP or self._main.rows > 1):
            self._main = None  # a class or a long reply grew the buffers; give the memory back once idle

    def _remove_group(self, indices: Sequence[int]) -> None:
        for i in sorted(indices, reverse=True):
            last = len(self._group) - 1
            if i != last:
                self._gcache.move_row(i, last, self._group[last]._prefilled)
                self._group[i] = self._group[last]
            self._group.pop()
        self._n_group = sum(not r.is_warmup for r in self._group)
        if not self._group:
            self._gcache = None

    def _fail_running(self, exc: BaseException) -> None:
        err = RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
        reqs = self._running
        self._running, self._lens, self._next = [], [], []
        self._main = None  # its contents are suspect; a fresh cache for the next rows
        for r in reqs:
            self._finish(r, "error", err)

    def _fail_group(self, exc: BaseException) -> None:
        err = RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
        reqs = self._group
        self._group = []
        self._n_group = 0
        self._gcache = None
        for r in reqs:
            self._finish(r, "error", err)


def _eos_ids(lm: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids as generate() uses them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])
