"""Load benchmark of the chat: many users at once, through `python app.py` and on the engine in-process.

One run measures, on the default model in NF4 (each part prints a markdown table):

1. Sampling step: (30, 262,144) real next-token logits, the notebook's sampling (T 0.7, top-p 0.95):
   transformers' warpers + softmax + multinomial vs `generation.decode.sampler.BatchSampler`, ms per step.
2. The hardware's batched rate: one static padded greedy `generate()` of 30 rows, 128 new tokens
   each (min_new_tokens=128), prefill included.
3. One user alone, one `generate()` call per reply (`benchutil.generate_reply`, over bitsandbytes' own
   Linear4bit modules, as before the fast path) vs the engine (`ChatEngine.stream_reply`) with the
   model's forward (fast=False) and with its fast CPU decode, the notebook's sampling and greedy:
   decode tokens/s (ReplyStats: (n-1) / (t_last - t_first), pooled over the prompts) and time to
   the first token. Each path in turn (today's in the main thread, the model-forward engine in its
   own thread, then the fast engine with its loop in the main thread as in `python app.py`).
4. N users at once (default 1, 8, 30) on the engine in-process (no gradio; its loop in the main
   thread, as in the app): each calls `stream_reply` at the same moment (the notebook's three
   prompts in turn, its sampling, 128 new tokens at most). Failures, first streamed piece median /
   p90 / max, aggregate tokens/s (all replies' tokens, counted with the model's tokenizer, / wall
   time of the round). The base model's replies end at their turn, so which seeds draw a long
   reply decides much of a round's wall time: --rounds rounds (default 3) per N, each with new
   seeds (round 0: seed = user), pooled (tokens / total wall). Then 30 users with --turns
   messages each (default 3), each sent as soon as the user's previous reply has ended, as a
   class keeps chatting (first piece: after each message). Then all 30 replies run to exactly 128
   tokens ("fixed length"), the like-for-like figure beside the static generate().
5. The same through `python app.py`: one `gradio_client` session per user, `/chat`, the streamed
   outputs watched by one polling thread (per-user polling threads would eat the two cores). The
   app is started with CHAT_CONCURRENCY=--chat-concurrency (default 32). The clients' own work
   (gradio_client's HTTP and SSE parsing, ~1 s of CPU per round of 30) runs at a lower CPU
   priority than the server (os.nice after the app has started), as if the users sat elsewhere;
   it still shares the server's two cores.

Then the issue's targets, met or not. Figures on a shared machine are noisy: the machine line
prints the load average at the start.

Usage: python bench/load.py [--users 1,8,30] [--new-tokens 128] [--rounds 3] [--turns 3]
                            [--chat-concurrency 32] [--threads N] [--skip-app] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchutil import chat_round, describe, percentile  # noqa: E402

PROMPTS = ("What is the capital of France?", "Explain self-attention in one paragraph.",
           "Write a haiku about transformers.")
LONG_PROMPT = "Tell me a long story about a dragon who learns to fly."
POLL_S = 0.05


@dataclass
class Round:
    where: str  # "engine" | "engine, fixed length" | "app"
    users: int
    failures: int
    first_p50: float
    first_p90: float
    first_max: float
    tokens: int
    wall_s: float
    tokens_per_s: float
    first_error: str | None = None
    rounds: int = 1


def summarize(where: str, n: int, firsts: list[float | None], tokens: list[int], errors: list[str | None],
              wall: float, rounds: int = 1) -> Round:
    """One table row from every reply of `rounds` rounds (lists over all replies, `wall` their total)."""
    ok = [i for i in range(len(errors)) if errors[i] is None]
    fs = [firsts[i] for i in ok if firsts[i] is not None]
    total = sum(tokens[i] for i in ok)
    errs = [e for e in errors if e is not None]
    return Round(where, n, len(errs), percentile(fs, 50), percentile(fs, 90), max(fs, default=float("nan")),
                 total, wall, total / wall if wall > 0 else 0.0, errs[0] if errs else None, rounds)


def pooled(where: str, n: int, runs: list[tuple[list, float]]) -> Round:
    """Rounds pooled: runs = [(replies as (first_s, tokens, error), wall_s)]; tokens over total wall."""
    replies = [r for got, _ in runs for r in got]
    return summarize(where, n, [r[0] for r in replies], [r[1] for r in replies], [r[2] for r in replies],
                     sum(w for _, w in runs), len(runs))


def seed_of(i: int, turn: int, rnd: int) -> int:
    """User i's seed in turn `turn` of round `rnd` (round 0, turn 0: the user's index)."""
    return i + 1000 * turn + 100_000 * rnd


# --- 1. the sampling step --------------------------------------------------------------------------


def left_padded(tok, messages: list[str]) -> dict:
    """The chat prompts of `messages`, tokenized as one left-padded batch (as generate() wants it)."""
    from generation.prompt import build_prompt

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return tok([build_prompt(tok, m).text for m in messages], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side


def real_logits(lm, rows: int):
    """(rows, V) bf16 next-token logits of the model for `rows` chat prompts (one padded forward)."""
    import torch

    enc = left_padded(lm.tokenizer, [f"{PROMPTS[i % 3]} ({i})" for i in range(rows)])
    with torch.inference_mode():
        return lm.model(**enc, logits_to_keep=1).logits[:, -1, :]


def bench_sampling(lm, rows: int = 30, repeats: int = 15) -> dict[str, float]:
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    from generation.decode.sampler import BatchSampler, RowSampling
    from generation.sampling import SamplingParams, make_generator

    logits = real_logits(lm, rows)
    params = SamplingParams()  # the notebook's: T 0.7, top-p 0.95
    hf = LogitsProcessorList([TemperatureLogitsWarper(params.temperature), TopPLogitsWarper(params.top_p)])
    gen = torch.Generator().manual_seed(0)
    sampler = BatchSampler()
    sample_rows = [RowSampling(params, generator=make_generator(i)) for i in range(rows)]
    greedy_rows = [RowSampling(SamplingParams(temperature=0.0)) for _ in range(rows)]

    def hf_step() -> None:
        scores = hf(None, logits.float())
        torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)

    times: dict[str, list[float]] = {"hf": [], "ours": [], "ours_greedy": []}
    steps = {"hf": hf_step, "ours": lambda: sampler.sample(logits, sample_rows),
             "ours_greedy": lambda: sampler.sample(logits, greedy_rows)}
    for f in steps.values():
        f()  # warm
    for r in range(repeats):
        for name, f in steps.items():
            if name == "hf" and r >= max(3, repeats // 3):
                continue  # slow: fewer rounds
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    out = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out["exact_rows"] = sampler.stats["exact"]
    out["widened_rows"] = sampler.stats["widened"]
    return out


# --- 2. the hardware's batched rate ----------------------------------------------------------------


def bench_static(lm, rows: int, new_tokens: int) -> dict[str, float]:
    import torch

    tok = lm.tokenizer
    enc = left_padded(tok, [PROMPTS[i % 3] for i in range(rows)])
    t = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - t
    made = (out.shape[1] - enc["input_ids"].shape[1]) * rows
    return {"rows": rows, "tokens": made, "wall_s": wall, "tokens_per_s": made / wall}


# --- 3. one user alone -----------------------------------------------------------------------------


def bench_single(lm, engines: dict, new_tokens: int, rounds: int = 2, today: bool = True) -> dict[str, dict[str, float]]:
    """One user at a time: one generate() per reply (`generate_reply`, with bitsandbytes' Linear4bit modules
    as they were before the fast path: `restore_linear4bit` for those rounds; unless today=False)
    and each engine in `engines` ({name: ChatEngine}); decode tokens/s pooled over the prompts,
    median first token."""
    from generation.decode import accelerate_linear4bit, restore_linear4bit
    from generation.sampling import SamplingParams
    from benchutil import generate_reply

    from generation import ReplyStats

    prompts = [*PROMPTS, LONG_PROMPT]
    modes = {"sampled": lambda i: SamplingParams(max_new_tokens=new_tokens, seed=i),
             "greedy": lambda i: SamplingParams(temperature=0.0, max_new_tokens=new_tokens)}
    who_all = ["today", *engines] if today else list(engines)
    acc = {f"{who}_{mode}": {"tokens": 0, "decode_s": 0.0, "first": []} for who in who_all for mode in modes}
    for _ in range(rounds):
        for mode, make in modes.items():
            for i, prompt in enumerate(prompts):
                for who in who_all:
                    stats = ReplyStats()
                    if who == "today":
                        restore_linear4bit(lm.model)
                        try:
                            generate_reply(lm, prompt, make(i), stats)
                        finally:
                            accelerate_linear4bit(lm.model)
                    else:
                        list(engines[who].stream_reply(prompt, params=make(i), stats=stats))
                    a = acc[f"{who}_{mode}"]
                    if stats.new_tokens > 1 and stats.tokens_per_s > 0:
                        a["tokens"] += stats.new_tokens - 1
                        a["decode_s"] += (stats.new_tokens - 1) / stats.tokens_per_s
                    a["first"].append(stats.first_token_s)
    return {k: {"tokens_per_s": a["tokens"] / a["decode_s"] if a["decode_s"] else float("nan"),
                "first_token_s": statistics.median(a["first"]), "tokens": a["tokens"]} for k, a in acc.items()}


# --- 4. N users on the engine, in-process ----------------------------------------------------------


def engine_round(engine, n: int, new_tokens: int, count_tokens, rnd: int = 0, turns: int = 1) -> tuple[list, float]:
    """n users call `stream_reply` at the same moment, each its next message as soon as a reply has
    ended, `turns` messages in all -> ([(first piece s after its message, tokens, error)], wall s)."""
    from generation.sampling import SamplingParams

    replies: list[tuple[float | None, int, str | None]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n + 1)
    ends = [0.0] * n
    t0_box: list[float] = []

    def user(i: int) -> None:
        barrier.wait()
        for t in range(turns):
            start = time.perf_counter()
            first, reply, error = None, "", None
            try:
                params = SamplingParams(max_new_tokens=new_tokens, seed=seed_of(i, t, rnd))
                for reply in engine.stream_reply(PROMPTS[(i + t) % 3], params=params):
                    if first is None and reply:
                        first = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                error = f"{type(exc).__name__}: {exc}"
            with lock:
                replies.append((first, count_tokens(reply), error))
        ends[i] = time.perf_counter() - t0_box[0]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    barrier.wait()
    for t in threads:
        t.join()
    return replies, max(ends)


def engine_fixed_round(engine, n: int, new_tokens: int) -> Round:
    """n users at once, each reply exactly new_tokens long (ignore_eos, no stop strings), the
    like-for-like figure beside the static generate() of as many rows, which makes new_tokens each."""
    from generation.prompt import build_prompt
    from generation.sampling import SamplingParams

    ids = [build_prompt(engine.tokenizer, PROMPTS[i % 3]).input_ids for i in range(n)]
    t0 = time.perf_counter()
    reqs = [engine.submit(x, SamplingParams(max_new_tokens=new_tokens, seed=i), ignore_eos=True)
            for i, x in enumerate(ids)]
    for r in reqs:
        r.wait()
    wall = time.perf_counter() - t0
    errors = [None if r.error is None else str(r.error) for r in reqs]
    firsts = [None if r.t_first is None else r.t_first - t0 for r in reqs]
    return summarize("engine, fixed length", n, firsts, [len(r.token_ids) for r in reqs], errors, wall)


# --- 5. N users through python app.py --------------------------------------------------------------


def app_round(url: str, n: int, new_tokens: int, count_tokens, timeout_s: float, rnd: int = 0,
              turns: int = 1) -> tuple[list, float]:
    """As engine_round, through the app's /chat with gradio_client."""
    def args(i: int, t: int = 0) -> tuple:
        return PROMPTS[(i + t) % 3], "", new_tokens, 0.7, 0.95, 0, 1.0, seed_of(i, t, rnd)

    results = chat_round(url, n, args, count_tokens, timeout_s, POLL_S, turns=turns)
    return [(r.first_s, r.tokens, r.error) for r in results], max(r.end_s for r in results)


def user_rounds(run, where: str, users: list[int], rounds: int, turns: int) -> list[Round]:
    """For each N: `rounds` rounds of N users at once (new seeds each round), pooled; then N = the
    largest, `turns` messages per user back to back. run(n, rnd, turns) -> (replies, wall s)."""
    out = []
    for n in users:
        r = pooled(where, n, [run(n, rnd, 1) for rnd in range(rounds)])
        print(f"  {where} N={n}: {r.tokens} tokens in {r.wall_s:.1f} s ({rounds} rounds), {r.failures} failures",
              flush=True)
        out.append(r)
    if turns > 1:
        n = max(users)
        r = pooled(f"{where}, {turns} turns each", n, [run(n, 0, turns)])
        print(f"  {r.where} N={n}: {r.tokens} tokens in {r.wall_s:.1f} s, {r.failures} failures", flush=True)
        out.append(r)
    return out


def bench_app(users: list[int], new_tokens: int, env: dict[str, str], count_tokens, timeout_s: float,
              rounds: int, turns: int) -> list[Round]:
    from apputil import start_app

    print("\nstarting python app.py ...", flush=True)
    app = start_app(env)
    if hasattr(os, "nice"):
        os.nice(10)  # this process (the clients) yields the cores to the server started above
    try:
        warm, _ = app_round(app.url, 1, 4, count_tokens, timeout_s)  # lazy inits, the engine's warm-up
        if warm[0][2] is not None:
            raise RuntimeError(f"warm-up request failed: {warm[0][2]}\n{app.log()[-3000:]}")
        return user_rounds(lambda n, rnd, t: app_round(app.url, n, new_tokens, count_tokens, timeout_s, rnd, t),
                           "app", users, rounds, turns)
    finally:
        app.stop()


# --- the run ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1,8,30")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of N users at once per N (new seeds each), pooled")
    ap.add_argument("--turns", type=int, default=3,
                    help="then the largest N with this many messages per user back to back (1: skip)")
    ap.add_argument("--chat-concurrency", type=int, default=32, help="CHAT_CONCURRENCY of the app (its largest batch)")
    ap.add_argument("--max-batch", type=int, default=32, help="the in-process engine's largest batch")
    ap.add_argument("--threads", type=int, help="torch threads here and in the app (default: all cores)")
    ap.add_argument("--skip-app", action="store_true", help="only the in-process parts")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one round may take")
    ap.add_argument("--json", type=Path, help="also write every figure as JSON here")
    args = ap.parse_args()
    users = [int(x) for x in args.users.split(",") if x.strip()]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {describe(args.threads)}\n", flush=True)

    from generation import load_model
    from generation.backends import ChatEngine

    lm = load_model()
    tok = lm.tokenizer

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    results: dict[str, object] = {"machine": describe(args.threads)}

    samp = bench_sampling(lm)
    results["sampling"] = samp
    print("### Sampling step, (30, 262,144) real logits, T 0.7 + top-p 0.95 + draw\n")
    print("| method | ms per step |")
    print("|---|---:|")
    print(f"| transformers warpers + softmax + multinomial | {samp['hf']:.1f} |")
    print(f"| BatchSampler (topk candidates, per-row generators) | {samp['ours']:.1f} |")
    print(f"| BatchSampler, greedy rows (penalty + argmax) | {samp['ours_greedy']:.1f} |")
    print(f"\n(rows that needed wider candidates: {samp['widened_rows']}, the exact full sort: {samp['exact_rows']})\n",
          flush=True)

    static = bench_static(lm, 30, args.new_tokens)
    results["static"] = static
    print("### Static padded greedy generate(), 30 rows\n")
    print(f"{static['tokens']} tokens in {static['wall_s']:.1f} s: **{static['tokens_per_s']:.1f} tokens/s**\n",
          flush=True)

    # Today's path first, in this (main) thread; then the engine as `python app.py` runs it: its loop
    # in the main thread (ChatEngine.run_here), the users in other threads.
    # The engine without its fast decode (the model's own forward and bf16 head) in its own thread,
    # closed before the fast one runs: a second thread with a live OpenMP team of its own would
    # slow the main thread's parallel regions (see generation/decode/lean.py `single_threaded`).
    single = bench_single(lm, {}, args.new_tokens)
    with ChatEngine(lm, max_batch=args.max_batch, fast=False) as plain:
        single.update(bench_single(lm, {"plain": plain}, args.new_tokens, today=False))
    engine = ChatEngine(lm, max_batch=args.max_batch, autostart=False)
    rounds: list[Round] = []

    def drive() -> None:
        try:
            single.update(bench_single(lm, {"engine": engine}, args.new_tokens, today=False))
            rounds.extend(user_rounds(lambda n, rnd, t: engine_round(engine, n, args.new_tokens, count_tokens, rnd, t),
                                      "engine", users, args.rounds, args.turns))
            rounds.append(engine_fixed_round(engine, max(users), args.new_tokens))
        finally:
            engine.close()

    driver = threading.Thread(target=drive, name="bench-driver")
    driver.start()
    engine.run_here()
    driver.join()
    results["single"] = single
    results["fast_decode"] = engine.fast_status
    print("### One user alone (4 prompts x 2 rounds, decode tokens/s pooled)\n")
    print(f"Fast decode: {engine.fast_status}\n")
    print("| sampling | one generate() per reply tok/s | engine, model's forward tok/s | engine, fast decode tok/s | "
          "fast vs today | first token today / fast s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("sampled", "greedy"):
        a, p, b = single[f"today_{mode}"], single[f"plain_{mode}"], single[f"engine_{mode}"]
        print(f"| {mode} | {a['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
              f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x | {a['first_token_s']:.2f} / {b['first_token_s']:.2f} |")
    print(flush=True)

    print(f"(engine: prefix tokens reused {engine.prefixes.tokens_saved}, sampler rows widened "
          f"{engine.sampler.stats['widened']}, exact {engine.sampler.stats['exact']})")
    engine = None  # its memory back before the app starts
    if not args.skip_app:
        env = {"CHAT_CONCURRENCY": str(args.chat_concurrency)}
        if args.threads:
            env["TORCH_NUM_THREADS"] = str(args.threads)
        rounds += bench_app(users, args.new_tokens, env, count_tokens, args.timeout, args.rounds, args.turns)
    results["rounds"] = [asdict(r) for r in rounds]
    print("\n### N simultaneous users, the notebook's sampling, "
          f"{args.new_tokens} new tokens at most\n")
    print("| where | N | rounds | failures | first piece p50 / p90 / max s | reply tokens | wall s | aggregate tok/s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rounds:
        print(f"| {r.where} | {r.users} | {r.rounds} | {r.failures} | "
              f"{r.first_p50:.2f} / {r.first_p90:.2f} / {r.first_max:.2f} | {r.tokens} | {r.wall_s:.1f} | "
              f"{r.tokens_per_s:.1f} |")
        if r.first_error:
            print(f"|  | first error: {r.first_error[:120]} | | | | | | |")

    print("\n### Targets\n")
    print("| target | measured | met |")
    print("|---|---|---|")

    def row(name: str, measured: str, ok: bool) -> None:
        print(f"| {name} | {measured} | {'yes' if ok else 'NO'} |")

    by = {(r.where, r.users): r for r in rounds}
    big = max(users)
    for where in ("app", "engine", f"app, {args.turns} turns each", f"engine, {args.turns} turns each",
                  "engine, fixed length"):
        r = by.get((where, big))
        if r is None:
            continue
        row(f"{big} users ({where}): 0 failures, first piece p90 <= 3 s",
            f"{r.failures} failures, p90 {r.first_p90:.2f} s", r.failures == 0 and r.first_p90 <= 3.0)
        ratio = r.tokens_per_s / static["tokens_per_s"]
        row(f"{big} users ({where}): aggregate >= 0.6x static generate()",
            f"{r.tokens_per_s:.1f} vs {static['tokens_per_s']:.1f} tok/s ({ratio:.2f}x)", ratio >= 0.6)
    s_ratio = single["engine_sampled"]["tokens_per_s"] / single["today_sampled"]["tokens_per_s"]
    g_ratio = single["engine_greedy"]["tokens_per_s"] / single["today_greedy"]["tokens_per_s"]
    row("one user, notebook sampling: >= 1.5x stream_reply", f"{s_ratio:.2f}x", s_ratio >= 1.5)
    row("one user, greedy: not slower", f"{g_ratio:.2f}x", g_ratio >= 1.0)
    row("sampling step (30 x 262,144) <= 20 ms", f"{samp['ours']:.1f} ms (transformers {samp['hf']:.0f} ms)",
        samp["ours"] <= 20.0)
    print(f"\nLoad average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
