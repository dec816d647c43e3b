"""The fast CPU decode for every family it describes (generation/decode/family.py): Qwen2, Llama
(with Llama 3's rope scaling), Mistral, Qwen3 and Gemma 3, on tiny random models saved and loaded
through the app's NF4 loading path (`load_model(folder, load_4bit=True)`).

As test_batchstep.py does for the default model: the lean step's logits (its hidden state
through the bf16 head) and the keys/values it writes equal the engine's model path bit for bit
(the exact per-row attention); the default attention (the native kernel) gives the same
next-token distributions within a small KL divergence; the engine's greedy replies through the
fast path and the int8 head equal transformers' generate(), or part from it only at a tie of its
logits. The int8 head for vocabularies that are not a multiple of 16, hidden sizes above 1024 and
a separate (untied) head; and architectures outside the list keep the model's forward, saying why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tr

from conftest import assert_flip_is_a_tie, copy_cache, decode_side_by_side, prefilled_cache, save_tiny_lm
from generation import SamplingParams, load_model
from generation.backends import ChatEngine
from generation.decode import (
    BatchDecodeStep,
    ModelStep,
    describe,
    fast_path_supported,
    quantize_lm_head,
)
from generation.kernels import native_int8_kernel

pytestmark = [
    pytest.mark.torch_threads(2),  # the OpenMP kernels run on two threads, as in the app
    pytest.mark.skipif(
        not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
        reason="bitsandbytes' CPU NF4 kernel needs AVX-512",
    ),
]

_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# family -> (config class, model class, config overrides): the differences each family brings
FAMILIES = {
    # q/k/v bias, a tied head (as Qwen2.5-0.5B), a vocabulary that is not a multiple of 16
    "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM, dict(tie_word_embeddings=True, vocab_size=333)),
    # Llama 3's rope scaling (original context 16: the scaled frequencies matter here), biases everywhere
    "llama": (tr.LlamaConfig, tr.LlamaForCausalLM,
              dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)),
    # a sliding window of 8 on every layer (Mistral 7B v0.1 has 4,096)
    "mistral": (tr.MistralConfig, tr.MistralForCausalLM, dict(sliding_window=8, vocab_size=341)),
    # q/k norms in Llama's form
    "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM, dict(tie_word_embeddings=True)),
    # Gemma's (1 + w) sandwich norms, q/k norms, embedding scale, sliding window 8 on two layers of three
    "gemma3_text": (tr.Gemma3TextConfig, tr.Gemma3ForCausalLM,
                    dict(sliding_window=8, query_pre_attn_scalar=32,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}
NEW = 24


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm(request, tmp_path_factory):
    """A tiny random model of the family in 4-bit NF4, loaded as the app loads a MODEL_ID folder."""
    config_cls, model_cls, overrides = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_lm(folder, config_cls, model_cls, **{**_SMALL, **overrides})
    loaded = load_model(str(folder), load_4bit=True)
    assert loaded.quantization == "nf4" and loaded.model.config.model_type == request.param
    return loaded


def _prompts(lm, lengths=(5, 17, 11)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    v = lm.tokenizer.vocab_size
    return [torch.randint(3, v - 3, (n,), generator=g) for n in lengths]


def test_the_family_takes_the_fast_path(lm):
    assert fast_path_supported(lm.model) is None
    arch = describe(lm.model.config)
    kind = lm.model.config.model_type
    assert arch.family.model_type == kind
    assert arch.norm == ("gemma" if kind == "gemma3_text" else "llama")
    assert arch.family.qk_norm == (kind in ("qwen3", "gemma3_text"))
    assert arch.qkv_bias == (kind in ("qwen2", "llama"))
    assert (arch.embed_scale is not None) == (kind == "gemma3_text")
    assert any(arch.sliding_layers) == (kind in ("gemma3_text", "mistral"))
    assert ("llama3" in arch.rope_types) == (kind == "llama")
    # the step's attention scaling is the model's own
    assert BatchDecodeStep(lm.model).scaling == lm.model.model.layers[0].self_attn.scaling


def test_step_equals_the_model_path_bit_for_bit(lm):
    """A batch of three prompts of mixed lengths, 12 greedy steps through the model path and the
    lean step (exact attention): the same logits and the same keys/values written, every step
    (Gemma's and Mistral's sliding windows of 8 move all the time); the default attention (the
    native kernel) and its fallback (sdpa per row, query heads packed), each on a third copy: the
    same next-token distributions within a small KL divergence."""
    slow = ModelStep(lm)
    step = BatchDecodeStep(lm.model, exact_attention=True)
    for packed in (BatchDecodeStep(lm.model), BatchDecodeStep(lm.model, native_attention=False)):
        worst, _ = decode_side_by_side(slow, step, packed, _prompts(lm), 12, lm.model.get_output_embeddings().weight)
        assert worst < 0.02, (worst, packed.attention_status)


def test_native_norm_kernels_change_no_bit(lm):
    """The family's norm form in the native kernels and in torch's ops: the same hidden states."""
    native, plain = BatchDecodeStep(lm.model), BatchDecodeStep(lm.model, native_norms=False)
    if native.norm_status.native is False:
        pytest.skip(str(native.norm_status))
    slow = ModelStep(lm)
    ref, lens, nxt = prefilled_cache(slow, _prompts(lm))
    other = copy_cache(ref, lens)
    for _ in range(3):
        for c in (ref, other):
            c.ensure(max(lens) + 1)
        tokens, pos = torch.tensor(nxt), torch.tensor(lens)
        with torch.inference_mode():
            a, b = native(tokens, pos, ref), plain(tokens, pos, other)
            nxt = F.linear(a, lm.model.get_output_embeddings().weight).argmax(-1).tolist()
        assert torch.equal(a, b)
        lens = [x + 1 for x in lens]


def test_greedy_replies_equal_generate(lm):
    """The engine with the fast decode on (lean step, int8 head with exact greedy): every decode
    step takes it, and each prompt's greedy reply, alone and in a batch, is generate()'s, or parts
    from it only where the model's own bf16 logits tie (its attention kernel sums in fp32 in
    another order than the model's sdpa call)."""
    prompts = _prompts(lm)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    with torch.inference_mode():
        refs = [lm.model.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                                  max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=lm.tokenizer.pad_token_id)[0, p.numel():].tolist() for p in prompts]
    with ChatEngine(lm, max_batch=3, warmup=False) as engine:
        alone = []
        for p in prompts:
            req = engine.submit(p, greedy)
            assert req.wait(120)
            alone.append(req.token_ids)
        reqs = [engine.submit(p, greedy) for p in prompts]
        assert all(r.wait(120) for r in reqs)
        assert engine.fast_status.startswith("on:"), engine.fast_status
        assert lm.model.config.model_type in engine.fast_status
        assert engine.counters["fast_steps"] == engine.counters["steps"] > 0
    assert sum(map(len, refs)) >= 2 * NEW  # not all ended at once by an end-of-sequence token
    for p, got_alone, got_batched, want in zip(prompts, alone, [r.token_ids for r in reqs], refs):
        for got in (got_alone, got_batched):  # random weights tie often
            if assert_flip_is_a_tie(lm, p, got, want):
                assert got == want


# -- the int8 head: any vocabulary, wide hidden sizes, a separate head -------------------------------


@pytest.fixture(scope="module")
def wide_head_model():
    """A bf16 Llama with a separate head of 1,003 x 1,152 (a vocabulary that is not a multiple of
    16, a hidden size above the 1,024 up to which the kernel's integer sums convert exactly)."""
    cfg = tr.LlamaConfig(vocab_size=1003, hidden_size=1152, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("layout", ["tiles", "rows"])
def test_int8_head_any_vocabulary_and_untied(wide_head_model, layout):
    """Logits within the error bound, exact greedy, exact top candidates and batch-invariant rows."""
    if layout == "tiles" and native_int8_kernel() is None:
        pytest.skip("the native kernel is not available here")
    model = wide_head_model
    head = quantize_lm_head(model, layout=layout)
    assert head.shape == (1003, 1152) and head.layout == layout
    assert head.exact.data_ptr() == model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(13, 1152, generator=g) * torch.linspace(0.2, 3, 1152)).bfloat16()
    steps = set()
    with torch.inference_mode():
        logits = head.logits(hidden)  # (13, V) fp32
        exact64 = hidden.double() @ head.exact.double().t()
        for i, h in enumerate(hidden):
            h = h[None]
            l1, slack = head.error_bound(h)
            rounding = logits[i].double().abs() * 2**-8 if layout == "rows" else 0.0
            assert torch.all((logits[i].double() - exact64[i]).abs() <= l1 * head.half_step.double() + slack + rounding)
            assert torch.equal(logits[i], head.logits(h)[0])  # a row alone: the same bits
            want = int(torch.argmax(F.linear(h, head.exact)[0]))
            tok, one_step = head.greedy_token(h, logits[i])
            steps.add(one_step)
            assert tok == want
        top = head.logits_exact_top(hidden[:2], k=64)
        for m in range(2):
            idx = torch.topk(head.logits(hidden[m : m + 1])[0], 64).indices
            assert torch.equal(top[m, idx], F.linear(hidden[m : m + 1], head.exact)[0, idx].float())
    assert True in steps


# -- what stays on the model's forward ----------------------------------------------------------------


@pytest.mark.parametrize("config, why", [
    (tr.GPT2Config(n_embd=64, n_layer=1, n_head=2), "model type 'gpt2'"),
    (tr.LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
     "RoPE type dynamic"),
    (tr.Gemma3TextConfig(final_logit_softcapping=30.0), "soft-capping"),
])
def test_other_architectures_keep_the_model_path_and_say_why(config, why):
    with pytest.raises(ValueError, match=why):
        describe(config)


def test_the_engine_says_why_a_model_keeps_its_forward(tmp_path):
    """A family outside the list (Phi-3, NF4): the engine runs the model's forward, and says why."""
    save_tiny_lm(tmp_path, tr.Phi3Config, tr.Phi3ForCausalLM,
                 **{k: v for k, v in _SMALL.items() if k != "head_dim"})
    other = load_model(str(tmp_path), load_4bit=True)
    with ChatEngine(other, max_batch=2, warmup=False) as engine:
        req = engine.submit(_prompts(other)[0], SamplingParams(temperature=0.0, max_new_tokens=4), ignore_eos=True)
        assert req.wait(120) and len(req.token_ids) == 4
        assert engine.fast_status.startswith("off: model type 'phi3'"), engine.fast_status
        assert engine.counters["fast_steps"] == 0
