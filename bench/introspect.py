"""Benchmark of generation/inside/: what the "inside the chat model" views cost.

    python bench/introspect.py               # ~1-2 min on 2 CPU cores, prints markdown tables

On the default model (Gemma 3 270m, NF4 4-bit, as the app loads it):
  dispatcher   greedy decode tokens/s with the "attention_lab" dispatcher installed vs the same
               model switched to plain sdpa: the cost every chat pays for being inspectable
  map          model_attention at 64 tokens (one forward, every layer through attention/'s explicit code)
  next token   next_token_candidates on a short prompt (one forward + filtering over 262k tokens)
  4-bit cost   FullPrecisionCache.get (the first use of the comparison loads the fp32 copy) and
               compare_quantization (two prefills + 8 timed decode steps each), plus its figures
  teaching     model_view (every layer, one forward) at 16/32/64 tokens, plot_model_view and its PNG;
               ablate_heads on a 64-token prompt (2 prefills + 2 x 7 decode steps); reply_attention
               for a 128-token greedy reply (one forward over prompt + reply), plot_token_attention
               and its PNG. Target: each <= 2 s at 64 tokens (reply: 128 tokens) on 2 CPU cores.
               `--teaching-only` runs just these.
Runs alternate (A, B, A, B, ...); decode speed is the best run of each (other processes on a shared
machine only ever slow a run down), the other times are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention.plot import figure_bytes, plot_model_view, plot_token_attention  # noqa: E402
from benchutil import describe  # noqa: E402
from generation import build_prompt  # noqa: E402
from generation.inside import (  # noqa: E402
    FullPrecisionCache,
    ablate_heads,
    capture,
    compare_quantization,
    heads_of_layer,
    model_attention,
    model_view,
    next_token_candidates,
    reply_attention,
)
from generation.model import load_model  # noqa: E402
from generation.sampling import SamplingParams  # noqa: E402
from generation.settings import Settings  # noqa: E402

PROMPT = "The capital of France is"
TEXT_64 = (
    "Attention lets every token look back at the tokens before it and decide how much of each one to "
    "use. In a small model such as this one, a few heads specialise: some look at the previous token, "
    "some at the first token, and some at words that repeat earlier in the text."
)


def _decode_tps(lm, ids: torch.Tensor, n: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) / dt


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _per_call_overhead_us(lm, calls: int = 2000, rounds: int = 7) -> tuple[float, float]:
    """(µs per call through the dispatcher, µs per direct sdpa call) with tiny float32 tensors (1 query,
    8 keys, d = 8), so that the kernel is cheap and the difference is the dispatcher's own Python cost;
    best of `rounds`, the least disturbed by other processes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = capture.attention_modules(lm.model)[0]
    cfg = lm.model.config
    q = torch.randn(1, cfg.num_attention_heads, 1, 8)
    kv = torch.randn(1, cfg.num_key_value_heads, 8, 8)
    best = {"lab": float("inf"), "sdpa": float("inf")}
    fns = {"lab": capture.attention_lab_forward, "sdpa": sdpa_attention_forward}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(module, q, kv, kv, None, scaling=module.scaling)
                best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best["lab"], best["sdpa"]


def _times(fn, reps: int) -> tuple[float, float]:
    """(median, best) seconds of `reps` calls: on a shared machine the best is the code's own cost."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _teaching(lm4, reps: int) -> None:
    """The teaching views: time to compute, to draw, and to encode as PNG (what gr.Plot sends).

    Each cell is "median / best" ms over `reps` runs; total = sum of the medians (of the bests).
    """
    text = TEXT_64 + " " + TEXT_64  # > 64 tokens: model_view's cap picks the length
    print("| view | tokens | compute ms | figure ms | PNG ms | total ms (median / best) | <= 2 s? | PNG px |")
    print("|---|---:|---:|---:|---:|---:|---|---|")

    def row(name: str, n: int | str, parts: list[tuple[float, float]], px: str) -> None:
        cells = [f"{1000 * m:.0f} / {1000 * b:.0f}" for m, b in parts] + [""] * (3 - len(parts))
        med, best = sum(m for m, _ in parts), sum(b for _, b in parts)
        print(f"| {name} | {n} | {' | '.join(cells)} | {1000 * med:.0f} / {1000 * best:.0f} | "
              f"{'yes' if med <= 2 else 'best only' if best <= 2 else 'NO'} | {px} |")

    for n in (16, 32, 64):
        model_view(lm4, text, max_tokens=n)  # warm-up
        t_mv = _times(lambda: model_view(lm4, text, max_tokens=n), reps)
        mv = model_view(lm4, text, max_tokens=n)

        def draw():
            return plot_model_view(mv.weights, layer_kinds=mv.layer_kinds, head_labels=mv.head_labels(),
                                   title="every layer, every head")

        t_fig = _times(draw, reps)
        fig = draw()
        t_png = _times(lambda: figure_bytes(fig, "png"), reps)
        w, h = (fig.get_size_inches() * fig.dpi).astype(int)
        row("model_view + grid", f"{n} (with <bos>)", [t_mv, t_fig, t_png], f"{w}x{h}")

    ids = lm4.tokenizer(text, return_tensors="pt").input_ids[:, :64]
    heads = heads_of_layer(3, *mv.weights.shape[:2])
    ablate_heads(lm4, ids, heads, new_tokens=2)  # warm-up
    t_ab = _times(lambda: ablate_heads(lm4, ids, heads, new_tokens=8), reps)
    row("ablate_heads (layer 3 off), 8 greedy tokens each way", 64, [t_ab], "")

    prompt = build_prompt(lm4.tokenizer, "Explain self-attention in one paragraph.")
    with torch.inference_mode():
        out = lm4.model.generate(prompt.input_ids, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                 pad_token_id=lm4.tokenizer.pad_token_id)
    reply = out[0, prompt.input_ids.shape[1]:]
    reply_attention(lm4, prompt, reply, layer=5)  # warm-up
    t_ra = _times(lambda: reply_attention(lm4, prompt, reply, layer=5), reps)
    ra = reply_attention(lm4, prompt, reply, layer=5)
    r = len(ra.reply_tokens) - 1  # the last token: the longest row
    n_ctx = ra.context(r)

    def draw_row():
        return plot_token_attention(ra.row(r), ra.tokens[:n_ctx], target=ra.reply_tokens[r],
                                    reply_start=ra.reply_start, hidden=ra.special[:n_ctx], title="while writing")

    t_fig = _times(draw_row, reps)
    fig = draw_row()
    t_png = _times(lambda: figure_bytes(fig, "png"), reps)
    w, h = (fig.get_size_inches() * fig.dpi).astype(int)
    row("reply_attention + strip, 128-token reply", len(ra.token_ids), [t_ra, t_fig, t_png], f"{w}x{h}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--teaching-only", action="store_true", help="only the model view, ablation and reply views")
    args = ap.parse_args()

    settings = Settings.from_env()
    lm4 = load_model(settings.model_id, load_4bit=True, settings=settings)
    model = lm4.model
    if not capture.is_installed(model):
        raise SystemExit("load_model did not install the attention_lab dispatcher")
    if args.teaching_only:
        print(f"Machine: {describe()}; model {lm4.model_id}; medians of {args.reps} runs.\n")
        _teaching(lm4, args.reps)
        return
    ids = lm4.tokenizer(PROMPT, return_tensors="pt").input_ids
    _decode_tps(lm4, ids, 4)  # warm-up

    lab, plain = [], []
    for _ in range(args.reps):
        lab.append(_decode_tps(lm4, ids, args.new_tokens))
        model.set_attn_implementation("sdpa")
        try:
            plain.append(_decode_tps(lm4, ids, args.new_tokens))
        finally:
            model.set_attn_implementation(capture.IMPL_NAME)
    # Best of the alternating runs: on a shared box the slowest runs measure the neighbours, not the code.
    tps_lab, tps_plain = max(lab), max(plain)

    us_lab, us_sdpa = _per_call_overhead_us(lm4)
    n_layers = lm4.model.config.num_hidden_layers

    n_map = len(lm4.tokenizer(TEXT_64).input_ids)
    model_attention(lm4, TEXT_64, layer=0)  # warm-up
    t_map0 = _median_time(lambda: model_attention(lm4, TEXT_64, layer=0), args.reps)
    t_map17 = _median_time(lambda: model_attention(lm4, TEXT_64, layer=17), args.reps)
    t_next = _median_time(lambda: next_token_candidates(lm4, PROMPT, SamplingParams()), args.reps)

    cache = FullPrecisionCache()
    t0 = time.perf_counter()
    lm_full = cache.get(settings)
    t_load_full = time.perf_counter() - t0
    compare_quantization(lm4, lm_full, PROMPT, decode_tokens=2)  # warm-up
    t0 = time.perf_counter()
    qc = compare_quantization(lm4, lm_full, PROMPT)
    t_cmp = time.perf_counter() - t0

    print(f"Machine: {describe()}; model {lm4.model_id}; {args.reps} alternating runs.\n")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| greedy decode, NF4, attention_lab dispatcher (best run) | {tps_lab:.1f} tok/s |")
    print(f"| greedy decode, NF4, plain sdpa (best run) | {tps_plain:.1f} tok/s |")
    print(f"| decode time, dispatcher vs sdpa | {100 * (tps_plain / tps_lab - 1):+.1f} % |")
    print(f"| tiny attention call: dispatcher / direct sdpa (best of 7) | {us_lab:.1f} µs / {us_sdpa:.1f} µs |")
    print(f"| dispatcher's own cost per token ({n_layers} layers) | {n_layers * (us_lab - us_sdpa):.0f} µs |")
    print(f"| model_attention, {min(n_map, 64)} tokens, layer 0 | {1000 * t_map0:.0f} ms |")
    print(f"| model_attention, {min(n_map, 64)} tokens, layer 17 | {1000 * t_map17:.0f} ms |")
    print(f"| next_token_candidates, {len(ids[0])} tokens | {1000 * t_next:.0f} ms |")
    print(f"| FullPrecisionCache.get, first use ({lm_full.dtype} load) | {t_load_full:.1f} s |")
    print(f"| compare_quantization (8 decode steps per model) | {t_cmp:.1f} s |")
    print()
    print(f'4-bit vs full precision on "{PROMPT}":\n')
    print("| | NF4 4-bit | full |")
    print("|---|---|---|")
    print(f"| weights | {qc.quantized.weight_bytes / 2**20:.0f} MiB | {qc.full.weight_bytes / 2**20:.0f} MiB "
          f"({qc.full.dtype}) |")
    print(f"| prefill | {1000 * qc.quantized.prefill_seconds:.0f} ms | {1000 * qc.full.prefill_seconds:.0f} ms |")
    print(f"| time per token (median decode step) | {1000 * qc.quantized.seconds_per_token:.0f} ms | "
          f"{1000 * qc.full.seconds_per_token:.0f} ms |")
    print(f"| KL(full ‖ 4-bit), next token | {qc.kl_full_to_4bit:.4f} nats | |")
    print(f"| same top-1 token | {'yes' if qc.top1_agree else 'no'} | |")
    print()
    print("| token | P 4-bit | P full |")
    print("|---|---|---|")
    for r in qc.rows[:5]:
        print(f"| {r.token!r} | {r.prob_4bit:.3f} | {r.prob_full:.3f} |")
    print()
    print("Teaching views (medians):\n")
    _teaching(lm4, args.reps)


if __name__ == "__main__":
    main()
