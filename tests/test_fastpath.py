"""The int8 LM head and the direct NF4 kernel calls (generation/decode/head.py, nf4.py) on the real
NF4 model and real bitsandbytes layers.

Everything is compared with what the model itself computes: the int8 head against the bf16 head
(within the derived error bound), the direct NF4 kernel calls against the Linear4bit modules (bit
for bit). The lean decode step built on them is checked against the model's forward, bit for bit,
in test_batchstep.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generation.decode import (
    NF4Linear,
    QuantizedLMHead,
    accelerate_linear4bit,
    argmax_first,
    quantize_lm_head,
)
from generation.kernels import native_int8_kernel

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

pytestmark = [
    pytest.mark.torch_threads(2),  # the OpenMP kernels run on two threads, as in the app
    pytest.mark.skipif(
        not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
        reason="bitsandbytes' CPU NF4 kernel needs AVX-512",
    ),
]


@pytest.fixture(scope="module")
def model(fast_model):
    return fast_model


@pytest.fixture(scope="module")
def head(int8_head):
    return int8_head


@pytest.fixture(scope="module")
def head_rows(model, head):
    """The (V, D) row layout for torch's kernel (the same as `head` where the native kernel is missing)."""
    return head if head.layout == "rows" else quantize_lm_head(model, layout="rows")


@pytest.fixture(scope="module")
def hidden(lm4, model):
    """Final hidden states (T, D) bf16 of 300 tokens of real text (Shakespeare, or the README)."""
    src = SHAKESPEARE if SHAKESPEARE.is_file() else Path(__file__).resolve().parents[1] / "README.md"
    ids = lm4.tokenizer(src.read_text(encoding="utf-8")[:4000], return_tensors="pt").input_ids[:, :300]
    with torch.inference_mode():
        return model.model(input_ids=ids).last_hidden_state[0]


# -- the int8 head ---------------------------------------------------------------------


def test_head_leaves_the_embedding_exact_and_tied(model, head, head_rows):
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # still tied
    assert head.exact.data_ptr() == emb.data_ptr() and head.exact.dtype == torch.bfloat16
    assert head_rows.exact.data_ptr() == emb.data_ptr()
    # and its values are still the checkpoint's (the cached bf16 snapshot the model was loaded from)
    from safetensors import safe_open

    from generation import Settings
    from generation.model import default_snapshot

    folder, _ = default_snapshot(Settings.from_env())
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if "model.embed_tokens.weight" in fh.keys():
                stored = fh.get_slice("model.embed_tokens.weight")[:4096]
                assert torch.equal(emb[:4096], stored)
                break
    else:
        pytest.skip("embedding not found in the snapshot")
    assert head.codes.dtype == torch.int8 and head.nbytes < emb.numel() * emb.element_size() / 1.9


def test_head_rows_reconstruct_within_half_a_step(model, head):
    idx = torch.randint(0, head.shape[0], (2000,), generator=torch.Generator().manual_seed(0))
    err = (head.dequantized(idx) - head.exact[idx].float()).abs().amax(dim=1)
    assert torch.all(err <= head.half_step[idx])
    assert torch.all(head.half_step[idx] <= head.scale[idx] / 2 * (1 + 2**-7))


def _bound(head, h):
    """Elementwise bound on |int8 logit - exact logit| before output rounding, for hidden h (D,)."""
    l1, slack = head.error_bound(h.unsqueeze(0))
    return l1 * head.half_step + slack


@pytest.mark.parametrize("layout", ["tiles", "rows"])
def test_head_logits_within_the_int8_error_bound(model, head, head_rows, hidden, layout):
    if layout == "tiles" and native_int8_kernel() is None:
        pytest.skip("the native kernel is not available here")
    qh = head if layout == "tiles" else head_rows
    hs = hidden[::30]  # 10 positions
    with torch.inference_mode():
        approx = qh.logits(hs)  # (10, V) fp32
        exact = hs.double() @ qh.exact.double().t()  # the bf16 head's dot products in fp64
    for i, h in enumerate(hs):
        bound = _bound(qh, h).double()
        # rows layout: torch's kernel rounds its output to bf16 (relative 2**-9)
        rounding = approx[i].double().abs() * 2**-8 if layout == "rows" else 0.0
        torch.testing.assert_close(approx[i].double(), exact[i], rtol=0, atol=float((bound + rounding).max()))
        assert torch.all((approx[i].double() - exact[i]).abs() <= bound + rounding)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 30])
def test_head_logits_of_a_row_do_not_depend_on_the_batch(head, hidden, rows):
    """The native kernel works on blocks of 6 rows plus a remainder: a row's logits must come out
    bit for bit the same whatever rows share the call (sampled replies are batch-invariant)."""
    hs = hidden[:rows]
    with torch.inference_mode():
        together = head.logits(hs)  # (rows, V)
        for i in {0, rows // 2, rows - 1}:
            assert torch.equal(together[i], head.logits(hs[i : i + 1])[0])


def test_head_top1_differs_from_the_bf16_heads_only_within_the_error_bound(model, head, hidden):
    """Where the int8 head's top token is not the bf16 head's, the two were too close to tell apart.

    How often they differ depends on the CPU's int8 and bf16 kernels (an agreement rate measured
    on one CPU is no bound); what the method guarantees is that each logit is within its row's
    error bound (`error_bound`), so the int8 choice u over the exact best b needs
    exact[b] - exact[u] <= bound_b + bound_u, plus the bf16 rounding of both exact outputs.
    """
    with torch.inference_mode():
        exact = F.linear(hidden, head.exact).float()  # (T, V): bf16 outputs, as the model's head
        approx = head.logits(hidden)  # (T, V)
    best, chosen = exact.argmax(-1), approx.argmax(-1)  # (T,)
    differ = torch.nonzero(best != chosen).flatten().tolist()
    for t in differ:
        l1, slack = head.error_bound(hidden[t : t + 1])
        b, u = int(best[t]), int(chosen[t])
        bound = l1 * float(head.half_step[b] + head.half_step[u]) + 2 * slack
        rounding = 2**-8 * (abs(float(exact[t, b])) + abs(float(exact[t, u])))
        assert float(exact[t, b] - exact[t, u]) <= bound + rounding + 1e-6, (t, b, u)


def test_rescore_is_bit_equal_to_the_bf16_head(head, hidden):
    with torch.inference_mode():
        for h in hidden[::50]:
            full = F.linear(h.unsqueeze(0), head.exact)[0]
            idx = torch.topk(full.float(), 64).indices
            assert torch.equal(head.rescore(h, idx), full[idx])


def test_greedy_token_is_the_bf16_heads_argmax(head, hidden):
    """Real hidden states (mostly decided by step 1) and scaled random ones (step 2 forced)."""
    gen = torch.Generator().manual_seed(1)
    random = (torch.randn(20, hidden.shape[1], generator=gen) * hidden.float().std() * 0.3).to(torch.bfloat16)
    steps = {True: 0, False: 0}
    with torch.inference_mode():
        for h in torch.cat([hidden[::5], random]):
            h = h.unsqueeze(0)
            want = int(torch.argmax(F.linear(h, head.exact)[0]))
            tok, one_step = head.greedy_token(h, head.logits(h)[0])
            steps[one_step] += 1
            assert tok == want
    assert steps[True] > 0 and steps[False] > 0


def test_logits_exact_top_replaces_the_top_with_exact_values(head, hidden):
    with torch.inference_mode():
        hs = hidden[:3]
        mixed = head.logits_exact_top(hs, k=16)
        plain = head.logits(hs)
        for m in range(3):
            idx = torch.topk(plain[m], 16).indices
            assert torch.equal(mixed[m, idx], F.linear(hs[m : m + 1], head.exact)[0, idx].float())


def test_argmax_first_breaks_ties_like_argmax():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.0], dtype=torch.bfloat16)
    assert argmax_first(x) == int(torch.argmax(x)) == 1
    assert argmax_first(torch.zeros(10, dtype=torch.bfloat16)) == 0


def test_quantized_lm_head_module_shapes(head, hidden):
    with torch.inference_mode():
        out = QuantizedLMHead(head)(hidden[:4].unsqueeze(0))
    assert out.shape == (1, 4, head.shape[0]) and out.dtype == torch.float32


# -- the NF4 kernel called directly ------------------------------------------------------


def test_nf4_linear_is_bit_equal_to_the_module(model):
    layer = model.model.layers[3]
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            nf4 = NF4Linear(mod)
            assert nf4.still_valid()
            for m in (1, 5):
                x = torch.randn(m, mod.in_features, generator=gen).to(torch.bfloat16)
                want = mod(x.unsqueeze(0))[0]
                assert torch.equal(nf4(x), want)
                out = torch.zeros(m, mod.out_features + 8, dtype=torch.bfloat16)
                nf4(x, out[:, 4 : 4 + mod.out_features])  # a strided view as the output
                assert torch.equal(out[:, 4 : 4 + mod.out_features], want)
                assert torch.all(out[:, :4] == 0) and torch.all(out[:, -4:] == 0)
    with pytest.raises(ValueError):
        nf4(torch.zeros(1, mod.in_features))  # fp32 input


def test_accelerate_linear4bit_keeps_the_module_and_its_result(model):
    import bitsandbytes as bnb

    holder = torch.nn.Module()
    holder.proj = copy.deepcopy(model.model.layers[0].mlp.down_proj)  # not the shared model's module
    x = torch.randn(2, 3, holder.proj.in_features).to(torch.bfloat16)
    with torch.inference_mode():
        want = holder.proj(x)
        assert accelerate_linear4bit(holder) == 1
        assert accelerate_linear4bit(holder) == 1  # idempotent
        assert isinstance(holder.proj, bnb.nn.Linear4bit)
        assert torch.equal(holder.proj(x), want)
        assert torch.equal(holder.proj(x.float()), holder.proj.__class__.__mro__[1].forward(holder.proj, x.float()))


def test_the_loaded_model_calls_the_nf4_kernel_directly_and_copies_stay_plain(lm4, model):
    """load_model accelerates every CPU NF4 layer (same modules, same count); a copy of one is a plain
    bitsandbytes Linear4bit with the same result (the kernel call's raw pointers stay behind)."""
    import bitsandbytes as bnb

    from generation.model import count_4bit_layers

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(type(m).__name__ == "FastLinear4bit" for m in layers)
    assert count_4bit_layers(model) == lm4.n_4bit_layers == len(layers)
    twin = copy.deepcopy(layers[0])
    assert type(twin) is bnb.nn.Linear4bit and "_nf4" not in twin.__dict__
    x = torch.randn(3, layers[0].in_features).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(twin(x), layers[0](x))


@pytest.mark.parametrize("m", [1, 3, 30])
def test_fused_nf4_projections_equal_the_separate_calls(fast_model, m):
    """q|k|v and gate|up as one NF4 kernel call each: the same bits as the three (two) calls."""
    from generation.decode import FusedNF4Linear, prepare_layers

    layer = prepare_layers(fast_model)[3]
    g = torch.Generator().manual_seed(m)
    for parts in ((layer.q, layer.k, layer.v), (layer.gate, layer.up)):
        fused = FusedNF4Linear(*parts)
        x = torch.randn(m, fused.k, generator=g).bfloat16()
        want = torch.cat([p(x) for p in parts], dim=1)
        out = torch.full((m, fused.n), float("nan"), dtype=torch.bfloat16)
        assert torch.equal(fused(x, out), want)
        assert parts[0].still_valid()  # the layers' own bytes are untouched
