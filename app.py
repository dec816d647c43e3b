"""Attention Lab: build self-attention from sliders, then chat with a 4-bit quantized LM.

This file only assembles the views of `ui/` (one module per view) and serves them; every tensor
operation lives in `attention/` and `generation/`. `import app` only defines: `build_demo()` makes
the Blocks, `main()` (`python app.py`) starts loading the model in the background and serves.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass

from ui.common import CSS, LAB_CONCURRENCY, THEME, TITLE, ModelSlot, tune_queue  # sets GRADIO_ANALYTICS_ENABLED first
from ui.common import SESSION_CAPACITY, palette_checkbox
from ui.process import limit_malloc_arenas

import gradio as gr  # noqa: E402,I001

from generation import Settings  # noqa: E402
from ui.apigate import gate_middleware  # noqa: E402
from ui.eventstream import stream_head  # noqa: E402
from ui.chat import ChatHandlers, build_chat, build_status  # noqa: E402
from ui.inside import INSIDE_FIELDS, InsideHandlers, build_inside  # noqa: E402
from ui.lab import LAB_FIELDS, LabHandlers, build_lab  # noqa: E402
from ui.lessons import LessonsHandlers, build_lessons  # noqa: E402
from ui.server_view import ServerHandlers, build_server  # noqa: E402
from ui.share import build_share  # noqa: E402
from ui.tokens_view import TokensHandlers, build_tokens  # noqa: E402

INTRO = """
# Attention Lab
Build **self-attention** from sliders and watch what every head does, then chat with a **4-bit
quantized** language model. *Attention Lab* turns your sentence into toy embeddings and runs a real
PyTorch attention module on them: each heatmap is one head; **row = the token that is looking
(query), column = the token it looks at (key)**, and every row sums to 1. *4-bit Chat* talks to
a small LM whose weights are stored as 4-bit NF4 codes.
"""


@dataclass
class AppState:
    """What the views share: settings, the model slot, and each view's handlers (tests use them)."""

    settings: Settings
    model: ModelSlot
    lab: LabHandlers
    chat: ChatHandlers
    inside: InsideHandlers

    @classmethod
    def create(cls, settings: Settings | None = None) -> AppState:
        """Handlers for every view around one (not yet loading) model slot."""
        settings = settings or Settings.from_env()
        # With a remote chat server the local weights serve only the inside views: load them lazily.
        model = ModelSlot(settings, lazy=settings.chat_backend_url is not None)
        return cls(settings, model, LabHandlers(), ChatHandlers(settings, model), InsideHandlers(settings, model))


def build_demo(settings: Settings | None = None, *, load_model_now: bool = False) -> gr.Blocks:
    """Build the Blocks (Attention Lab, 4-bit Chat, Lessons). With load_model_now, start loading the chat model in the background
    (unless it is lazy: a remote server answers the chat)."""
    state = AppState.create(settings)
    if load_model_now and not state.model.lazy:
        state.model.start()
    with gr.Blocks(title=TITLE, delete_cache=(1800, 3600)) as demo:  # figures served as files: an hour each
        demo.app_state = state  # for tests and main(); gradio ignores extra attributes
        gr.Markdown(INTRO)
        bar = build_status(state.chat)
        colourblind = palette_checkbox()  # every figure of every view follows it
        with gr.Tab("Attention Lab", id="lab"):
            share_row = gr.Row(equal_height=True)  # filled below, once the widgets it reads exist
            lab = build_lab(demo, state.lab, colourblind)
            inside = build_inside(demo, state.inside, colourblind)
            build_share([(LAB_FIELDS, lab.inputs), (INSIDE_FIELDS, inside.inputs)], share_row)
        with gr.Tab("4-bit Chat", id="chat"):
            chat = build_chat(demo, state.chat, bar)
            build_tokens(TokensHandlers(state.chat), chat, colourblind)  # every reply token opens up
            build_server(ServerHandlers(state.chat.backend))  # the engine serving the class, live
        with gr.Tab("Lessons", id="lessons"):
            build_lessons(demo, LessonsHandlers(state.model, state.inside.full_precision))  # predict, then see
        inside.wire(chat.chatbot, chat.replies, bar.line, system=chat.system)
    return demo


def main() -> int:
    """`python app.py`: start loading the model in the background and serve (blocks)."""
    limit_malloc_arenas()
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"attention-lab: bad configuration: {exc}", file=sys.stderr)
        return 2
    # Wiring, not maths: torch's intra-op threads as configured (Settings.torch_threads), set
    # before any model work starts.
    import torch

    torch.set_num_threads(settings.torch_threads)
    demo = build_demo(settings, load_model_now=True)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=LAB_CONCURRENCY)
    missing = tune_queue(demo)
    if missing:  # another gradio version: the app works, only busier
        print(f"attention-lab: gradio's queue has no {', '.join(missing)} to tune", file=sys.stderr)
    demo.launch(
        server_name=settings.server_name,
        server_port=settings.server_port,
        share=False,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        prevent_thread_lock=True,
        quiet=True,
        head=stream_head(),  # no event's updates left unread at the server (ui/eventstream.py)
        # Only public endpoints answer by name, and get their documented defaults (ui/apigate.py).
        app_kwargs={"middleware": gate_middleware(demo)},
        state_session_capacity=SESSION_CAPACITY,
    )
    print(f"Attention Lab is serving on http://{settings.server_name}:{settings.server_port}", flush=True)
    remote = demo.app_state.chat.backend.remote
    if remote is not None:  # one line about the chat server; the app serves whether or not it answers
        def report() -> None:
            reason = remote.check()  # first: it learns the model name the server lists
            print(f"Chat backend {remote.describe()}: {'reachable' if reason is None else reason}", flush=True)

        threading.Thread(target=report, name="check-chat-backend", daemon=True).start()
    # From here a stop request (SIGTERM: a Space restarting, a container stopping) ends the app as
    # Ctrl+C does, through the `finally` below and exit handlers, not mid-write.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # The local chat engine's decode loop runs here, in the main thread, from the moment the
        # model has loaded (its small ops are cheapest here; see ChatEngine.run_here).
        demo.app_state.chat.backend.serve_here()
        # A remote backend, or a model that failed to load: wait here rather than in gradio's
        # block_thread, which on Ctrl+C closes the server before the clients' heartbeat streams are
        # told to end and then waits seconds for them; demo.close() below tells them first.
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        demo.app_state.chat.backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
