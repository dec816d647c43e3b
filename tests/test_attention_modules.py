"""attention.modules: parity with torch.nn.MultiheadAttention and SDPA, GQA, traces, invariants, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from attention import AttentionConfig, MultiHeadAttention, SingleHeadAttention, Trace

MASKS = ["none", "causal", "padding", "causal+padding"]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}


def _padding(batch: int, t: int) -> torch.Tensor:
    """(B, T) True = keep; right padding of a different length per row, never a fully padded row."""
    kpm = torch.ones(batch, t, dtype=torch.bool)
    for b in range(batch):
        n_pad = b % t  # 0, 1, 2, ... but never the whole row
        if n_pad:
            kpm[b, t - n_pad:] = False
    return kpm


def _mask_args(kind: str, batch: int, t: int) -> dict:
    return {"causal": "causal" in kind, "key_padding_mask": _padding(batch, t) if "padding" in kind else None}


def _mha_pair(emb_dim: int, n_heads: int, dtype: torch.dtype) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(emb_dim, n_heads, bias=False, batch_first=True).to(dtype).eval()
    ours = MultiHeadAttention(emb_dim, n_heads).to(dtype).eval()
    w_q, w_k, w_v = ref.in_proj_weight.detach().chunk(3, dim=0)
    with torch.no_grad():
        ours.q_proj.weight.copy_(w_q)
        ours.k_proj.weight.copy_(w_k)
        ours.v_proj.weight.copy_(w_v)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("emb_dim,n_heads", [(16, 1), (32, 4), (64, 8)])
@pytest.mark.parametrize("batch,t", [(1, 1), (1, 7), (3, 5)])
def test_parity_with_nn_multihead_attention(batch, t, emb_dim, n_heads, mask, dtype):
    ours, ref = _mha_pair(emb_dim, n_heads, dtype)
    x = torch.randn(batch, t, emb_dim, dtype=dtype)
    args = _mask_args(mask, batch, t)
    ref_mask = torch.ones(t, t, dtype=torch.bool).triu(1) if args["causal"] else None  # True = blocked
    ref_kpm = None if args["key_padding_mask"] is None else ~args["key_padding_mask"]  # True = blocked
    want, want_w = ref(x, x, x, attn_mask=ref_mask, key_padding_mask=ref_kpm, need_weights=True,
                       average_attn_weights=False)
    got_fast = ours(x, **args)
    got, got_w = ours(x, **args, return_weights=True)
    assert_close(got, want, **_tol(dtype))
    assert_close(got_fast, want, **_tol(dtype))
    assert_close(got_w, want_w, **_tol(dtype))


def _gqa_reference(m: MultiHeadAttention, x: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
    """Textbook GQA: project, repeat each K/V head for its group of query heads, run PyTorch's SDPA."""
    b, t, _ = x.shape
    q = m.q_proj(x).view(b, t, m.n_heads, m.head_dim).transpose(1, 2)
    k = m.k_proj(x).view(b, t, m.n_kv_heads, m.head_dim).transpose(1, 2)
    v = m.v_proj(x).view(b, t, m.n_kv_heads, m.head_dim).transpose(1, 2)
    g = m.n_heads // m.n_kv_heads
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    if causal:
        mask &= torch.ones(t, t, dtype=torch.bool).tril()
    if kpm is not None:
        mask &= kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return m.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (4, 2), (8, 2), (16, 2)])
def test_gqa_matches_repeated_kv_reference(n_heads, n_kv_heads, mask):
    torch.manual_seed(1)
    m = MultiHeadAttention(64, n_heads, n_kv_heads=n_kv_heads).eval()
    assert m.k_proj.out_features == n_kv_heads * (64 // n_heads)
    assert m.v_proj.out_features == n_kv_heads * (64 // n_heads)
    x = torch.randn(2, 6, 64)
    args = _mask_args(mask, 2, 6)
    want = _gqa_reference(m, x, args["causal"], args["key_padding_mask"])
    assert_close(m(x, **args), want, atol=1e-5, rtol=1e-5)
    out, w = m(x, **args, return_weights=True)
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, n_heads, 6, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS)
def test_fast_path_equals_explicit_path(mask, dtype):
    torch.manual_seed(2)
    m = MultiHeadAttention(32, 4, bias=True).to(dtype).eval()
    x = torch.randn(3, 9, 32, dtype=dtype)
    args = _mask_args(mask, 3, 9)
    fast = m(x, **args)
    explicit, _ = m(x, **args, return_trace=True)
    assert_close(fast, explicit, **_tol(dtype))


def test_one_head_equals_single_head_attention():
    torch.manual_seed(3)
    single = SingleHeadAttention(16).eval()
    multi = MultiHeadAttention(16, n_heads=1).eval()
    multi.load_state_dict(single.state_dict())
    x = torch.randn(2, 5, 16)
    for args in ({}, {"causal": True}, {"key_padding_mask": _padding(2, 5)}):
        s_out, s_w = single(x, **args, return_weights=True)
        m_out, m_w = multi(x, **args, return_weights=True)
        assert_close(s_out, m_out)
        assert_close(s_w, m_w)
        assert s_w.shape == (2, 1, 5, 5)
        assert_close(single(x, **args), multi(x, **args))


def test_bias_option_adds_bias_to_all_projections():
    m = MultiHeadAttention(32, 4, bias=True)
    assert all(getattr(m, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    m = MultiHeadAttention(32, 4)
    assert all(getattr(m, p).bias is None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


SINGLE_TRACE = """\
Q           (2, 5, 16)
K           (2, 5, 16)
V           (2, 5, 16)
scores      (2, 5, 5)
weights     (2, 5, 5)
context     (2, 5, 16)
out         (2, 5, 16)
"""

MULTI_TRACE = """\
Q           (2, 8, 10, 8)
K           (2, 8, 10, 8)
V           (2, 8, 10, 8)
scores      (2, 8, 10, 10)
weights     (2, 8, 10, 10)
context     (2, 8, 10, 8)
concat      (2, 10, 64)
out         (2, 10, 64)
"""


def test_single_head_debug_trace_matches_notebook(capsys):
    m = SingleHeadAttention(16, debug=True)
    out = m(torch.randn(2, 5, 16))
    assert capsys.readouterr().out == SINGLE_TRACE
    assert out.shape == (2, 5, 16)


def test_multi_head_debug_trace_matches_notebook(capsys):
    m = MultiHeadAttention(64, 8, debug=True)
    out = m(torch.randn(2, 10, 64))
    assert capsys.readouterr().out == MULTI_TRACE
    assert out.shape == (2, 10, 64)


def test_trace_as_data_without_printing(capsys):
    m = MultiHeadAttention(64, 8)
    x = torch.randn(2, 10, 64)
    out, weights, trace = m(x, return_weights=True, return_trace=True)
    assert capsys.readouterr().out == ""
    assert isinstance(trace, Trace)
    assert trace.format() + "\n" == MULTI_TRACE
    assert [s.name for s in trace.printed_steps()] == ["Q", "K", "V", "scores", "weights", "context", "concat", "out"]
    assert {"qk", "masked"} <= set(trace.names())
    for step in trace:
        assert step.shape == tuple(step.tensor.shape)
        assert not step.tensor.requires_grad
    assert_close(trace.get("weights").tensor, weights.detach())
    assert_close(trace.get("out").tensor, out.detach())
    assert_close(trace.get("scores").tensor, trace.get("qk").tensor / 8 ** 0.5)
    with pytest.raises(ValueError, match="no step named 'nope'.*Q, K, V"):
        trace.get("nope")
    _, trace_single = SingleHeadAttention(16)(torch.randn(2, 5, 16), return_trace=True)
    assert trace_single.format() + "\n" == SINGLE_TRACE


def test_debug_prints_trace_also_when_returning_it(capsys):
    m = MultiHeadAttention(64, 8, debug=True)
    _, trace = m(torch.randn(2, 10, 64), return_trace=True)
    assert capsys.readouterr().out == MULTI_TRACE == trace.format() + "\n"


@pytest.mark.parametrize("mask", MASKS)
def test_weight_rows_sum_to_one_and_masked_positions_are_zero(mask):
    torch.manual_seed(4)
    m = MultiHeadAttention(32, 4, n_kv_heads=2)
    x = torch.randn(3, 7, 32)
    args = _mask_args(mask, 3, 7)
    _, w = m(x, **args, return_weights=True)
    assert_close(w.sum(-1), torch.ones(3, 4, 7))
    keep = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    if args["causal"]:
        keep &= torch.ones(7, 7, dtype=torch.bool).tril()
    if args["key_padding_mask"] is not None:
        keep &= args["key_padding_mask"][:, None, None, :]
    assert torch.all(w.masked_select(~keep.expand_as(w)) == 0)
    assert torch.all(w.masked_select(keep.expand_as(w)) > 0)


@pytest.mark.parametrize("module", [SingleHeadAttention(16), MultiHeadAttention(16, 4, n_kv_heads=2)])
def test_fully_masked_rows_give_zeros_not_nan(module):
    x = torch.randn(2, 5, 16, requires_grad=True)
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1, :2] = False  # with causal, queries 0 and 1 of item 1 see no key at all
    for fast in (True, False):
        if fast:
            out = module(x, causal=True, key_padding_mask=kpm)
        else:
            out, w = module(x, causal=True, key_padding_mask=kpm, return_weights=True)
            assert torch.isfinite(w).all()
            assert torch.all(w[1, :, :2] == 0)
            assert_close(w[1, :, 2:].sum(-1), torch.ones_like(w[1, :, 2:, 0]))
        assert torch.isfinite(out).all()
        bias = module.o_proj.bias
        assert_close(out[1, :2], torch.zeros(2, 16) if bias is None else bias.expand(2, 16))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()


def test_dropout_acts_only_in_training():
    torch.manual_seed(5)
    m = MultiHeadAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 8, 32)
    m.eval()
    assert_close(m(x), m(x))
    out_a, w_a = m(x, return_weights=True)
    assert_close(m(x), out_a, atol=1e-5, rtol=1e-5)
    m.train()
    assert not torch.allclose(m(x), m(x))
    out_b, w_b, trace = m(x, return_weights=True, return_trace=True)
    assert_close(w_b, w_a)  # weights are reported before dropout
    dropped = trace.get("dropped").tensor
    assert (dropped == 0).any()
    survivors = dropped != 0
    assert_close(dropped[survivors], w_b[survivors] * 2)  # inverted dropout: survivors scaled by 1/(1-p)
    assert not torch.allclose(out_b, out_a)


def test_generator_makes_dropout_reproducible_without_touching_global_rng():
    m = MultiHeadAttention(32, 4, dropout=0.3).train()
    x = torch.randn(1, 6, 32)
    state = torch.get_rng_state()
    a = m(x, generator=torch.Generator().manual_seed(7))
    b = m(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(a, b)


def test_gradcheck_float64():
    torch.manual_seed(6)
    m = MultiHeadAttention(8, 2, n_kv_heads=1, bias=True).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True, True, True, True], [False, True, True, True]])  # item 1, query 0: no key at all
    assert torch.autograd.gradcheck(lambda t: m(t, causal=True, key_padding_mask=kpm, return_weights=True)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: m(t, causal=True), (x,))
    small = MultiHeadAttention(4, 2, n_kv_heads=1).double()
    names = [n for n, _ in small.named_parameters()]
    x_small = torch.randn(1, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(small, dict(zip(names, ps)), (x_small,), {"return_trace": True})[0],
        tuple(p.detach().requires_grad_() for p in small.parameters()),
    )


@pytest.mark.parametrize("module_cls", [SingleHeadAttention, MultiHeadAttention])
def test_bfloat16_runs(module_cls):
    m = module_cls(32).to(torch.bfloat16)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    fast = m(x, causal=True)
    out, w = m(x, causal=True, return_weights=True)
    assert fast.dtype == out.dtype == w.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert_close(fast, out, atol=2e-2, rtol=2e-2)
    assert_close(w.float().sum(-1), torch.ones(w.shape[:-1]), atol=2e-2, rtol=0)


def test_config_is_frozen_and_resolves_defaults():
    cfg = AttentionConfig(64, 8)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.kv_groups) == (8, 8, list(range(8)))
    assert AttentionConfig(64, 8, 2).kv_groups == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(AttributeError):
        cfg.n_heads = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"emb_dim": 64, "n_heads": 6}, r"n_heads=6 does not divide emb_dim=64; choose one of 1, 2, 4, 8, 16, 32, 64"),
        ({"emb_dim": 0}, r"emb_dim=0 must be a positive int"),
        ({"emb_dim": -8}, r"emb_dim=-8 must be a positive int"),
        ({"emb_dim": 16.0}, r"emb_dim=16.0 must be a positive int"),
        ({"emb_dim": 64, "n_heads": 0}, r"n_heads=0 must be a positive int dividing emb_dim=64; choose one of 1, 2"),
        ({"emb_dim": 64, "n_heads": 8, "n_kv_heads": 3}, r"n_kv_heads=3 does not divide n_heads=8; choose one of 1, 2, 4, 8"),
        ({"emb_dim": 64, "n_heads": 8, "n_kv_heads": 0}, r"n_kv_heads=0 must be a positive int dividing n_heads=8"),
        ({"emb_dim": 64, "n_heads": 8, "n_kv_heads": 16}, r"n_kv_heads=16 does not divide n_heads=8"),
        ({"emb_dim": 64, "dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"emb_dim": 64, "dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
        ({"emb_dim": 64, "bias": "yes"}, r"bias='yes' must be True or False"),
        ({"emb_dim": 64, "debug": 1}, r"debug=1 must be True or False"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_single_head_bad_arguments():
    with pytest.raises(ValueError, match=r"emb_dim=0 must be a positive int"):
        SingleHeadAttention(0)
    with pytest.raises(ValueError, match=r"dropout=1.5 must be in \[0, 1\)"):
        SingleHeadAttention(16, dropout=1.5)


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (torch.randn(5, 16), {}, r"x has shape \(5, 16\) \(rank 2\); expected rank 3: \(B, T, 16\)"),
        (torch.randn(1, 2, 5, 16), {}, r"rank 4\); expected rank 3"),
        (torch.randn(2, 5, 12), {}, r"x has width 12 .*expects emb_dim=16"),
        (torch.randn(2, 0, 16), {}, r"batch and sequence length must be at least 1"),
        (torch.ones(2, 5, 16, dtype=torch.long), {}, r"x has dtype torch.int64; expected a floating dtype"),
        ([[1.0]], {}, r"x must be a torch.Tensor"),
        (torch.randn(2, 5, 16), {"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)},
         r"key_padding_mask has shape \(2, 4\); expected \(batch, seq_len\) = \(2, 5\)"),
        (torch.randn(2, 5, 16), {"key_padding_mask": torch.ones(5, dtype=torch.bool)},
         r"key_padding_mask has shape \(5,\); expected"),
        (torch.randn(2, 5, 16), {"key_padding_mask": torch.ones(2, 5)}, r"key_padding_mask has dtype torch.float32"),
        (torch.randn(2, 5, 16), {"key_padding_mask": torch.full((2, 5), 2)}, r"must hold only 0 \(padding\) and 1"),
        (torch.randn(2, 5, 16), {"causal": "yes"}, r"causal='yes' must be True or False"),
        (torch.randn(2, 5, 16), {"return_weights": None}, r"return_weights=None must be True or False"),
    ],
)
@pytest.mark.parametrize("explicit", [False, True])
def test_bad_forward_arguments_raise_value_error(x, kwargs, match, explicit):
    m = MultiHeadAttention(16, 4)
    if explicit and "return_weights" not in kwargs:
        kwargs = {**kwargs, "return_trace": True}
    with pytest.raises(ValueError, match=match):
        m(x, **kwargs)


def test_integer_key_padding_mask_is_accepted_like_hf_attention_mask():
    torch.manual_seed(8)
    m = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    ints = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert_close(m(x, key_padding_mask=ints), m(x, key_padding_mask=ints.bool()))
