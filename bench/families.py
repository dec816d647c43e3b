"""Benchmark of the fast CPU decode per model family: fast path vs the model's forward, side by side.

    python bench/families.py                       # every shape below (~15 min on 2 CPU cores)
    python bench/families.py --shapes qwen2.5-0.5b,smollm2-360m --new 32 --users 30
    python bench/families.py --llama-src ~/src/llama_cpp_python-0.3.36/vendor/llama.cpp   # + llama.cpp

For each shape, a random-weight model of that shape (bf16, transformers' own init; the default
model's tokenizer; weights do not change the speed of a dense decode) is saved to a temporary
folder by one child process and loaded by another through the app's path (`load_model(folder,
load_4bit=True)`: NF4, the same as MODEL_ID=folder), so that child's peak RSS is what the app
would need. In it, two ChatEngines on the one model, their loops in the main thread as `python
app.py` runs them (`run_here`): the fast decode (lean step, int8 head) and fast=False (the
model's forward), rounds interleaved, greedy, a fixed number of new tokens (ignore_eos):

  1 stream   one 32-token prompt: decode tokens/s of the reply (ReplyStats: (n - 1) / decode time)
  N users    N 8-token prompts at once (max_batch = N; their prefill is one forward, so the clock
             from the first reply token to the last covers decode steps only): all rows' decode
             tokens / that time
  same       the fast path's greedy tokens equal the model path's (one stream / the batch)
  RSS        after loading and both engines' set-up; anonymous: without the checkpoint's mapped
             file pages (which the kernel can drop); peak: the child's ru_maxrss

"default" is the app's own model (the embedded Gemma 3 270m, real weights) through the same harness.

llama.cpp (with --llama-src, llama.cpp's source folder, e.g. the vendor/llama.cpp of the
llama-cpp-python source package, and llama-cpp-python installed: requirements-bench.txt): the same
random weights written as a GGUF by llama.cpp's own converter (convert_hf_to_gguf.py; a
placeholder vocabulary of the model's size, as the default tokenizer does not fit these shapes),
quantized to Q4_K_M by `llama_cpp.llama_model_quantize`, one greedy stream of the same length
(llama-cpp-python's Llama decodes one sequence; no 30-user row). "default" reads the embedded
GGUF itself.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import describe

REPO = Path(__file__).resolve().parents[1]

# name -> (transformers config class, its arguments): the published models' shapes
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         max_position_embeddings=32768)),
    "smollm2-360m": ("LlamaConfig", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                                         max_position_embeddings=8192)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                         max_position_embeddings=131072,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                          "factor": 32.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192})),
    "qwen2.5-3b": ("Qwen2Config", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                       max_position_embeddings=32768)),
    "default": ("", {}),
}
PROMPT_TOKENS = 32
BATCH_PROMPT_TOKENS = 8  # N of them within one prefill forward (the engine's 256 tokens)
ROUNDS = 2


def build_worker(shape: str, folder: str) -> dict:
    """Save a random-weight model of `shape` (bf16) and the default tokenizer into `folder`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation import Settings
    from generation.model import default_snapshot

    cls_name, kwargs = SHAPES[shape]
    config = getattr(transformers, cls_name)(**kwargs)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: a 3B model in fp32 would take 12 GB
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    snapshot, _ = default_snapshot(Settings.from_env())
    AutoTokenizer.from_pretrained(snapshot).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "build_s": time.perf_counter() - t0}


def _decode(engine, prompts, new: int) -> tuple[float, list[list[int]]]:
    """Greedy replies of `new` tokens to every prompt at once -> (decode tokens/s of all rows, tokens)."""
    from generation.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    reqs = [engine.submit(p, params, ignore_eos=True) for p in prompts]
    engine.run_here(until_idle=True)
    if any(r.error is not None for r in reqs):
        raise RuntimeError(str(reqs[0].error))
    if len(reqs) == 1:
        return reqs[0].stats()["tokens_per_s"], [reqs[0].token_ids]
    span = max(r.t_last for r in reqs) - min(r.t_first for r in reqs)
    return sum(len(r.token_ids) - 1 for r in reqs) / span, [r.token_ids for r in reqs]


def measure_worker(shape: str, folder: str, new: int, users: int) -> dict:
    import psutil
    import torch

    from generation import DEFAULT_MODEL_ID, load_model
    from generation.backends import ChatEngine

    t0 = time.perf_counter()
    lm = load_model(DEFAULT_MODEL_ID if shape == "default" else folder, load_4bit=True)
    res: dict = {"load_s": time.perf_counter() - t0, "machine": describe(torch.get_num_threads())}
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    stream = [torch.randint(100, min(vocab, 40000), (PROMPT_TOKENS,), generator=g)]
    batch = [torch.randint(100, min(vocab, 40000), (BATCH_PROMPT_TOKENS,), generator=g) for _ in range(users)]
    engines = {"fast": ChatEngine(lm, max_batch=max(users, 1), warmup=False, autostart=False),
               "forward": ChatEngine(lm, max_batch=max(users, 1), warmup=False, autostart=False, fast=False)}
    for engine in engines.values():  # one-time set-up (the fast path's int8 head) before the clock
        _decode(engine, stream, 2)
    res["fast_status"] = engines["fast"].fast_status
    res["rss_mib"] = psutil.Process().memory_info().rss / 2**20
    res["anon_mib"] = _anonymous_mib()
    cases = [("stream", stream)] + ([("users", batch)] if users > 1 else [])
    runs: dict[str, list[float]] = {}
    tokens: dict[str, list] = {}
    for r in range(ROUNDS):
        for case, ps in cases:
            for name, engine in engines.items():
                tps, toks = _decode(engine, ps, new)
                runs.setdefault(f"{name}_{case}", []).append(tps)
                tokens.setdefault(f"{name}_{case}", toks)
                print(f"{shape} round {r + 1} {name} {case}: {tps:.1f} tok/s", file=sys.stderr, flush=True)
    res["tps"] = {k: statistics.median(v) for k, v in runs.items()}
    res["same_stream"] = tokens["fast_stream"] == tokens["forward_stream"]
    if "fast_users" in tokens:
        res["same_users"] = tokens["fast_users"] == tokens["forward_users"]
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["load_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    for engine in engines.values():
        engine.close()
    return res


def _anonymous_mib() -> float:
    """This process's anonymous memory (its RSS without the pages of mapped files such as the
    checkpoint's safetensors, which the kernel can drop), from /proc (Linux); nan elsewhere."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _placeholder_vocab(self) -> None:
    """A converter's set_vocab for a random-weight model: a SentencePiece-style vocabulary of the
    model's size (<unk> <s> </s>, the 256 byte tokens, then placeholders): what llama.cpp needs to
    load it; the bench feeds token ids, never text."""
    import gguf

    n = int(self.hparams["vocab_size"])
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(n - len(tokens))]
    kinds = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
             + [gguf.TokenType.NORMAL] * (n - 259))
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n)
    w.add_token_types(kinds)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def llama_worker(shape: str, folder: str, new: int, llama_src: str) -> dict:
    """llama.cpp on the same weights: convert (llama.cpp's converter), quantize to Q4_K_M, one
    greedy stream of `new` tokens after a PROMPT_TOKENS prompt; decode tokens/s, median of ROUNDS."""
    import llama_cpp

    res: dict = {"llama_version": llama_cpp.__version__}
    if shape == "default":
        from generation.model import gguf_path

        q4 = str(gguf_path())
    else:
        sys.path[:0] = [llama_src, str(Path(llama_src) / "gguf-py")]
        import convert_hf_to_gguf as cv

        original = cv.get_model_class

        def with_placeholder_vocab(name: str, mmproj: bool = False):  # noqa: ANN202
            cls = original(name, mmproj)
            cls.set_vocab = _placeholder_vocab
            return cls

        cv.get_model_class = with_placeholder_vocab
        f16 = str(Path(folder) / "model-f16.gguf")
        t0 = time.perf_counter()
        sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", f16, "--outtype", "f16"]
        cv.main()
        q4 = str(Path(folder) / "model-q4_k_m.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(f16.encode(), q4.encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
        os.remove(f16)
        res["gguf_s"] = time.perf_counter() - t0
    res["gguf_mib"] = os.path.getsize(q4) / 2**20
    import torch

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=q4, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False, seed=0)
    vocab = llm.n_vocab()
    g = torch.Generator().manual_seed(1)
    rates = []
    for _ in range(ROUNDS):
        prompt = torch.randint(300, min(vocab, 40000), (PROMPT_TOKENS,), generator=g).tolist()
        llm.reset()
        times = []
        for _tok in llm.generate(prompt, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new:
                break
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    res["llama_stream"] = statistics.median(rates)
    return res


def run_child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} {args[1]} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--new", type=int, default=32, help="new tokens per reply")
    ap.add_argument("--users", type=int, default=30, help="rows of the batch case (the 3B shape: one stream only)")
    ap.add_argument("--llama-src", default=os.environ.get("LLAMA_CPP_SRC", ""),
                    help="llama.cpp's source folder (convert_hf_to_gguf.py): adds the llama.cpp column")
    args = ap.parse_args()
    rows = {}
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}")
        users = 0 if shape == "qwen2.5-3b" else args.users
        with tempfile.TemporaryDirectory(prefix=f"attn-lab-{shape}-") as folder:
            print(f"building {shape} ...", file=sys.stderr, flush=True)
            built = run_child("build", shape, folder) if shape != "default" else {}
            rows[shape] = {**built, **run_child("measure", shape, folder, str(args.new), str(users))}
            if args.llama_src:
                rows[shape].update(run_child("llama", shape, folder, str(args.new), args.llama_src))
    first = next(iter(rows.values()))
    print(f"Machine: {first['machine']}\n")
    print(f"Greedy, {PROMPT_TOKENS}-token prompts, {args.new} new tokens, median of {ROUNDS} interleaved rounds; "
          "decode tokens/s.\n")
    print(f"| shape | fast 1 stream | forward 1 stream | x | fast {args.users} users | forward {args.users} users "
          "| x | same greedy tokens (1 / N) | RSS MiB (anonymous; peak) | fast path |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for shape, r in rows.items():
        t = r["tps"]
        fs, ms = t["fast_stream"], t["forward_stream"]
        fu, mu = t.get("fast_users"), t.get("forward_users")
        users = f"{fu:.1f} | {mu:.1f} | {fu / mu:.2f}x" if fu else "- | - | -"
        same = " / ".join("yes" if r[k] else "no" for k in ("same_stream", "same_users") if k in r)
        print(f"| {shape} | {fs:.1f} | {ms:.1f} | {fs / ms:.2f}x | {users} | {same} | {r['rss_mib']:.0f} "
              f"({r['anon_mib']:.0f}; {r['peak_rss_mib']:.0f}) | {r['fast_status'].split(', ready')[0]} |")
    if args.llama_src:
        print(f"\nOne stream beside llama.cpp ({first.get('llama_version', '?')}, Q4_K_M of the same weights, "
              f"{PROMPT_TOKENS}-token prompt, {args.new} greedy tokens):\n")
        print("| shape | fast path tok/s | llama.cpp tok/s | fast / llama.cpp | Q4_K_M MiB |")
        print("|---|---:|---:|---:|---:|")
        for shape, r in rows.items():
            fs, ls = r["tps"]["fast_stream"], r["llama_stream"]
            print(f"| {shape} | {fs:.1f} | {ls:.1f} | {fs / ls:.2f}x | {r['gguf_mib']:.0f} |")
    print(f"\nload average at the end: {rows[list(rows)[-1]]['load_end']}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kind, shape, folder, *rest = sys.argv[2:]
        if kind == "build":
            out = build_worker(shape, folder)
        elif kind == "llama":
            out = llama_worker(shape, folder, int(rest[0]), rest[1])
        else:
            out = measure_worker(shape, folder, int(rest[0]), int(rest[1]))
        print(json.dumps(out))
    else:
        main()
