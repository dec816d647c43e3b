"""Benchmark: explicit attention vs the fused SDPA path vs torch.nn.MultiheadAttention.

    python bench/attention.py                # T = 128 ... 4096, B = 1, D = 512, H = 8
    python bench/attention.py --lengths 128 256 --reps 5

Memory: every (implementation, T) runs in a fresh subprocess, so that its peak can be read
honestly from the kernel: "peak MiB" is the growth of the process's peak resident set size
(getrusage ru_maxrss) over one forward + backward pass, measured after the module, the input
and the libraries were set up and warmed up at a tiny length. It covers everything the pass
allocates (activations saved for backward, temporaries, gradients). On CUDA,
torch.cuda.max_memory_allocated is used instead.
Time: one fresh subprocess per T builds all three implementations and runs them in turns,
round after round (a shared machine then slows them alike); the best of --reps rounds after
one warm-up round, forward and backward timed separately. --threads sets torch's intra-op
threads (default: torch's own choice); on a busy machine 1 thread avoids OpenMP threads
waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import describe  # noqa: E402
from attention import MultiHeadAttention  # noqa: E402

IMPLS = ("explicit", "fused", "nn.MultiheadAttention")
EMB_DIM, N_HEADS, BATCH = 512, 8, 1


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the process's high-water resident set size.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(impl: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if impl == "nn.MultiheadAttention":
        return nn.MultiheadAttention(EMB_DIM, N_HEADS, bias=False, batch_first=True).to(device)
    return MultiHeadAttention(EMB_DIM, N_HEADS).to(device)


def _forward(impl: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if impl == "explicit":
        out, _weights = module(x, return_weights=True)  # asking for the weights forces the explicit path
        return out
    if impl == "fused":
        return module(x)
    out, _ = module(x, x, x, need_weights=False)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memory(impl: str, t: int) -> float:
    """Peak memory growth (MiB) of one forward + backward, measured in this (fresh) process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = _build(impl, device)
    warm = torch.randn(BATCH, 16, EMB_DIM, device=device, requires_grad=True)
    _forward(impl, module, warm).sum().backward()  # load kernels and thread pools before the baseline
    x = torch.randn(BATCH, t, EMB_DIM, device=device, requires_grad=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _peak_rss_mib()
    _forward(impl, module, x).sum().backward()
    _sync(device)
    return (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()) - base


def measure_time(t: int, reps: int) -> dict[str, dict[str, float]]:
    """Best forward and backward ms of every implementation at length t.

    The implementations take turns within each round, so that a machine shared with other work
    slows them alike and the ratios stay meaningful.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modules = {impl: _build(impl, device) for impl in IMPLS}
    x = torch.randn(BATCH, t, EMB_DIM, device=device, requires_grad=True)
    times: dict[str, dict[str, list[float]]] = {impl: {"fwd": [], "bwd": []} for impl in IMPLS}
    for round_ in range(reps + 1):
        for impl, module in modules.items():
            x.grad = None
            t0 = time.perf_counter()
            out = _forward(impl, module, x)
            _sync(device)
            t1 = time.perf_counter()
            out.sum().backward()
            _sync(device)
            t2 = time.perf_counter()
            del out
            if round_ > 0:  # round 0 warms up
                times[impl]["fwd"].append(t1 - t0)
                times[impl]["bwd"].append(t2 - t1)
    # Best of the rounds (as timeit advises): other processes only ever add time.
    return {impl: {"fwd_ms": min(v["fwd"]) * 1e3, "bwd_ms": min(v["bwd"]) * 1e3} for impl, v in times.items()}


def _reps_for(t: int, reps: int | None) -> int:
    if reps is not None:
        return reps
    return 10 if t <= 512 else 5 if t <= 2048 else 3


def machine() -> str:
    return describe()

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=None, help="timed passes per config (default 10/5/3 by length)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--time", type=int, metavar="T", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be at least 1")
        torch.set_num_threads(args.threads)

    if args.memory:
        print(json.dumps(measure_memory(args.memory[0], int(args.memory[1]))))
        return
    if args.time:
        print(json.dumps(measure_time(args.time, _reps_for(args.time, args.reps))))
        return

    def child(*extra: str) -> object:
        cmd = [sys.executable, __file__, *extra] + ([] if args.reps is None else ["--reps", str(args.reps)])
        cmd += [] if args.threads is None else ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows: dict[tuple[str, int], dict[str, float]] = {}
    started = time.perf_counter()
    for t in args.lengths:
        timed = child("--time", str(t))
        for impl in IMPLS:
            rows[(impl, t)] = {**timed[impl], "peak_mib": child("--memory", impl, str(t))}  # type: ignore[index]
        print(f"  measured T={t}", file=sys.stderr)

    print(f"Machine: {machine()}")
    print(f"B={BATCH}, D={EMB_DIM}, H={N_HEADS}, float32, no mask, forward + backward; "
          f"best of {args.reps or '10 (T<=512), 5 (T<=2048), 3'} interleaved rounds; peak = growth of peak RSS over one fwd+bwd "
          f"in a fresh process{' (CUDA: max_memory_allocated)' if torch.cuda.is_available() else ''}.")
    print()
    print("| T | explicit fwd / bwd ms | fused fwd / bwd ms | nn.MHA fwd / bwd ms | fused ÷ nn.MHA time "
          "| explicit peak MiB | fused peak MiB | nn.MHA peak MiB | explicit ÷ fused peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in args.lengths:
        e, f, m = (rows[(impl, t)] for impl in IMPLS)
        ratio_time = (f["fwd_ms"] + f["bwd_ms"]) / (m["fwd_ms"] + m["bwd_ms"])
        ratio_mem = e["peak_mib"] / max(f["peak_mib"], 1e-9)
        print(f"| {t} | {e['fwd_ms']:.1f} / {e['bwd_ms']:.1f} | {f['fwd_ms']:.1f} / {f['bwd_ms']:.1f} "
              f"| {m['fwd_ms']:.1f} / {m['bwd_ms']:.1f} | {ratio_time:.2f}× "
              f"| {e['peak_mib']:.0f} | {f['peak_mib']:.0f} | {m['peak_mib']:.0f} | {ratio_mem:.1f}× |")
    print()
    print(f"(bench wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
