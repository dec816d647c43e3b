"""Is the 4-bit model less sure of itself than bf16? One scale on its logits, scanned.

    python bench/logit_scale.py                       # the app's calibrated NF4 (~3 min on 2 CPU cores)
    python bench/logit_scale.py --rounding plain

A scale s on the logits (the same as scaling the final norm's output) leaves every greedy choice as it
is and makes sampling sharper (s > 1) or flatter (s < 1). If rounding made the model uniformly less
confident, some s > 1 would bring its next-token distributions closer to bf16's and win back sampled
answers. For each s: KL(bf16 || softmax(s * logits)) on the calibration text (the model's own, where
such a scale would be chosen), at the end of every question's prompt (bench/questions.tsv, with and
without the example exchanges) and on the first 2,000 tokens of tinyshakespeare, with the perplexity
there; and each model's mean entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import describe  # noqa: E402
from chat_quality import PPL_CHARS, PPL_TOKENS, SHAKESPEARE, load_questions, system_text  # noqa: E402

SCALES = (0.9, 0.95, 1.0, 1.03, 1.06, 1.1, 1.2)
CHUNK = 128  # positions a time through the 262k-wide head


def scan(full, low, h_full: torch.Tensor, h_low: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """(N, D) hidden states of both models at the same N positions -> mean KL and NLL per scale, entropies."""
    kl = dict.fromkeys(SCALES, 0.0)
    nll = dict.fromkeys(SCALES, 0.0)
    ent_full = ent_low = 0.0
    with torch.inference_mode():
        for i in range(0, h_full.shape[0], CHUNK):
            ref = full.model.lm_head(h_full[i : i + CHUNK]).float().log_softmax(-1)  # (n, V)
            z = low.model.lm_head(h_low[i : i + CHUNK]).float()  # (n, V)
            ent_full -= float((ref.exp() * ref).sum())
            plain = z.log_softmax(-1)
            ent_low -= float((plain.exp() * plain).sum())
            for s in SCALES:
                lp = (s * z).log_softmax(-1)
                kl[s] += float((ref.exp() * (ref - lp)).sum())
                if targets is not None:
                    nll[s] += float(torch.nn.functional.nll_loss(lp, targets[i : i + CHUNK], reduction="sum"))
    n = h_full.shape[0]
    return {"kl": {s: v / n for s, v in kl.items()}, "nll": {s: v / n for s, v in nll.items()},
            "entropy": (ent_full / n, ent_low / n)}


def row(name: str, res: dict, ppl: bool = False) -> str:
    best = min(res["kl"], key=res["kl"].get)
    cells = [f"{res['kl'][s]:.4f}" + (f" ({float(torch.tensor(res['nll'][s]).exp()):.2f})" if ppl else "")
             for s in SCALES]
    return f"| {name} | {res['entropy'][0]:.3f} / {res['entropy'][1]:.3f} | " + " | ".join(cells) + f" | {best} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounding", default="calibrated", choices=("calibrated", "plain"))
    ap.add_argument("--rows", type=int, default=16, help="calibration rows (SEQ_TOKENS tokens each)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from generation import Settings, load_model
    from generation.prompt import build_prompt
    from generation.rounding import calibration_ids, calibration_texts, final_hidden

    print(describe())
    full = load_model(load_4bit=False)
    low = load_model(settings=dataclasses.replace(Settings.from_env(), nf4_rounding=args.rounding))
    tok = full.tokenizer
    print(f"\nNF4 rounding: {args.rounding}; KL(bf16 || NF4 with its logits x s), ppl in brackets\n")
    print("| text | entropy bf16 / NF4 | " + " | ".join(f"s = {s}" for s in SCALES) + " | lowest KL at |")
    print("|---|---|" + "---:|" * len(SCALES) + "---|")

    ids = calibration_ids(tok, calibration_texts())[: args.rows]  # (rows, SEQ_TOKENS), <bos> first
    d = full.model.config.get_text_config().hidden_size
    hf, hl = (final_hidden(m.model, ids)[:, 1:].reshape(-1, d) for m in (full, low))
    print(row(f"calibration text ({hf.shape[0]} positions)", scan(full, low, hf, hl)), flush=True)

    questions = [q for q, _ in load_questions()]
    for prompt in ("zero-shot", "examples"):
        system = system_text(prompt)
        last = [[final_hidden(m.model, build_prompt(tok, q, system=system).input_ids)[0, -1] for q in questions]
                for m in (full, low)]
        print(row(f"{len(questions)} question prompts, {prompt}", scan(full, low, *map(torch.stack, last))),
              flush=True)

    if SHAKESPEARE.is_file():
        x = tok(SHAKESPEARE.read_text(encoding="utf-8")[:PPL_CHARS], return_tensors="pt").input_ids[:, :PPL_TOKENS]
        hf, hl = (final_hidden(m.model, x)[0, :-1] for m in (full, low))
        print(row(f"tinyshakespeare, first {x.shape[1]} tokens", scan(full, low, hf, hl, x[0, 1:]), ppl=True))


if __name__ == "__main__":
    main()
