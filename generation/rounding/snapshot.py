"""The calibrated NF4 model as a snapshot: built once from the full-precision one, then loaded as any
pre-quantized bitsandbytes checkpoint (config.json carries its quantization_config)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .calibrate import calibrate
from .nf4grid import GptqConfig
from .pack import install

# Bump when the method changes: the folder name carries it (with a hash of the calibration text and
# METHOD's settings), so a changed method never reads an old cache.
ROUNDING_FORMAT = 3  # 2: blocks of 32 weights; 3: q/k/v and gate/up targets half way to the full model's output
CALIBRATION_TEXT = Path(__file__).with_name("calibration.json")
# Tokens per calibration row (BOS + 191 of the text). Rows of 192, not 256: the first start affords
# ~11.5k tokens, and rows this long still hold a chat with the app's example exchanges (~170 tokens);
# so the model's own text (44 rows) and its arithmetic worksheets (16) both fit (bench/README.md,
# "What the 4-bit model loses").
SEQ_TOKENS = 192
# Damping 0.3 (not GPTQ's usual 0.01): the calibration text is the model's own, not the text a
# learner types; a stronger pull towards plain rounding generalises better. Two rounds: the codes
# chosen again under the refit scales, then the scales again. The target of each linear that reads
# the residual stream half way towards the weight that maps the rounded model's inputs onto the
# full model's outputs: the whole way fits the calibration text too closely (bench/README.md has what each buys).
METHOD = GptqConfig(damp=0.3, batch=128, act_order=True, rounds=2, toward_full=0.5)


def calibration_texts(path: Path = CALIBRATION_TEXT) -> list[str]:
    """The calibration texts, every part's in order: what the full-precision default model wrote
    itself (each part's notes say how; bench/calibration_text.py writes a part)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [text for part in data["parts"] for text in part["texts"]]


def calibration_ids(tokenizer, texts: list[str], seq_tokens: int = SEQ_TOKENS) -> torch.Tensor:
    """(N, seq_tokens) token ids: each text that is long enough, BOS first, cut to seq_tokens."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: seq_tokens - 1]
        if len(ids) == seq_tokens - 1:
            rows.append([tokenizer.bos_token_id, *ids])
    if not rows:
        raise ValueError(f"no calibration text has {seq_tokens - 1} tokens")
    return torch.tensor(rows)


def snapshot_name(base: str, path: Path = CALIBRATION_TEXT) -> str:
    """Folder name of the calibrated NF4 snapshot of the full-precision snapshot `base`."""
    digest = hashlib.sha256(path.read_bytes() + repr((METHOD, SEQ_TOKENS)).encode()).hexdigest()[:10]
    return f"{base}-nf4-calibrated-v{ROUNDING_FORMAT}-{digest}"


def build_calibrated(full_dir: Path, out_dir: Path, bnb_config, *,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Round the full-precision snapshot in `full_dir` to calibrated NF4 and save it to `out_dir`.
    Returns facts for the snapshot's completeness marker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(full_dir, local_files_only=True)
    full = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16, local_files_only=True).eval()
    ids = calibration_ids(tokenizer, calibration_texts())
    chosen = calibrate(full, ids, METHOD, progress=progress)
    del full
    quant = AutoModelForCausalLM.from_pretrained(
        full_dir, quantization_config=bnb_config, dtype=torch.bfloat16, local_files_only=True
    )
    for name, r in chosen.items():
        install(quant.get_submodule(name), r.index, r.scales)
    quant.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"calibration_tokens": int(ids.numel()), "layers_rounded": len(chosen),
            "build_seconds": round(time.perf_counter() - t0, 1)}
