"""The decode step's native RMSNorm / residual / q-k norm + RoPE kernels give torch's bits."""

from __future__ import annotations

import shutil

import pytest
import torch

from generation.normkernels import (
    _state,
    check_against_torch,
    norm_kernels,
    torch_qk_norm_rope,
    torch_rms,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="needs a C compiler")


@pytest.fixture(scope="module")
def kernels():
    k, why = norm_kernels(640, 5, 256, 1e-6)  # Gemma 3 270M: hidden 640, 4 q + 1 k heads of 256
    assert k is not None, why
    assert why.startswith("native")
    return k


@pytest.mark.parametrize("d", [8, 100, 256, 640, 1152, 2560])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_equal_torch_bit_for_bit(kernels, d, seed):
    assert check_against_torch(kernels, d, heads=3, hd=64 if d < 256 else 256, eps=1e-6, rows=(1, 2, 17), seed=seed) is None


@pytest.mark.parametrize("n", [1, 5])
def test_rms_of_strided_rows_and_extreme_values(kernels, n):
    g = torch.Generator().manual_seed(n)
    wide = (torch.randn(n, 2 * 640, generator=g) * 1e4).bfloat16()
    wide[0, :7] = 0
    x = wide[:, 640:]  # rows with a stride of 1280
    w = 1 + torch.randn(640, generator=g)
    out = torch.empty(n, 640, dtype=torch.bfloat16)
    assert torch.equal(kernels.rms(x, w, 1e-6, out), torch_rms(x, w, 1e-6))
    zero = torch.zeros(1, 640, dtype=torch.bfloat16)  # all zeros: rsqrt(eps), times 0
    assert torch.equal(kernels.rms(zero, w, 1e-6, torch.empty_like(zero)), torch_rms(zero, w, 1e-6))


def test_qk_norm_rope_leaves_the_values_alone(kernels):
    n, heads, hd = 3, 5, 256
    g = torch.Generator().manual_seed(7)
    qkv = (torch.randn(n, (heads + 1) * hd, generator=g) * 3).bfloat16()  # q|k heads, then one v head
    w = 1 + torch.randn(heads, hd, generator=g) * 0.2
    cos, sin = torch.randn(2, 40, hd, generator=g).bfloat16()
    pos = torch.tensor([0, 39, 7])
    want = torch_qk_norm_rope(qkv[:, : heads * hd].view(n, heads, hd), w, 1e-6, cos[pos].unsqueeze(1),
                              sin[pos].unsqueeze(1))
    v = qkv[:, heads * hd :].clone()
    kernels.qk_norm_rope(qkv, heads, hd, w, 1e-6, cos, sin, pos)
    assert torch.equal(qkv[:, : heads * hd].view(n, heads, hd), want)
    assert torch.equal(qkv[:, heads * hd :], v)


def test_a_kernel_that_differs_from_torch_is_not_used(kernels, monkeypatch):
    """The check runs once per size; where it finds a difference the step gets torch's ops and the
    reason."""
    key = ("checked", 640, 5, 256, 1e-5)
    monkeypatch.setitem(_state, key, "rms of 1 x 640")
    k, why = norm_kernels(640, 5, 256, 1e-5)
    assert k is None and "differ" in why and "rms of 1 x 640" in why


def test_off_switch(monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    k, why = norm_kernels(640, 5, 256, 1e-6)
    assert k is None and "ATTN_LAB_NATIVE=0" in why
