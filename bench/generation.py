"""Benchmark of generation/: load time, time to first token, decode speed, peak RSS, perplexity.

    python bench/generation.py [--threads N]   # the whole run (~5-10 min on 2 CPU cores), markdown tables

--threads (default: all cores, like the app) sets torch's intra-op threads in every child. On the
idle 2-core box 2 threads decode NF4 at ~36 tok/s and 1 thread at ~21; on a box shared with other
busy processes 2 threads can collapse (threads waiting on a taken core), and --threads 1 is steadier.

Every configuration runs in its own subprocess so its peak RSS is its own (ru_maxrss of the child):
  convert   first load ever: GGUF -> bf16 snapshot in a fresh temporary cache, then NF4 load
  nf4/bf16/fp32   cached load at that precision, then the measurements below
  notebook  the original notebook's way on the NF4 model: transformers `pipeline("text-generation")`,
            its three prompts one after another, 128 new tokens, do_sample, T=0.7, top_p=0.95

Measurements per precision:
  TTFT       ReplyStats.first_token_s of stream_reply (the app's path), mean over the 3 prompts
  decode     tokens/s over the decode phase of a fixed 128-token greedy generation (min_new_tokens=128)
  app        stream_reply on the 3 prompts with the notebook's sampling: new tokens / wall time
  ppl        perplexity on the first 2,000 tokens of ../shared/data/tinyshakespeare.txt (one window)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import describe

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPTS = ["What is the capital of France?", "Explain self-attention in one paragraph.", "Write a haiku about transformers."]
NEW_TOKENS = 128
PPL_TOKENS = 2000


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Clock:
    """StoppingCriteria that timestamps every generated token (never stops anything)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _fixed_decode(lm) -> dict:
    import torch
    from transformers import StoppingCriteriaList

    from generation import build_prompt

    ids = build_prompt(lm.tokenizer, "Tell me a long story about a dragon.").input_ids
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, stopping_criteria=StoppingCriteriaList([clock]),
                                pad_token_id=lm.tokenizer.pad_token_id)
    n = out.shape[1] - ids.shape[1]
    assert n == NEW_TOKENS == len(clock.times)
    return {"ttft_fixed_s": clock.times[0] - t0, "decode_tps": (n - 1) / (clock.times[-1] - clock.times[0])}


def _app_stream(lm) -> dict:
    from generation import ReplyStats, SamplingParams, stream_reply

    ttft, new, wall = [], 0, 0.0
    for i, prompt in enumerate(PROMPTS):
        stats = ReplyStats()
        t0 = time.perf_counter()
        for _ in stream_reply(lm, prompt, params=SamplingParams(max_new_tokens=NEW_TOKENS, seed=i), stats=stats):
            pass
        wall += time.perf_counter() - t0
        ttft.append(stats.first_token_s)
        new += stats.new_tokens
    return {"ttft_s": sum(ttft) / len(ttft), "app_tokens": new, "app_tps": new / wall}


def _perplexity(lm) -> float:
    """exp(mean NLL) of tokens 2..2000 given their prefix, one forward pass; logits in chunks to bound memory."""
    import torch

    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :PPL_TOKENS]  # (1, T) with <bos>
    assert ids.shape[1] == PPL_TOKENS
    cfg = lm.model.config
    nll, count = 0.0, 0
    with torch.inference_mode():
        h = lm.model.model(input_ids=ids).last_hidden_state  # (1, T, D)
        for i in range(0, PPL_TOKENS - 1, 250):
            logits = lm.model.lm_head(h[:, i : min(i + 250, PPL_TOKENS - 1)]).float()  # (1, t, V)
            cap = getattr(cfg, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            target = ids[:, i + 1 : i + 1 + logits.shape[1]]  # (1, t)
            nll += torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum").item()
            count += target.numel()
    return float(torch.exp(torch.tensor(nll / count)))


def worker(config: str) -> dict:
    """Run one configuration in this (child) process and return its figures."""
    from generation import load_model

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    load_4bit = config in ("convert", "nf4", "notebook")
    dtype = None if load_4bit else {"bf16": torch.bfloat16, "fp32": torch.float32}[config]
    lm = load_model(load_4bit=load_4bit, dtype=dtype)
    res = {"config": config, "load_s": lm.load_seconds, "weight_mib": lm.weight_bytes / 2**20, "dtype": lm.dtype}
    if config == "convert":
        res["rss_mib"] = _peak_rss_mib()
        return res
    if config == "notebook":
        import torch
        from transformers import pipeline

        pipe = pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer)
        torch.manual_seed(0)
        new, t0 = 0, time.perf_counter()
        for prompt in PROMPTS:
            out = pipe(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7, top_p=0.95,
                       return_tensors=True)
            new += len(out[0]["generated_token_ids"]) - len(lm.tokenizer(prompt).input_ids)
        wall = time.perf_counter() - t0
        res.update(app_tokens=new, app_tps=new / wall, rss_mib=_peak_rss_mib())
        return res
    res.update(_fixed_decode(lm))
    res.update(_app_stream(lm))
    res["rss_mib"] = _peak_rss_mib()  # before the perplexity pass, whose activations are not chat's
    res["ppl"] = _perplexity(lm)
    return res


def run_child(config: str, cache: str, threads: int) -> dict:
    env = {**os.environ, "BENCH_THREADS": str(threads), "ATTN_LAB_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", config], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    return describe(threads)

def main() -> None:
    import argparse

    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads per child (default: all cores, like the app)")
    threads = ap.parse_args().threads

    rows = {}
    with tempfile.TemporaryDirectory(prefix="attn-lab-bench-") as cache:
        for config in ("convert", "nf4", "bf16", "fp32", "notebook"):
            print(f"running {config} ...", file=sys.stderr, flush=True)
            rows[config] = run_child(config, cache, threads)

    print(f"Machine: {machine(threads)}, transformers {transformers.__version__}\n")
    print("| config | load s | weights MiB | TTFT s | decode tok/s (128 greedy) | app stream tok/s (3 prompts) "
          "| peak RSS MiB | ppl (2,000 tok) |")
    print("|---|---|---|---|---|---|---|---|")
    c = rows["convert"]
    print(f"| first load: GGUF conversion + NF4 | {c['load_s']:.1f} | {c['weight_mib']:.0f} | | | | {c['rss_mib']:.0f} | |")
    for name, label in (("nf4", "NF4 4-bit (cached)"), ("bf16", "bf16 (cached)"), ("fp32", "fp32 (cached)")):
        r = rows[name]
        print(f"| {label} | {r['load_s']:.1f} | {r['weight_mib']:.0f} | {r['ttft_s']:.2f} | {r['decode_tps']:.1f} "
              f"| {r['app_tps']:.1f} ({r['app_tokens']} tok) | {r['rss_mib']:.0f} | {r['ppl']:.3f} |")
    n = rows["notebook"]
    print(f"| notebook pipeline, NF4 (baseline) | {n['load_s']:.1f} | {n['weight_mib']:.0f} | | "
          f"| {n['app_tps']:.1f} ({n['app_tokens']} tok) | {n['rss_mib']:.0f} | |")

    nf4, bf16 = rows["nf4"], rows["bf16"]
    rel = nf4["ppl"] / bf16["ppl"] - 1
    print("\n| target | measured | met |")
    print("|---|---|---|")
    print(f"| NF4 decode >= notebook pipeline per-stream speed | {nf4['decode_tps']:.1f} tok/s (app stream "
          f"{nf4['app_tps']:.1f}) vs {n['app_tps']:.1f} tok/s | {'yes' if nf4['decode_tps'] >= n['app_tps'] else 'NO'} |")
    print(f"| NF4 perplexity within 5% of bf16 | {nf4['ppl']:.3f} vs {bf16['ppl']:.3f} ({rel:+.1%}) "
          f"| {'yes' if abs(rel) <= 0.05 else 'NO'} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
