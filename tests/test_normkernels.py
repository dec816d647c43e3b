"""The native kernels (generation/kernels/): the build module compiles once per machine and says
why not where it cannot; the decode step's RMSNorm / residual / q-k norm + RoPE kernels give
torch's bits."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generation.kernels import (
    KernelStatus,
    build_library,
    check_against_torch,
    load_library,
    norm_kernels,
    torch_qk_norm_rope,
    torch_rms,
)
from generation.kernels import build as kbuild
from generation.kernels import norms as knorms

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "generation" / "kernels"
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None or shutil.which(CC) is None, reason="needs a C compiler")
TINY = "int add(int a, int b) { return a + b; }\n"

pytestmark = pytest.mark.torch_threads(2)  # the OpenMP kernels run on two threads, as in the app


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty app cache for this test (ATTN_LAB_CACHE), native kernels on."""
    monkeypatch.setenv("ATTN_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv("ATTN_LAB_NATIVE", raising=False)
    return tmp_path


def _compiles(monkeypatch) -> list[list[str]]:
    """The compiler runs of the build module from now on (the real compiler still runs)."""
    calls: list[list[str]] = []
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            calls.append(list(cmd))
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(kbuild.subprocess, "run", run)
    return calls


# --- the build module ------------------------------------------------------------------------


@needs_cc
def test_a_kernel_is_compiled_once_into_the_cache_and_loads(cache, monkeypatch):
    compiles = _compiles(monkeypatch)
    so = build_library("tiny", TINY)
    assert so.parent == cache / "kernels" and so.name.startswith("tiny-") and so.suffix == ".so"
    stamp = so.stat().st_mtime_ns
    lib, status = load_library("tiny", TINY, native="tiny C", fallback="tiny Python")
    assert lib is not None and lib.add(2, 40) == 42
    assert status == KernelStatus("tiny C", True, str(so))
    assert build_library("tiny", TINY) == so and so.stat().st_mtime_ns == stamp
    assert len(compiles) == 1 and {"-Wall", "-Wextra"} <= set(compiles[0])
    assert [p.name for p in (cache / "kernels").iterdir()] == [so.name]  # no build folder left behind


@needs_cc
def test_the_cache_is_keyed_by_source_and_flags(cache, monkeypatch):
    compiles = _compiles(monkeypatch)
    a = build_library("tiny", TINY)
    b = build_library("tiny", TINY, extra_flags=("-O1",))
    c = build_library("tiny", TINY + "int sub(int a, int b) { return a - b; }\n")
    assert len({a, b, c}) == 3 and len(compiles) == 3


@needs_cc
def test_a_library_that_cannot_be_bound_gives_the_fallback(cache):
    lib, status = load_library("tiny", TINY, native="tiny C", fallback="tiny Python", bind=lambda lib: lib.sub)
    assert lib is None and status.kernel == "tiny Python" and "sub" in status.detail


def test_no_compiler_gives_the_fallback_and_why(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    lib, status = load_library("tiny", TINY, native="tiny C", fallback="tiny Python")
    assert lib is None and not status.native and status.kernel == "tiny Python"
    assert "/nonexistent/cc" in status.detail and "unavailable" in status.detail
    assert not (cache / "kernels").exists()


def test_off_switch_gives_the_fallback_and_why(cache, monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    lib, status = load_library("tiny", TINY, native="tiny C", fallback="tiny Python")
    assert lib is None and status == KernelStatus("tiny Python", False, "native kernels off: ATTN_LAB_NATIVE=0")


def test_a_cpu_without_the_flags_a_kernel_needs(cache):
    lib, status = load_library("tiny", TINY, native="tiny C", fallback="tiny Python", needs=("no_such_cpu_flag",))
    assert lib is None and not status.native and "this CPU lacks no_such_cpu_flag" in status.detail


@needs_cc
def test_a_source_that_does_not_compile(cache):
    lib, status = load_library("tiny", "int add(int a, int b) { return a + }\n", native="tiny C",
                               fallback="tiny Python")
    assert lib is None and not status.native and "compiling failed" in status.detail


def test_status_short_form_and_line():
    on = KernelStatus("native norm kernels", True, "torch's bits, checked here")
    assert on.short == "native norm kernels" and str(on) == "native norm kernels (torch's bits, checked here)"
    assert str(KernelStatus("torch ops", False)) == "torch ops"


@needs_cc
@pytest.mark.parametrize("name", ["norms.c", "int8_head.c", "gptq.c"])
def test_the_kernels_compile_without_warnings(name):
    if name == "int8_head.c" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("AVX-512 intrinsics: x86-64 only")
    isa = ["-mavx512f", "-mavx512bw", "-mavx512vnni"] if name == "int8_head.c" else []
    res = subprocess.run([CC, "-fsyntax-only", "-fopenmp", "-Wall", "-Wextra", "-Werror", *isa, str(KERNELS / name)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_int8_head_off_switch_in_a_fresh_process(tmp_path):
    """The int8 head kernel decides once per process: a fresh one with ATTN_LAB_NATIVE=0."""
    env = {**os.environ, "ATTN_LAB_NATIVE": "0", "ATTN_LAB_CACHE": str(tmp_path)}
    code = ("from generation.kernels import native_int8_kernel, native_int8_status as s; st = s(); "
            "print(native_int8_kernel() is None, st.native, st.short, '|', st.detail)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True False torch _weight_int8pack_mm | native kernels off: ATTN_LAB_NATIVE=0"


# --- the norm kernels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    if CC is None or shutil.which(CC) is None:
        pytest.skip("needs a C compiler")
    k, status = norm_kernels(640, 5, 256, 1e-6)  # Gemma 3 270M: hidden 640, 4 q + 1 k heads of 256
    assert k is not None, str(status)
    assert status == KernelStatus("native norm kernels", True, "torch's bits, checked here")
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
    key = ("checked", 640, 5, 256, 1e-5, "gemma")  # the norm form is part of the key
    monkeypatch.setitem(knorms._state, key, "rms of 1 x 640")
    k, status = norm_kernels(640, 5, 256, 1e-5)
    assert k is None and not status.native and status.short == "torch ops"
    assert "differ" in status.detail and "rms of 1 x 640" in status.detail


def test_off_switch(monkeypatch):
    monkeypatch.setenv("ATTN_LAB_NATIVE", "0")
    k, status = norm_kernels(640, 5, 256, 1e-6)
    assert k is None and not status.native and "ATTN_LAB_NATIVE=0" in status.detail
