"""Load through the app: N simultaneous chat users, the chat served by the local engine vs a remote server.

For each backend, `python app.py` is started (one after the other, never both at once), warmed up
with one short reply, then for every N (default 1, 8, 30) N `gradio_client` users, each with its own
session, send one `/chat` message at the same moment (the notebook's three prompts in turn, greedy
by default, at most --max-new-tokens). Per user: time to the first streamed text and to
the whole reply, and the reply's tokens (counted with the model's tokenizer). One table row per
backend and N: TTFT p50/p95, reply p50/max, tokens/s of all users together, errors.

The remote server is, by default, `transformers serve <default model snapshot> --continuous-batching`
started here on the CPU (the same Gemma 3 270m, bf16; its paged KV cache bounded by --cb-num-blocks).
--remote-url/--remote-model point the app at any other OpenAI-compatible server (vLLM on a GPU, ...).
On one machine the server shares the cores with the app, so this compares serving engines, not
hardware: the point of a remote backend is that it runs somewhere else.

Both apps get the same CHAT_CONCURRENCY (--chat-concurrency): the replies the app lets run at once
(the local engine's batch; for the remote backend, the streams it keeps open to the server).
Greedy (--temperature 0) and the local model in bf16 like the server's (LOAD_IN_4BIT=false; --local-nf4
keeps the app's NF4 default) so both backends write the same replies and tokens/s compare like for
like; besides, `transformers serve` samples only when the model's generation config says
do_sample, which the converted Gemma's does not, so it answers greedily whatever the temperature.

Usage: python bench/load_remote.py [--users 1,8,30] [--max-new-tokens 64] [--chat-concurrency 32]
                                   [--remote-url URL --remote-model NAME] [--only local|remote]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from apputil import start_app  # noqa: E402
from benchutil import ChatResult, chat_round, describe, percentile  # noqa: E402
from openai_server import default_model_folder, start_transformers_serve  # noqa: E402

# The original notebook's three prompts (the Chat tab's examples).
PROMPTS = ("What is the capital of France?", "Explain self-attention in one paragraph.",
           "Write a haiku about transformers.")
POLL_S = 0.02  # one thread watches every job: per-user threads polling gradio_client would eat the cores


@dataclass
class Row:
    backend: str
    users: int
    ttft_p50: float
    ttft_p95: float
    latency_p50: float
    latency_max: float
    tokens: int
    wall_s: float
    tokens_per_s: float
    errors: int
    first_error: str | None


def run_users(url: str, n: int, max_new_tokens: int, temperature: float, count_tokens,
              timeout_s: float) -> tuple[list[ChatResult], float]:
    """N users send one chat each at once; returns their results and the wall time of the whole round."""
    results = chat_round(url, n, lambda i: (PROMPTS[i % len(PROMPTS)], "", max_new_tokens, temperature),
                         count_tokens, timeout_s, POLL_S)
    return results, max(r.end_s for r in results)


def summarize(backend: str, n: int, results: list[ChatResult], wall: float) -> Row:
    ok = [r for r in results if r.error is None]
    ttfts = [r.first_s for r in ok if r.first_s is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return Row(backend, n, percentile(ttfts, 50), percentile(ttfts, 95),
               percentile([r.end_s for r in ok], 50), max((r.end_s for r in ok), default=float("nan")),
               tokens, wall, tokens / wall if wall > 0 else 0.0, len(errors), errors[0] if errors else None)


def bench_backend(name: str, env: dict[str, str], users: list[int], max_new_tokens: int, temperature: float,
                  count_tokens, timeout_s: float) -> list[Row]:
    print(f"\n[{name}] starting the app ...", flush=True)
    app = start_app(env, wait_model=(name == "local"))
    rows = []
    try:
        # The first request pays lazy inits (and fixes a continuous-batching server's sampling settings).
        warm, _ = run_users(app.url, 1, 4, temperature, count_tokens, timeout_s)
        if warm[0].error:
            raise RuntimeError(f"{name}: warm-up failed: {warm[0].error}\n{app.log()[-3000:]}")
        for n in users:
            results, wall = run_users(app.url, n, max_new_tokens, temperature, count_tokens, timeout_s)
            row = summarize(name, n, results, wall)
            rows.append(row)
            print(f"[{name}] N={n}: {row.tokens} tokens in {row.wall_s:.1f} s, {row.errors} errors"
                  + (f" (first: {row.first_error})" if row.first_error else ""), flush=True)
    finally:
        app.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1,8,30", help="comma-separated simultaneous users per round")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default, see above)")
    ap.add_argument("--chat-concurrency", type=int, default=32, help="CHAT_CONCURRENCY for both apps")
    ap.add_argument("--remote-url", help="an OpenAI-compatible base URL (default: start transformers serve here)")
    ap.add_argument("--remote-model", help="the served model's name (with --remote-url; default: first listed)")
    ap.add_argument("--cb-num-blocks", type=int, default=64, help="KV cache blocks of the started server")
    ap.add_argument("--threads", type=int, help="torch threads of the app and the started server "
                    "(default: all cores; 1 helps on a box shared with other busy processes)")
    ap.add_argument("--only", choices=("local", "remote"))
    ap.add_argument("--local-nf4", action="store_true", help="the local app in NF4 (its default) instead of bf16")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a round may take")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    users = [int(x) for x in args.users.split(",") if x.strip()]

    from transformers import AutoTokenizer

    folder = default_model_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    print(f"machine: {describe(args.threads)}")
    load0 = os.getloadavg()
    base_env = {"CHAT_CONCURRENCY": str(args.chat_concurrency), "PYTHONUNBUFFERED": "1"}
    if args.threads:
        base_env["TORCH_NUM_THREADS"] = str(args.threads)
    rows: list[Row] = []
    server = None
    try:
        if args.only != "remote":
            local_env = {**base_env, "LOAD_IN_4BIT": "true" if args.local_nf4 else "false"}
            rows += bench_backend("local", local_env, users, args.max_new_tokens, args.temperature, count_tokens,
                                  args.timeout)
        if args.only != "local":
            if args.remote_url:
                url, model, what = args.remote_url, args.remote_model, args.remote_url
            else:
                print("\n[remote] starting transformers serve --continuous-batching ...", flush=True)
                server = start_transformers_serve(folder, continuous_batching=True, threads=args.threads,
                                                  extra_args=("--cb-num-blocks", str(args.cb_num_blocks)))
                url, model = server.url, server.model
                what = f"transformers serve --continuous-batching (CPU, bf16; ready in {server.started_s:.0f} s)"
            env = {**base_env, "CHAT_BACKEND_URL": url}
            if model:
                env["CHAT_BACKEND_MODEL"] = model
            rows += bench_backend("remote", env, users, args.max_new_tokens, args.temperature, count_tokens,
                                  args.timeout)
            print(f"\nremote server: {what}")
    finally:
        if server is not None:
            server.stop()

    load1 = os.getloadavg()
    print(f"load average: {load0[0]:.1f} at start, {load1[0]:.1f} at end; {args.max_new_tokens} max new tokens, "
          f"temperature {args.temperature:g}, local model {'NF4' if args.local_nf4 else 'bf16'}, "
          f"CHAT_CONCURRENCY={args.chat_concurrency}, torch threads {args.threads or 'all cores'}\n")
    print("| backend | users | TTFT p50 s | TTFT p95 s | reply p50 s | reply max s | tokens | wall s | tokens/s (all users) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.backend} | {r.users} | {r.ttft_p50:.2f} | {r.ttft_p95:.2f} | {r.latency_p50:.1f} | "
              f"{r.latency_max:.1f} | {r.tokens} | {r.wall_s:.1f} | {r.tokens_per_s:.1f} | {r.errors} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
