"""Benchmark of generation/: load time, time to first token, decode speed, peak RSS, perplexity.

    python bench/generation.py [--threads N]   # the whole run (~8-12 min on 2 CPU cores), markdown tables
    python bench/generation.py --section decode  # only the decode levers vs llama.cpp (~3 min)

--threads (default: all cores, like the app) sets torch's intra-op threads in every child. On the
idle 2-core box 2 threads decode NF4 at ~36 tok/s and 1 thread at ~21; on a box shared with other
busy processes 2 threads can collapse (threads waiting on a taken core), and --threads 1 is steadier.

Every configuration runs in its own subprocess so its peak RSS is its own (ru_maxrss of the child):
  convert   first load ever: GGUF -> bf16 snapshot in a fresh temporary cache, then NF4 load
  nf4/bf16/fp32   cached load at that precision, then the measurements below
  notebook  the original notebook's way on the NF4 model: transformers `pipeline("text-generation")`,
            its three prompts one after another, 128 new tokens, do_sample, T=0.7, top_p=0.95
  decode    single-stream greedy decode, NF4, one process, rounds interleaved (median of 3): today's
            path (`generate()`), each lever (generation/decode/, bench/levers.py) alone, all of them, and
            llama.cpp (llama-cpp-python, requirements-bench.txt) on the embedded GGUF itself; same
            prompt ("What is the capital of France?" in the app's format, the same token ids for
            both), 128 new tokens, same threads; plus perplexity and top-1 agreement of the int8
            head, and the greedy replies to the notebook's prompts with and without the levers

Measurements per precision:
  TTFT       ReplyStats.first_token_s of ChatEngine.stream_reply (the app's path), mean over the 3 prompts
  decode     tokens/s over the decode phase of a fixed 128-token greedy generation (min_new_tokens=128)
  app        ChatEngine.stream_reply on the 3 prompts with the notebook's sampling: new tokens / wall time
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
    from generation import build_prompt

    ids = build_prompt(lm.tokenizer, "Tell me a long story about a dragon.").input_ids
    rate, _ = _decode_generate(lm, ids)
    return {"ttft_fixed_s": rate["ttft_s"], "decode_tps": rate["tps"]}


def _app_stream(lm) -> dict:
    from generation import ReplyStats, SamplingParams
    from generation.backends import ChatEngine

    ttft, new, wall = [], 0, 0.0
    with ChatEngine(lm, max_batch=1) as engine:
        list(engine.stream_reply("Hello", params=SamplingParams(max_new_tokens=1)))  # its one-time set-up
        for i, prompt in enumerate(PROMPTS):
            stats = ReplyStats()
            t0 = time.perf_counter()
            for _ in engine.stream_reply(prompt, params=SamplingParams(max_new_tokens=NEW_TOKENS, seed=i), stats=stats):
                pass
            wall += time.perf_counter() - t0
            ttft.append(stats.first_token_s)
            new += stats.new_tokens
    return {"ttft_s": sum(ttft) / len(ttft), "app_tokens": new, "app_tps": new / wall}


def _perplexity(lm, heads=None) -> float | dict:
    """exp(mean NLL) of tokens 2..2000 given their prefix, one forward pass; logits in chunks to bound memory.

    heads: None = the model's own head -> float; else {name: fn(hidden (t, D)) -> logits (t, V)} ->
    {name: perplexity} plus "top1_<name>": the share of positions whose argmax equals the model
    head's (the body runs once for all of them).
    """
    import torch

    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :PPL_TOKENS]  # (1, T) with <bos>
    assert ids.shape[1] == PPL_TOKENS
    cfg = lm.model.config
    fns = {"model": lambda h: lm.model.lm_head(h)}
    fns.update(heads or {})
    nll = dict.fromkeys(fns, 0.0)
    same = dict.fromkeys(fns, 0)
    count = 0
    with torch.inference_mode():
        h = lm.model.model(input_ids=ids).last_hidden_state  # (1, T, D)
        for i in range(0, PPL_TOKENS - 1, 250):
            target = ids[0, i + 1 : min(i + 251, PPL_TOKENS)]  # (t,)
            ref_top = None
            for name, fn in fns.items():
                logits = fn(h[0, i : i + target.numel()]).float()  # (t, V)
                cap = getattr(cfg, "final_logit_softcapping", None)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                nll[name] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
                top = logits.argmax(-1)
                ref_top = top if ref_top is None else ref_top
                same[name] += int((top == ref_top).sum())
            count += target.numel()
    ppl = {name: float(torch.exp(torch.tensor(v / count))) for name, v in nll.items()}
    if heads is None:
        return ppl["model"]
    return {**ppl, **{f"top1_{name}": same[name] / count for name in fns}}


# ---------------------------------------------------------------------------------------------
# Single-stream greedy decode: today's path, the levers (generation/decode/, bench/levers.py), llama.cpp

DECODE_ROUNDS = 5  # the median of 5 survives two rounds hit by a busy neighbour
DECODE_CONFIGS = [  # (key, label)
    ("today", "today: `generate()`, bitsandbytes modules, bf16 head"),
    ("head", "lever 1 alone: int8 head copy in `generate()`"),
    ("nf4", "lever 2 alone: direct NF4 kernel calls in `generate()`"),
    ("loop", "lever 3 alone: lean decode loop (bf16 head, bitsandbytes modules)"),
    ("loop_nf4", "levers 2 + 3 (bf16 head)"),
    ("all", "all levers (int8 head, exact greedy)"),
    ("all_exact_attn", "all levers, attention call as transformers' (bit-equal)"),
    ("llama", "llama.cpp (llama-cpp-python, same GGUF)"),
    ("engine", "the app's chat engine: one chat, fast decode, loop in the main thread (`python app.py`)"),
]


def _rate(t0: float, times: list[float]) -> dict:
    return {"ttft_s": times[0] - t0, "tps": (len(times) - 1) / (times[-1] - times[0])}


def _decode_generate(lm, ids) -> tuple[dict, list[int]]:
    import torch
    from transformers import StoppingCriteriaList

    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, stopping_criteria=StoppingCriteriaList([clock]),
                                pad_token_id=lm.tokenizer.pad_token_id)
    assert len(clock.times) == NEW_TOKENS
    return _rate(t0, clock.times), out[0, ids.shape[1]:].tolist()


def _decode_fast(dec, ids) -> tuple[dict, list[int]]:
    times, toks = [], []
    t0 = time.perf_counter()
    for tok in dec.greedy(ids, NEW_TOKENS):  # no EOS: exactly NEW_TOKENS, like min_new_tokens above
        times.append(time.perf_counter())
        toks.append(tok)
    return _rate(t0, times), toks


def _decode_llama(llm, ids) -> tuple[dict, list[int]]:
    times, toks = [], []
    llm.reset()  # no reuse of the previous round's prompt: the prefill is measured each time
    t0 = time.perf_counter()
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        toks.append(int(tok))
        if len(toks) == NEW_TOKENS:
            break
    return _rate(t0, times), toks


def _load_llama(threads: int):
    """(Llama or None, version or the reason it is missing)."""
    try:
        import llama_cpp
    except ImportError:
        return None, "not installed (pip install -r requirements-bench.txt, see README)"
    from generation.model import gguf_path

    llm = llama_cpp.Llama(model_path=str(gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          verbose=False, seed=0)
    return llm, f"llama-cpp-python {llama_cpp.__version__}"


def _engine_runner(lm):
    """(run(ids) -> (figures, tokens), status()): one greedy reply of NEW_TOKENS tokens from the app's
    ChatEngine, its loop in this (the main) thread as `python app.py` runs it, paused between rounds
    (run_here(until_idle=True)) so that its rounds interleave with the others."""
    from generation.decode import accelerate_linear4bit, restore_linear4bit
    from generation.backends import ChatEngine
    from generation.sampling import SamplingParams

    engine = ChatEngine(lm, autostart=False)

    def run(ids) -> tuple[dict, list[int]]:
        accelerate_linear4bit(lm.model)  # as load_model leaves it (the engine's prefill uses the modules)
        try:
            # a fixed NEW_TOKENS, as min_new_tokens gives generate() above
            req = engine.submit(ids, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS), ignore_eos=True)
            engine.run_here(until_idle=True)
        finally:
            restore_linear4bit(lm.model)
        st = req.stats()
        return {"tps": st["tokens_per_s"], "ttft_s": st["first_token_s"]}, req.token_ids

    return run, lambda: engine.fast_status


def decode_worker(lm) -> dict:
    """The decode section in this (child) process: every config in each round, rounds interleaved."""
    import statistics

    import torch

    from generation import build_prompt
    from generation.decode import QuantizedLMHead, accelerate_linear4bit, quantize_lm_head, restore_linear4bit
    from levers import FastDecoder
    from generation.kernels import native_int8_status
    from generation.backends import visible_text

    threads = torch.get_num_threads()
    model, tok = lm.model, lm.tokenizer
    restore_linear4bit(model)  # load_model calls the NF4 kernel directly; "today" is bitsandbytes' modules
    res: dict = {"machine_start": describe(threads)}
    import psutil

    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731  (current, not peak)
    with torch.inference_mode():  # page in the bf16 head (mmapped from the snapshot) as any first token does
        model.get_output_embeddings().weight.float().sum()
    rss0 = rss()
    t = time.perf_counter()
    head = quantize_lm_head(model)
    res["quantize_s"] = time.perf_counter() - t
    res["head_kernel"] = str(native_int8_status())
    res["head_mib"] = head.nbytes / 2**20
    res["rss_head_mib"] = rss() - rss0
    decoders = {
        "loop": FastDecoder(model, direct_nf4=False),
        "loop_nf4": FastDecoder(model),
        "all": FastDecoder(model, head=head),
        "all_exact_attn": FastDecoder(model, head=head, exact_attention=True),
    }
    dec = decoders["all"]
    res["decoder_len"] = dec.max_len
    res["decoder_mib"] = sum(t.numel() * t.element_size() for t in (
        dec.k_cache, dec.v_cache, dec._qkv, dec._o, dec._gu, dec._down, dec._logits)) / 2**20
    llm, res["llama_version"] = _load_llama(threads)
    prompt = build_prompt(tok, PROMPTS[0])
    ids = prompt.input_ids
    res["prompt_tokens"] = int(ids.shape[1])
    original_head = model.lm_head

    def run(key: str) -> tuple[dict, list[int]]:
        if key == "today":
            return _decode_generate(lm, ids)
        if key == "head":
            model.lm_head = QuantizedLMHead(head)
            try:
                return _decode_generate(lm, ids)
            finally:
                model.lm_head = original_head
        if key == "nf4":
            accelerate_linear4bit(model)
            try:
                return _decode_generate(lm, ids)
            finally:
                restore_linear4bit(model)
        if key == "llama":
            return _decode_llama(llm, ids[0].tolist())
        if key == "engine":
            return engine_run(ids)
        return _decode_fast(decoders[key], ids)

    engine_run, engine_status = _engine_runner(lm)
    engine_run(ids[:, :8])  # its one-time set-up (int8 head, warm-up reply) before the rounds

    rounds: dict[str, list[dict]] = {k: [] for k, _ in DECODE_CONFIGS}
    tokens: dict[str, list[int]] = {}
    for r in range(DECODE_ROUNDS):
        for key, _ in DECODE_CONFIGS:
            if key == "llama" and llm is None:
                continue
            figures, toks = run(key)
            rounds[key].append(figures)
            tokens.setdefault(key, toks)
            print(f"round {r + 1} {key}: {figures['tps']:.1f} tok/s, first token {figures['ttft_s'] * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)
    res["rows"] = {
        key: {
            "tps": statistics.median(x["tps"] for x in runs),
            "tps_min": min(x["tps"] for x in runs),
            "tps_max": max(x["tps"] for x in runs),
            "ttft_s": statistics.median(x["ttft_s"] for x in runs),
            "same_tokens": tokens[key] == tokens["today"],
        }
        for key, runs in rounds.items() if runs
    }
    res["engine_status"] = engine_status()
    res["llama_text"] = tok.decode(tokens["llama"]) if "llama" in tokens else ""
    res["today_text"] = tok.decode(tokens["today"])
    res["second_steps"] = (decoders["all"].second_steps, decoders["all"].steps)
    res["load_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    # Perplexity and top-1 agreement of the int8 head on the same 2,000 tokens as the ppl column.
    res["ppl"] = _perplexity(lm, {
        "int8": lambda h: head.logits(h),
        "int8_exact_top": lambda h: head.logits_exact_top(h),
    })
    # Greedy replies to the notebook's prompts (EOS allowed, 128 tokens at most): generate() vs all levers.
    eos = [model.generation_config.eos_token_id]
    replies = []
    for p in PROMPTS:
        pr = build_prompt(tok, p)
        with torch.inference_mode():
            out = model.generate(pr.input_ids, attention_mask=torch.ones_like(pr.input_ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
        want = out[0, pr.input_ids.shape[1]:].tolist()
        got = list(decoders["all"].greedy(pr.input_ids, NEW_TOKENS, eos_token_ids=eos))
        # the bit-equal attention call must give generate()'s very tokens; the packed one may move a
        # logit by a bf16 step (its fp32 softmax sums), so only its visible reply is compared
        exact = list(decoders["all_exact_attn"].greedy(pr.input_ids, NEW_TOKENS, eos_token_ids=eos))
        replies.append({"prompt": p, "same_tokens": exact == want, "packed_same_tokens": got == want, "n": len(want),
                        "reply": visible_text(tok.decode(want, skip_special_tokens=True), pr.stop_strings)[0],
                        "fast_reply": visible_text(tok.decode(got, skip_special_tokens=True), pr.stop_strings)[0]})
    res["replies"] = replies
    return res


def print_decode(res: dict, base_ppl: float | None = None) -> None:
    rows = res["rows"]
    llama = rows.get("llama")
    print(f"\n### Single-stream greedy decode, NF4 ({DECODE_ROUNDS} rounds interleaved, median)\n")
    print(f"Prompt: {res['prompt_tokens']} tokens (the app's format around \"{PROMPTS[0]}\"), "
          f"{NEW_TOKENS} new tokens.  ")
    print(f"{res['machine_start']}; load average at the end {res['load_end']}  \nint8 head: {res['head_kernel']}, "
          f"{res['head_mib']:.0f} MiB, quantized in {res['quantize_s']:.1f} s; llama.cpp: {res['llama_version']}\n")
    print("| path | decode tok/s (min-max) | first token ms | decode vs llama.cpp | first token vs llama.cpp "
          "| 128 tokens = today's |")
    print("|---|---:|---:|---:|---:|---|")
    for key, label in DECODE_CONFIGS:
        r = rows.get(key)
        if r is None:
            print(f"| {label} | {res['llama_version']} | | | | |")
            continue
        vs = f"{r['tps'] / llama['tps']:.2f}x" if llama else "n/a"
        vf = f"{r['ttft_s'] / llama['ttft_s']:.1f}x" if llama else "n/a"
        same = "yes" if r["same_tokens"] else "no"
        print(f"| {label} | {r['tps']:.1f} ({r['tps_min']:.1f}-{r['tps_max']:.1f}) | {r['ttft_s'] * 1e3:.0f} "
              f"| {vs} | {vf} | {same} |")
    s2, n = res["second_steps"]
    dec_len = res.get("decoder_len", 1024)
    print(f"\nExact greedy with the int8 head: {n - s2} of {n} steps decided by the 64 rescored candidates, "
          f"{s2} by the second step. Memory: the int8 head +{res['rss_head_mib']:.0f} MiB RSS (the model's weight "
          f"bytes unchanged), each decoder {res['decoder_mib']:.0f} MiB (KV cache for {dec_len} positions, buffers).")
    p = res["ppl"]
    print("\n| head | perplexity (2,000 tok) | vs bf16 head | top-1 = bf16 head's |")
    print("|---|---:|---:|---:|")
    for name, label in (("model", "bf16 (tied embedding)"), ("int8", "int8 per row"),
                        ("int8_exact_top", "int8, top 64 recomputed exactly")):
        print(f"| {label} | {p[name]:.3f} | {p[name] / p['model'] - 1:+.2%} | {p['top1_' + name]:.2%} |")
    print("\n| prompt | greedy reply, `generate()` | all levers | same tokens, all levers | same tokens, attention as "
          "transformers' |")
    print("|---|---|---|---|---|")
    yes = lambda same: "yes" if same else "no"  # noqa: E731
    for r in res["replies"]:
        short = lambda text: repr(text if len(text) <= 90 else text[:90] + "...")  # noqa: E731
        fast = "(same)" if r["fast_reply"] == r["reply"] else short(r["fast_reply"])
        print(f"| {r['prompt']} | {short(r['reply'])} | {fast} | {yes(r['packed_same_tokens'])} | {yes(r['same_tokens'])} |")
    if llama:
        print("\n| target | measured | met |")
        print("|---|---|---|")
        for key, what in (("all", "the levers (FastDecoder)"), ("engine", "the app's engine")):
            r = rows[key]
            print(f"| decode >= 1.0x llama.cpp, {what} | {r['tps']:.1f} vs {llama['tps']:.1f} tok/s "
                  f"({r['tps'] / llama['tps']:.2f}x) | {'yes' if r['tps'] >= llama['tps'] else 'NO'} |")
            ok = r["ttft_s"] <= 3 * llama["ttft_s"]
            print(f"| first token <= 3x llama.cpp's, {what} | {r['ttft_s'] * 1e3:.0f} vs {llama['ttft_s'] * 1e3:.0f} "
                  f"ms ({r['ttft_s'] / llama['ttft_s']:.1f}x) | {'yes' if ok else 'NO'} |")
        ref = base_ppl if base_ppl is not None else p["model"]
        print(f"| perplexity within 1% of today's NF4 | {p['int8']:.3f} vs {ref:.3f} ({p['int8'] / ref - 1:+.2%}) "
              f"| {'yes' if abs(p['int8'] / ref - 1) <= 0.01 else 'NO'} |")
        same = all(r["same_tokens"] and r["fast_reply"] == r["reply"] for r in res["replies"])
        print(f"| greedy replies to the notebook's prompts unchanged (the visible replies; every token with the "
              f"bit-equal attention call) | {'all three' if same else 'see above'} | {'yes' if same else 'NO'} |")


def worker(config: str) -> dict:
    """Run one configuration in this (child) process and return its figures."""
    from generation import load_model

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    load_4bit = config in ("convert", "nf4", "notebook", "decode")
    dtype = None if load_4bit else {"bf16": torch.bfloat16, "fp32": torch.float32}[config]
    lm = load_model(load_4bit=load_4bit, dtype=dtype)
    if config == "decode":
        return decode_worker(lm)
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


def run_child(config: str, cache: str | None, threads: int) -> dict:
    env = {**os.environ, "BENCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if cache is not None:
        env["ATTN_LAB_CACHE"] = cache
    # stderr passes through: the decode section reports each round as it goes
    proc = subprocess.run([sys.executable, __file__, "--worker", config], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=None if config == "decode" else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    return describe(threads)

def main() -> None:
    import argparse

    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads per child (default: all cores, like the app)")
    ap.add_argument("--section", choices=("all", "precision", "decode"), default="all",
                    help="precision: load/TTFT/decode/ppl per precision; decode: the decode levers vs llama.cpp")
    args = ap.parse_args()
    threads = args.threads

    rows = {}
    configs = {"all": ("convert", "nf4", "bf16", "fp32", "notebook", "decode"),
               "precision": ("convert", "nf4", "bf16", "fp32", "notebook"), "decode": ("decode",)}[args.section]
    with tempfile.TemporaryDirectory(prefix="attn-lab-bench-") as cache:
        for config in configs:
            print(f"running {config} ...", file=sys.stderr, flush=True)
            # alone, the decode section reads the user's cached snapshot (converted once, on first use)
            rows[config] = run_child(config, None if args.section == "decode" else cache, threads)

    print(f"Machine: {machine(threads)}, transformers {transformers.__version__}\n")
    if args.section == "decode":
        print_decode(rows["decode"])
        return
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
    if "decode" in rows:  # not with --section precision
        print_decode(rows["decode"], base_ppl=nf4["ppl"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
