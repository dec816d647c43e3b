"""Could a smaller copy of the LM head keep greedy decoding exact? Rows to recompute per copy.

    python bench/head_copies.py                    # ~20 s on 2 CPU cores, prints a markdown table
    python bench/head_copies.py --positions 400

The fast decode reads an int8 copy of the tied LM head (Gemma 3 270m: 262,144 x 640, 160 MiB) every
token and keeps greedy choice exact by recomputing, from the bf16 weights, every token whose
rounded logit could still beat the best exact one (generation/decode/head.py). A copy with fewer
bits reads fewer bytes, but its logits are further off, so more tokens could still win. For each
copy below (symmetric codes, a scale per group of weights along the hidden size), at the final
hidden states of the default model (the Shakespeare text after position 20,000 of
../shared/data/tinyshakespeare.txt, never the perplexity text, and one chat prompt):

  rows       how many tokens v have rounded logit_v + bound_v >= the exact best logit: every one of
             them would have to be recomputed. bound_v = ||h||_2 ||w_v - w^_v||_2 (Cauchy-Schwarz:
             a proven bound on |h . w_v - h . w^_v|, from the row's own rounding error), so the
             count is the least any exact scheme built on that copy and bound must recompute
  top-1      how often the copy's own argmax is the bf16 head's
  bytes      the copy's codes and scales

The copies are simulated in fp32 (codes x scales): the counts depend on the rounding, not on a kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchutil import describe

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# (label, bits, group size along the hidden size; None = one scale per row)
COPIES = [("int8, a scale per row (the app's)", 8, None), ("int5, groups of 32", 5, 32), ("int4, groups of 32", 4, 32),
          ("int4, groups of 64", 4, 64)]


def rounded(w, bits: int, group: int | None):
    """w (V, D) fp32 -> its symmetric `bits`-bit rounding (fp32), absmax scale per group of `group`."""
    import torch

    v, d = w.shape
    g = d if group is None else group
    q_max = 2 ** (bits - 1) - 1
    wg = w.view(v, d // g, g)
    scale = (wg.abs().amax(-1, keepdim=True) / q_max).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.round(wg / scale).clamp(-q_max - 1, q_max) * scale).view(v, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=200, help="Shakespeare positions (plus one chat prompt)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from generation import build_prompt, load_model

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    w = model.get_output_embeddings().weight.detach().float()  # (V, D)
    v, d = w.shape
    text = SHAKESPEARE.read_text(encoding="utf-8")[20_000:20_000 + 20 * args.positions]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.positions]
    prompt = build_prompt(tok, "What is the capital of France?").input_ids
    with torch.inference_mode():
        # the last hidden state is after the final norm: the LM head's input
        h = torch.cat([model(x, output_hidden_states=True).hidden_states[-1][0] for x in (ids, prompt)]).float()
    exact = h @ w.T  # (N, V)
    best = exact.max(1).values
    print(f"Machine: {describe()}  \nHead {v:,} x {d}; {h.shape[0]} positions ({ids.shape[1]} of Shakespeare, "
          f"one chat prompt of {prompt.shape[1]} tokens)\n")
    print("| copy | bytes | rows to recompute (median / p90 / max) | top-1 = the bf16 head's |")
    print("|---|---:|---:|---:|")
    for label, bits, group in COPIES:
        wq = rounded(w, bits, group)
        approx = h @ wq.T
        bound = h.norm(dim=1, keepdim=True) * (w - wq).norm(dim=1)  # (N, V)
        rows = ((approx + bound) >= best[:, None]).sum(1).float()
        top1 = (approx.argmax(1) == exact.argmax(1)).float().mean().item()
        scales = v * (1 if group is None else d // group) * 2
        mib = (v * d * bits / 8 + scales) / 2**20
        print(f"| {label} | {mib:.0f} MiB | {rows.median():,.0f} / {rows.quantile(0.9):,.0f} / {rows.max():,.0f} "
              f"| {top1:.1%} |")


if __name__ == "__main__":
    main()
