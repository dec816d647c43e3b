"""How far the calibrated rounding's targets should move towards the full model's output
(GptqConfig.toward_full, generation/rounding/): perplexity and KL for each value, side by side in one run.

    python bench/toward_full.py                      # 0 (GPTQ's usual target), 0.25, 0.5, 1
    python bench/toward_full.py --values 0,0.5

One process: the converted bf16 snapshot (the app's cache) and its next-token distributions on the
question prompts; then for each value, a fresh copy of it rounded as the app rounds it (simulated in
bf16: each layer holds what its codes stand for) with only `toward_full` changed. Per row: perplexity
on held-out Shakespeare, KL(bf16 || model) of the first reply token on bench/questions.tsv with the
zero-shot line and with the app's example exchanges, and the rounding's time. Answers need the real
snapshot through the engine: bench/chat_quality.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import describe  # noqa: E402
from chat_quality import QUESTIONS, ZERO_SHOT, last_logprobs, load_questions, mean_kl, perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", default="0,0.25,0.5,1", help="comma-separated toward_full values in [0, 1]")
    args = ap.parse_args()
    try:
        values = [float(v) for v in args.values.split(",")]
    except ValueError:
        raise SystemExit(f"bad --values {args.values!r}: write numbers, e.g. 0,0.5") from None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation import Settings
    from generation.model import default_snapshot
    from generation.prompt import DEFAULT_SYSTEM
    from generation.rounding import calibrate, calibration_ids, calibration_texts
    from generation.rounding.snapshot import METHOD

    print(describe())
    full_dir, _ = default_snapshot(Settings.from_env())
    tok = AutoTokenizer.from_pretrained(full_dir, local_files_only=True)

    def full_model():
        return AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16, local_files_only=True).eval()

    questions = [q for q, _ in load_questions(QUESTIONS)]
    systems = {"zero-shot": ZERO_SHOT, "examples": DEFAULT_SYSTEM}
    ref = last_logprobs(SimpleNamespace(model=full_model(), tokenizer=tok), systems, questions)
    ids = calibration_ids(tok, calibration_texts())
    print(f"\nthe app: {METHOD}")
    print("\n| toward_full | rounding time | perplexity | KL vs bf16, zero-shot | KL vs bf16, example exchanges |")
    print("|---:|---:|---:|---:|---:|")
    for value in values:
        model = full_model()
        t0 = time.perf_counter()
        calibrate(model, ids, dataclasses.replace(METHOD, toward_full=value))
        seconds = time.perf_counter() - t0
        lm = SimpleNamespace(model=model, tokenizer=tok)
        got = last_logprobs(lm, systems, questions)
        kl = mean_kl(ref, got)
        print(f"| {value:g} | {seconds:.0f} s | {perplexity(lm):.2f} | {kl['zero-shot']:.4f} | {kl['examples']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
