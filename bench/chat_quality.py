"""Does the chat answer? Short factual questions through the app's engine, scored by their answers.

    python bench/chat_quality.py                  # every variant below (~15-25 min on 2 CPU cores)
    python bench/chat_quality.py --variants nf4-calibrated,bf16 --prompts examples

Variants (each in its own subprocess, loaded as the app loads it):
  nf4-plain        bitsandbytes NF4 as `from_pretrained` rounds it (absmax scales, nearest code)
  nf4-calibrated   the app's default: NF4 codes and scales chosen for each layer's output
                   (generation/rounding/), the same Linear4bit layers
  bf16             the same GGUF weights dequantized, no 4-bit rounding
Prompts:
  zero-shot        one instruction line (the app's system text until 2026-12)
  examples         generation.prompt.DEFAULT_SYSTEM: the instruction and a few example exchanges
  file:PATH        a system text of your own to compare (--prompts examples,file:mine.txt)
Decoding: greedy, and the notebook's sampling (temperature 0.7, top-p 0.95) over --seeds seeds. The
sampled figure is their mean ± its standard error: ten seeds' counts for the app's model spread
from 46 to 63 of 111 (bench/README.md), so to tell two models apart by their sampled answers, use
--seeds 10. Below the table, for each 4-bit variant against bf16: the greedy answers it loses and
gains, with an exact sign test of whether the net is more than that churn, and the sampled answers'
difference seed by seed (the same seeds for both, so what a seed's luck shares between them cancels).

The questions (bench/questions.tsv, 111 of them: capitals, science, arithmetic, words, people) are
never among the system text's examples. bench/questions_heldout.tsv (--questions) holds 40 more of
the same kinds that were never used to choose the examples; bench/questions_arithmetic.tsv 24 sums
and products with other numbers (what 4-bit rounding loses most: --changes lists, question by
question, what each 4-bit variant loses and gains against bf16). A reply counts when one of the
accepted answers appears in it as a whole word (case-insensitive): "The capital of France is Paris."
answers "Paris".
Also per variant: perplexity on held-out text and KL(bf16 || variant) of the next-token
distribution at the end of every question's prompt (the bf16 run writes its distributions first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import describe  # noqa: E402

QUESTIONS = Path(__file__).with_name("questions.tsv")
QUESTION_SETS = ("questions.tsv", "questions_heldout.tsv", "questions_arithmetic.tsv")  # every question asked
ZERO_SHOT = "The following is a conversation with a helpful assistant that answers questions accurately and concisely."
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PPL_CHARS, PPL_TOKENS = 20_000, 2000  # the first 2,000 tokens: never calibrated on
VARIANTS = ("nf4-plain", "nf4-calibrated", "bf16")
PROMPTS = ("zero-shot", "examples")
MAX_NEW_TOKENS = 48  # a short answer's length; a reply that has not named it by then is wrong anyway


def standard_error(values: list[int]) -> float:
    """The standard error of the mean of `values` (one seed's count each): how far the mean of this
    many seeds may sit from the mean over many; 0 for a single value."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def sign_test_p(lost: int, gained: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of the questions one model answers and the
    other not: the chance that, were the two equally good on questions of this kind, those questions
    would split between them at least as unevenly as `lost` against `gained`. 1.0 when none differ."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_difference(got: list[int], ref: list[int]) -> tuple[float, float]:
    """The mean over seeds of got[i] - ref[i] (each seed's right answers, the same seed for both
    models) and its standard error. A seed's count moves by up to ~17 of 111 from the next; where a
    seed's draws suit both models alike, the difference seed by seed leaves that shared part out."""
    if len(got) != len(ref) or not got:
        raise ValueError(f"need the same seeds for both: {len(got)} and {len(ref)} counts")
    diffs = [a - b for a, b in zip(got, ref)]
    return statistics.fmean(diffs), standard_error(diffs)


def load_questions(path: Path = QUESTIONS) -> list[tuple[str, list[str]]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        question, answers = line.split("\t")
        out.append((question, [a.strip() for a in answers.split("|")]))
    return out


def answered(reply: str, answers: list[str]) -> bool:
    """True when one of `answers` is in `reply` as a whole word or phrase (case-insensitive)."""
    return any(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", reply, re.IGNORECASE) for a in answers)


def system_text(prompt: str) -> str:
    """The system text a prompt name stands for; "file:PATH" reads a text to try from PATH."""
    from generation.prompt import DEFAULT_SYSTEM

    if prompt.startswith("file:"):
        return Path(prompt.removeprefix("file:")).read_text(encoding="utf-8").strip()
    return {"zero-shot": ZERO_SHOT, "examples": DEFAULT_SYSTEM}[prompt]


def replies(engine, questions: list[str], system: str, params) -> list[str]:
    """Each question's reply through `engine.stream_reply`, all submitted at once (the engine batches them)."""

    def one(q: str) -> str:
        text = ""
        for text in engine.stream_reply(q, (), system=system, params=params):
            pass
        return text

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        return list(pool.map(one, questions))


def score(engine, system: str, seeds: int, questions=None) -> dict:
    """{"greedy": right answers, "sampled": mean over seeds, "sampled_each": [...], "greedy_replies": [...],
    "greedy_right": [...] (one per question, in order)}."""
    from generation import SamplingParams

    qa = questions or load_questions()
    qs = [q for q, _ in qa]
    greedy = replies(engine, qs, system, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
    right = [answered(r, a) for r, (_, a) in zip(greedy, qa)]
    each = []
    for seed in range(seeds):
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.95, seed=1000 + seed)
        got = replies(engine, qs, system, params)
        each.append(sum(answered(r, a) for r, (_, a) in zip(got, qa)))
    return {"greedy": sum(right), "sampled": sum(each) / max(len(each), 1), "sampled_each": each,
            "n": len(qa), "greedy_replies": greedy, "greedy_right": right}


def changes(ref: dict, got: dict, questions: list[str]) -> tuple[list, list]:
    """The questions `got` answers differently from `ref` greedily (two score() results on the same
    questions): (lost: ref right, got wrong; gained: the other way), each [question, ref's reply, got's]."""
    pairs = zip(questions, ref["greedy_right"], got["greedy_right"], ref["greedy_replies"], got["greedy_replies"])
    lost, gained = [], []
    for q, a, b, ra, rb in pairs:
        if a != b:
            (lost if a else gained).append([q, ra.strip(), rb.strip()])
    return lost, gained


def perplexity(lm) -> float | None:
    """exp(mean NLL) over the first PPL_TOKENS tokens of tinyshakespeare (None where the file is missing)."""
    import torch

    if not SHAKESPEARE.is_file():
        return None
    ids = lm.tokenizer(SHAKESPEARE.read_text(encoding="utf-8")[:PPL_CHARS], return_tensors="pt").input_ids[:, :PPL_TOKENS]
    nll = 0.0
    with torch.inference_mode():
        h = lm.model.model(input_ids=ids).last_hidden_state[0]  # (T, D)
        for i in range(0, ids.shape[1] - 1, 250):  # logits in chunks: (T, V) at once would be ~2 GB
            target = ids[0, i + 1 : i + 251]  # (t,)
            logits = lm.model.lm_head(h[i : i + target.numel()]).float()  # (t, V)
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return float(torch.tensor(nll / (ids.shape[1] - 1)).exp())


def last_logprobs(lm, systems: dict[str, str], questions: list[str]):
    """{prompt: (Q, V) log-probabilities of the first reply token} for every question's prompt."""
    import torch

    from generation.prompt import build_prompt

    out = {}
    for name, system in systems.items():
        rows = []
        with torch.inference_mode():
            for q in questions:
                ids = build_prompt(lm.tokenizer, q, system=system).input_ids
                rows.append(lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().log_softmax(-1))
        out[name] = torch.stack(rows)
    return out


def mean_kl(ref: dict, got: dict) -> dict[str, float]:
    """{prompt: mean KL(ref || got)} over the questions, for last_logprobs' outputs (prompts in both)."""
    return {p: float((ref[p].exp() * (ref[p] - got[p])).sum(-1).mean()) for p in ref if p in got}


def run_variant(variant: str, prompts: list[str], seeds: int, ref_path: Path, questions: Path = QUESTIONS) -> dict:
    """Load `variant` as the app would, answer every question, measure perplexity and KL."""
    import torch

    from generation import ChatEngine, Settings, load_model

    t0 = time.perf_counter()
    if variant == "bf16":
        lm = load_model(load_4bit=False)
    else:
        settings = dataclasses.replace(Settings.from_env(), nf4_rounding=variant.removeprefix("nf4-"))
        lm = load_model(settings=settings)
    res: dict = {"variant": variant, "load_s": time.perf_counter() - t0, "ppl": perplexity(lm)}
    qa = load_questions(questions)
    systems = {p: system_text(p) for p in prompts}
    lp = last_logprobs(lm, systems, [q for q, _ in qa])
    if variant == "bf16":
        torch.save(lp, ref_path)
    elif ref_path.is_file():
        ref = torch.load(ref_path)
        res["kl"] = mean_kl({p: ref[p] for p in prompts if p in ref}, lp)
    engine = ChatEngine(lm, max_batch=32)
    try:
        for p in prompts:
            res[p] = score(engine, systems[p], seeds, qa)
    finally:
        engine.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--questions", type=Path, default=QUESTIONS,
                    help="the question set (default questions.tsv; questions_heldout.tsv: 40 never used to choose the examples; "
                         "questions_arithmetic.tsv: 24 sums and products)")
    ap.add_argument("--changes", action="store_true",
                    help="list each question a 4-bit variant answers differently from bf16 (greedy; needs bf16 among --variants)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompts = [p for p in args.prompts.split(",") if p]
    if args.child:
        print(json.dumps(run_variant(args.child, prompts, args.seeds, Path(args.ref), args.questions)))
        return
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {VARIANTS}")
    for p in prompts:
        if p.startswith("file:"):
            if not Path(p.removeprefix("file:")).is_file():
                raise SystemExit(f"no such system text file: {p.removeprefix('file:')!r}")
        elif p not in PROMPTS:
            raise SystemExit(f"unknown prompt {p!r}: choose from {PROMPTS} or file:PATH")
    print(describe())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "bf16_logprobs.pt"
        # bf16 first: the others' KL is measured against its distributions.
        for v in sorted(variants, key=lambda v: v != "bf16"):
            cmd = [sys.executable, __file__, "--child", v, "--prompts", ",".join(prompts),
                   "--seeds", str(args.seeds), "--ref", str(ref), "--questions", str(args.questions)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    n = results[0][prompts[0]]["n"]
    print("\n| model | perplexity | " + " | ".join(f"{p}: KL vs bf16 | {p}: greedy /{n} | {p}: sampled /{n} (mean of {args.seeds} ± its standard error)"
                                              for p in prompts) + " |")
    print("|---|---:|" + "---:|---:|---:|" * len(prompts))
    for r in results:
        cells = []
        for p in prompts:
            kl = r.get("kl", {}).get(p)
            cells += ["–" if kl is None else f"{kl:.4f}", str(r[p]["greedy"]),
                      f"{r[p]['sampled']:.1f} ± {standard_error(r[p]['sampled_each']):.1f} "
                      f"({', '.join(map(str, r[p]['sampled_each']))})"]
        ppl = "–" if r["ppl"] is None else f"{r['ppl']:.2f}"
        print(f"| {r['variant']} | {ppl} | " + " | ".join(cells) + " |")
    print_changes(results, prompts, [q for q, _ in load_questions(args.questions)], args.changes)


def print_changes(results: list[dict], prompts: list[str], questions: list[str], listed: bool) -> None:
    """How many greedy answers each 4-bit variant loses and gains against bf16 (the net is the
    table's difference; the two apart show how much of it is churn, and the sign test whether the
    net is more than churn), the sampled difference seed by seed, and with `listed` which."""
    ref = next((r for r in results if r["variant"] == "bf16"), None)
    if ref is None:
        return
    print()
    for r in results:
        if r is ref:
            continue
        for p in prompts:
            lost, gained = changes(ref[p], r[p], questions)
            print(f"{r['variant']}, {p}, greedy against bf16: lost {len(lost)}, gained {len(gained)} "
                  f"(exact sign test p = {sign_test_p(len(lost), len(gained)):.2f})")
            if len(r[p]["sampled_each"]) > 1:
                mean, se = paired_difference(r[p]["sampled_each"], ref[p]["sampled_each"])
                print(f"{r['variant']}, {p}, sampled against bf16, seed by seed: {mean:+.1f} ± {se:.1f} a seed")
            if listed:
                for tag, rows in (("lost", lost), ("gained", gained)):
                    for q, a, b in rows:
                        print(f"  {tag}: {q} | bf16: {a!r} | {r['variant']}: {b!r}")


if __name__ == "__main__":
    main()
