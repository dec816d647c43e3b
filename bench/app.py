"""Benchmark of the app as users feel it; prints markdown tables.

1. Attention Lab update, server side: the handler a slider's release runs (module build, forward with
   trace, heatmap grid, trace table) and the chained step-view handler, each with Gradio's PNG
   encoding of its figure, for T <= 32 (target <= 150 ms for the whole update).
2. `python app.py` to serving (HTTP 200) and to the model being ready: with the converted snapshot
   cached, and with an empty cache dir (first run: GGUF conversion), each in a fresh process.
3. The chat's time to first token: the streaming handler from call to first text, default model,
   in-process (no network), plus the decode speed of the same replies.

Usage: python bench/app.py [--skip-first-run] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchutil import describe  # noqa: E402
import app  # noqa: E402
from ui.chat import EXAMPLE_PROMPTS  # noqa: E402
from ui.lab import LabHandlers  # noqa: E402
from apputil import start_app  # noqa: E402
from generation.settings import Settings  # noqa: E402

SENTENCE_32 = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
               "and the birds sing in the tall green trees near the quiet river bank today")


def machine() -> str:
    return describe()

def lab_update_ms(lab: LabHandlers, n_tokens: int, emb_dim: int, n_heads: int, causal: bool,
                  repeats: int) -> tuple[float, float]:
    """Median ms of (the heatmap event, the chained step-view event), each with its PNG encoding."""
    import gradio as gr

    text = " ".join(SENTENCE_32.split()[:n_tokens])
    plot = gr.Plot(format="png")
    first, second = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        heat, _, _, _, result = lab.lab_update(text, emb_dim, n_heads, n_heads, 0.0, 0, causal, True, 0)
        plot.postprocess(heat)
        t1 = time.perf_counter()
        plot.postprocess(lab.steps_update(result, 0))
        t2 = time.perf_counter()
        first.append(t1 - t0)
        second.append(t2 - t1)
    # the first call warms caches (fonts, kernels)
    return statistics.median(first[1:]) * 1000, statistics.median(second[1:]) * 1000


def startup(env: dict[str, str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    server = start_app(env, wait_model=False)
    serving = time.perf_counter() - t0
    try:
        while "Model ready:" not in server.log():
            if "Model failed" in server.log() or server.proc.poll() is not None:
                raise RuntimeError(server.log()[-2000:])
            time.sleep(0.1)
        ready = time.perf_counter() - t0
    finally:
        server.stop()
    return serving, ready


def chat_first_token(state: app.AppState, repeats: int) -> list[tuple[float, float]]:
    class _Req:
        session_hash = "bench"

    out = []
    for prompt in EXAMPLE_PROMPTS[:repeats]:
        _, history, _ = state.chat.user_turn(prompt, [], _Req())  # Send: registers the reply
        t0 = time.perf_counter()
        first = None
        stats = ""
        for hist, _, user_stats, _ in state.chat.bot_turn(history, 0, "", 48, 0.0, 0.95, 0, 1.0, -1, 0, _Req()):
            if first is None and len(hist) > 1:
                first = time.perf_counter() - t0
            if isinstance(user_stats, str):
                stats = user_stats
        tps = float(stats.split("**")[1].split()[0]) if "**" in stats else float("nan")
        out.append((first or float("nan"), tps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-first-run", action="store_true", help="skip the empty-cache start (about a minute)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    print(f"Machine: {machine()}\n")
    state = app.AppState.create()
    print("### Attention Lab update, server side (handler + PNG encoding), median ms\n")
    print("| tokens T | emb_dim | heads | causal | heatmaps + trace event | then step view event | total | <= 150 ms? |")
    print("|---:|---:|---:|---|---:|---:|---:|---|")
    for t, d, h, c in [(8, 32, 4, False), (16, 32, 4, True), (32, 32, 4, False), (32, 64, 8, True),
                       (32, 128, 16, False)]:
        a, b = lab_update_ms(state.lab, t, d, h, c, args.repeats)
        print(f"| {t} | {d} | {h} | {'yes' if c else 'no'} | {a:.0f} | {b:.0f} | {a + b:.0f} | "
              f"{'yes' if a + b <= 150 else 'no'} |")

    print("\n### `python app.py`: seconds to serving and to the model being ready\n")
    print("| cache | to serving (HTTP 200) | to model ready |")
    print("|---|---:|---:|")
    s, r = startup({})
    print(f"| cached snapshot | {s:.1f} | {r:.1f} |")
    if not args.skip_first_run:
        with tempfile.TemporaryDirectory(prefix="attention-lab-bench-cache-") as tmp:
            s, r = startup({"ATTN_LAB_CACHE": tmp})
        print(f"| empty cache dir (first run: GGUF conversion) | {s:.1f} | {r:.1f} |")

    print("\n### Chat: time to first token (streaming handler, in-process, greedy, 48 new tokens max)\n")
    state.model.start()
    state.model.wait()
    settings = Settings.from_env()
    print("| prompt | first token s | decode tokens/s |")
    print("|---|---:|---:|")
    for prompt, (first, tps) in zip(EXAMPLE_PROMPTS, chat_first_token(state, 3)):
        print(f"| {prompt} | {first:.2f} | {tps:.1f} |")
    print(f"\nModel: {state.model.lm.summary()}; chat concurrency {settings.chat_concurrency}.")


if __name__ == "__main__":
    main()
