"""The decode step's attention over every row of the batch in C (generation/kernels/attention.c):
within the error bound its fp32 arithmetic guarantees of the exact attention (torch's sdpa in
float64) on any layout the engine's cache gives it; the same bits on any number of threads; a
kernel that attends to the wrong keys is caught by the check that comes before any use; torch's
sdpa runs where it is switched off; and the real model's step gives the same tokens with it."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import native_kernel
from generation.kernels import KernelStatus
from generation.kernels import attention as kattn

pytestmark = pytest.mark.torch_threads(2)  # the OpenMP kernel runs on two threads, as in the app


@pytest.fixture(scope="module")
def native():
    return native_kernel(lambda: kattn.attention_kernel(4, 64), kattn.NATIVE, "within its error bound")


def _rows(n: int, kv: int, group: int, hd: int, cap: int, seed: int, span: int | None = None):
    """Random queries (a strided row, as the engine's q|k|v buffer has them), caches of capacity
    `cap` (strided over it, as the engine's are) and each row's [first, end): the last `span`
    positions where given (a sliding window), else from 0; row 0 attends to its first position only."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, kv * group + 2, hd, generator=g) * 2).bfloat16()[:, : kv * group]
    keys = (torch.randn(n, kv, cap, hd, generator=g) * 2).bfloat16()
    values = (torch.randn(n, kv, cap, hd, generator=g) * torch.logspace(-3, 2, hd)).bfloat16()
    end = torch.randint(1, cap + 1, (n,), generator=g)
    end[0] = 1
    first = (end - span).clamp(min=0) if span else torch.zeros_like(end)
    return q, keys, values, first, end


@pytest.mark.parametrize("n,kv,group,hd", [(1, 1, 4, 256), (3, 1, 4, 256), (5, 2, 7, 64), (30, 1, 4, 256),
                                           (4, 8, 4, 64), (2, 2, 8, 128), (3, 4, 1, 32)])
@pytest.mark.parametrize("span", [None, 7])
def test_within_its_error_bound_of_the_exact_attention(native, n, kv, group, hd, span):
    q, keys, values, first, end = _rows(n, kv, group, hd, 80, seed=n * 31 + hd, span=span)
    scale = 1 / math.sqrt(hd)
    out = native(q, keys, values, first, end, scale, torch.empty(n, kv * group, hd, dtype=torch.bfloat16), 2)
    exact = kattn.exact_attention(q, keys, values, first.tolist(), end.tolist(), scale)
    bound = kattn.error_bound(q, keys, values, first.tolist(), end.tolist(), scale)
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_the_bound_is_a_few_roundings_of_the_result(native):
    """Not vacuous: the bound is the result's own bf16 rounding and a thousandth of the values'
    weighted magnitude, where the weights' fp32 errors show."""
    q, keys, values, first, end = _rows(6, 2, 4, 64, 64, seed=5)
    scale = 1 / 8
    exact = kattn.exact_attention(q, keys, values, first.tolist(), end.tolist(), scale)
    bound = kattn.error_bound(q, keys, values, first.tolist(), end.tolist(), scale)
    spread = torch.stack([(torch.softmax(scale * q[b].double().view(2, 4, 64) @ keys[b, :, first[b] : end[b]].double()
                                         .transpose(-1, -2), -1) @ values[b, :, first[b] : end[b]].double().abs())
                          .view(8, 64) for b in range(6)])
    assert bool((bound <= 2**-8 * exact.abs() + 1e-3 * spread).all())


class _OffByOne(kattn.AttentionKernel):
    """The real kernel attending to one position too few: what a wrong window would do."""

    def __call__(self, query, keys, values, first, end, scale, out, threads):
        return super().__call__(query, keys, values, torch.minimum(first + 1, end - 1), end, scale, out, threads)


def test_the_check_catches_a_kernel_that_attends_to_the_wrong_keys(native):
    assert kattn.check_against_exact(native, 4, 64) is None
    assert kattn.check_against_exact(_OffByOne(native.lib), 4, 64) is not None


@pytest.mark.parametrize("n", [1, 7, 30])
def test_the_same_bits_on_one_thread_or_two(native, n):
    q, keys, values, first, end = _rows(n, 1, 4, 256, 300, seed=n)
    one, two = (native(q, keys, values, first, end, 1 / 16, torch.empty(n, 4, 256, dtype=torch.bfloat16), t)
                for t in (1, 2))
    assert torch.equal(one, two)


def test_switched_off_torch_runs_and_says_why(monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    kernel, status = kattn.attention_kernel(4, 256)
    assert kernel is None and status == KernelStatus(kattn.FALLBACK, False, "native kernels off: ATTN_LAB_NATIVE=0")
