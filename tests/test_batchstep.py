"""The chat engine's fast CPU decode (generation/decode/: lean.py, head.py) on the real NF4 model.

The lean batched step is compared with the engine's own model path (transformers' forward over
the same KV cache) bit for bit, logits and written keys, for batches of mixed lengths and across
Gemma 3's sliding window; the token choice through the int8 head with the bf16 head's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_flip_is_a_tie
from conftest import copy_cache as _copy
from conftest import decode_side_by_side
from conftest import prefilled_cache as _prefilled
from generation import SamplingParams, build_prompt
from generation.decode import BatchDecodeStep, ModelStep, pick_tokens
from generation.backends import ChatEngine
from generation.decode.sampler import BatchSampler, RowSampling
from generation.sampling import make_generator

pytestmark = [
    pytest.mark.torch_threads(2),  # the OpenMP kernels run on two threads, as in the app
    pytest.mark.skipif(
        not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
        reason="bitsandbytes' CPU NF4 kernel needs AVX-512",
    ),
]

PROMPTS = ["What is the capital of France?", "Explain self-attention in one paragraph.", "Hi",
           "Write a haiku about transformers."]


@pytest.fixture(scope="module")
def model(fast_model):
    return fast_model


@pytest.fixture(scope="module")
def slow(lm4, model):
    """The engine's model path (`ModelStep`: transformers' forward over the engine's cache, logits)."""
    return ModelStep(lm4)


@pytest.fixture(scope="module")
def step(model):
    """The exact variant: sdpa called per row exactly as the model path calls it."""
    return BatchDecodeStep(model, exact_attention=True)


@pytest.fixture(scope="module")
def packed(model):
    """The engine's default: every row's attention in one native kernel call per layer (torch's
    sdpa per row, the query heads of a key/value head packed, where the kernel cannot run)."""
    return BatchDecodeStep(model)


@pytest.fixture(scope="module")
def packed_sdpa(model):
    """The default's fallback: torch's sdpa per row, the query heads of a key/value head packed."""
    return BatchDecodeStep(model, native_attention=False)


@pytest.fixture(scope="module")
def head(int8_head):
    return int8_head


@pytest.mark.parametrize("attention", ["default", "packed sdpa"])
@pytest.mark.parametrize("case", ["mixed", "window"])
def test_step_equals_the_model_path_bit_for_bit(lm4, model, slow, step, packed, packed_sdpa, case, attention):
    """A few greedy steps of a batch through both paths: the same logits (the lean step's hidden
    through the bf16 head) and the same keys/values written, every step. "window": rows of 508
    and 505 tokens decoding across the 512-token sliding window of the local layers. The default
    attention (the native kernel) or its fallback (sdpa per row, query heads packed) on a third copy
    of the cache: the same next-token distributions within a small KL divergence (their fp32 sums
    round differently from the model's call)."""
    packed = packed if attention == "default" else packed_sdpa
    if attention == "default" and not packed.attention_status.native:
        pytest.skip(str(packed.attention_status))
    tok = lm4.tokenizer
    if case == "mixed":
        prompts = [build_prompt(tok, p).input_ids[0] for p in PROMPTS]
        steps = 4
    else:
        text = tok("All the world's a stage, and all the men and women merely players. " * 60,
                   return_tensors="pt").input_ids[0]
        prompts = [text[:508], text[3:508], build_prompt(tok, PROMPTS[0]).input_ids[0]]
        steps = 10
    worst, lens = decode_side_by_side(slow, step, packed, prompts, steps, model.get_output_embeddings().weight)
    assert worst < 0.02, worst  # nats; NF4 vs full precision is ~0.36
    if case == "window":
        assert min(lens[:2]) > 512  # the local layers' window really moved


@pytest.mark.parametrize("n", [1, 3, 30])
def test_native_norm_kernels_change_no_bit(lm4, model, slow, packed, n):
    """The default step (RMSNorms, residual adds, q/k norms and RoPE in the native kernels, where
    they build here) and the same step on torch's ops: the same hidden states and keys/values."""
    plain = BatchDecodeStep(model, native_norms=False)
    assert not plain.norm_status.native and plain.norm_status.short == "torch ops"
    if packed._kernels is None:
        pytest.skip(str(packed.norm_status))
    assert packed.norm_status.native
    ids = [build_prompt(lm4.tokenizer, PROMPTS[i % len(PROMPTS)]).input_ids[0] for i in range(n)]
    ref, lens, nxt = _prefilled(slow, ids)
    other = _copy(ref, lens)
    for _ in range(3):
        for c in (ref, other):
            c.ensure(max(lens) + 1)
        tokens, pos = torch.tensor(nxt), torch.tensor(lens)
        with torch.inference_mode():
            a, b = packed(tokens, pos, ref), plain(tokens, pos, other)
            nxt = F.linear(a, model.get_output_embeddings().weight).argmax(-1).tolist()
        assert torch.equal(a, b)
        for layer in range(ref.n_layers):
            assert torch.equal(ref.keys[layer][:n], other.keys[layer][:n])
        lens = [x + 1 for x in lens]


@pytest.fixture(scope="module")
def hidden(lm4, model):
    """Final hidden states (40, D) bf16 of real text, one row per position."""
    ids = build_prompt(lm4.tokenizer, "Tell me a long story about a dragon who learns to fly.").input_ids
    with torch.inference_mode():
        return model.model(input_ids=ids).last_hidden_state[0, -40:]


def _exact_row(head, h: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return F.linear(h[None], head.exact)[0]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_rows_get_the_bf16_heads_choice(lm4, head, hidden, penalty):
    params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
    prompt = torch.arange(100, 140)
    rows = [RowSampling(params, prompt) for _ in range(hidden.shape[0])]
    with torch.inference_mode():
        got = pick_tokens(hidden, head, rows, BatchSampler())
        want = BatchSampler().sample(torch.stack([_exact_row(head, h) for h in hidden]), rows).tolist()
    assert got == want


def test_suppressed_tokens_are_never_the_greedy_choice(head, hidden):
    """min_new_tokens: a suppressed token (here each row's own argmax, or a token that is not
    the argmax) is never chosen, and the choice is the bf16 head's best among the rest."""
    params = SamplingParams(temperature=0.0)
    exact = torch.stack([_exact_row(head, h) for h in hidden]).float()  # (T, V)
    best = exact.argmax(-1)
    for suppress in (best, torch.full_like(best, int(exact[0].argmin()))):
        rows = [RowSampling(params) for _ in range(hidden.shape[0])]
        for r, tok in zip(rows, suppress.tolist()):
            r.suppress = torch.tensor([tok])
        with torch.inference_mode():
            got = pick_tokens(hidden, head, rows, BatchSampler())
        masked = exact.scatter(1, suppress[:, None], float("-inf"))
        assert got == masked.argmax(-1).tolist()


def test_a_sampled_row_does_not_depend_on_the_batch(head, hidden):
    """The same hidden state and seed give the same draws alone and among other rows."""
    params = SamplingParams(seed=11)
    target = hidden[7:8]
    with torch.inference_mode():
        alone = [pick_tokens(target, head, [RowSampling(params, generator=make_generator(s))], BatchSampler())[0]
                 for s in range(12)]
        mixed = []
        for s in range(12):
            rows = [RowSampling(SamplingParams(seed=50 + i)) for i in range(6)]
            rows[3] = RowSampling(params, generator=make_generator(s))
            batch = torch.cat([hidden[:3], target, hidden[10:12]])
            mixed.append(pick_tokens(batch, head, rows, BatchSampler())[3])
    assert alone == mixed


def test_sampled_distribution_is_close_to_the_bf16_heads(head, hidden):
    """The notebook's sampling (T 0.7, top-p 0.95) from int8 logits with the top 64 exact vs from the
    bf16 head's: total variation distance between the two kept distributions, per position."""
    from generation.decode import RESCORE_K

    sampler = BatchSampler()
    tv = []
    with torch.inference_mode():
        for h in hidden:
            exact = _exact_row(head, h).float()
            approx = head.logits(h[None])[0]
            top = torch.topk(approx, RESCORE_K).indices
            approx.index_copy_(0, top, head.rescore(h[None], top).float())
            dist = []
            for logits in (exact, approx):
                scaled = logits / 0.7
                kept = sampler.kept_ids(scaled[None], [0], [0.95])[0]
                p = torch.zeros_like(scaled)
                p[kept] = torch.softmax(scaled[kept].double(), -1).float()
                dist.append(p)
            tv.append(0.5 * float((dist[0] - dist[1]).abs().sum()))
    assert max(tv) < 0.02 and sum(tv) / len(tv) < 0.005, (max(tv), sum(tv) / len(tv))


def test_the_engine_decodes_through_the_fast_path(lm4):
    """The 4-bit model on CPU: the engine sets the fast decode up itself and every decode step
    takes it; its greedy replies are the model path's (an engine with fast=False), except where
    the model's own bf16 logits tie: the fast step sums attention in another order, so a token
    may flip only between two candidates no further apart than bf16's rounding of the logits."""
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    prompts = [build_prompt(lm4.tokenizer, p).input_ids[0] for p in PROMPTS[:2]]
    with ChatEngine(lm4, max_batch=4) as fast, ChatEngine(lm4, max_batch=4, fast=False) as plain:
        got = [fast.submit(ids, params) for ids in prompts]
        want = [plain.submit(ids, params) for ids in prompts]
        for r in got + want:
            assert r.wait(300)
        assert fast.fast_status.startswith("on:"), fast.fast_status
        assert plain.fast_status == "off" and plain.counters["fast_steps"] == 0
        assert fast.counters["fast_steps"] == fast.counters["steps"] > 0
        assert "fast CPU decode" in fast.describe()
    assert "Paris" in lm4.tokenizer.decode(want[0].token_ids)
    for ids, g, w in zip(prompts, got, want):
        assert_flip_is_a_tie(lm4, ids, g.token_ids, w.token_ids)


@pytest.mark.parametrize("asked_first", [True, False], ids=["asked-first", "first-call"])
def test_one_thread_here_is_per_thread(asked_first):
    """A worker thread goes single-threaded, also when that is the thread's first torch call (torch
    sizes a new thread's team at its first parallel call, after torch.set_num_threads as app.py
    and this module's marker call it); the main thread (the engine's, in the app) keeps its threads."""
    import threading

    from generation.decode import one_thread_here, openmp_runtime

    if openmp_runtime() is None or torch.get_num_threads() < 2:
        pytest.skip("needs torch's OpenMP runtime and 2+ threads")
    before = torch.get_num_threads()
    seen = {}

    def worker() -> None:
        if asked_first:
            seen["first"] = torch.get_num_threads()
        one_thread_here()
        torch.ones(256, 256) @ torch.ones(256, 256)  # a parallel op
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == ({"first": before} if asked_first else {}) | {"after": 1}
    one_thread_here()  # the main thread: a no-op
    assert torch.get_num_threads() == before


def test_single_threaded_as_a_new_threads_first_call():
    """single_threaded in a fresh thread: one thread inside (after torch.set_num_threads, as in the
    app), the count from before inside all_threads() and after the block."""
    import threading

    from generation.decode import openmp_runtime, single_threaded

    if openmp_runtime() is None or torch.get_num_threads() < 2:
        pytest.skip("needs torch's OpenMP runtime and 2+ threads")
    before = torch.get_num_threads()
    seen = {}

    def worker() -> None:
        with single_threaded() as st:
            torch.ones(256, 256) @ torch.ones(256, 256)
            seen["inside"] = torch.get_num_threads()
            with st.all_threads():
                seen["all"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"inside": 1, "all": before, "after": before}
