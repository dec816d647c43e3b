"""ChatEngine: continuous batching on one decode loop.

Token-for-token parity with `generate()` on tiny fp32 models (Qwen2; Gemma 3 with a sliding window
smaller than the sequences, through sdpa and eager attention), alone and mixed in one batch with
prompts of other lengths, with queueing and chunked prefill; seeds, Stop, errors, close; and the
real 4-bit default model (the notebook's prompts, 30 users at once).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from generation import ReplyStats, SamplingParams, build_prompt, load_model
from generation.backends import visible_text
from generation.decode import RowAttentionMask
from generation.backends import ENGINE_THREAD_NAME, ChatEngine
from generation.model import LoadedModel

from conftest import assert_flip_is_a_tie, save_tiny_lm

NOTEBOOK_PROMPTS = [
    "What is the capital of France?",
    "Explain self-attention in one paragraph.",
    "Write a haiku about transformers.",
]
NEW = 20


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == ENGINE_THREAD_NAME and t.is_alive()]


def _load_eager(path) -> LoadedModel:
    """The tiny model with attn_implementation="eager" (additive float masks), then the project's
    dispatcher installed on top, as load_model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation.inside import install

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    install(model)
    tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tok, str(path), "cpu", "float32", "none", 0, 0, 0.0, True)


@pytest.fixture(scope="module", params=["qwen2", "gemma3-sliding", "gemma3-eager"])
def tiny(request, tmp_path_factory) -> LoadedModel:
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    if kind == "qwen2":
        save_tiny_lm(folder)
        return load_model(str(folder), load_4bit=False, dtype=torch.float32)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # window 8 << prompts of up to 41 tokens + 20 new: the sliding layers really slide
    save_tiny_lm(folder, Gemma3TextConfig, Gemma3ForCausalLM, sliding_window=8, head_dim=16,
                 query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    if kind == "gemma3-eager":
        return _load_eager(folder)
    return load_model(str(folder), load_4bit=False, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("qwen_plain")
    save_tiny_lm(folder)
    return load_model(str(folder), load_4bit=False, dtype=torch.float32)


def _prompts(lm: LoadedModel, lengths=(5, 17, 41, 3, 30, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    v = lm.model.config.vocab_size
    return [torch.randint(3, v - 3, (n,), generator=g) for n in lengths]


def _generate(lm: LoadedModel, prompt: torch.Tensor, new: int, **kw) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=new, pad_token_id=lm.tokenizer.pad_token_id, **kw)
    return out[0, len(prompt):].tolist()


def _generate_text(lm: LoadedModel, message: str, new: int) -> str:
    """The greedy reply to `message` as the chat shows it, from transformers' generate(): the app's
    prompt, the reply's text up to its first stop string."""
    prompt = build_prompt(lm.tokenizer, message)
    tokens = _generate(lm, prompt.input_ids[0], new, do_sample=False)
    return visible_text(lm.tokenizer.decode(tokens, skip_special_tokens=True), prompt.stop_strings)[0]


def test_ignore_eos_goes_on_to_max_new_tokens(tiny_qwen):
    """ignore_eos (as vLLM's): an end-of-sequence token no longer ends the reply, which runs on to
    max_new_tokens with the same tokens; without it the same reply ends at that token."""
    prompt = _prompts(tiny_qwen)[0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    with ChatEngine(tiny_qwen, warmup=False) as engine:
        free = engine.submit(prompt, greedy)
        assert free.wait(60) and free.stopped_by == "max_new_tokens"
        eos = free.token_ids[2]
        engine._eos = frozenset({eos})  # the tiny model's third token stands for an end of turn here
        ended, on = engine.submit(prompt, greedy), engine.submit(prompt, greedy, ignore_eos=True)
        assert ended.wait(60) and on.wait(60)
    first = free.token_ids.index(eos)
    assert ended.stopped_by == "eos" and ended.token_ids == free.token_ids[: first + 1]
    assert on.stopped_by == "max_new_tokens" and on.token_ids == free.token_ids


def test_greedy_matches_generate_alone_and_mixed(tiny):
    """Token for token: each prompt alone, then all six at once in a batch of at most 3 (so rows
    queue, join and leave between steps) with prefill chunks of 12 tokens."""
    prompts = _prompts(tiny)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    refs = [_generate(tiny, p, NEW, do_sample=False) for p in prompts]
    with ChatEngine(tiny, max_batch=3, prefill_tokens=12) as engine:
        alone = []
        for p in prompts:
            req = engine.submit(p, greedy)
            assert req.wait(60)
            alone.append(req.token_ids)
        reqs = [engine.submit(p, greedy) for p in prompts]
        assert all(r.wait(60) for r in reqs)
        assert engine.counters["prefill_forwards"] > len(prompts)  # the 41- and 30-token prompts were chunked
    assert alone == refs
    assert [r.token_ids for r in reqs] == refs
    assert all(r.error is None and r.stopped_by in ("eos", "max_new_tokens") for r in reqs)


def test_long_replies_grow_the_cache(tiny_qwen):
    """Replies past the KV buffers' first capacity (256 positions) grow them mid-batch, token-exact;
    once the batch is empty the grown buffers are given back."""
    prompts = _prompts(tiny_qwen, (41, 5))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=300)
    refs = [_generate(tiny_qwen, p, 300, do_sample=False) for p in prompts]
    assert min(len(r) for r in refs) + 5 > 256, "the references must outgrow the first capacity"
    with ChatEngine(tiny_qwen, warmup=False) as engine:
        reqs = [engine.submit(p, greedy) for p in prompts]
        assert all(r.wait(120) for r in reqs)
        assert engine._main is None
    assert [r.token_ids for r in reqs] == refs


def test_the_cache_holds_rows_for_the_running_chats_only(tiny_qwen):
    """One chat holds one row of keys/values, not max_batch rows; three more chats at once grow the
    rows (doubling, here to 4 of 8), token-exact; once no chat runs the buffers are given back."""
    prompts = _prompts(tiny_qwen)[:3]
    endless = SamplingParams(temperature=0.0, max_new_tokens=4096)  # runs until cancelled
    refs = [_generate(tiny_qwen, p, NEW, do_sample=False) for p in prompts]

    def until(cond):
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, "condition not reached within 60 s"
            time.sleep(0.002)

    with ChatEngine(tiny_qwen, max_batch=8, warmup=False) as engine:
        one = engine.submit(prompts[0], endless, ignore_eos=True)
        until(lambda: one.token_ids)
        assert engine._main.rows == 1
        more = [engine.submit(p, endless, ignore_eos=True) for p in prompts]
        until(lambda: all(len(r.token_ids) >= NEW for r in more))
        assert engine._main.rows == 4 and engine.snapshot().running == 4
        for r in [one] + more:
            r.cancel()
        assert all(r.wait(60) for r in [one] + more)
        until(lambda: engine._main is None)
    assert [r.token_ids[:NEW] for r in more] == refs


@pytest.mark.parametrize("rows,want,limit,grown", [(1, 2, 8, 2), (2, 3, 8, 4), (4, 5, 6, 6), (3, 2, 8, 3)])
def test_slot_cache_rows_double_up_to_the_limit_and_keep_their_contents(rows, want, limit, grown):
    from generation.decode import SlotKVCache

    cache = SlotKVCache(2, rows, 8)
    keys = [torch.randn(rows, 2, 8, 4) for _ in range(2)]
    cache.keys, cache.values = [k.clone() for k in keys], [None, (keys[0] + 1).clone()]
    cache.ensure_rows(want, limit)
    assert cache.rows == grown and all(k.shape == (grown, 2, 8, 4) for k in cache.keys)
    for before, after in zip(keys, cache.keys):
        torch.testing.assert_close(after[:rows], before, rtol=0, atol=0)
        assert not after[rows:].any()
    assert cache.values[0] is None and cache.values[1].shape[0] == grown
    with pytest.raises(ValueError, match="at most"):
        cache.ensure_rows(limit + 1, limit)


def test_seeded_sample_same_alone_and_in_batch(tiny_qwen):
    prompts = _prompts(tiny_qwen)
    mine = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=11, max_new_tokens=NEW)
    with ChatEngine(tiny_qwen, max_batch=8) as engine:
        alone = engine.submit(prompts[2], mine)
        assert alone.wait(60)
        others = [SamplingParams(temperature=0.0, max_new_tokens=NEW),
                  SamplingParams(temperature=1.5, seed=1, max_new_tokens=NEW),
                  SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=7)]
        reqs = [engine.submit(p, o) for p, o in zip(prompts[:2] + prompts[3:4], others)]
        again = engine.submit(prompts[2], mine)
        reqs += [engine.submit(p, SamplingParams(seed=5, max_new_tokens=NEW)) for p in prompts[4:]]
        assert again.wait(60) and all(r.wait(60) for r in reqs)
    assert again.token_ids == alone.token_ids and len(alone.token_ids) > 3
    unseeded = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=NEW)
    with ChatEngine(tiny_qwen) as engine:
        a, b = engine.submit(prompts[0], unseeded), engine.submit(prompts[0], unseeded)
        assert a.wait(60) and b.wait(60)
    assert a.token_ids != b.token_ids  # seed None: fresh entropy per request


def test_stop_one_request_leaves_the_others_intact(tiny_qwen):
    prompts = _prompts(tiny_qwen)[:3]
    long = SamplingParams(temperature=0.0, max_new_tokens=60)
    refs = [_generate(tiny_qwen, p, 60, do_sample=False) for p in prompts]
    assert all(len(r) >= 30 for r in refs), "the references must run long enough to stop one midway"
    with ChatEngine(tiny_qwen, max_batch=3) as engine:
        reqs = [engine.submit(p, long) for p in prompts]
        while len(reqs[1].token_ids) < 5:
            time.sleep(0.001)
        before = engine.active()
        reqs[1].cancel()
        assert reqs[1].wait(10)
        assert engine.active() <= before - 1  # its slot is free by the time it reports done
        assert reqs[1].stopped_by == "stopped" and 5 <= len(reqs[1].token_ids) < len(refs[1])
        assert reqs[1].token_ids == refs[1][: len(reqs[1].token_ids)]
        assert reqs[0].wait(60) and reqs[2].wait(60)
    assert [reqs[0].token_ids, reqs[2].token_ids] == [refs[0], refs[2]]


def test_stream_reply_contract(tiny_qwen):
    engine = ChatEngine(tiny_qwen, max_batch=4)
    try:
        with pytest.raises(ValueError):  # bad input: raised before anything is queued
            next(engine.stream_reply("   "))
        with pytest.raises(ValueError):
            next(engine.stream_reply("hello", params={"temperature": 0.5}))
        with pytest.raises(ValueError):
            next(engine.stream_reply("hello " * 400, max_input_tokens=64))
        assert engine.waiting() == 0 and engine.active() == 0 and not _engine_threads()

        stats = ReplyStats()
        params = SamplingParams(temperature=0.0, max_new_tokens=12)
        pieces = list(engine.stream_reply("The capital of France is", params=params, stats=stats))
        assert pieces and pieces[-1] == _generate_text(tiny_qwen, "The capital of France is", 12)
        assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(pieces, pieces[1:]))
        assert stats.stopped_by in ("eos", "max_new_tokens") and 0 < stats.new_tokens <= 12
        assert stats.prompt_tokens > 5 and 0 < stats.first_token_s <= stats.total_s
        assert stats.tokens_per_s > 0 or stats.new_tokens == 1
        assert len(_engine_threads()) >= 1 and engine.describe() == "local engine · batch ≤ 4"

        # closing the generator early stops the request and frees its slot
        stats = ReplyStats()
        gen = engine.stream_reply("Tell me about attention", params=SamplingParams(temperature=0.0, max_new_tokens=200),
                                  stats=stats)
        next(gen)
        gen.close()
        assert stats.stopped_by == "stopped" and engine.active() == 0

        # a stop_event set from another thread ends it too
        stop = threading.Event()
        stats = ReplyStats()
        gen = engine.stream_reply("Tell me about attention", params=SamplingParams(temperature=0.0, max_new_tokens=200),
                                  stats=stats, stop_event=stop)
        next(gen)
        threading.Timer(0.05, stop.set).start()
        rest = list(gen)
        assert stats.stopped_by == "stopped" and stats.new_tokens < 200 and isinstance(rest, list)
    finally:
        engine.close()
    assert not _engine_threads()


def test_requests_beyond_max_batch_wait_in_fifo_order(tiny_qwen):
    """Six requests queued before the loop runs, a batch of two: every step, as the engine itself
    sees it, runs at most two rows while the rest wait; they start in the order they came."""
    prompts = _prompts(tiny_qwen)
    engine = ChatEngine(tiny_qwen, max_batch=2, autostart=False)
    seen: list[tuple[int, int]] = []  # (rows running or being prefilled, requests waiting) at each step
    decode, prefill = engine._decode_step, engine._prefill_chunk

    def traced(step):
        def run():
            seen.append((engine.active(), engine.waiting()))
            step()
        return run

    engine._decode_step, engine._prefill_chunk = traced(decode), traced(prefill)
    reqs = [engine.submit(p, SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i)) for i, p in enumerate(prompts)]
    with engine:
        engine.run_here(until_idle=True)
    assert all(r.done.is_set() and r.error is None for r in reqs)
    assert max(a for a, _ in seen) == 2 and any(a == 2 and w >= 2 for a, w in seen)
    firsts = [r.t_first for r in reqs]
    assert firsts == sorted(firsts)


def test_prefill_chunks_interleave_with_decode_steps(tiny_qwen):
    """A 60-token newcomer is prefilled in chunks of 8 while another reply streams: the running
    row gets a decode step after every chunk (it never waits for the whole prompt)."""
    order: list[str] = []
    engine = ChatEngine(tiny_qwen, max_batch=4, prefill_tokens=8)
    prefill, decode = engine._prefill_chunk, engine._decode_step

    def traced_prefill():
        order.append("P")
        prefill()

    def traced_decode():
        order.append("D")
        decode()

    engine._prefill_chunk, engine._decode_step = traced_prefill, traced_decode
    with engine:
        first = engine.submit(_prompts(tiny_qwen, (4,))[0], SamplingParams(temperature=0.0, max_new_tokens=40))
        while not first.token_ids:
            time.sleep(0.001)
        order.clear()
        late = engine.submit(_prompts(tiny_qwen, (60,))[0], SamplingParams(temperature=0.0, max_new_tokens=4))
        assert late.wait(60) and first.wait(60)
    chunks = "".join(order)
    assert chunks.count("P") >= 60 // 8
    assert "PP" not in chunks.strip("D")


def test_error_in_the_loop_fails_the_request_and_the_loop_goes_on(tiny_qwen):
    engine = ChatEngine(tiny_qwen)
    real = engine._decode_step
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second decode step of the first request
            raise RuntimeError("out of memory (simulated)")
        real()

    engine._decode_step = flaky
    with engine:
        with pytest.raises(RuntimeError, match="generation failed: RuntimeError: out of memory"):
            list(engine.stream_reply("Tell me about attention", params=SamplingParams(temperature=0.0, max_new_tokens=30)))
        assert engine.active() == 0 and _engine_threads()
        reply = list(engine.stream_reply("The capital of France is", params=SamplingParams(temperature=0.0, max_new_tokens=5)))
        assert reply


def test_close_fails_pending_requests(tiny_qwen):
    engine = ChatEngine(tiny_qwen, max_batch=1)
    reqs = [engine.submit(p, SamplingParams(temperature=0.0, max_new_tokens=500)) for p in _prompts(tiny_qwen)[:3]]
    while not reqs[0].token_ids:
        time.sleep(0.001)
    engine.close()
    assert all(r.done.is_set() for r in reqs)
    assert all(isinstance(r.error, RuntimeError) and "closed" in str(r.error) for r in reqs)
    assert not _engine_threads()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(reqs[0].prompt_ids)
    with pytest.raises(RuntimeError, match="closed"):
        next(engine.stream_reply("hello"))


EXIT_SCRIPT = """
import atexit, sys, threading
import torch

def at_exit():
    # Registered before generation is imported, so it runs after the engine module's own handler.
    alive = [t.name for t in threading.enumerate() if t.name == "chat_engine" and t.is_alive()]
    print("engine threads at exit:", alive, flush=True)

atexit.register(at_exit)
from generation import ChatEngine, SamplingParams, load_model

lm = load_model(sys.argv[1], load_4bit=False, dtype=torch.float32)
greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
with ChatEngine(lm) as first:
    list(first.stream_reply("hello", params=greedy))
left = ChatEngine(lm)  # never closed, as a short script forgets to
print("reply:", list(left.stream_reply("hello", params=greedy))[-1] is not None, flush=True)
"""


def test_an_engine_left_running_is_closed_as_the_interpreter_exits(tiny_qwen_dir, tmp_path):
    """A script that never closes its engine: the loop thread (a daemon, inside torch at any time)
    must be gone before the interpreter tears torch down, or the process may abort on exit
    ("terminate called without an active exception", status 134)."""
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(EXIT_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(tiny_qwen_dir)], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reply: True" in done.stdout and "engine threads at exit: []" in done.stdout, done.stdout
    assert "terminate called" not in done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rep", [1, 4])
def test_row_attention_mask_equals_single_sequence_sdpa(dtype, n_rep):
    """Through transformers' sdpa_attention_forward, a RowAttentionMask batch gives each row
    exactly (bit for bit) what the row alone gives (decode and a causal prefill from 0); the
    plain batched mask does not in general, which is why the engine uses it."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    hkv, d, lens = 1, 64, [7, 31, 50, 12]
    module = SimpleNamespace(num_key_value_groups=n_rep, is_causal=True, training=False)
    n, span = len(lens), max(lens)
    keys = torch.randn(n, hkv, span, d, generator=g).to(dtype)
    values = torch.randn(n, hkv, span, d, generator=g).to(dtype)
    # decode: one query per row at position len - 1
    q = torch.randn(n, hkv * n_rep, 1, d, generator=g).to(dtype)
    plain = (torch.arange(span) < torch.tensor(lens).view(-1, 1)).view(n, 1, 1, span)
    mask = RowAttentionMask.wrap(plain, lens, [1] * n, None, n_rep)
    got, _ = sdpa_attention_forward(module, q, keys, values, mask, scaling=0.125)
    for b, length in enumerate(lens):
        alone, _ = sdpa_attention_forward(module, q[b : b + 1], keys[b : b + 1, :, :length].contiguous(),
                                          values[b : b + 1, :, :length].contiguous(), None, scaling=0.125)
        assert torch.equal(got[b], alone[0])
    # prefill from position 0, left-padded to T = 12: row b's real queries are its last lens[b]
    t = 12
    lens = [5, 12, 9, 1]
    q = torch.randn(n, hkv * n_rep, t, d, generator=g).to(dtype)
    mask = RowAttentionMask.wrap(torch.ones(n, 1, t, t, dtype=torch.bool), lens, lens, None, n_rep)
    k = torch.zeros(n, hkv, t, d, dtype=dtype)
    v = torch.zeros(n, hkv, t, d, dtype=dtype)
    for b, length in enumerate(lens):
        k[b, :, :length], v[b, :, :length] = keys[b, :, :length], values[b, :, :length]
    got, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    for b, length in enumerate(lens):
        alone, _ = sdpa_attention_forward(module, q[b : b + 1, :, t - length :], k[b : b + 1, :, :length].contiguous(),
                                          v[b : b + 1, :, :length].contiguous(), None, scaling=0.125)
        assert torch.equal(got[b, t - length :], alone[0])
        assert not got[b, : t - length].any()


# --- the real default model in 4-bit -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine4(lm4):
    with ChatEngine(lm4, max_batch=32) as engine:
        yield engine


def test_real_model_greedy_text_matches_generate(lm4, engine4):
    """The notebook's prompts, greedy: the engine's reply is generate()'s (its text cut at the first
    stop string), alone and mixed in one batch with prompts of other lengths (arriving at staggered
    moments). The engine's step and its cached system prefix sum in another order than generate():
    the two may part only where the model's own bf16 logits tie (`assert_flip_is_a_tie`)."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    prompts = [build_prompt(lm4.tokenizer, p) for p in NOTEBOOK_PROMPTS]
    refs = [_generate(lm4, p.input_ids[0], 40, do_sample=False) for p in prompts]
    assert "Paris" in lm4.tokenizer.decode(refs[0])

    def check(prompt, got: list[int], want: list[int]) -> None:
        if assert_flip_is_a_tie(lm4, prompt.input_ids[0], got, want):
            text = [visible_text(lm4.tokenizer.decode(t, skip_special_tokens=True), prompt.stop_strings)[0]
                    for t in (got, want)]
            assert text[0] == text[1]

    for p, want in zip(prompts, refs):
        r = engine4.submit(p.input_ids[0], greedy, stop_strings=p.stop_strings)
        assert r.wait(300)
        check(p, r.token_ids, want)
    # the whole default system text (instruction and example exchanges) came from the warm-up's keys/values
    from generation import DEFAULT_SYSTEM

    system_tokens = len(lm4.tokenizer(DEFAULT_SYSTEM).input_ids) - 1  # its last token may merge with what follows
    assert system_tokens > 60 and engine4.prefixes.tokens_saved >= 3 * system_tokens
    mixed: dict[int, list[int]] = {}
    others = [build_prompt(lm4.tokenizer, m) for m in
              ["Tell me a long story about a dragon who learns to fly over the snowy mountains of the north.", "Hi"]]

    def run(i: int, p, delay: float) -> None:
        time.sleep(delay)
        r = engine4.submit(p.input_ids[0], greedy, stop_strings=p.stop_strings)
        r.wait(300)
        mixed[i] = r.token_ids

    batch = [others[0], *prompts, others[1]]
    threads = [threading.Thread(target=run, args=(i, p, 0.15 * i)) for i, p in enumerate(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, (p, want) in enumerate(zip(prompts, refs), start=1):
        check(p, mixed[i], want)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_new_tokens=16),
                                    SamplingParams(max_new_tokens=16, seed=3)], ids=["greedy", "notebook-seeded"])
def test_real_model_reply_does_not_depend_on_the_batch(lm4, engine4, params):
    """Token for token, the same reply alone and in batches of other lengths and arrival times
    (the 4-bit model's bf16 logits tie exactly now and then; only bit-identical arithmetic keeps
    the choice)."""
    from generation.prompt import build_prompt

    prompts = [build_prompt(lm4.tokenizer, p).input_ids for p in
               [*NOTEBOOK_PROMPTS, "Hi", "Tell me a long story about a dragon who learns to fly.", "List three colours."]]
    alone = []
    for ids in prompts:
        req = engine4.submit(ids, params)
        assert req.wait(120)
        alone.append(req.token_ids)
    for shift in (0, 3):
        order = prompts[shift:] + prompts[:shift]
        reqs = []
        for i, ids in enumerate(order):
            reqs.append(engine4.submit(ids, params))
            time.sleep(0.05 * (i % 3))
        assert all(r.wait(120) for r in reqs)
        assert [r.token_ids for r in reqs] == alone[shift:] + alone[:shift]


def test_real_model_thirty_concurrent_requests_finish(engine4):
    """30 users at once with the notebook's sampling: all finish, in one batch; a seeded reply is
    the same as when it ran alone."""
    n = 30
    seeded = SamplingParams(max_new_tokens=12, seed=7)
    alone = list(engine4.stream_reply(NOTEBOOK_PROMPTS[1], params=seeded))[-1]
    results: dict[int, tuple[str, ReplyStats]] = {}
    errors: list[BaseException] = []
    peak = {"active": 0}

    def run(i: int) -> None:
        stats = ReplyStats()
        try:
            params = seeded if i == 0 else SamplingParams(max_new_tokens=12, seed=100 + i)
            prompt = NOTEBOOK_PROMPTS[1] if i == 0 else f"{NOTEBOOK_PROMPTS[i % 3]} (user {i})"
            out = list(engine4.stream_reply(prompt, params=params, stats=stats))
            results[i] = (out[-1] if out else "", stats)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak["active"] = max(peak["active"], engine4.active())
        time.sleep(0.01)
    assert not errors and len(results) == n
    assert all(s.stopped_by in ("eos", "stop_string", "max_new_tokens") and s.new_tokens >= 1 for _, s in results.values())
    assert peak["active"] >= 16  # they really shared the batch
    assert results[0][0] == alone
    assert engine4.active() == 0 and engine4.waiting() == 0


def test_run_here_serves_from_the_calling_thread(tiny_qwen):
    """autostart=False: requests submitted before the loop runs wait for it (no thread of its own);
    run_here() serves them from the calling thread until close()."""
    before = set(_engine_threads())  # other tests' engines may still run
    engine = ChatEngine(tiny_qwen, max_batch=4, autostart=False)
    prompts = _prompts(tiny_qwen, (5, 9))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    reqs = [engine.submit(p, greedy) for p in prompts]
    time.sleep(0.3)
    assert set(_engine_threads()) == before and engine.waiting() == 2 and not reqs[0].done.is_set()
    served: list[list[int]] = []

    def user() -> None:
        for r in reqs:
            r.wait(60)
        served.extend(r.token_ids for r in reqs)
        served.append(next(iter(engine.stream_reply("hi", params=greedy, max_input_tokens=64))) is not None)
        engine.close()

    t = threading.Thread(target=user)
    t.start()
    engine.run_here()  # returns once the user thread closed the engine
    t.join(60)
    assert served[:2] == [_generate(tiny_qwen, p, 6) for p in prompts] and served[2] is True
    assert set(_engine_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        engine.run_here()


def test_run_here_until_idle_pauses_and_resumes(tiny_qwen):
    """until_idle: the loop serves what is queued, returns, and serves later requests on the next call."""
    engine = ChatEngine(tiny_qwen, max_batch=4, autostart=False)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    prompts = _prompts(tiny_qwen, (6, 11, 4))
    first = [engine.submit(p, greedy) for p in prompts[:2]]
    engine.run_here(until_idle=True)
    assert all(r.done.is_set() and r.error is None for r in first)
    late = engine.submit(prompts[2], greedy)
    time.sleep(0.2)
    assert not late.done.is_set()  # nothing runs between calls
    engine.run_here(until_idle=True)
    assert [r.token_ids for r in [*first, late]] == [_generate(tiny_qwen, p, 5) for p in prompts]
    engine.close()


@pytest.fixture(scope="module")
def tiny_qwen_eos(tmp_path_factory, tiny_qwen) -> tuple[LoadedModel, list[int]]:
    """The same tiny model (same seed) saved with its third greedy token as end-of-sequence; and
    the greedy reply with no end-of-sequence (20 tokens)."""
    prompt = _prompts(tiny_qwen)[0]
    free = _generate(tiny_qwen, prompt, NEW, do_sample=False)
    folder = tmp_path_factory.mktemp("qwen_eos")
    save_tiny_lm(folder, eos_token_id=free[2])
    return load_model(str(folder), load_4bit=False, dtype=torch.float32), free


@pytest.mark.parametrize("min_new", [0, 1, 3, 8, NEW])
def test_min_new_tokens_is_transformers_min_new_tokens(tiny_qwen_eos, min_new):
    """Before min_new_tokens no end-of-sequence token can be drawn (its logit is -inf, as in
    transformers' MinNewTokensLengthLogitsProcessor): greedy replies equal generate()'s."""
    lm, free = tiny_qwen_eos
    prompt = _prompts(lm)[0]
    eos = free[2]
    want = _generate(lm, prompt, NEW, do_sample=False, min_new_tokens=min_new, eos_token_id=eos)
    with ChatEngine(lm, warmup=False) as engine:
        req = engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=NEW, min_new_tokens=min_new))
        assert req.wait(60)
    assert req.token_ids == want
    assert eos not in req.token_ids[:min_new]
    assert req.stopped_by == ("eos" if eos in want else "max_new_tokens")


def test_min_new_tokens_holds_sampled_rows(tiny_qwen_eos):
    """Sampled rows cannot draw end-of-sequence before min_new_tokens either (a hot temperature
    makes it likely otherwise)."""
    lm, free = tiny_qwen_eos
    prompt = _prompts(lm)[0]
    with ChatEngine(lm, warmup=False) as engine:
        reqs = [engine.submit(prompt, SamplingParams(temperature=2.0, top_p=1.0, max_new_tokens=NEW,
                                                     min_new_tokens=NEW, seed=s)) for s in range(8)]
        assert all(r.wait(60) for r in reqs)
    for r in reqs:
        assert free[2] not in r.token_ids and len(r.token_ids) == NEW and r.stopped_by == "max_new_tokens"


def test_min_new_tokens_keeps_an_early_stop_string_in_the_reply(tiny_qwen):
    """A stop string that begins in the text of the first min_new_tokens tokens is part of the
    reply, not its end; without min_new_tokens the same reply ends there."""
    prompt = _prompts(tiny_qwen)[0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    with ChatEngine(tiny_qwen, warmup=False) as engine:
        free = engine.submit(prompt, greedy)
        assert free.wait(60)
        # two printable characters of the reply's middle (the first tokens are byte fragments)
        at = next(i for i in range(len(free.text) // 3, len(free.text)) if free.text[i : i + 2].isalpha())
        stop = free.text[at : at + 2]
        held = engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=NEW, min_new_tokens=NEW),
                             stop_strings=[stop])
        ended = engine.submit(prompt, greedy, stop_strings=[stop])
        assert held.wait(60) and ended.wait(60)
    assert held.token_ids == free.token_ids and held.stopped_by == "max_new_tokens"
    assert ended.stopped_by == "stop_string" and len(ended.token_ids) < NEW


@pytest.mark.parametrize(("text", "search_from", "shown", "hit"), [
    ("Paris.\nUser: hi", 0, "Paris.", True),
    ("Paris.\nUser: hi", 3, "Paris.", True),
    ("Paris.\nUser: hi", 7, "Paris.\nUser: hi", False),  # the stop began before search_from
    ("Paris.\nUser: hi\nUser: x", 7, "Paris.\nUser: hi", True),
    ("Paris.\nUs", 0, "Paris.", False),  # held back: it may become a stop
    ("Paris.\nUs", 99, "Paris.\nUs", False),  # nothing counts yet: nothing held back
])
def test_visible_text_counts_stop_strings_from_search_from(text, search_from, shown, hit):
    assert visible_text(text, ["\nUser:"], search_from) == (shown, hit)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(min_new_tokens=-1), r"min_new_tokens must be an integer in \[0, max_new_tokens = 128\], got -1"),
    (dict(min_new_tokens=129), r"got 129"),
    (dict(min_new_tokens=5, max_new_tokens=4), r"\[0, max_new_tokens = 4\], got 5"),
    (dict(min_new_tokens=True), r"got True"),
    (dict(min_new_tokens=2.0), r"got 2.0"),
])
def test_min_new_tokens_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
