"""The norm weights tuned end to end after the calibrated rounding (generation/rounding/normtune.py):
what it buys and what it costs, side by side in one run.

    python bench/norm_tuning.py                                   # 10 steps x 4 rows at lr 6e-3
    python bench/norm_tuning.py --configs 10x4@6e-3,10x4@2e-3 --seeds 0,1

One process: the converted bf16 snapshot (the app's cache), its next-token distributions on the
question prompts, then the calibrated rounding as the app builds it (generation/rounding/, simulated
in bf16: each layer holds what its codes stand for), then each tuning from that same start, on the
first steps x rows rows of the calibration text in a seeded order. Per row: perplexity on held-out
Shakespeare, KL(bf16 || model) of the first reply token on bench/questions.tsv with the zero-shot
line and with the app's example exchanges, and the tuning's time (without the full model's final
hidden states for its rows, computed once up front). Answers need the real snapshot through the engine: bench/chat_quality.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import describe  # noqa: E402
from chat_quality import QUESTIONS, ZERO_SHOT, last_logprobs, load_questions, mean_kl, perplexity  # noqa: E402


def parse_config(text: str):
    """'10x4@6e-3' -> (steps, rows, lr)."""
    try:
        shape, lr = text.split("@")
        steps, rows = shape.split("x")
        return int(steps), int(rows), float(lr)
    except ValueError:
        raise SystemExit(f"bad config {text!r}: write STEPSxROWS@LR, e.g. 10x4@6e-3") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="10x4@6e-3", help="comma-separated STEPSxROWS@LR")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (rows and positions drawn)")
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.configs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation import Settings
    from generation.model import default_snapshot
    from generation.prompt import DEFAULT_SYSTEM
    from generation.rounding import (
        NormTuning, calibrate, calibration_ids, calibration_texts, final_hidden, norm_modules, tune_norms,
    )
    from generation.rounding.snapshot import METHOD

    print(describe())
    full_dir, _ = default_snapshot(Settings.from_env())
    tok = AutoTokenizer.from_pretrained(full_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16, local_files_only=True).eval()
    lm = SimpleNamespace(model=model, tokenizer=tok)
    questions = [q for q, _ in load_questions(QUESTIONS)]
    systems = {"zero-shot": ZERO_SHOT, "examples": DEFAULT_SYSTEM}
    ref = last_logprobs(lm, systems, questions)
    ids = calibration_ids(tok, calibration_texts())
    # every tuning's rows, in each seed's order, through the full model before it is rounded
    targets = {}
    for seed in seeds:
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
        targets[seed] = (order, final_hidden(model, ids[order[: max(s * r for s, r, _ in configs)]]))
    t0 = time.perf_counter()
    calibrate(model, ids, METHOD)
    print(f"calibrated rounding: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    start = {name: mod.weight.detach().clone() for name, mod in norm_modules(model).items()}

    def row(label: str, seconds: str) -> str:
        got = last_logprobs(lm, systems, questions)
        kl = mean_kl(ref, got)
        return f"| {label} | {seconds} | {perplexity(lm):.2f} | {kl['zero-shot']:.4f} | {kl['examples']:.4f} |"

    print("\n| norm weights | tuning time | perplexity | KL vs bf16, zero-shot | KL vs bf16, example exchanges |")
    print("|---|---:|---:|---:|---:|")
    print(row("as rounded (the app)", "–"), flush=True)
    for steps, rows, lr in configs:
        for seed in seeds:
            with torch.no_grad():
                for name, mod in norm_modules(model).items():
                    mod.weight.copy_(start[name])
            order, target = targets[seed]
            n = steps * rows
            t0 = time.perf_counter()
            cfg = NormTuning(steps=steps, rows=rows, lr=lr, seed=seed)
            tune_norms(model, ids[order[:n]], target[:n], cfg)
            print(row(f"tuned {steps} x {rows} rows, lr {lr:g}, seed {seed}", f"{time.perf_counter() - t0:.1f} s"),
                  flush=True)


if __name__ == "__main__":
    main()
