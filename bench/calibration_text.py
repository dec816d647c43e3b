"""Write a calibration text for the calibrated NF4 rounding: what the full-precision model writes itself.

    python bench/calibration_text.py --out mine.json                      # the first part: from <bos>
    python bench/calibration_text.py --temperature 0.8 --out mine.json    # a variant to measure
    python bench/calibration_text.py --arithmetic --out sums.json         # the second part: sums
    python bench/calibration_text.py --facts --out facts.json             # fact sheets (measured, not kept)

Each text is sampled by the default model in bf16 (the GGUF dequantized), with no top-k, about
`--tokens` tokens long (more than the rounding reads: SEQ_TOKENS in generation/rounding/snapshot.py,
and a decoded text tokenizes again into a few tokens more or fewer). The output is one part of
`generation/rounding/calibration.json` ({"notes", "texts"}); to measure a text, put it into that
file's "parts" in a scratch checkout: the calibrated snapshot's cache name includes the file's
digest, so the next start rounds a new snapshot with it, and `python bench/logit_scale.py` or
`python bench/chat_quality.py` measure that snapshot.

The shipped file's first part was sampled from `<bos>` at temperature 1 (64 samples of 256 tokens;
it keeps the 44 that still fill 255 tokens when tokenized again); its seed was not kept, so this
writes another sample of the same kind, not the same bytes. That text is web pages and code with
almost no arithmetic, and the 4-bit model calibrated on it alone lost bf16's sums and products more
than anything else (bench/README.md, "What the 4-bit model loses"). The second part is
`--arithmetic` as its defaults stand: the model continues each of ARITHMETIC_OPENINGS (a title and
one worked line of our own, none of them a question the quality bench asks) twice at temperature
0.7, and writes its own worksheets, right or wrong: the rounding keeps what the full-precision model
computes, whatever that is. `--facts` writes fact sheets the same way from FACT_OPENINGS (three
continuations each, seed 5678; `--seed 5679` the second draw) and keeps the first two per opening
that fill a row and hold no question of the bench: measured as a third part in two draws and not
kept, as it moved the answers no further than the same text in another row order does
(bench/README.md, "Facts the model wrote itself").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import describe  # noqa: E402

ARITHMETIC_OPENINGS = (
    "Addition practice\n\n1. 12 + 5 = 17\n2. ",
    "Subtraction practice\n\n1. 15 - 7 = 8\n2. ",
    "Multiplication practice\n\n1. 7 x 4 = 28\n2. ",
    "Division practice\n\n1. 18 / 6 = 3\n2. ",
    "Word problems with answers\n\nProblem 1: Sam has 5 apples and buys 6 more. How many apples does he have now?\n"
    "Answer: 11 apples.\n\nProblem 2:",
    "Counting by fives: 5, 10, 15, 20,",
    "Quick sums\n\n9 + 4 = 13\n",
    "Math facts to remember\n\n- Double 6 is 12.\n- ",
)

FACT_OPENINGS = (
    "General knowledge quiz with answers\n\nQ: What is the largest island in the world?\nA: Greenland.\n\nQ:",
    "Science facts\n\n- Sound travels faster in water than in air.\n- ",
    "Famous inventions and their inventors\n\n- The light bulb: Thomas Edison\n- ",
    "Animal facts for kids\n\n1. An octopus has three hearts.\n2. ",
    "History quiz\n\nQ: In which year did the Second World War end?\nA: 1945.\n\nQ:",
    "Geography facts\n\n1. The Amazon River flows through South America.\n2. ",
    "Word meanings\n\n- Enormous means very large.\n- ",
    "Facts about the human body\n\n- The skin is the largest organ of the body.\n- ",
)


def clean_rows(tokenizer, texts: list[str], per_opening: int, keep: int) -> list[str]:
    """Of each opening's `per_opening` texts (in order), the first `keep` that fill a calibration row
    (SEQ_TOKENS - 1 tokens when tokenized again) and hold no question of the bench."""
    from chat_quality import QUESTION_SETS, load_questions
    from generation.rounding.snapshot import SEQ_TOKENS

    asked = [q.rstrip("?").lower() for name in QUESTION_SETS for q, _ in load_questions(REPO / "bench" / name)]
    kept: list[str] = []
    for start in range(0, len(texts), per_opening):
        fit = [t for t in texts[start:start + per_opening]
               if len(tokenizer(t, add_special_tokens=False).input_ids) >= SEQ_TOKENS - 1
               and not any(q in t.lower() for q in asked)]
        kept += fit[:keep]
    return kept


def continue_sampled(lm, ids: torch.Tensor, new: int, temperature: float, top_p: float) -> list[str]:
    """Exactly `new` tokens sampled after each row of ids (n, P) (no top-k), decoded without the prompt."""
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=temperature, top_p=top_p, top_k=0,
                                max_new_tokens=new, min_new_tokens=new)  # (n, P + new)
    return [lm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def from_bos(lm, samples: int, tokens: int, temperature: float, top_p: float, batch: int) -> list[str]:
    """`samples` texts sampled from <bos>, `tokens` new tokens each."""
    texts: list[str] = []
    t0 = time.perf_counter()
    while len(texts) < samples:
        ids = torch.full((min(batch, samples - len(texts)), 1), lm.tokenizer.bos_token_id)  # (n, 1)
        texts += continue_sampled(lm, ids, tokens, temperature, top_p)
        print(f"{len(texts)}/{samples} texts, {time.perf_counter() - t0:.0f} s", flush=True)
    return texts


def from_openings(lm, openings: tuple[str, ...], per_opening: int, tokens: int, temperature: float,
                  top_p: float) -> list[str]:
    """`per_opening` continuations of each opening (after <bos>), each `tokens` tokens long with
    its opening, which the text keeps."""
    texts: list[str] = []
    t0 = time.perf_counter()
    for opening in openings:
        ids = lm.tokenizer(opening, return_tensors="pt").input_ids.repeat(per_opening, 1)  # (n, P), <bos> first
        texts += [opening + t for t in continue_sampled(lm, ids, tokens + 1 - ids.shape[1], temperature, top_p)]
        print(f"{len(texts)}/{len(openings) * per_opening} texts, {time.perf_counter() - t0:.0f} s", flush=True)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arithmetic", action="store_true",
                    help="continue ARITHMETIC_OPENINGS (defaults then: temperature 0.7, 2 per opening, seed 4321)")
    ap.add_argument("--facts", action="store_true",
                    help="continue FACT_OPENINGS (defaults then: temperature 0.7, 3 per opening, 2 kept, seed 5678)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=64, help="texts from <bos>")
    ap.add_argument("--per-opening", type=int, help="texts per opening (--arithmetic: 2, --facts: 3)")
    ap.add_argument("--tokens", type=int, default=272)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    if args.arithmetic and args.facts:
        raise SystemExit("--arithmetic or --facts, not both")
    openings = args.arithmetic or args.facts
    temperature = args.temperature if args.temperature is not None else (0.7 if openings else 1.0)
    seed = args.seed if args.seed is not None else (4321 if args.arithmetic else 5678 if args.facts else 1234)
    per_opening = args.per_opening if args.per_opening is not None else (3 if args.facts else 2)
    if not (temperature > 0 and 0 < args.top_p <= 1 and args.samples > 0 and per_opening > 0
            and args.tokens >= 256):
        raise SystemExit("need temperature > 0, 0 < top-p <= 1, samples > 0, per-opening > 0 and tokens >= 256")
    torch.set_num_threads(2)
    from generation import load_model

    print(describe())
    lm = load_model(load_4bit=False)
    torch.manual_seed(seed)
    how = f"temperature {temperature:g}, top-p {args.top_p:g}, no top-k, {args.tokens} tokens each"
    if args.arithmetic:
        texts = from_openings(lm, ARITHMETIC_OPENINGS, per_opening, args.tokens, temperature, args.top_p)
        notes = (f"Arithmetic worksheets written by the full-precision default model itself (google/gemma-3-270m "
                 f"from the GGUF, bf16): each begins with one of {len(ARITHMETIC_OPENINGS)} openings (a title and "
                 f"one worked line), {per_opening} continuations each, {how} with the opening "
                 f"(bench/calibration_text.py --arithmetic, seed {seed}). The model's own sums, right or wrong; "
                 f"no question the quality bench asks.")
    elif args.facts:
        texts = clean_rows(lm.tokenizer, from_openings(lm, FACT_OPENINGS, per_opening, args.tokens, temperature,
                                                       args.top_p), per_opening, keep=2)
        notes = (f"Fact sheets written by the full-precision default model itself (google/gemma-3-270m from the "
                 f"GGUF, bf16): each begins with one of {len(FACT_OPENINGS)} openings (a title and one line), "
                 f"{per_opening} continuations each, {how} with the opening (bench/calibration_text.py --facts, "
                 f"seed {seed}); of each opening's, the first two that fill a row and hold no question the "
                 f"quality bench asks.")
    else:
        texts = from_bos(lm, args.samples, args.tokens, temperature, args.top_p, args.batch)
        notes = (f"Text the full-precision default model wrote itself (google/gemma-3-270m from the GGUF, bf16), "
                 f"sampled from <bos> at {how} (bench/calibration_text.py, seed {seed}): nothing here is "
                 f"evaluation text.")
    args.out.write_text(json.dumps({"notes": notes, "texts": texts}, ensure_ascii=False, indent=0), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
