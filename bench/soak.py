"""Memory soak of the real app: many short chats, does the server's memory level off?

Starts `python app.py` on a free loopback port (tests/apputil.py's `start_app`), then --clients
`gradio_client` users (default 4) send --chats chats in all (default 1,000) to `/chat`: short
replies (--min-tokens..--max-tokens new tokens, default 16-32), varied messages and seeds. Each
user opens a new session (a new `Client`, as a page reload or a new student does) every
--session-every of its chats, and after every --extra-every of its chats it makes one more call,
taking turns: the lab's `/attention`, the chat's `/next_token` and the inside views'
`/model_attention`, `/model_view` and `/ablate`.

After every --sample-every chats (default 50) the server's RSS is read (psutil: the server process
and every child it has). At the end: a table (chats, RSS, change from the first reading, elapsed
time) and the verdict: the highest reading during the last 100 chats vs the highest during the
first 100 (target: within +5%). The highest of a window, because the readings come while other
calls are in flight, and what creeps is the level the peaks reach.

Bounded: at most --chats chats and --max-minutes of wall time (then it stops, reports what it has
and says so); every call waits at most --call-timeout seconds. Traffic goes only to 127.0.0.1.
Extra environment for the server (e.g. MALLOC_ARENA_MAX=2 to compare allocator settings): --env
KEY=VALUE, repeatable.

Usage: python bench/soak.py [--chats 1000] [--clients 4] [--sample-every 50] [--session-every 25]
                            [--extra-every 2] [--min-tokens 16] [--max-tokens 32]
                            [--max-minutes 120] [--env KEY=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchutil import describe  # noqa: E402

TARGET_GROWTH = 0.05  # the last 100 chats' highest RSS may be at most 5% above the first 100's
WINDOW = 100  # chats at each end of the run that the verdict compares

SUBJECTS = ("the moon", "a cat", "Paris", "attention heads", "the ocean", "a robot", "winter", "tea",
            "a library", "the piano", "volcanoes", "bees", "a bicycle", "the internet", "rain", "chess")
ASKS = ("What is {s}?", "Tell me one fact about {s}.", "Write a short poem about {s}.",
        "Why do people like {s}?", "Describe {s} in one sentence.", "Explain {s} to a child.",
        "Give me three words about {s}.", "What colour is {s}?")


def message(rng: random.Random) -> str:
    """A varied short chat message (a class types many different ones)."""
    return rng.choice(ASKS).format(s=rng.choice(SUBJECTS))


def lab_text(rng: random.Random) -> str:
    """A short sentence for the lab and inside views (varied, so their label caches see new tokens)."""
    words = rng.sample(["the", "cat", "sat", "on", "a", "warm", "mat", "while", "dogs", "ran", "far",
                        "away", "under", "blue", "skies", "and", "birds", "sang"], rng.randint(4, 9))
    return " ".join(words).capitalize() + "."


def extra_call(client, kind: int, rng: random.Random, timeout: float) -> str:
    """One of the non-chat calls a class makes beside its chats; its API name."""
    text = lab_text(rng)
    calls = (
        ("/attention", (text, rng.choice([16, 32, 64]), 4, rng.choice([1, 2, 4]), 0.0, rng.randint(0, 99),
                        rng.random() < 0.5, True)),
        ("/next_token", (text, 0.7, 0.95, 0, 1.0, 10)),
        ("/model_attention", (text, rng.randint(0, 17), True)),
        ("/model_view", (text, True, 24)),
        ("/ablate", (text, f"{rng.randint(0, 17)}:*", 4, 5)),
    )
    name, args = calls[kind % len(calls)]
    client.submit(*args, api_name=name).result(timeout=timeout)
    return name


@dataclass
class Sample:
    chats: int
    rss_mib: float
    elapsed_s: float
    processes: int


@dataclass
class Soak:
    """Shared state of the users' threads."""

    chats: int
    sample_every: int
    proc_pid: int
    t0: float = field(default_factory=time.perf_counter)
    next_chat: int = 0
    done: int = 0
    errors: list[str] = field(default_factory=list)
    extra_calls: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def take(self) -> int | None:
        """The next chat's number, or None when all are taken (or time is up)."""
        with self.lock:
            if self.stop.is_set() or self.next_chat >= self.chats:
                return None
            self.next_chat += 1
            return self.next_chat - 1

    def finished(self, error: str | None) -> None:
        """One chat ended (error: why it failed); a reading after every sample_every chats."""
        with self.lock:
            self.done += 1
            if error is not None:
                self.errors.append(error)
            if self.done % self.sample_every == 0:
                self.samples.append(read_rss(self.proc_pid, self.done, time.perf_counter() - self.t0))
                s = self.samples[-1]
                print(f"  {s.chats:5d} chats  RSS {s.rss_mib:8.1f} MiB  ({s.elapsed_s:6.0f} s, "
                      f"{len(self.errors)} errors)", flush=True)


def read_rss(pid: int, chats: int, elapsed: float) -> Sample:
    """RSS of the process `pid` and all its children (the engine may run helpers), MiB."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that just ended
            pass
    return Sample(chats, total / 2**20, elapsed, len(procs))


def user(url: str, soak: Soak, uid: int, args: argparse.Namespace, tls: ssl.SSLContext) -> None:
    """One user: chats until none are left, a new session every args.session_every chats, an
    extra (lab / inside) call after every args.extra_every chats."""
    from gradio_client import Client

    rng = random.Random(1000 + uid)
    client = None
    mine = 0
    try:
        while (i := soak.take()) is not None:
            if client is None or mine % args.session_every == 0:
                if client is not None:
                    client.close()
                client = Client(url, verbose=False, ssl_verify=tls)
                client.predict(api_name="/model_status")  # as a page load opens the session
                with soak.lock:
                    soak.sessions += 1
            mine += 1
            error = None
            try:
                new_tokens = rng.randint(args.min_tokens, args.max_tokens)
                client.submit(message(rng), "", new_tokens, 0.7, 0.95, 0, 1.0, i,
                              api_name="/chat").result(timeout=args.call_timeout)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                error = f"/chat #{i}: {type(exc).__name__}: {exc}"
            soak.finished(error)
            if mine % args.extra_every == 0:
                kind = mine // args.extra_every + uid
                try:
                    name = extra_call(client, kind, rng, args.call_timeout)
                    with soak.lock:
                        soak.extra_calls[name] = soak.extra_calls.get(name, 0) + 1
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with soak.lock:
                        soak.errors.append(f"extra call {kind % 5}: {type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            client.close()


def verdict(samples: list[Sample], total: int) -> tuple[float, float, float] | None:
    """(highest RSS in the first WINDOW chats, highest in the last WINDOW, growth) or None when
    the run is too short to compare two separate windows."""
    first = [s.rss_mib for s in samples if s.chats <= WINDOW]
    last = [s.rss_mib for s in samples if s.chats > total - WINDOW]
    if not first or not last or total < 2 * WINDOW:
        return None
    a, b = max(first), max(last)
    return a, b, b / a - 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chats", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--session-every", type=int, default=25, help="a user's chats per session")
    ap.add_argument("--extra-every", type=int, default=2, help="a lab / inside call after every N chats of a user")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-minutes", type=float, default=120.0, help="stop (and report) after this long")
    ap.add_argument("--call-timeout", type=float, default=300.0, help="seconds one call may take")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server, repeatable")
    ap.add_argument("--json", type=Path, help="also write the readings as JSON here")
    args = ap.parse_args()
    if min(args.chats, args.clients, args.sample_every, args.session_every, args.extra_every, args.min_tokens) < 1 \
            or args.max_tokens < args.min_tokens:
        ap.error("counts must be positive and --max-tokens >= --min-tokens")
    env = dict(kv.split("=", 1) for kv in args.env)

    machine = describe()
    print(f"Machine: {machine}", flush=True)
    print(f"Soak: {args.chats} chats, {args.clients} users, {args.min_tokens}-{args.max_tokens} new tokens, "
          f"a new session every {args.session_every} chats of a user, an extra call every {args.extra_every}; "
          f"server env {env or '(default)'}\n", flush=True)

    from apputil import start_app

    # A SIGTERM (a `kill`, a timeout) ends the run through the `finally` below, which stops the app.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app = start_app(env)
    ready_rss = read_rss(app.proc.pid, 0, 0.0)
    print(f"app ready at {app.url}: RSS {ready_rss.rss_mib:.1f} MiB", flush=True)
    if hasattr(os, "nice"):
        os.nice(10)  # the users' own work yields the cores to the server, as if they sat elsewhere
    soak = Soak(args.chats, args.sample_every, app.proc.pid)
    tls = ssl.create_default_context()  # one CA bundle load for every request (see benchutil.chat_round)
    threads = [threading.Thread(target=user, args=(app.url, soak, u, args, tls), daemon=True)
               for u in range(args.clients)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + args.max_minutes * 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        timed_out = any(t.is_alive() for t in threads)
        if timed_out:
            soak.stop.set()  # no new chats; those in flight end within --call-timeout
            for t in threads:
                t.join(args.call_timeout + 10)
        final = read_rss(app.proc.pid, soak.done, time.perf_counter() - soak.t0)
    finally:
        app.stop()

    report(args, machine, env, ready_rss, final, soak, timed_out)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "env": env,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "ready": asdict(ready_rss), "final": asdict(final),
                                         "samples": [asdict(s) for s in soak.samples], "errors": soak.errors,
                                         "extra_calls": soak.extra_calls, "sessions": soak.sessions,
                                         "timed_out": timed_out}, indent=1))
    return 0


def report(args, machine: str, env: dict, ready: Sample, final: Sample, soak: Soak, timed_out: bool) -> None:
    base = soak.samples[0].rss_mib if soak.samples else ready.rss_mib
    print(f"\n### Memory soak: {soak.done} chats, {args.clients} users ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {machine}  ")
    print(f"Server env: {env or '(default)'}; sessions opened: {soak.sessions}; other calls: "
          f"{', '.join(f'{k} {v}' for k, v in sorted(soak.extra_calls.items())) or 'none'}\n")
    print("| chats | RSS MiB | vs first reading | elapsed s |")
    print("|---:|---:|---:|---:|")
    print(f"| ready | {ready.rss_mib:.1f} | | 0 |")
    for s in soak.samples:
        print(f"| {s.chats} | {s.rss_mib:.1f} | {100 * (s.rss_mib / base - 1):+.1f}% | {s.elapsed_s:.0f} |")
    print(f"\nErrors: {len(soak.errors)}" + (f" (first: {soak.errors[0]})" if soak.errors else ""))
    if timed_out:
        print(f"Stopped after --max-minutes {args.max_minutes:g}: {soak.done} of {args.chats} chats done.")
    v = verdict(soak.samples, soak.done)
    if v is None:
        print(f"Verdict: too few chats to compare the first and last {WINDOW}.")
        return
    a, b, growth = v
    ok = growth <= TARGET_GROWTH
    print(f"Verdict: highest RSS over the last {WINDOW} chats {b:.1f} MiB vs over the first {WINDOW} {a:.1f} MiB: "
          f"{100 * growth:+.1f}% (target within +{100 * TARGET_GROWTH:.0f}%): **{'met' if ok else 'NOT met'}**")


if __name__ == "__main__":
    sys.exit(main())
