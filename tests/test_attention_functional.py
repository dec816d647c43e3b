"""attention.functional: parity with PyTorch's SDPA and Hugging Face's eager/sdpa attention, masks, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sliding_window_overlay
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward as gemma3_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from attention import Trace, explain_head, fused_attention, make_mask, scaled_dot_product


def _qkv(b: int, h: int, h_kv: int, t: int, s: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, s, d, generator=g, dtype=dtype)
    return q, k, v


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}


def _additive(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF eager style: 0 where kept, finfo(dtype).min where masked."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
@pytest.mark.parametrize("b,h,h_kv,t,s,d", [(1, 1, 1, 1, 1, 4), (2, 4, 4, 5, 5, 8), (2, 8, 2, 6, 6, 16),
                                            (3, 4, 1, 3, 7, 8)])
def test_parity_with_torch_sdpa(b, h, h_kv, t, s, d, mask_kind, dtype):
    q, k, v = _qkv(b, h, h_kv, t, s, d, dtype)
    mask = None
    if mask_kind == "causal":
        mask = make_mask(b, t, s, causal=True)
    elif mask_kind == "random":
        mask = torch.rand(b, 1, t, s, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True  # every query keeps a key: SDPA has no zero-row convention to compare with
    out, w = scaled_dot_product(q, k, v, mask)
    g = h // h_kv
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    assert_close(out, want, **_tol(dtype))
    assert out.dtype == w.dtype == dtype
    assert w.shape == (b, h, t, s)
    assert_close(w.sum(-1), torch.ones(b, h, t, dtype=dtype), **_tol(dtype))
    if mask_kind == "causal":
        assert_close(fused_attention(q, k, v, causal=True), want, **_tol(dtype))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (8, 2), (4, 1)])
def test_parity_with_hf_llama_eager_attention(h, h_kv, scale):
    b, t, d = 2, 7, 16
    q, k, v = _qkv(b, h, h_kv, t, t, d)
    keep = make_mask(b, t, t, causal=True, key_padding_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))
    additive = _additive(keep)  # (B, 1, T, T), as HF builds it for eager attention
    module = SimpleNamespace(num_key_value_groups=h // h_kv, training=False)
    scaling = d ** -0.5 if scale is None else scale
    want_out, want_w = llama_eager(module, q, k, v, additive, scaling=scaling)
    out, w = scaled_dot_product(q, k, v, additive, scale=scale)
    assert_close(out.transpose(1, 2), want_out, atol=1e-5, rtol=1e-5)  # HF returns (B, T, H, d)
    assert_close(w, want_w, atol=1e-5, rtol=1e-5)
    out_bool, w_bool = scaled_dot_product(q, k, v, keep, scale=scale)
    assert_close(out_bool, out, atol=1e-6, rtol=1e-6)
    assert_close(w_bool, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_with_hf_gemma3_eager_softcap_and_gqa(dtype):
    b, h, h_kv, t, d = 1, 4, 1, 9, 32  # Gemma 3 270M: 4 query heads share 1 KV head
    q, k, v = _qkv(b, h, h_kv, t, t, d, dtype=dtype)
    q = q * 4  # large logits, so that softcapping changes something
    additive = _additive(make_mask(b, t, t, causal=True), dtype)
    module = SimpleNamespace(num_key_value_groups=h // h_kv, training=False, head_dim=d)
    scaling = 256 ** -0.5  # query_pre_attn_scalar, not head_dim
    for softcap in (None, 5.0):
        want_out, want_w = gemma3_eager(module, q, k, v, additive, scaling=scaling, softcap=softcap)
        out, w = scaled_dot_product(q, k, v, additive, scale=scaling, softcap=softcap)
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.0, "rtol": 0.0}
        assert out.dtype == w.dtype == dtype
        assert_close(w, want_w, **tol)  # same op order, same float32 softmax: bit-identical in bf16
        assert_close(out.transpose(1, 2), want_out, **tol)
    assert not torch.allclose(scaled_dot_product(q, k, v, additive, scale=scaling, softcap=5.0)[1],
                              scaled_dot_product(q, k, v, additive, scale=scaling)[1])


def test_parity_with_hf_sdpa_attention_forward_gqa():
    b, h, h_kv, t, d = 2, 8, 2, 6, 8
    q, k, v = _qkv(b, h, h_kv, t, t, d)
    keep = make_mask(b, t, t, causal=True)
    module = SimpleNamespace(num_key_value_groups=h // h_kv, training=False, is_causal=True)
    want, _ = sdpa_attention_forward(module, q, k, v, keep, scaling=d ** -0.5)
    out, _ = scaled_dot_product(q, k, v, keep)
    assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 4, 10])
@pytest.mark.parametrize("t,s", [(6, 6), (2, 6)])
def test_sliding_window_matches_hf_mask_functions(window, t, s):
    q, k, v = _qkv(1, 2, 1, t, s, 8)
    offset = s - t  # queries are the last t positions, as with a KV cache
    causal, overlay = causal_mask_function, sliding_window_overlay(window)
    keep = torch.tensor([[causal(0, 0, i + offset, j) and overlay(0, 0, i + offset, j) for j in range(s)]
                         for i in range(t)])
    want_out, want_w = scaled_dot_product(q, k, v, keep)
    out, w = scaled_dot_product(q, k, v, make_mask(1, t, s, causal=True), sliding_window=window)
    assert_close(out, want_out)
    assert_close(w, want_w)
    assert torch.all(w[..., ~keep] == 0)


def test_fully_masked_rows_bool_and_additive():
    q, k, v = _qkv(2, 2, 2, 3, 4, 8)
    keep = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    keep[0, :, 1] = False  # query 1 of item 0 sees nothing
    for mask in (keep, _additive(keep), torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))):
        out, w = scaled_dot_product(q, k, v, mask)
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        assert torch.all(out[0, :, 1] == 0) and torch.all(w[0, :, 1] == 0)
        assert_close(w[1].sum(-1), torch.ones(2, 3))
    out_fused = fused_attention(q, k, v, key_padding_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    assert torch.all(out_fused[0] == 0) and torch.isfinite(out_fused).all()


def test_masked_positions_get_exactly_zero_weight():
    q, k, v = _qkv(1, 2, 2, 5, 5, 4)
    for mask in (make_mask(1, 5, 5, causal=True), _additive(make_mask(1, 5, 5, causal=True))):
        _, w = scaled_dot_product(q, k, v, mask)
        assert torch.all(w[..., torch.ones(5, 5, dtype=torch.bool).triu(1)] == 0)


def test_dropout_only_when_training_and_weights_before_dropout():
    q, k, v = _qkv(1, 2, 2, 6, 6, 8)
    out_eval, w_eval = scaled_dot_product(q, k, v, dropout_p=0.5, training=False)
    assert_close(out_eval, scaled_dot_product(q, k, v)[0])
    trace = Trace()
    out_train, w_train = scaled_dot_product(q, k, v, dropout_p=0.5, training=True, trace=trace,
                                            generator=torch.Generator().manual_seed(0))
    assert_close(w_train, w_eval)
    dropped = trace.get("dropped").tensor
    assert (dropped == 0).any() and not torch.allclose(out_train, out_eval)
    assert_close(out_train, dropped @ v)


def test_trace_records_steps_and_explain_head():
    q, k, v = _qkv(2, 3, 3, 4, 4, 8)
    trace = Trace()
    mask = make_mask(2, 4, 4, causal=True)
    out, w = scaled_dot_product(q, k, v, mask, trace=trace, softcap=2.0)
    assert trace.names() == ["qk", "scores", "softcapped", "masked", "weights", "context"]
    assert [s.name for s in trace if s.printed] == ["scores", "weights", "context"]
    assert_close(trace.get("qk").tensor, q @ k.transpose(-2, -1))
    steps = explain_head(trace, head=2, batch=1)
    assert [label for label, _ in steps] == ["QKᵀ", "÷ √d_k", "tanh softcap", "mask", "softmax"]
    assert all(m.shape == (4, 4) for _, m in steps)
    assert torch.isinf(steps[3][1][0, 1]) and steps[3][1][0, 1] < 0
    assert_close(steps[-1][1], w[1, 2])
    with pytest.raises(ValueError, match=r"head=3 is out of range; this trace has 3 head\(s\): choose 0..2"):
        explain_head(trace, head=3)
    with pytest.raises(ValueError, match=r"batch=2 is out of range; this trace has batch size 2"):
        explain_head(trace, head=0, batch=2)
    with pytest.raises(ValueError, match=r"trace has no 'qk' step"):
        explain_head(Trace(), head=0)


def test_single_head_tensors_without_head_axis():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 16, generator=g) for _ in range(3))
    out, w = scaled_dot_product(q, k, v, make_mask(2, 5, 5, causal=True)[:, 0])
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, want)
    assert w.shape == (2, 5, 5)


def test_gradcheck_scaled_dot_product_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 3, 3, 4, dtype=torch.float64))
    keep = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    assert torch.autograd.gradcheck(lambda *a: scaled_dot_product(*a, keep, softcap=3.0)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: scaled_dot_product(*a, _additive(keep, torch.float64))[1], (q, k, v))


def test_make_mask():
    assert make_mask(2, 3, 3) is None
    causal = make_mask(2, 3, 3, causal=True)
    assert causal.shape == (2, 1, 3, 3) and causal.dtype == torch.bool
    assert torch.equal(causal[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(make_mask(1, 2, 4, causal=True)[0, 0], torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    both = make_mask(2, 3, 3, causal=True, key_padding_mask=torch.tensor([[True, True, False], [False, True, True]]))
    assert torch.equal(both[1, 0], torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]]).bool())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: scaled_dot_product(q[0, 0], k, v), r"q has shape \(5, 8\); expected \(B, H, T, d\)"),
        (lambda q, k, v: scaled_dot_product(q, k[0], v), r"same rank"),
        (lambda q, k, v: scaled_dot_product(q, k, v[..., :4, :]), r"k \(2, 2, 5, 8\) and v \(2, 2, 4, 8\) must agree"),
        (lambda q, k, v: scaled_dot_product(q, k[:1], v[:1]), r"batch sizes differ: q has 2, k/v have 1"),
        (lambda q, k, v: scaled_dot_product(q[..., :4], k, v), r"head dims differ: q has d=4, k has d=8"),
        (lambda q, k, v: scaled_dot_product(q[:, :3], k, v), r"q has 3 heads and k/v have 2"),
        (lambda q, k, v: scaled_dot_product(q.long(), k, v), r"q has dtype torch.int64"),
        (lambda q, k, v: scaled_dot_product(q.double(), k, v), r"dtypes differ"),
        (lambda q, k, v: scaled_dot_product(q, k, v, torch.ones(3, 5, dtype=torch.bool)),
         r"mask has shape \(3, 5\), which does not broadcast to the scores' shape \(2, 4, 5, 5\)"),
        (lambda q, k, v: scaled_dot_product(q, k, v, torch.ones(1, 2, 4, 5, 5, dtype=torch.bool)),
         r"does not broadcast"),
        (lambda q, k, v: scaled_dot_product(q, k, v, torch.ones(5, 5, dtype=torch.long)), r"mask has dtype torch.int64"),
        (lambda q, k, v: scaled_dot_product(q, k, v, [[True]]), r"mask must be a torch.Tensor"),
        (lambda q, k, v: scaled_dot_product(q, k, v, scale=0), r"scale=0 must be a positive number"),
        (lambda q, k, v: scaled_dot_product(q, k, v, dropout_p=1.0), r"dropout_p=1.0 must be in \[0, 1\)"),
        (lambda q, k, v: scaled_dot_product(q, k, v, softcap=-1.0), r"softcap=-1.0 must be a positive number"),
        (lambda q, k, v: scaled_dot_product(q, k, v, sliding_window=0), r"sliding_window=0 must be a positive int"),
        (lambda q, k, v: make_mask(0, 5, 5), r"batch=0 must be a positive int"),
        (lambda q, k, v: make_mask(1, 6, 5, causal=True), r"causal mask needs t_q <= t_k"),
        (lambda q, k, v: fused_attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
         r"key_padding_mask has shape \(2, 4\); expected \(batch, seq_len\) = \(2, 5\)"),
        (lambda q, k, v: fused_attention(q, k, v, dropout_p=-0.1), r"dropout_p=-0.1 must be in \[0, 1\)"),
        (lambda q, k, v: fused_attention(q, k, v, scale=-2.0), r"scale=-2.0 must be a positive number"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    q, k, v = _qkv(2, 4, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
