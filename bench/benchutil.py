"""What every benchmark prints about the machine it ran on (figures mean nothing without it)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(threads: int | None = None) -> str:
    """One line: CPU, cores, torch threads, GPU, load average, torch and Python versions."""
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu_model()}, {os.cpu_count()} cores (torch threads {threads}), {gpu}, load average {load} at start; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(q / 100 * len(xs) + 0.5) - 1))
    return xs[k]


@dataclass
class ChatResult:
    """One `/chat` call: seconds from its own submission to the first streamed text (None if none
    came), seconds from the round's start to its end, the reply's tokens, the error (None when it
    answered), and which user and turn it was."""

    first_s: float | None
    end_s: float
    tokens: int
    error: str | None
    user: int = 0
    turn: int = 0


def chat_round(url: str, n: int, args_of: Callable[..., tuple], count_tokens: Callable[[str], int],
               timeout_s: float, poll_s: float = 0.05, turns: int = 1) -> list[ChatResult]:
    """n `gradio_client` users (a session each, opened before the clock starts) send `/chat` with
    args_of(i) (args_of(i, t) for turns > 1) at the same moment, each the next of its `turns`
    messages as soon as the previous reply has ended; one thread watches every job's streamed
    outputs (a polling thread per user would eat the cores of a small machine)."""
    import ssl

    from gradio_client import Client

    # One TLS context for every request: gradio_client makes a new httpx client per request, and
    # each would load the CA bundle again (~20 ms of CPU), which for 30 users on the server's own
    # two cores delays the submissions by a second or more (browsers elsewhere pay nothing here).
    tls = ssl.create_default_context()
    clients = [Client(url, verbose=False, ssl_verify=tls) for _ in range(n)]  # httpx takes a context as verify
    for c in clients:
        # Each user's server-side session opened before the clock, as a browser's page load opens
        # it (the app's load events): gradio builds a new session's state from every component's
        # config (~20 ms for this app), one session after another on its event loop.
        c.predict(api_name="/model_status")

    def args(i: int, t: int) -> tuple:
        return args_of(i) if turns == 1 else args_of(i, t)

    results: list[ChatResult] = []
    t0 = time.perf_counter()
    jobs = [c.submit(*args(i, 0), api_name="/chat") for i, c in enumerate(clients)]
    turn = [0] * n
    start = [0.0] * n
    first: list[float | None] = [None] * n
    live = set(range(n))

    def finish(i: int, now: float, error: str | None) -> None:
        tokens = 0
        if error is None:
            try:
                tokens = count_tokens(jobs[i].result() or "")
            except Exception as exc:  # noqa: BLE001 - the app's gr.Error text, e.g. a server's message
                error = f"{type(exc).__name__}: {exc}"
        results.append(ChatResult(first[i], now, tokens, error, i, turn[i]))

    while live and time.perf_counter() - t0 < timeout_s:
        for i in sorted(live):
            now = time.perf_counter() - t0
            job = jobs[i]
            if first[i] is None and any(o for o in job.outputs()):
                first[i] = now - start[i]
            if job.done():
                finish(i, now, None)
                if turn[i] + 1 < turns:
                    turn[i] += 1
                    start[i], first[i] = time.perf_counter() - t0, None
                    jobs[i] = clients[i].submit(*args(i, turn[i]), api_name="/chat")
                else:
                    live.discard(i)
        time.sleep(poll_s)
    for i in live:
        jobs[i].cancel()
        finish(i, time.perf_counter() - t0, f"no reply within {timeout_s:g} s")
    for c in clients:
        c.close()
    return results


def generate_reply(lm, message: str, params, stats) -> str:
    """The reply to `message` through one transformers `generate()` call: the path the chat took
    before the engine, kept as the benchmarks' baseline. The app's prompt, sampling and stop
    strings; `stats` (a generation.ReplyStats) gets the token count and timing."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from generation import build_prompt

    class Clock(StoppingCriteria):  # timestamps every token, stops nothing
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    t0 = time.perf_counter()
    tok = lm.tokenizer
    prompt = build_prompt(tok, message)
    clock = Clock()
    stops = dict(stop_strings=list(prompt.stop_strings), tokenizer=tok) if prompt.stop_strings else {}
    with torch.inference_mode():
        out = lm.model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                                stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=tok.pad_token_id,
                                **stops, **params.generate_kwargs())
    new = out[0, prompt.input_ids.shape[1]:]
    stats.prompt_tokens = int(prompt.input_ids.shape[1])
    stats.new_tokens = int(new.numel())
    stats.total_s = time.perf_counter() - t0
    t = clock.times
    stats.set_timing(t0, t[0] if t else None, t[-1] if t else None, len(t))
    return tok.decode(new, skip_special_tokens=True)
