"""The chat model's attention maps, next-token probabilities and what 4-bit costs.

References are transformers' own code on the same model object (same weights): its eager
attention with output_attentions for the maps, its logits processors for the filtering (the
filtering functions themselves are tested in tests/test_sampling.py).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch
from torch.testing import assert_close
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

import attention.functional
from generation.inside import (
    CaptureUnsupported,
    capture,
    FullPrecisionCache,
    compare_quantization,
    model_attention,
    model_layers,
    next_token_candidates,
)
from generation.model import LoadedModel, load_model
from generation.sampling import SamplingParams, SeededSampler
from generation.settings import Settings

TEXT = "The quick brown fox jumps over the lazy dog. It was five o'clock."
PROMPT = "The capital of France is"


@contextmanager
def eager_attention(model):
    """Run THIS model object with transformers' eager attention, then switch back.

    Only for the reference run inside a test (pytest runs one test at a time): the app never
    switches a shared model; the point of generation.inside.capture is that it does not have to.
    """
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def ids_of(lm, text: str) -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt").input_ids  # (1, T)


def eager_maps(lm, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' eager attention weights, one (H, T, T) float32 per layer."""
    with eager_attention(lm.model), torch.inference_mode():
        out = lm.model(input_ids=ids, output_attentions=True, use_cache=False)
    return [a[0].float() for a in out.attentions]


def project_maps(lm, ids: torch.Tensor) -> list[torch.Tensor]:
    """The same forward with every layer's attention computed by attention.functional.scaled_dot_product."""
    capture.install(lm.model)
    with torch.inference_mode(), capture.capture() as captured:
        lm.model(input_ids=ids, use_cache=False)
    return [captured[i][0].float() for i in sorted(captured)]


def greedy_tokens(lm, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny_qwen(tiny_qwen_dir):
    return {bits: load_model(str(tiny_qwen_dir), load_4bit=bits) for bits in (False, True)}


@pytest.fixture(scope="module")
def tiny_gemma_window(tmp_path_factory):
    """A random two-layer Gemma 3 (the default model's architecture) whose sliding window is 4 tokens:
    Gemma 3 270m's window (512) is longer than any text the view accepts, so the masking itself is
    checked here."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.conftest import save_tiny_lm

    folder = save_tiny_lm(
        tmp_path_factory.mktemp("tiny_gemma3_window"),
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return load_model(str(folder), load_4bit=False)


# ---------------------------------------------------------------------------------------------
# Attention maps equal transformers' eager attention


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lm_full", "lm4"])
def test_default_model_maps_equal_eager(request, which):
    lm = request.getfixturevalue(which)
    ids = ids_of(lm, TEXT)
    ref = eager_maps(lm, ids)
    ours = project_maps(lm, ids)
    assert len(ours) == len(ref) == 18
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape == (4, ids.shape[1], ids.shape[1]), layer
        if which == "lm_full":
            assert_close(a, b, atol=1e-5, rtol=0, msg=f"layer {layer}")
        else:  # 4-bit, bf16 compute: same weights, same steps, so the same numbers
            assert_close(a, b, atol=1e-6, rtol=0, msg=f"layer {layer}")
    # The public function returns the same maps, one layer at a time.
    for layer in (0, 5, 17):
        ma = model_attention(lm, TEXT, layer=layer, hide_special=False)
        assert ma.token_ids == ids[0].tolist()
        assert_close(ma.weights, ref[layer], atol=1e-5 if which == "lm_full" else 1e-6, rtol=0)


@pytest.mark.parametrize("bits", [False, True], ids=["full", "4bit"])
def test_tiny_qwen_maps_equal_eager(tiny_qwen, bits):
    lm = tiny_qwen[bits]
    ids = ids_of(lm, "Attention weights are a softmax over scaled dot products of queries and keys.")
    ref = eager_maps(lm, ids)
    ours = project_maps(lm, ids)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.shape == (4, ids.shape[1], ids.shape[1])
        assert_close(a, b, atol=1e-5 if not bits else 1e-6, rtol=0)
    ma = model_attention(lm, "The capital of France is Paris.", layer=1)
    assert ma.kv_groups == [0, 0, 1, 1]  # 4 query heads on 2 KV heads, as HF's repeat_kv pairs them
    assert ma.n_kv_heads == 2 and ma.layer_kind == "global" and ma.window is None


def test_sliding_window_layer_shows_its_window(tiny_gemma_window):
    lm = tiny_gemma_window
    assert capture.is_installed(lm.model)  # by load_model's post-load hook
    text = "Attention weights are a softmax over scaled dot products."
    ids = ids_of(lm, text)
    t = ids.shape[1]
    assert t >= 10
    ref = eager_maps(lm, ids)
    sliding = model_attention(lm, text, layer=0)
    full = model_attention(lm, text, layer=1)
    assert (sliding.layer_kind, sliding.window) == ("sliding", 4)
    assert (full.layer_kind, full.window) == ("global", None)
    assert_close(sliding.weights, ref[0], atol=1e-5, rtol=0)
    assert_close(full.weights, ref[1], atol=1e-5, rtol=0)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    in_window = (j <= i) & (i - j < 4)
    assert (sliding.weights[:, ~in_window] == 0).all()
    assert (sliding.weights[:, in_window] > 0).all()
    assert (full.weights[:, j <= i] > 0).all()  # the global layer reaches back to the first token
    assert "last 4 tokens" in sliding.notice


# ---------------------------------------------------------------------------------------------
# Invariants and labels on the default model


@pytest.mark.parametrize("layer", [0, 11])
def test_rows_sum_to_one_and_causal(lm4, layer):
    full = model_attention(lm4, TEXT, layer=layer, hide_special=False)
    t = len(full.tokens)
    # bf16 probabilities (the 4-bit model computes in bf16): each rounded to 8 significant bits
    assert_close(full.weights.sum(-1), torch.ones(4, t), atol=2e-2, rtol=0)
    assert (torch.triu(full.weights, diagonal=1) == 0).all()
    shown = model_attention(lm4, TEXT, layer=layer)
    assert shown.hidden_tokens == ["<bos>"] and full.tokens[0] == "<bos>"
    assert shown.tokens == full.tokens[1:]
    assert_close(shown.weights, full.weights[:, 1:, 1:])
    assert_close(shown.hidden_mass, full.weights[:, 1:, 0])
    assert_close(shown.weights.sum(-1) + shown.hidden_mass, torch.ones(4, t - 1), atol=2e-2, rtol=0)


def test_layer_facts_follow_the_config(lm4):
    cfg = lm4.model.config
    facts = model_layers(lm4)
    assert facts["n_layers"] == cfg.num_hidden_layers == 18
    assert facts["n_heads"] == 4 and facts["n_kv_heads"] == 1 and facts["window"] == cfg.sliding_window == 512
    expected = ["sliding" if kind == "sliding_attention" else "global" for kind in cfg.layer_types]
    assert facts["layer_kinds"] == expected
    assert [i for i, k in enumerate(expected) if k == "global"] == [5, 11, 17]
    ma = model_attention(lm4, TEXT, layer=5)
    assert (ma.layer, ma.n_layers, ma.layer_kind, ma.window) == (5, 18, "global", None)
    assert ma.kv_groups == [0, 0, 0, 0] and ma.head_titles()[3] == "head 3 · KV 0"
    assert "4 query heads share 1 KV head" in ma.describe()


def test_token_labels_are_clean(lm4):
    ma = model_attention(lm4, "Hello   world\nnew line", layer=0, hide_special=False)
    assert ma.tokens[0] == "<bos>"
    assert not any("▁" in t or "Ġ" in t for t in ma.tokens)
    assert "Hello" in ma.tokens and "world" in ma.tokens and "↵" in ma.tokens
    assert all(t for t in ma.tokens)


def test_long_text_is_capped_with_a_notice(lm4):
    text = " ".join(["word"] * 100)
    ma = model_attention(lm4, text, layer=0, max_tokens=16, hide_special=False)
    assert ma.capped and ma.n_text_tokens > 16 and len(ma.tokens) == 16 and ma.weights.shape == (4, 16, 16)
    assert "showing the first 16" in ma.notice
    assert not model_attention(lm4, "short", layer=0).capped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "", "layer": 0}, "empty"),
        ({"text": "  \n ", "layer": 0}, "empty"),
        ({"text": None, "layer": 0}, "string"),
        ({"text": "hi", "layer": 18}, "valid 0 to 17"),
        ({"text": "hi", "layer": -1}, "valid 0 to 17"),
        ({"text": "hi", "layer": True}, "valid 0 to 17"),
        ({"text": "hi", "layer": 0, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_a_clear_value_error(lm4, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_attention(lm4, **kwargs)


def test_model_without_attention_interface_is_refused(tiny_qwen):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tok = tiny_qwen[False].tokenizer
    config = GPTNeoConfig(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64, window_size=4,
    )
    model = GPTNeoForCausalLM(config).eval()
    assert capture.install(model) is False  # left untouched
    lm = LoadedModel(model, tok, "tiny-gpt-neo", "cpu", "float32", "none", 0, 0, 0.0, True)
    with pytest.raises(CaptureUnsupported, match="AttentionInterface") as err:
        model_attention(lm, "The capital of France is Paris.", layer=0)
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------------
# The dispatcher leaves generation alone


def test_dispatcher_leaves_generation_unchanged(lm4):
    model = lm4.model
    capture.install(model)
    assert model.config._attn_implementation == capture.IMPL_NAME
    ids = ids_of(lm4, PROMPT)
    with_dispatcher = greedy_tokens(lm4, ids, 12)
    model.set_attn_implementation("sdpa")
    try:
        plain = greedy_tokens(lm4, ids, 12)
    finally:
        model.set_attn_implementation(capture.IMPL_NAME)
    assert with_dispatcher == plain


def test_dispatcher_over_an_eager_model(tiny_qwen_dir):
    """A model loaded with attn_implementation="eager" keeps eager (and its float masks) after install."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, attn_implementation="eager").eval()
    lm = LoadedModel(model, AutoTokenizer.from_pretrained(tiny_qwen_dir), "tiny", "cpu", "float32", "none", 0, 0, 0.0, True)
    ids = ids_of(lm, "The capital of France is")
    before = greedy_tokens(lm, ids, 8)
    with torch.inference_mode():
        ref = [a[0] for a in model(input_ids=ids, output_attentions=True).attentions]
    assert capture.install(model) and model.config._attn_implementation == capture.IMPL_NAME
    assert greedy_tokens(lm, ids, 8) == before
    ours = project_maps(lm, ids)
    for a, b in zip(ours, ref):
        assert_close(a, b, atol=1e-6, rtol=0)


def test_capture_and_generation_in_two_threads(lm4, monkeypatch):
    ids = ids_of(lm4, PROMPT)
    ref_tokens = greedy_tokens(lm4, ids, 16)
    ref_map = model_attention(lm4, TEXT, layer=3).weights

    callers: set[int] = set()
    real = attention.functional.scaled_dot_product

    def recording(*args, **kwargs):
        callers.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.functional, "scaled_dot_product", recording)
    done = threading.Event()
    out: dict[str, object] = {"maps": []}

    def chat():
        try:
            out["tokens"] = greedy_tokens(lm4, ids, 16)
            out["chat_thread"] = threading.get_ident()
        finally:
            done.set()

    def inspector():
        out["map_thread"] = threading.get_ident()
        while not done.is_set():
            out["maps"].append(model_attention(lm4, TEXT, layer=3).weights)

    threads = [threading.Thread(target=chat), threading.Thread(target=inspector)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    assert out["tokens"] == ref_tokens
    assert len(out["maps"]) >= 1  # a map was computed while the chat was generating
    for m in out["maps"]:
        assert_close(m, ref_map, atol=1e-6, rtol=0)
    assert out["map_thread"] in callers and out["chat_thread"] not in callers


# ---------------------------------------------------------------------------------------------
# Next-token probabilities


SAMPLING_CASES = [
    SamplingParams(),  # the notebook's T=0.7, top-p 0.95
    SamplingParams(temperature=1.0, top_p=1.0),  # nothing filtered
    SamplingParams(temperature=1.3, top_k=5, top_p=0.9),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.5, repetition_penalty=1.5),
]


def _last_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_next_token_follows_the_chats_own_processors(lm4, params):
    prompt = "The cat sat on the mat. The cat sat on the"
    ids = ids_of(lm4, prompt)
    nt = next_token_candidates(lm4, prompt, params, k=10)
    logits = _last_logits(lm4, ids)
    # The chat's generate(): repetition penalty first, then the processors SamplingParams hands it.
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, logits[None].clone())
    procs = list(params.generate_kwargs()["logits_processor"])
    assert isinstance(procs[-1], SeededSampler)
    tempered = scores
    for proc in procs[:-1]:
        scores = proc(ids, scores)
        if isinstance(proc, TemperatureLogitsWarper):
            tempered = scores
    scores, tempered = scores[0], tempered[0]
    assert nt.kept == int(scores.isfinite().sum())
    # The processors decide which tokens stay and the scaled logits (float32, as in generate());
    # probabilities are read in float64: a float32 softmax over 262k tokens is off by ~1e-4.
    sampling = scores.double().softmax(-1)
    for c in nt.candidates:
        # Where bf16 logits tie across the top-k/top-p edge, which of the equal tokens stays is the
        # sort's choice, not the method's: any token tied with c may stand for it.
        tied = (tempered == tempered[c.token_id]).nonzero().flatten().tolist()
        assert any((c.removed_by is None) == bool(scores[t].isfinite())
                   and c.sampling_prob == pytest.approx(float(sampling[t]), abs=1e-9) for t in tied)
        assert c.prob == pytest.approx(float(logits.double().softmax(-1)[c.token_id]), abs=1e-9)
        assert c.prob_temperature == pytest.approx(float(tempered.double().softmax(-1)[c.token_id]), abs=1e-9)
    # Best first, equal scores in id order (greedy decoding's rule): a stable sort's order.
    assert [c.token_id for c in nt.candidates] == torch.argsort(tempered, descending=True, stable=True)[:10].tolist()


@pytest.mark.parametrize("params", [*SAMPLING_CASES, SamplingParams(temperature=0)], ids=lambda p: f"T{p.temperature}")
def test_next_token_probabilities_sum_to_one(lm4, params):
    nt = next_token_candidates(lm4, PROMPT, params, k=10)
    assert len(nt.candidates) == 10
    for name in ("prob", "prob_temperature", "sampling_prob"):
        total = sum(getattr(c, name) for c in nt.candidates) + getattr(nt, f"rest_{name}")
        assert total == pytest.approx(1.0, abs=1e-5), name
        assert 0.0 <= getattr(nt, f"rest_{name}") <= 1.0
    assert nt.rest_prob > 0  # k=10 of 262144 tokens: some mass is elsewhere


def test_greedy_candidate_is_what_the_chat_generates(lm4):
    nt = next_token_candidates(lm4, PROMPT, SamplingParams(temperature=0), k=5)
    assert nt.greedy and nt.kept == 1 and "greedy" in nt.notice
    top = nt.candidates[0]
    assert (top.sampling_prob, top.prob_temperature, top.removed_by) == (1.0, 1.0, None)
    assert all(c.removed_by == "greedy" and c.sampling_prob == 0.0 for c in nt.candidates[1:])
    assert greedy_tokens(lm4, ids_of(lm4, PROMPT), 1) == [top.token_id]


def test_next_token_bad_input(lm4):
    with pytest.raises(ValueError, match="empty"):
        next_token_candidates(lm4, " ", SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams"):
        next_token_candidates(lm4, PROMPT, {"temperature": 1.0})
    with pytest.raises(ValueError, match="k must be"):
        next_token_candidates(lm4, PROMPT, SamplingParams(), k=0)
    capped = next_token_candidates(lm4, " ".join(["word"] * 40), SamplingParams(), max_tokens=8)
    assert capped.capped and capped.prompt_tokens == 8 and "last 8" in capped.notice


# ---------------------------------------------------------------------------------------------
# What 4-bit costs


def test_four_bit_vs_full_kl_is_small_but_not_zero(lm4, lm_full):
    qc = compare_quantization(lm4, lm_full, PROMPT, k=5, decode_tokens=3)
    ids = ids_of(lm4, PROMPT)
    # The logits of the call the comparison makes (a prefill that keeps its cache for the decode
    # steps it times): another call shape may round differently. From the same logits in float64
    # the two sums over 262k tokens agree to ~1e-12 (relative ~1e-9 against 1e-3 nats or more).
    with torch.inference_mode():
        l4, lf = (lm.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].double()
                  for lm in (lm4, lm_full))
    kl = torch.nn.functional.kl_div(l4.log_softmax(-1), lf.log_softmax(-1), log_target=True, reduction="sum")
    assert qc.kl_full_to_4bit == pytest.approx(float(kl), rel=1e-8)
    # Far above what a bf16 copy without NF4 loses (figures in bench/README.md): the cost is NF4 itself,
    # re-quantising the already-Q4_K_M weights; below 1 nat on this prompt.
    assert 1e-3 < qc.kl_full_to_4bit < 1.0
    assert qc.quantized.quantization == "nf4" and qc.full.quantization == "none"
    assert qc.quantized.weight_bytes < qc.full.weight_bytes / 2 and qc.size_ratio > 2
    assert qc.quantized.seconds_per_token > 0 and qc.full.seconds_per_token > 0
    top4 = min(qc.rows, key=lambda r: r.rank_4bit)
    assert top4.rank_4bit == 1 and top4.prob_4bit == max(r.prob_4bit for r in qc.rows)
    assert any(r.rank_full == 1 for r in qc.rows)
    assert 5 <= len(qc.rows) <= 10
    assert qc.top1_agree == (top4.rank_full == 1)
    # What each writes next: decode_tokens + 1 greedy tokens, the first the top token of its row.
    for side, rank in ((qc.quantized, "rank_4bit"), (qc.full, "rank_full")):
        first = next(r.token_id for r in qc.rows if getattr(r, rank) == 1)
        assert side.continuation.startswith(lm4.tokenizer.decode([first]))
        assert side.continuation.strip()


def test_full_precision_cache_loads_once_for_concurrent_callers(tiny_qwen_dir, monkeypatch):
    import generation.model

    calls: list[bool] = []
    real = generation.model.load_model

    def counting(model_id, *, load_4bit, settings):
        calls.append(load_4bit)
        time.sleep(0.2)  # widen the window in which a second loader could start
        return real(model_id, load_4bit=load_4bit, settings=settings)

    monkeypatch.setattr(generation.model, "load_model", counting)
    cache = FullPrecisionCache()
    settings = Settings(model_id=str(tiny_qwen_dir))
    assert not cache.loaded()
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(settings))) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert calls == [False]  # one full-precision load
    assert len(got) == 4 and all(lm is got[0] for lm in got)
    assert got[0].quantization == "none" and cache.loaded(str(tiny_qwen_dir))
