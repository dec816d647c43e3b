"""The block-scale refit's matrices in C (generation/kernels/refit.c): within the rounding-error bound
of torch's einsum on any sizes the rounding meets, so refit_scales finds the same least-squares
scales whichever runs; where the C code differs by more, cannot be built or is switched off, the
einsum runs and the status says why."""

from __future__ import annotations

import pytest
import torch

from generation.kernels import KernelStatus
from generation.kernels import build as kbuild
from generation.kernels import refit as krefit
from generation.rounding import BLOCK, block_absmax, dequantize, nf4grid, refit_scales

from generation.rounding.nf4grid import round_to_nearest
from conftest import native_kernel
from test_rounding import correlated_inputs, output_error

pytestmark = pytest.mark.torch_threads(2)  # the OpenMP kernel runs on two threads, as in the app


@pytest.fixture(scope="module")
def native():
    return native_kernel(krefit.block_gram, krefit.NATIVE, "within rounding of torch's, checked here")


@pytest.mark.parametrize("rows,n", [(1, 32), (15, 64), (16, 64), (17, 96), (33, 640), (40, 2048)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_c_matrices_are_torch_s_within_rounding(native, rows, n, seed):
    assert krefit.check_against_torch(native, sizes=((rows, n),), seed=seed) is None


@pytest.mark.parametrize("blk", [8, 32, 64])
def test_symmetric_and_blockwise_as_defined(native, blk):
    """A[r] is C_r^T H C_r with C_r the (n, G) block matrix of row r's codes: symmetric, and a
    block of zero codes gives a zero row and column."""
    n, rows = 4 * blk, 5
    gen = torch.Generator().manual_seed(blk)
    x = torch.randn(2 * n, n, generator=gen)
    h = x.T @ x / (2 * n)
    c = torch.randn(rows, n, generator=gen)
    c[2, blk : 2 * blk] = 0
    a = native(c, h, blk)
    assert torch.equal(a, a.transpose(1, 2))
    assert torch.equal(a[2, 1], torch.zeros(4)) and torch.equal(a[2, :, 1], torch.zeros(4))
    blocks = torch.zeros(rows, n, n // blk)
    for g in range(n // blk):
        blocks[:, g * blk : (g + 1) * blk, g] = c[:, g * blk : (g + 1) * blk]
    want = blocks.transpose(1, 2) @ h @ blocks  # (rows, G, G)
    assert bool(((a - want).abs() <= krefit.gram_error_bound(c, h, blk)).all())


def test_a_block_that_is_not_a_multiple_of_eight_is_refused(native):
    with pytest.raises(ValueError, match="multiple of 8"):
        native(torch.ones(2, 12), torch.eye(12), 12)


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("out,d", [(24, 192), (40, 640)])
def test_refit_scales_finds_the_least_squares_scales_with_either(native, monkeypatch, kernel, out, d):
    if kernel == "torch":
        monkeypatch.setattr(nf4grid, "block_gram", lambda: (krefit.torch_block_gram, KernelStatus("torch einsum", False)))
    x = correlated_inputs(4 * d, d, seed=d)
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(out)) * 0.05
    index = round_to_nearest(w, block_absmax(w))
    fitted = refit_scales(w, h, index, damp=0.1)
    hd = h + 0.1 * h.diagonal().mean() * torch.eye(d)  # the objective the scales were fitted for
    best = output_error(w, dequantize(index, fitted), hd)
    for r, g in [(0, 0), (out - 1, d // BLOCK - 1)]:  # no nudge of one block's scale lowers it
        for f in (0.99, 1.01):
            nudged = fitted.clone()
            nudged[r, g] *= f
            assert output_error(w, dequantize(index, nudged), hd) >= best * (1 - 1e-6)


def test_a_kernel_that_differs_from_torch_is_not_used(monkeypatch):
    def one_entry_off(c, h, blk):
        a = krefit.torch_block_gram(c, h, blk)
        a[-1, -1, -1] += 1e-3 * a[-1, -1, -1].abs() + 1e-6
        return a

    monkeypatch.setattr(krefit, "_state", {})
    monkeypatch.setattr(kbuild, "load_library", lambda *a, **k: (one_entry_off, KernelStatus(krefit.NATIVE, True)))
    gram, status = krefit.block_gram()
    assert gram is krefit.torch_block_gram
    assert status.kernel == krefit.FALLBACK and not status.native and "differs from torch" in status.detail


def test_switched_off_the_einsum_runs(monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    gram, status = krefit.block_gram()
    assert gram is krefit.torch_block_gram and not status.native
