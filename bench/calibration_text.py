"""Write a calibration text for the calibrated NF4 rounding: what the full-precision model writes itself.

    python bench/calibration_text.py --out mine.json                      # as shipped: temperature 1
    python bench/calibration_text.py --temperature 0.8 --out mine.json    # a variant to measure

Each text is sampled from `<bos>` by the default model in bf16 (the GGUF dequantized), with no
top-k, `--tokens` new tokens long (a few more than the 255 the rounding reads, as the decoded text
tokenizes again into about as many). The file has the shape of `generation/rounding/calibration.json`;
to measure a text, copy it over that file in a scratch checkout: the calibrated snapshot's cache
name includes the file's digest, so the next start rounds a new snapshot with it, and
`python bench/logit_scale.py` or `python bench/chat_quality.py` measure that snapshot. The shipped
file was sampled this way at temperature 1 (64 samples of 256 tokens); its seed was not kept, so
this writes another sample of the same kind, not the same bytes.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=272)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if not (args.temperature > 0 and 0 < args.top_p <= 1 and args.samples > 0 and args.tokens >= 256):
        raise SystemExit("need temperature > 0, 0 < top-p <= 1, samples > 0 and tokens >= 256")
    torch.set_num_threads(2)
    from generation import load_model

    print(describe())
    lm = load_model(load_4bit=False)
    tok, model = lm.tokenizer, lm.model
    torch.manual_seed(args.seed)
    texts: list[str] = []
    t0 = time.perf_counter()
    while len(texts) < args.samples:
        n = min(args.batch, args.samples - len(texts))
        ids = torch.full((n, 1), tok.bos_token_id)  # (n, 1)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=args.temperature, top_p=args.top_p, top_k=0,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens)  # (n, 1 + tokens)
        texts += [tok.decode(row[1:], skip_special_tokens=True) for row in out]
        print(f"{len(texts)}/{args.samples} texts, {time.perf_counter() - t0:.0f} s", flush=True)
    notes = (f"Calibration text for the calibrated NF4 rounding (generation/rounding/). Every text was written by the "
             f"full-precision default model itself (google/gemma-3-270m from the GGUF, bf16), sampled from <bos> at "
             f"temperature {args.temperature:g}, top-p {args.top_p:g}, no top-k, {args.tokens} tokens each "
             f"(bench/calibration_text.py, seed {args.seed}): nothing here is evaluation text.")
    args.out.write_text(json.dumps({"notes": notes, "texts": texts}, ensure_ascii=False, indent=0), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
