"""Caps that keep a long-running app's memory bounded (see bench/soak.py and bench/README.md,
"Memory soak"): gradio's per-session states, the engine's prefix store, the allocator's settings.

Fast: no server and no real model (the prefix store gets synthetic keys/values)."""

from __future__ import annotations

import ast
import platform
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# --- gradio's per-session states -------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_session_states_never_exceed_the_capacity(cap):
    """gradio's StateHolder keeps at most `state_session_capacity` sessions, the most recent ones."""
    import gradio as gr
    from gradio.state_holder import StateHolder

    with gr.Blocks() as demo:
        gr.State(0)
    demo.state_session_capacity = cap  # what launch(state_session_capacity=...) sets
    holder = StateHolder()
    holder.set_blocks(demo)
    for i in range(3 * cap + 2):
        holder[f"session-{i}"]
        assert len(holder.session_data) <= cap
        assert len(holder.time_last_used) <= cap
    newest = {f"session-{i}" for i in range(2 * cap + 2, 3 * cap + 2)}
    assert set(holder.session_data) == newest


def test_app_launches_with_the_session_capacity():
    """app.main() passes ui.common.SESSION_CAPACITY to launch(), and the cap is a real bound."""
    from ui.common import SESSION_CAPACITY

    assert isinstance(SESSION_CAPACITY, int) and 1 <= SESSION_CAPACITY < 10_000  # gradio's default: 10,000
    tree = ast.parse((REPO / "app.py").read_text())
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == "launch"]
    assert launches, "app.py calls demo.launch()"
    kw = {k.arg: k.value for k in launches[0].keywords}
    assert isinstance(kw.get("state_session_capacity"), ast.Name)
    assert kw["state_session_capacity"].id == "SESSION_CAPACITY"


# --- the engine's prefix store ---------------------------------------------------------------------


def _cache_with(ids: torch.Tensor, layers: int = 2):
    """A one-row SlotKVCache whose keys/values hold something for ids (P,)."""
    from generation.decode import SlotKVCache

    cache = SlotKVCache(layers, 1, ids.numel() + 4)
    for i in range(layers):
        cache.keys[i] = torch.randn(1, 2, cache.capacity, 8)
        cache.values[i] = torch.randn(1, 2, cache.capacity, 8)
    return cache


@pytest.mark.parametrize("entries", [1, 2, 3])
def test_prefix_store_keeps_at_most_its_entries(entries):
    from generation.decode import PrefixStore

    store = PrefixStore(entries=entries, max_tokens=64)
    for i in range(3 * entries + 1):
        ids = torch.arange(10) + 100 * (i + 1)  # no two share a prefix
        store.add(ids, _cache_with(ids), 0)
        assert len(store._items) <= entries
    # the most recent prompt is the one found
    assert store.lookup(torch.cat([ids, torch.tensor([7])]))[0] == ids.numel()


@pytest.mark.parametrize("max_tokens", [4, 16])
def test_prefix_store_refuses_prompts_over_its_token_cap(max_tokens):
    from generation.decode import PrefixStore

    store = PrefixStore(entries=4, max_tokens=max_tokens)
    long_ids = torch.arange(max_tokens + 1)
    store.add(long_ids, _cache_with(long_ids), 0)
    assert store._items == []
    ok = torch.arange(max_tokens)
    store.add(ok, _cache_with(ok), 0)
    assert len(store._items) == 1
    assert all(k.shape[1] == max_tokens for k in store._items[0][1])  # only the prompt's positions, copied


# --- glibc's malloc arenas -------------------------------------------------------------------------

_ARENA_PROBE = """
import ctypes, sys, threading
from ui.process import limit_malloc_arenas  # no gradio: a quick probe
assert limit_malloc_arenas(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
held, barrier = [], threading.Barrier(8)
def work():
    barrier.wait()  # all at once: every thread wants an arena of its own
    for _ in range(50):
        held.append(libc.malloc(200_000))  # above tcache's sizes: served by an arena
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas only")
@pytest.mark.parametrize("arenas", [1, 2, 3])
def test_malloc_arenas_never_exceed_the_cap(arenas):
    """After limit_malloc_arenas(n), eight threads allocating at once share at most n arenas."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, str(arenas)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = sum(line.startswith("Arena ") for line in out.stderr.splitlines())
    assert 1 <= found <= arenas, out.stderr[-2000:]


def test_malloc_arena_cap_leaves_an_explicit_setting_alone(monkeypatch):
    from ui.process import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
