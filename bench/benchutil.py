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
    """One user's /chat call: seconds from the round's start to the first streamed text (None if
    none came) and to the end, the reply's tokens, the error (None when it answered)."""

    first_s: float | None
    end_s: float
    tokens: int
    error: str | None


def chat_round(url: str, n: int, args_of: Callable[[int], tuple], count_tokens: Callable[[str], int],
               timeout_s: float, poll_s: float = 0.05) -> list[ChatResult]:
    """n `gradio_client` users (a session each, opened before the clock starts) send `/chat` with
    args_of(i) at the same moment; one thread watches every job's streamed outputs (a polling
    thread per user would eat the cores of a small machine)."""
    import ssl

    from gradio_client import Client

    # One TLS context for every request: gradio_client makes a new httpx client per request, and
    # each would load the CA bundle again (~20 ms of CPU), which for 30 users on the server's own
    # two cores delays the submissions by a second or more (browsers elsewhere pay nothing here).
    tls = ssl.create_default_context()
    clients = [Client(url, verbose=False, ssl_verify=tls) for _ in range(n)]  # httpx takes a context as verify
    t0 = time.perf_counter()
    jobs = [c.submit(*args_of(i), api_name="/chat") for i, c in enumerate(clients)]
    first: list[float | None] = [None] * n
    end: list[float | None] = [None] * n
    while any(e is None for e in end) and time.perf_counter() - t0 < timeout_s:
        now = time.perf_counter() - t0
        for i, job in enumerate(jobs):
            if end[i] is not None:
                continue
            if first[i] is None and any(o for o in job.outputs()):
                first[i] = now
            if job.done():
                end[i] = now
        time.sleep(poll_s)
    results = []
    for i, job in enumerate(jobs):
        error, tokens = None, 0
        if end[i] is None:
            error, end[i] = f"no reply within {timeout_s:g} s", time.perf_counter() - t0
            job.cancel()
        else:
            try:
                tokens = count_tokens(job.result() or "")
            except Exception as exc:  # noqa: BLE001 - the app's gr.Error text, e.g. a server's message
                error = f"{type(exc).__name__}: {exc}"
        results.append(ChatResult(first[i], end[i], tokens, error))
    for c in clients:
        c.close()
    return results
