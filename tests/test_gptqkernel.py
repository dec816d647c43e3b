"""GPTQ's column loop in C (generation/kernels/gptq.c): the indices, errors and updated columns are
torch's bit for bit, so the calibrated rounding is the same whichever loop runs; where the C loop
differs, cannot be built or is switched off, torch's ops run and the status says why."""

from __future__ import annotations

import pytest
import torch

from generation.kernels import KernelStatus
from generation.kernels import build as kbuild
from generation.kernels import gptq as kgptq
from generation.rounding import (
    NF4_CODE,
    NF4_MIDPOINTS,
    GptqConfig,
    block_absmax,
    double_quantize,
    gptq_factor,
    gptq_nf4,
    nf4grid,
)

from conftest import native_kernel
from test_rounding import correlated_inputs

pytestmark = pytest.mark.torch_threads(2)  # the OpenMP kernels run on two threads, as in the app


@pytest.fixture(scope="module")
def native():
    return native_kernel(kgptq.gptq_batch, kgptq.NATIVE, "torch's bits, checked here")


@pytest.mark.parametrize("bn,out", [(1, 1), (2, 7), (16, 65), (128, 640), (128, 1536)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_c_loop_is_torch_bit_for_bit(native, bn, out, seed):
    assert kgptq.check_against_torch(native, sizes=((bn, out),), seed=seed) is None


def test_values_on_the_edges_of_the_grid(native):
    """Exact midpoints (ties go to the lower code, as torch.bucketize), values beyond the largest
    code (clamped), zeros, and scales at gptq_nf4's floor."""
    vals = torch.cat([NF4_MIDPOINTS, NF4_CODE, torch.tensor([-3.0, 2.5, 0.0, -0.0, 1e-30, -1e-30])])
    out = vals.numel()
    scale = torch.ones(3, out)
    scale[2] = 1e-30
    wb = torch.stack([vals, vals * 0.5, vals * 1e-30])
    ub = torch.tensor([[2.0, 0.5, -0.25], [0.0, 1.0, 0.125], [0.0, 0.0, 4.0]])
    got = (wb.clone(), torch.empty(3, out, dtype=torch.long), torch.empty(3, out))
    want = (wb.clone(), torch.empty(3, out, dtype=torch.long), torch.empty(3, out))
    native(got[0], scale, ub, NF4_CODE, NF4_MIDPOINTS, got[1], got[2])
    kgptq.torch_batch(want[0], scale, ub, NF4_CODE, NF4_MIDPOINTS, want[1], want[2])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(want[1][0, :15], torch.arange(15))  # a midpoint rounds down


@pytest.mark.parametrize("out,d", [(48, 128), (96, 640)])
def test_gptq_gives_the_same_codes_with_either_loop(native, monkeypatch, out, d):
    x = correlated_inputs(4 * d, d, seed=d)
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(out)) * 0.05
    s = double_quantize(block_absmax(w))[0]
    cfg = GptqConfig(damp=0.1, batch=32)
    with_c = gptq_nf4(w, h, s, cfg)
    monkeypatch.setattr(nf4grid, "gptq_batch", lambda: (kgptq.torch_batch, KernelStatus("torch ops", False)))
    assert torch.equal(gptq_nf4(w, h, s, cfg), with_c)
    assert torch.equal(gptq_nf4(w, h, s, cfg, factor=gptq_factor(h, cfg)), with_c)  # a shared factor: the same


def test_a_loop_that_differs_from_torch_is_not_used(monkeypatch):
    def off_by_one_ulp(wb, scale, ub, code, mid, index, err):
        kgptq.torch_batch(wb, scale, ub, code, mid, index, err)
        err[-1, -1] = torch.nextafter(err[-1, -1], torch.tensor(1.0))

    assert "errors" in kgptq.check_against_torch(off_by_one_ulp)
    monkeypatch.setattr(kgptq, "_state", {})
    monkeypatch.setattr(kbuild, "load_library", lambda *a, **k: (off_by_one_ulp, KernelStatus(kgptq.NATIVE, True)))
    loop, status = kgptq.gptq_batch()
    assert loop is kgptq.torch_batch and not status.native and status.short == "torch ops"
    assert "differs from torch in the errors" in status.detail


def test_off_switch(monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    loop, status = kgptq.gptq_batch()
    assert loop is kgptq.torch_batch and not status.native and "ATTN_LAB_NATIVE=0" in status.detail
