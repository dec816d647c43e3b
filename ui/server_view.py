"""Inside the server: the chat engine serving this class, live (rows being batched, the waiting
line, KV cache bytes, tokens/s, step time), and `/engine_state`.

Only counts are shown, never anyone's text. The panel refreshes at most once a second while it is
open (a gr.Timer outside the queue); `/engine_state` answers outside the chat queue, so it answers
while every chat slot is busy. With a remote chat server the panel says the chat is served elsewhere.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from generation.backends import BackendSlot, EngineState

from .common import PRIVATE, typed_api

REFRESH_S = 1.0  # the panel's refresh: a class watching it costs one tiny call per browser a second

SERVER_HELP = """
Every chat in this class is served by **one decode loop** on this machine: each step runs the
model once for *every* reply being written (continuous batching), a newcomer's prompt is read in
a chunk between two steps (prefill), and a reply leaves the batch the moment it ends. Send a
message and watch your row appear. Only counts are shown here, never anyone's text.
"""


def engine_state(backend: BackendSlot) -> dict[str, Any]:
    """The /engine_state payload: the local engine's snapshot as plain JSON, or for a remote chat
    server the replies in flight and `served_elsewhere` true (its engine is not visible from here)."""
    if backend.remote is not None:
        return {**EngineState().as_dict(), "running": backend.remote.active(), "served_elsewhere": True,
                "backend": backend.remote.describe()}
    state = backend.engine_state()
    started = state is not None
    state = state or EngineState(max_batch=backend.settings.chat_concurrency)
    return {**state.as_dict(), "served_elsewhere": False,
            "backend": "local engine" if started else "local engine (starts once the model has loaded)"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _row_html(i: int, row: dict[str, Any]) -> str:
    if row["phase"] == "prefill":
        done = row["prefilled"] / max(row["prompt_tokens"], 1)
        what = f"reading its prompt: {row['prefilled']} of {row['prompt_tokens']} tokens"
    else:
        done = row["generated"] / max(row["max_new_tokens"], 1)
        what = f"writing: {row['generated']} of at most {row['max_new_tokens']} tokens"
    colour = "#f59e0b" if row["phase"] == "prefill" else "#6366f1"
    sampling = ("greedy" if row["temperature"] == 0 else
                f"T {row['temperature']:g} · top-p {row['top_p']:g} · top-k {row['top_k'] or 'off'}")
    bar = (f"<div style='background:#e5e7eb;border-radius:3px;height:8px;width:100%'><div style='background:{colour};"
           f"height:8px;border-radius:3px;width:{100 * min(done, 1.0):.0f}%'></div></div>")
    return (f"<tr><td>{i + 1}</td><td>{row['phase']}</td><td>{row['prompt_tokens']}</td><td>{row['generated']}</td>"
            f"<td style='min-width:160px'>{bar}<small>{html.escape(what)}</small></td><td>{html.escape(sampling)}</td></tr>")


def server_html(payload: dict[str, Any]) -> str:
    """The panel: one summary line and a table of the rows being batched."""
    if payload.get("served_elsewhere"):
        return (f"<div id='server-summary'>The chat is served elsewhere: <b>{html.escape(payload['backend'])}</b> "
                f"({payload['running']} of this app's replies in flight). Its engine is not visible from "
                "here; run the app without CHAT_BACKEND_URL to watch the local one.</div>")
    summary = (
        f"<b>{payload['running']}</b> of {payload['max_batch']} rows busy · <b>{payload['waiting']}</b> waiting · "
        f"<b>{payload['tok_s']:.1f}</b> tokens/s · step {payload['step_ms']:.0f} ms · KV cache "
        f"<b>{_mib(payload['kv_cache_bytes'])}</b> in use of {_mib(payload['kv_cache_allocated_bytes'])} allocated "
        f"(+ {_mib(payload['prefix_cache_bytes'])} shared prompt prefix) · {html.escape(payload['backend'])}"
    )
    if payload.get("fast_decode"):
        summary += f" · fast decode {html.escape(payload['fast_decode'].split(':')[0])}"
    rows = "".join(_row_html(i, r) for i, r in enumerate(payload["rows"]))
    table = ("<table style='width:100%;font-size:0.9em'><tr><th>row</th><th>phase</th><th>prompt tokens</th>"
             f"<th>written</th><th>progress</th><th>sampling</th></tr>{rows}</table>" if rows else
             "<p><i>No reply is being written right now.</i></p>")
    return f"<div id='server-summary'>{summary}</div>{table}"


class ServerHandlers:
    """The panel's and /engine_state's handlers over the chat's backend slot."""

    def __init__(self, backend: BackendSlot) -> None:
        self.backend = backend

    def engine_state_api(self) -> dict:
        """API /engine_state: what the chat engine is doing, as counts (no one's text).

        {"running", "waiting", "rows": [{"prompt_tokens", "generated", "phase": "prefill"|"decode",
        "prefilled", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"}],
        "kv_cache_bytes" (the rows' keys and values), "kv_cache_allocated_bytes", "prefix_cache_bytes",
        "tok_s" (all rows, last few seconds), "step_ms" (one iteration of the loop), "max_batch",
        "prefill_tokens", "tokens_total", "steps_total", "fast_decode", "at" (unix time),
        "served_elsewhere" (a remote chat server: its engine is not visible), "backend"}.
        Answers outside the queue, while every chat slot is busy.
        """
        return engine_state(self.backend)

    def tick(self) -> str:
        return server_html(engine_state(self.backend))


def build_server(handlers: ServerHandlers) -> None:
    """The "Inside the server" accordion (live while open) and `/engine_state`."""
    with gr.Accordion("Inside the server: how this class's chats are batched", open=False) as box:
        gr.Markdown(SERVER_HELP)
        panel = gr.HTML("<i>Open to watch …</i>", elem_id="server-panel")
    timer = gr.Timer(REFRESH_S, active=False)
    box.expand(lambda: (handlers.tick(), gr.Timer(active=True)), None, [panel, timer], queue=False, **PRIVATE)
    box.collapse(lambda: gr.Timer(active=False), None, [timer], queue=False, **PRIVATE)
    timer.tick(handlers.tick, None, [panel], queue=False, show_progress="hidden", **PRIVATE)
    gr.api(typed_api(handlers.engine_state_api), api_name="engine_state", queue=False)
