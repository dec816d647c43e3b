"""Caps that keep a long-running app's memory bounded (see bench/soak.py and bench/README.md,
"Memory soak"): gradio's per-session states, the engine's prefix store, the allocator's settings.

Fast: no server and no real model (the prefix store gets synthetic keys/values)."""

from __future__ import annotations

import ast
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
    from generation.engine import SlotKVCache

    cache = SlotKVCache(layers, 1, ids.numel() + 4)
    for i in range(layers):
        cache.keys[i] = torch.randn(1, 2, cache.capacity, 8)
        cache.values[i] = torch.randn(1, 2, cache.capacity, 8)
    return cache


@pytest.mark.parametrize("entries", [1, 2, 3])
def test_prefix_store_keeps_at_most_its_entries(entries):
    from generation.engine import PrefixStore

    store = PrefixStore(entries=entries, max_tokens=64)
    for i in range(3 * entries + 1):
        ids = torch.arange(10) + 100 * (i + 1)  # no two share a prefix
        store.add(ids, _cache_with(ids), 0)
        assert len(store._items) <= entries
    # the most recent prompt is the one found
    assert store.lookup(torch.cat([ids, torch.tensor([7])]))[0] == ids.numel()


@pytest.mark.parametrize("max_tokens", [4, 16])
def test_prefix_store_refuses_prompts_over_its_token_cap(max_tokens):
    from generation.engine import PrefixStore

    store = PrefixStore(entries=4, max_tokens=max_tokens)
    long_ids = torch.arange(max_tokens + 1)
    store.add(long_ids, _cache_with(long_ids), 0)
    assert store._items == []
    ok = torch.arange(max_tokens)
    store.add(ok, _cache_with(ok), 0)
    assert len(store._items) == 1
    assert all(k.shape[1] == max_tokens for k in store._items[0][1])  # only the prompt's positions, copied
