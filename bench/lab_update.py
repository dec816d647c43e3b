"""Benchmark: server time of one Attention Lab update, the way the app and gradio do it.

    python bench/lab_update.py               # T in {8, 16, 32} x heads {1, 4, 8, 16}, 30 reps each
    python bench/lab_update.py --reps 10 --tokens 32 --heads 8

One update = run_lab + plot_heads (the grid) + plot_steps (the step-by-step view of head 0), each
figure turned into a PNG data URL by ``gr.Plot(format="png").postprocess`` itself (gradio 6:
``processing_utils.encode_plot_to_base64``, a plain ``Figure.savefig(format="png")`` at the
figure's dpi, no tight bbox, then ``plt.close``). "grid" columns time run_lab + plot_heads +
its PNG only; "update" adds plot_steps and its PNG. The machine is shared, so CPU time
(time.process_time, all threads of this process) is reported as best and median over --reps
runs after two warm-up runs, next to wall time (median). attention.canvas caches the bitmaps of
the labels it drew (tokens, titles, values): "new sentence" runs a sentence of words not seen
before every time, the cost of the first update after someone types a new sentence. --threads sets torch's
intra-op threads (default: torch's own choice): run_lab's tiny matrices gain nothing from two
threads, and on a loaded machine the second one mostly waits. "PNG px" is the size of the grid and
of the step view (width x height): PNG encoding grows with it, and the app's plot column is ~900 px
wide (a wider PNG is scaled down in the browser).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import describe  # noqa: E402
import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402
import torch  # noqa: E402

from attention.lab import LabConfig, run_lab  # noqa: E402
from attention.plot import plot_heads, plot_steps  # noqa: E402

WORDS = ("The teacher wrote a short sentence on the board , and every student in the room watched how each "
         "word looked back at the words before it while the heads of attention lit up one by one .").split()


def _sentence(n: int, fresh: int | None = None) -> str:
    words = (WORDS * (n // len(WORDS) + 1))[:n]
    if fresh is not None:  # words nobody typed before (their labels are not cached yet)
        words = [f"{w}{fresh}" if w.isalpha() else w for w in words]
    return " ".join(words)


def _machine() -> str:
    return (f"{describe()}; matplotlib {matplotlib.__version__} ({matplotlib.get_backend()}), "
            f"gradio {gr.__version__}")

def _update(cfg: LabConfig, plot: gr.Plot, steps: bool) -> int:
    result = run_lab(cfg)
    heads = int(result.weights.shape[0])
    title = f"{heads} heads × d_k={cfg.emb_dim // heads} · {cfg.n_kv_heads} K/V heads · causal"
    size = len(plot.postprocess(plot_heads(result.weights, result.tokens, title=title)).plot)
    if steps:
        size += len(plot.postprocess(plot_steps(result.explain(0), result.tokens)).plot)
    return size


def _measure(work, reps: int) -> tuple[float, float, float]:
    for rep in range(2):
        work(-1 - rep)
    cpu, wall = [], []
    for rep in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        work(rep)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu) * 1e3, statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plot = gr.Plot(format="png")
    print(f"Machine: {_machine()}\n")
    print("| T | heads | run_lab CPU ms median | grid CPU ms best | grid CPU ms median | grid wall ms median "
          "| update CPU ms best | update CPU ms median | update wall ms median | new sentence: update CPU ms median "
          "| PNG px: grid, steps |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in args.tokens:
        for h in args.heads:
            def config(fresh: int | None = None) -> LabConfig:
                return LabConfig(_sentence(t, fresh), emb_dim=64, n_heads=h, n_kv_heads=h, causal=True,
                                 multi_head=h > 1)

            cfg = config()
            lab = _measure(lambda _: run_lab(cfg), args.reps)
            grid = _measure(lambda _: _update(cfg, plot, False), args.reps)
            full = _measure(lambda _: _update(cfg, plot, True), args.reps)
            fresh = _measure(lambda rep: _update(config(1000 * t + 10 * h + rep + 3), plot, True), args.reps)
            result = run_lab(cfg)
            px = ", ".join("{}x{}".format(*fig.canvas.get_width_height()) for fig in (
                plot_heads(result.weights, result.tokens), plot_steps(result.explain(0), result.tokens)))
            print(f"| {t} | {h} | " + " | ".join(f"{v:.0f}" for v in (lab[1], *grid, *full, fresh[1])) + f" | {px} |",
                  flush=True)


if __name__ == "__main__":
    main()
