"""Attention Lab: build self-attention from sliders, then chat with a 4-bit quantized LM.

This file only wires widgets to `attention/` and `generation/`; every tensor operation lives
there. `import app` does nothing but define things: `build_demo()` makes the Blocks and
`main()` (run by `python app.py`) starts the model loading in the background and serves.
"""

from __future__ import annotations

import functools
import html
import inspect
import math
import os
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Before gradio is imported: gradio reads it at import time. The app must make no internet calls.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from attention.lab import LabConfig, run_lab, valid_head_counts  # noqa: E402
from attention.plot import plot_head, plot_heads, plot_steps  # noqa: E402
from attention.trace import explain_head  # noqa: E402
from generation.introspect import (  # noqa: E402
    FullPrecisionCache,
    compare_quantization,
    model_attention,
    model_layers,
    next_token_candidates,
)
from generation.model import LoadedModel, load_model  # noqa: E402
from generation.sampling import SamplingParams  # noqa: E402
from generation.settings import Settings  # noqa: E402
from generation.stream import WORKER_THREAD_NAME, ReplyStats, stream_reply  # noqa: E402
from generation.tokens import preview_tokens  # noqa: E402

TITLE = "Attention Lab"

# Lab events are cheap (T <= 32 toy tensors) and must never queue behind a chat, so they get
# their own concurrency group with more slots than generation has.
LAB_CONCURRENCY = 4
LAB_GROUP = "lab"
CHAT_GROUP = "chat"
# Forward passes of the shared model for the "inside the chat model" views: bounded apart from chats.
INSPECT_GROUP = "inspect"
INSPECT_CONCURRENCY = 2
DEFAULT_INSPECT_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_NEXT_PROMPT = "The capital of France is"
REMOVED_BY = {None: "kept", "top_k": "removed by top-k", "top_p": "removed by top-p",
              "greedy": "not taken (greedy)"}

# The chat's "max new tokens" slider maximum; /chat refuses more, so no client holds the slot longer.
MAX_NEW_TOKENS = 512

# The notebook's defaults and prompts.
DEFAULT_SENTENCE = "The cat sat on the mat because it was tired."
EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Explain self-attention in one paragraph.",
    "Write a haiku about transformers.",
]
DEFAULT_PARAMS = SamplingParams()

# A single message longer than this is refused before it reaches the tokenizer: generation trims
# *history* to the token budget, but one giant message cannot be trimmed into something sensible.
# ~8 characters per token is generous for English, so this never refuses a message that fits.
CHARS_PER_TOKEN_LIMIT = 8

# Meaning of each row of the debug shape trace, for the table (UI text only).
TRACE_MEANING = {
    "Q": "queries: x · W_q, split into heads",
    "K": "keys: x · W_k (n_kv_heads heads, shared by query groups)",
    "V": "values: x · W_v",
    "scores": "Q·Kᵀ / √d_k: one score per query/key pair",
    "weights": "softmax over keys (each row sums to 1)",
    "context": "weights · V: a mix of values per query",
    "concat": "heads side by side again",
    "out": "output projection W_o",
}

THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="sky",
    # System fonts only: the stock theme would fetch Google Fonts, and the app makes no internet calls.
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    text_size=gr.themes.sizes.text_lg,
)

CSS = """
.gradio-container { max-width: 1400px !important; margin: auto; }
#status-line { font-size: 0.95em; }
#status-line p { margin: 0; }
.token-preview { line-height: 2.1; font-family: ui-monospace, monospace; font-size: 0.95em; }
.token-preview .tok { padding: 2px 3px; margin-right: 1px; border-radius: 4px; white-space: pre; }
.token-preview .t0 { background: #e0e7ff; color: #1e1b4b; }
.token-preview .t1 { background: #fde68a; color: #422006; }
.token-preview .meta { color: #6b7280; font-family: ui-sans-serif, system-ui, sans-serif; }
#lab-message p { margin: 0; }
"""


def _dot(colour: str) -> str:
    # A coloured status dot that needs no emoji font (projectors and CI browsers often lack one).
    return f"<span style='color:{colour}'>●</span>"


# ---------------------------------------------------------------------------------------------
# The shared model: loaded once, in the background, then only read.


@dataclass
class ModelSlot:
    """One model loaded at most once in a background thread and then shared read-only."""

    settings: Settings
    load_4bit: bool = True
    lm: LoadedModel | None = None
    error: str | None = None
    started_at: float | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Start loading in a daemon thread (idempotent)."""
        with self._lock:
            if self.started_at is not None:
                return
            self.started_at = time.perf_counter()
        threading.Thread(target=self._load, name=f"load-model-{self.load_4bit}", daemon=True).start()

    def _load(self) -> None:
        what = f"{self.settings.model_id} ({'4-bit NF4' if self.load_4bit else 'full precision'})"
        print(f"Loading model {what} in the background ...", flush=True)
        try:
            self.lm = load_model(self.settings.model_id, load_4bit=self.load_4bit, settings=self.settings)
        except Exception as exc:  # any failure must become a message in the UI, not a dead thread
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            print(f"Model failed to load: {self.error}", flush=True)
        else:
            print(f"Model ready: {self.lm.summary()}", flush=True)
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        """True once the model is loaded and usable."""
        return self.lm is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (or failed); True when the model is usable."""
        self._ready.wait(timeout)
        return self.ready

    def require(self) -> LoadedModel:
        """The model, or a gr.Error saying why it is not there (loading, failed, not started)."""
        if self.lm is not None:
            return self.lm
        raise gr.Error(self.not_ready_message(), title="Model not ready")

    def not_ready_message(self) -> str:
        """Why the chat model cannot be used yet (failed, not started, or still loading for how long)."""
        if self.error is not None:
            return f"The chat model could not be loaded: {self.error}"
        if self.started_at is None:
            return "The chat model is not loaded (the app was started without loading it)."
        secs = time.perf_counter() - self.started_at
        return (
            f"The chat model is still loading ({secs:.0f} s so far; the first run converts it once, "
            "about a minute). The Attention Lab works meanwhile."
        )

    def status(self) -> str:
        """One line of markdown for the status bar."""
        if self.lm is not None:
            lm = self.lm
            four = "on (NF4)" if lm.quantization == "nf4" else "off"
            return (
                f"{_dot('#16a34a')} **{lm.model_id}** · 4-bit: {four} · device: {lm.device} · "
                f"weights: {lm.weight_bytes / 2**20:.1f} MiB ({lm.weight_bytes:,} bytes)"
            )
        if self.error is not None:
            return f"{_dot('#dc2626')} Model failed to load: {self.error}"
        if self.started_at is None:
            return f"{_dot('#9ca3af')} Model not loaded"
        return f"{_dot('#d97706')} Loading **{self.settings.model_id}** … ({time.perf_counter() - self.started_at:.0f} s)"


# ---------------------------------------------------------------------------------------------
# Attention Lab tab


def _as_float(value: Any, name: str) -> float:
    """A widget or API value -> a finite float, or ValueError naming the field and the problem."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty; pick a value")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    # float("1e400") is inf and float("nan") is nan: neither is a setting anyone means.
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def _as_int(value: Any, name: str) -> int:
    """A widget or API value -> an int (4.0 is fine, 4.5 is not); ValueError naming the field otherwise."""
    f = _as_float(value, name)
    if f != int(f):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(f)


def lab_config(
    text: str,
    emb_dim: float,
    n_heads: Any,
    n_kv_heads: Any,
    dropout: float,
    seed: float,
    causal: bool,
    multi_head: bool,
) -> LabConfig:
    """Widget values -> validated LabConfig (ValueError with the reason otherwise)."""
    return LabConfig(
        text=text or "",
        emb_dim=_as_int(emb_dim, "emb_dim"),
        n_heads=_as_int(n_heads, "n_heads"),
        n_kv_heads=_as_int(n_kv_heads, "n_kv_heads"),
        dropout=_as_float(dropout, "dropout"),
        seed=_as_int(seed, "seed"),
        causal=bool(causal),
        multi_head=bool(multi_head),
    )


def lab_figure(cfg: LabConfig, result: Any) -> Any:
    """The per-head heatmap grid for a lab result."""
    n_heads = int(result.weights.shape[0])
    kind = "causal" if cfg.causal else "bidirectional"
    if cfg.multi_head:
        title = f"{n_heads} heads × d_k={cfg.emb_dim // n_heads} · {cfg.n_kv_heads} K/V heads · {kind}"
        groups = list(result.kv_groups) if cfg.n_kv_heads < n_heads else None
    else:
        title = f"single head · d_k={cfg.emb_dim} · {kind}"
        groups = None
    return plot_heads(result.weights, result.tokens, title=title, kv_groups=groups)


def trace_rows(trace: Any) -> list[list[str]]:
    """The debug-mode shape trace as table rows: step, shape, what it is."""
    return [
        [step.name, str(tuple(step.shape)), TRACE_MEANING.get(step.name, "")]
        for step in trace
        if step.printed
    ]


def steps_figure(result: Any, head: Any) -> Any:
    """Step-by-step maths (QKᵀ, ÷√d_k, mask, softmax) for one head of a lab result."""
    n_heads = int(result.weights.shape[0])
    h = min(max(_as_int(head, "head"), 0), n_heads - 1)
    return plot_steps(explain_head(result.trace, h), result.tokens)


def lab_notice(cfg: LabConfig, result: Any) -> str:
    """The line under the heatmaps: token count, whether the sentence was cut, what dropout does."""
    n_tok = len(result.tokens)
    msg = f"{n_tok} tokens"
    if getattr(result, "capped", False):
        msg += f" (the sentence was cut to the first {cfg.max_tokens} tokens)"
    if cfg.dropout > 0:
        msg += f" · dropout {cfg.dropout:g} is applied to the weights as in training, so rows no longer sum to 1"
    return msg


# ---------------------------------------------------------------------------------------------
# Chat tab


def _content_text(content: Any) -> str:
    """Chatbot message content (str or list of parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_content_text(c) for c in content)
    return "" if content is None else str(content)


def model_history(history: list[Any]) -> list[dict[str, str]]:
    """Chatbot history -> alternating user/assistant turns for the prompt builder.

    Unanswered user turns (a Stop before the first token, an error) are dropped so chat templates
    that insist on alternating roles never see two user turns in a row.
    """
    turns: list[dict[str, str]] = []
    for msg in history or []:
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        text = _content_text(content)
        if role not in ("user", "assistant"):
            continue
        if role == "user":
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            turns.append({"role": "user", "content": text})
        elif turns and turns[-1]["role"] == "user":
            turns.append({"role": "assistant", "content": text})
    return turns


def sampling_params(
    max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any, seed: Any
) -> SamplingParams:
    """Widget values -> validated SamplingParams (ValueError with the reason otherwise)."""
    seed_val = None if seed is None or seed == "" or _as_float(seed, "seed") < 0 else _as_int(seed, "seed")
    return SamplingParams(
        max_new_tokens=_as_int(max_new_tokens, "max new tokens"),
        temperature=_as_float(temperature, "temperature"),
        top_p=_as_float(top_p, "top-p"),
        top_k=_as_int(top_k, "top-k"),
        repetition_penalty=_as_float(repetition_penalty, "repetition penalty"),
        seed=seed_val,
    )


def token_preview_html(lm: LoadedModel | None, text: str, *, sent: bool = False) -> str:
    """The message as the model's tokenizer cuts it: alternating coloured pieces and a count."""
    if not text:
        return "<div class='token-preview'><span class='meta'>Type a message to see its tokens.</span></div>"
    if lm is None:
        return "<div class='token-preview'><span class='meta'>The tokenizer arrives with the model …</span></div>"
    p = preview_tokens(lm.tokenizer, text)
    pieces = []
    for i, piece in enumerate(p.pieces):
        shown = piece.replace("\n", "↵")
        pieces.append(
            f"<span class='tok t{i % 2}' title='id {p.ids[i]}'>{html.escape(shown)}</span>"
        )
    head = "Just sent" if sent else "Your message"
    more = " (preview shows the first ones)" if p.truncated else ""
    return (
        f"<div class='token-preview'><span class='meta'>{head}: <b>{len(p.ids) if not p.truncated else str(len(p.ids)) + '+'}"
        f"</b> tokens{more} · hover a token for its id</span><br>{''.join(pieces)}</div>"
    )


def stats_line(stats: ReplyStats) -> str:
    """The last reply's speed, length, time to first token and why it stopped, for the status line."""
    return (
        f"last reply: **{stats.tokens_per_s:.1f} tokens/s** ({stats.new_tokens} tokens, "
        f"first token after {stats.first_token_s:.2f} s, stopped by {stats.stopped_by})"
    )


def last_exchange(history: list[Any]) -> str:
    """The last user message and the reply to it, as one text (for the model-attention view)."""
    turns = model_history(history)
    if turns and turns[-1]["role"] == "assistant":
        return f"{turns[-2]['content']}\n{turns[-1]['content']}" if len(turns) > 1 else turns[-1]["content"]
    return turns[-1]["content"] if turns else ""


def _pct(p: float) -> str:
    return f"{p * 100:.2f} %" if p >= 0.0001 else f"{p * 100:.1e} %"


def next_token_table(nt: Any) -> list[list[str]]:
    """NextToken -> table rows: token, model p, after temperature, chance to be drawn, status."""
    rows = [[repr(c.token)[1:-1], _pct(c.prob), _pct(c.prob_temperature), _pct(c.sampling_prob),
             REMOVED_BY.get(c.removed_by, str(c.removed_by))] for c in nt.candidates]
    rows.append([f"(the other {nt.vocab_size - len(nt.candidates):,} tokens)", _pct(nt.rest_prob),
                 _pct(nt.rest_prob_temperature), _pct(nt.rest_sampling_prob), ""])
    return rows


def quant_markdown(cmp: Any) -> str:
    """4-bit vs full precision (a QuantComparison): bytes, time per token, KL, as a markdown table."""
    q, f = cmp.quantized, cmp.full
    return (
        f"| | {q.label} | {f.label} |\n|---|---|---|\n"
        f"| weights | {q.weight_bytes / 2**20:.1f} MiB | {f.weight_bytes / 2**20:.1f} MiB |\n"
        f"| time per token | {q.seconds_per_token * 1000:.0f} ms | {f.seconds_per_token * 1000:.0f} ms |\n"
        f"| prompt ({cmp.prompt_tokens} tokens) | {q.prefill_seconds * 1000:.0f} ms | {f.prefill_seconds * 1000:.0f} ms |\n\n"
        f"**KL(full ‖ 4-bit) = {cmp.kl_full_to_4bit:.4f} nats** · most likely token "
        f"{'the same' if cmp.top1_agree else 'differs'} · the full-precision weights are "
        f"{cmp.size_ratio:.1f}× larger. {cmp.notice}"
    )


class StopRegistry:
    """Per-session stop events, so Stop halts *this* user's generation at the next token."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new(self, key: str) -> threading.Event:
        """Register a fresh stop event for `key` (replacing any) and return it."""
        ev = threading.Event()
        with self._lock:
            self._events[key] = ev
        return ev

    def begin(self, key: str) -> threading.Event | None:
        """Register a generation for `key`; None while one is still live there (registered, not stopped)."""
        with self._lock:
            ev = self._events.get(key)
            if ev is not None and not ev.is_set():
                return None
            ev = self._events[key] = threading.Event()
        return ev

    def current(self, key: str) -> threading.Event:
        """The event `begin` registered for `key` (a fresh one if none), for the generation itself."""
        with self._lock:
            return self._events.setdefault(key, threading.Event())

    def stop(self, key: str) -> None:
        """Set `key`'s stop event: its generation halts at the next token."""
        with self._lock:
            ev = self._events.get(key)
        if ev is not None:
            ev.set()

    def done(self, key: str, ev: threading.Event) -> None:
        """A generation ended: set its event and forget it (unless a newer one replaced it)."""
        ev.set()
        with self._lock:
            if self._events.get(key) is ev:
                del self._events[key]


# ---------------------------------------------------------------------------------------------
# The app


class LabApp:
    """Everything the event handlers need: settings, the shared model, per-session stop events."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.model = ModelSlot(self.settings)
        self.stops = StopRegistry()
        self.full_precision = FullPrecisionCache()  # loaded on the first "What 4-bit costs" click

    # -- Attention Lab ------------------------------------------------------------------------

    def head_choices(self, emb_dim: float, n_heads: Any) -> Any:
        """New n_heads dropdown (divisors of emb_dim), keeping the current value when still valid."""
        try:
            choices = valid_head_counts(_as_int(emb_dim, "emb_dim"))
        except ValueError as exc:
            gr.Warning(str(exc))
            return gr.skip()
        try:
            current = _as_int(n_heads, "n_heads")
        except ValueError:
            current = choices[0]
        if current not in choices:
            current = min(choices, key=lambda c: (abs(c - current), c))
        return gr.Dropdown(choices=choices, value=current)

    def lab_update(
        self,
        text: str,
        emb_dim: float,
        n_heads: Any,
        n_kv_heads: Any,
        dropout: float,
        seed: float,
        causal: bool,
        multi_head: bool,
        head: float,
    ) -> tuple[Any, Any, Any, Any, Any]:
        """UI: recompute the lab -> (heatmaps, trace rows, notice, head slider, result for `steps_update`).

        The step-by-step figure follows in a chained event from the stored result, so the heatmaps
        show up without waiting for it. Bad settings -> gr.Warning and the previous plots stay.
        """
        try:
            cfg = lab_config(text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head)
            head_i = _as_int(0 if head is None or head == "" else head, "head")
            result = run_lab(cfg)
            heat = lab_figure(cfg, result)
        except ValueError as exc:
            gr.Warning(str(exc), title="Invalid settings")
            return gr.skip(), gr.skip(), f"**Not drawn:** {exc}", gr.skip(), None
        n_heads_out = int(result.weights.shape[0])
        return (
            heat,
            trace_rows(result.trace),
            lab_notice(cfg, result),
            gr.Slider(maximum=max(n_heads_out - 1, 1), value=min(max(head_i, 0), n_heads_out - 1),
                      interactive=n_heads_out > 1),
            result,
        )

    @staticmethod
    def steps_update(result: Any, head: float) -> Any:
        """UI: the step-by-step view of one head of the last lab result (nothing recomputed)."""
        if result is None:
            return gr.skip()
        try:
            return steps_figure(result, head)
        except ValueError as exc:
            gr.Warning(str(exc))
            return gr.skip()

    def attention_api(
        self,
        text: str = DEFAULT_SENTENCE,
        emb_dim: float = 32,
        n_heads: Any = 4,
        n_kv_heads: Any = 4,
        dropout: float = 0.0,
        seed: float = 0,
        causal: bool = False,
        multi_head: bool = True,
    ) -> Any:
        """API /attention: slider values -> the per-head heatmap figure (gr.Error on bad values)."""
        try:
            cfg = lab_config(text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head)
            return lab_figure(cfg, run_lab(cfg))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid settings") from None

    # -- Chat ---------------------------------------------------------------------------------

    def status_tick(self, user_stats: str) -> tuple[str, Any, Any]:
        """Timer: the status line (and the layer slider once the model is there); stops when loading is over."""
        line = self.status_markdown(user_stats)
        done = self.model.ready or self.model.error is not None
        return line, gr.Timer(active=not done), self.layer_slider()

    def status_markdown(self, user_stats: str = "") -> str:
        """The status line: the model's state, plus this user's last-reply stats once it is ready."""
        line = self.model.status()
        return f"{line} · {user_stats}" if user_stats and self.model.ready else line

    def preview(self, text: str) -> Any:
        """Tokenization preview of the message being typed (kept when the box is cleared by Send)."""
        if not text:
            return gr.skip()
        try:
            return token_preview_html(self.model.lm, text)
        except ValueError as exc:
            return f"<div class='token-preview'><span class='meta'>{html.escape(str(exc))}</span></div>"

    def _check_message(self, message: str) -> str:
        message = (message or "").strip()
        if not message:
            raise ValueError("Type a message first: an empty message has nothing to answer.")
        limit = self.settings.max_input_tokens * CHARS_PER_TOKEN_LIMIT
        if len(message) > limit:
            raise ValueError(
                f"That message is {len(message):,} characters long; the model reads at most "
                f"{self.settings.max_input_tokens} tokens (about {limit:,} characters). Please shorten it."
            )
        return message

    def user_turn(self, message: str, history: list[Any], request: gr.Request) -> tuple[Any, Any, Any, bool]:
        """Send: validate, append the user turn, clear the box. Returns (box, history, preview, go).

        Refused (gr.Warning, text kept) while this session's previous reply is still being written.
        """
        if not self.model.ready:
            gr.Warning(self.model.not_ready_message(), title="Model loading")
            return gr.skip(), gr.skip(), gr.skip(), False
        try:
            text = self._check_message(message)
        except ValueError as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip(), gr.skip(), False
        if self.stops.begin(_session(request)) is None:
            gr.Warning(BUSY_MESSAGE)  # the typed text stays in the box
            return gr.skip(), gr.skip(), gr.skip(), False
        history = list(history or []) + [{"role": "user", "content": text}]
        return "", history, token_preview_html(self.model.lm, text, sent=True), True

    def bot_turn(
        self,
        go: bool,
        history: list[Any],
        system: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: Any,
        request: gr.Request,
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Stream the assistant's reply to the last user turn into the chatbot."""
        if not go:
            return
        key = _session(request)
        try:
            yield from self._bot_turn(history, system, max_new_tokens, temperature, top_p, top_k,
                                      repetition_penalty, seed, key)
        finally:
            self.stops.done(key, self.stops.current(key))

    def _bot_turn(self, history, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                  key: str) -> Iterator[tuple[Any, Any, Any]]:
        if not history:
            return
        turns = model_history(history)
        if not turns or turns[-1]["role"] != "user":
            return
        lm = self.model.lm
        if lm is None:
            gr.Warning(self.model.not_ready_message(), title="Model loading")
            return
        try:
            params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except ValueError as exc:
            gr.Warning(str(exc), title="Invalid sampling settings")
            return
        stop = self.stops.current(key)  # registered by user_turn / retry; Stop sets it
        stats = ReplyStats()
        history = list(history)
        reply_at = len(history)
        try:
            gen = stream_reply(
                lm,
                turns[-1]["content"],
                turns[:-1],
                system=(system or "").strip() or None,
                params=params,
                max_input_tokens=self.settings.max_input_tokens,
                stats=stats,
                stop_event=stop,
            )
            try:
                for text in gen:
                    history[reply_at:] = [{"role": "assistant", "content": text}]
                    yield history, gr.skip(), gr.skip()
            finally:
                gen.close()  # stops the worker thread within one token
        except (ValueError, RuntimeError) as exc:  # bad input / generation failed: say so, keep the worker
            gr.Warning(str(exc), title="No reply")
            return
        finally:
            self.stops.done(key, stop)
        if reply_at == len(history):
            note = "stopped before the first token" if stats.stopped_by == "stopped" else "no text generated"
            history.append({"role": "assistant", "content": f"*({note})*"})
        user_stats = stats_line(stats)
        yield history, self.status_markdown(user_stats), user_stats

    def stop(self, request: gr.Request) -> None:
        """Stop button: halt this session's generation at the next token (cancels= does the rest)."""
        self.stops.stop(_session(request))

    def retry(self, history: list[Any], request: gr.Request) -> tuple[Any, bool]:
        """Drop the last reply so the last user turn is answered again (refused while one is written)."""
        if self.stops.begin(_session(request)) is None:
            gr.Warning(BUSY_MESSAGE)
            return gr.skip(), False
        history = list(history or [])
        while history and _role(history[-1]) == "assistant":
            history.pop()
        if not history:
            gr.Warning("Nothing to retry yet.")
            return history, False
        return history, True

    @staticmethod
    def undo(history: list[Any]) -> tuple[list[Any], Any]:
        """Remove the last exchange and put the user's message back in the box."""
        history = list(history or [])
        while history and _role(history[-1]) == "assistant":
            history.pop()
        if not history:
            return history, gr.skip()
        last = history.pop()
        return history, _content_text(last.get("content") if isinstance(last, dict) else last.content)

    def chat_api(
        self,
        message: str,
        system: str = "",
        max_new_tokens: int = DEFAULT_PARAMS.max_new_tokens,
        temperature: float = DEFAULT_PARAMS.temperature,
        top_p: float = DEFAULT_PARAMS.top_p,
        top_k: int = DEFAULT_PARAMS.top_k,
        repetition_penalty: float = DEFAULT_PARAMS.repetition_penalty,
        seed: int = -1,
    ) -> Iterator[str]:
        """API /chat: one message (plus optional system prompt and sampling settings) -> the reply.

        Streams the growing reply; `client.predict` returns the final one. A cancelled job closes
        this generator, which stops the worker at the next token. seed < 0 means a random seed;
        max_new_tokens is capped like the UI's slider. Errors (model loading, empty or oversized
        message, bad sampling values) come back as a gr.Error with the reason.
        """
        lm = self.model.require()
        try:
            text = self._check_message(message)
            if _as_int(max_new_tokens, "max new tokens") > MAX_NEW_TOKENS:
                raise ValueError(f"max new tokens must be at most {MAX_NEW_TOKENS} (the chat's limit), "
                                 f"got {max_new_tokens!r}")
            params = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
            gen = stream_reply(lm, text, (), system=(system or "").strip() or None, params=params,
                               max_input_tokens=self.settings.max_input_tokens)
            reply = None
            try:  # closing this generator (a cancelled job) closes stream_reply's, which ends its worker
                for reply in gen:
                    yield reply
            finally:
                gen.close()
            if reply is None:
                yield ""  # nothing generated: the result is still a string
        except (ValueError, RuntimeError) as exc:
            raise gr.Error(str(exc)) from None

    # -- Inside the chat model (issue 5) -------------------------------------------------------

    def _map(self, text: str, layer: Any, hide_special: bool, history: list[Any] | None = None) -> Any:
        lm = self.model.require()
        text = (text or "").strip() or last_exchange(history or [])
        if not text:
            raise ValueError("Type a text (or chat first): there is nothing to run the model on.")
        return model_attention(lm, text, layer=_as_int(layer, "layer"), hide_special=bool(hide_special))

    @staticmethod
    def _map_figures(att: Any, head: Any) -> tuple[Any, Any, int]:
        title = f"{att.model_id} · layer {att.layer} ({att.layer_kind})"
        # Colour scale up to the largest weight shown: with <bos> hidden, rows keep only part of their
        # mass and a fixed 0..1 scale would leave the maps nearly black.
        grid = plot_heads(att.weights, att.tokens, title=title, kv_groups=list(att.kv_groups), vmax=None)
        h = min(max(_as_int(head, "head"), 0), att.n_heads - 1)
        big = plot_head(att.weights[h], att.tokens, title=f"head {h} · reads KV head {att.kv_groups[h]}", vmax=None)
        return grid, big, h

    def inspect_update(self, text: str, layer: Any, head: Any, hide_special: bool, history: list[Any]):
        """UI: the model's attention for one layer: all heads, one large, notes. Errors -> gr.Warning."""
        try:
            att = self._map(text, layer, hide_special, history)
            grid, big, h = self._map_figures(att, head)
        except (ValueError, gr.Error) as exc:
            gr.Warning(getattr(exc, "message", None) or str(exc), title="Cannot show the attention")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        notes = f"**{att.describe()}.** {html.escape(att.notice)}".strip()  # "<bos>" is not markup
        share = ", ".join(
            f"heads {', '.join(str(q) for q, g in enumerate(att.kv_groups) if g == kv)} share KV head {kv}"
            for kv in sorted(set(att.kv_groups))
        )
        notes += f"  \nGrouped-query attention: {share}."
        return grid, big, notes, gr.Slider(maximum=max(att.n_heads - 1, 1), value=h)

    def model_attention_api(self, text: str, layer: Any = 0, hide_special: bool = True) -> Any:
        """API /model_attention: the chat model's attention grid for `text` at `layer` (gr.Error on bad input)."""
        try:
            att = self._map(text, layer, hide_special)
            return self._map_figures(att, 0)[0]
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def layer_slider(self) -> Any:
        """Layer slider fitted to the loaded model (unchanged while it loads)."""
        if self.model.lm is None:
            return gr.skip()
        info = model_layers(self.model.lm)
        kinds = info["layer_kinds"]
        glob = [str(i) for i, k in enumerate(kinds) if k == "global"]
        return gr.Slider(maximum=info["n_layers"] - 1,
                         info=f"{info['n_layers']} layers; global ones: {', '.join(glob) or 'none'}, "
                         f"the others use a sliding window of {info['window']} tokens" if info["window"]
                         else f"{info['n_layers']} layers")

    def _next_token(self, prompt: str, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any,
                    k: int = 10) -> Any:
        lm = self.model.require()
        if not (prompt or "").strip():
            raise ValueError("Type a text whose next token you want to see.")
        params = sampling_params(1, temperature, top_p, top_k, repetition_penalty, -1)
        return next_token_candidates(lm, prompt, params, k=k)

    def next_token_update(self, prompt: str, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any):
        """UI: next-token table for the chat tab's current sampling settings."""
        try:
            nt = self._next_token(prompt, temperature, top_p, top_k, repetition_penalty)
        except (ValueError, gr.Error) as exc:
            gr.Warning(getattr(exc, "message", None) or str(exc), title="Next token")
            return gr.skip(), gr.skip()
        head = (f"**temperature {nt.temperature:g} · top-p {nt.top_p:g} · top-k {nt.top_k or 'off'} · "
                f"repetition penalty {nt.repetition_penalty:g}** ({nt.prompt_tokens} prompt tokens).")
        return next_token_table(nt), f"{head} {html.escape(nt.notice)}".strip()

    def next_token_api(
        self,
        prompt: str,
        temperature: float = DEFAULT_PARAMS.temperature,
        top_p: float = DEFAULT_PARAMS.top_p,
        top_k: int = DEFAULT_PARAMS.top_k,
        repetition_penalty: float = DEFAULT_PARAMS.repetition_penalty,
        k: int = 10,
    ) -> list[dict]:
        """API /next_token: the k most likely next tokens, each {token, token_id, prob, prob_temperature,
        sampling_prob, removed_by} (removed_by: null, "top_k", "top_p" or "greedy")."""
        try:
            nt = self._next_token(prompt, temperature, top_p, top_k, repetition_penalty, k=_as_int(k, "k"))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return [dict(token=c.token, token_id=c.token_id, prob=c.prob, prob_temperature=c.prob_temperature,
                     sampling_prob=c.sampling_prob, removed_by=c.removed_by) for c in nt.candidates]

    def quant_update(self, prompt: str, progress: gr.Progress = gr.Progress()):
        """UI: 4-bit beside full precision (loads the full-precision copy on first use)."""
        try:
            lm4 = self.model.require()
            if not (prompt or "").strip():
                raise ValueError("Type a text to compare the two models on.")
            if not self.full_precision.loaded():
                progress(0.1, desc="Loading the full-precision model (first time only) …")
            full = self.full_precision.get(self.settings)
            progress(0.8, desc="Running both models …")
            cmp = compare_quantization(lm4, full, prompt)
        except (ValueError, gr.Error) as exc:
            gr.Warning(getattr(exc, "message", None) or str(exc), title="What 4-bit costs")
            return gr.skip(), gr.skip()
        rows = [[repr(r.token)[1:-1], _pct(r.prob_4bit), _pct(r.prob_full), str(r.rank_4bit), str(r.rank_full)]
                for r in cmp.rows]
        return quant_markdown(cmp), rows

    def model_status_api(self) -> dict:
        """API /model_status: {"ready", "error", "summary", "generating"} (tests and benchmarks poll it).

        generating: live generation worker threads (all users), so a client can see Stop or a
        cancelled job really free the worker.
        """
        lm = self.model.lm
        return {"ready": lm is not None, "error": self.model.error, "summary": lm.summary() if lm else None,
                "generating": live_generations()}


def live_generations() -> int:
    """How many generation worker threads are running right now (every user's and API call's)."""
    return sum(t.name == WORKER_THREAD_NAME and t.is_alive() for t in threading.enumerate())


def _typed(fn: Callable) -> Callable:
    """`fn` with its string annotations evaluated: gr.api reads the return type from the raw
    signature, and `from __future__ import annotations` would leave it as the string "str".

    A generator stays a generator (gradio streams it and closes it on cancel); its return type is
    what each step yields (Iterator[str] -> str)."""
    sig = inspect.signature(fn, eval_str=True)
    if inspect.isgeneratorfunction(fn):
        (item,) = typing.get_args(sig.return_annotation)

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            yield from fn(*args, **kwargs)

        stream.__signature__ = sig.replace(return_annotation=item)  # type: ignore[attr-defined]
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__signature__ = sig  # type: ignore[attr-defined]
    return call


BUSY_MESSAGE = "A reply is still being written: wait for it or press Stop"


def _session(request: Any) -> str:
    """The browser session's key for per-user state (stop events)."""
    return getattr(request, "session_hash", None) or str(id(request))


def fill_inspect(current: str, auto: str, history: list[Any]) -> tuple[Any, Any]:
    """After a reply: the model-attention text becomes the last exchange unless the user typed it.

    Replaced only when it is empty, the untouched default or what this function filled in last.
    Returns (text box, new auto-filled value).
    """
    exchange = last_exchange(history)
    if not exchange or (current or "").strip() not in ("", DEFAULT_INSPECT_TEXT, (auto or "").strip()):
        return gr.skip(), gr.skip()
    return exchange, exchange


def _role(msg: Any) -> str | None:
    return msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)


# ---------------------------------------------------------------------------------------------
# Layout


INTRO = """
# Attention Lab
Build **self-attention** from sliders and watch what every head does, then chat with a **4-bit
quantized** language model. *Attention Lab* turns your sentence into toy embeddings and runs a real
PyTorch attention module on them: each heatmap is one head; **row = the token that is looking
(query), column = the token it looks at (key)**, and every row sums to 1. *4-bit Chat* talks to
a small LM whose weights are stored as 4-bit NF4 codes.
"""

STEPS_HELP = """
**QKᵀ**: raw similarity of every query with every key. **÷ √d_k**: scaled so the softmax does not
saturate as heads get wider. **mask**: blocked cells (causal: the future) become −∞.
**softmax**: each row turns into weights that sum to 1, the heatmap above.
"""

INSIDE_HELP = """
## Inside the chat model
The same mechanism inside the real 4-bit language model. Its attention is computed by **this
project's own attention code**, plugged into the model: pick a layer and see every head at once,
and one head large. Gemma 3 mixes *sliding-window* layers (each token sees only recent tokens) with
*global* ones, and several query heads share one key/value head (grouped-query attention).
"""

INSIDE_READ = """
**How to read it.** Row = the token that is looking, column = the token it looks at. Grey cells
are masked: a language model never looks at the future (causal), and in a sliding-window layer
not further back than the window. Much of each row usually goes to the first token (`<bos>`),
a "resting place" for heads with nothing better to do; it is hidden by default, and the note above
says how much of each row it takes.
"""

QUANT_HELP = """
### What 4-bit costs
The 4-bit model beside a full-precision copy of the same model: memory, speed, and how much the
next-token distribution moves (KL divergence).
"""

LAB_HELP = """
**Try:** switch on the *causal mask* (a token may only look back), change the *seed* (new random
projections → new patterns), lower *n_kv_heads* (grouped-query attention: query heads share keys and
values), or raise *dropout* (training-time noise). `d_k = emb_dim / n_heads` is the size of each head.
"""


def build_demo(settings: Settings | None = None, *, load_model_now: bool = False) -> gr.Blocks:
    """Build the two-tab Blocks. With load_model_now, start loading the chat model in the background."""
    state = LabApp(settings)
    if load_model_now:
        state.model.start()
    heads0 = valid_head_counts(32)

    with gr.Blocks(title=TITLE) as demo:
        demo.lab_app = state  # for tests and main(); gradio ignores extra attributes
        gr.Markdown(INTRO)
        status = gr.Markdown(state.status_markdown(), elem_id="status-line")
        user_stats = gr.State("")
        timer = gr.Timer(1.0)

        with gr.Tab("Attention Lab", id="lab"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    text = gr.Textbox(
                        DEFAULT_SENTENCE, label="Sentence (its tokens label the axes)", max_lines=2,
                        info="Press Enter to redraw. At most 32 tokens.", elem_id="lab-text",
                    )
                    multi_head = gr.Radio(
                        [("Multi-head", True), ("Single head", False)], value=True, label="Module"
                    )
                    emb_dim = gr.Slider(4, 128, value=32, step=4, label="emb_dim (embedding size)",
                                        elem_id="emb-dim")
                    n_heads = gr.Dropdown(
                        heads0, value=4, label="n_heads", info="Only divisors of emb_dim are offered.",
                        elem_id="n-heads", allow_custom_value=True,  # API callers may send any int
                    )
                    n_kv_heads = gr.Slider(
                        1, 16, value=4, step=1, label="n_kv_heads (grouped-query)", elem_id="n-kv-heads",
                        info="Must divide n_heads; = n_heads is classic multi-head attention.",
                    )
                    dropout = gr.Slider(0.0, 0.5, value=0.0, step=0.05, label="dropout on the weights")
                    seed = gr.Slider(0, 100, value=0, step=1, label="seed (random projections)",
                                     elem_id="lab-seed")
                    causal = gr.Checkbox(False, label="Causal mask (look back only)", elem_id="causal")
                with gr.Column(scale=3):
                    gr.Markdown("### Attention weights, one heatmap per head")
                    heatmaps = gr.Plot(show_label=False, format="png", elem_id="lab-heatmaps")
                    lab_msg = gr.Markdown("", elem_id="lab-message")
                    gr.Markdown(LAB_HELP)
            gr.Markdown("### One head, step by step")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    head = gr.Slider(0, 3, value=0, step=1, label="Head to explain", elem_id="lab-head")
                    gr.Markdown(STEPS_HELP)
                with gr.Column(scale=3):
                    steps = gr.Plot(show_label=False, format="png", elem_id="lab-steps")
            with gr.Accordion("Debug trace: the shape of every intermediate", open=True):
                trace = gr.Dataframe(
                    headers=["step", "shape", "what it is"], show_label=False,
                    interactive=False, wrap=True, elem_id="lab-trace", column_widths=["15%", "25%", "60%"],
                )

            gr.Markdown(INSIDE_HELP, elem_id="inside-title")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    inspect_text = gr.Textbox(DEFAULT_INSPECT_TEXT, label="Text (empty = the last chat exchange)",
                                              lines=3, max_lines=6, elem_id="inspect-text")
                    use_chat = gr.Button("Use the last chat exchange", size="sm", elem_id="use-chat-btn")
                    layer = gr.Slider(0, 17, value=0, step=1, label="Layer", elem_id="inspect-layer")
                    inspect_head = gr.Slider(0, 3, value=0, step=1, label="Head shown large",
                                             elem_id="inspect-head")
                    hide_special = gr.Checkbox(True, label="Hide special tokens such as <bos>")
                    show_map = gr.Button("Show the model's attention", variant="primary", elem_id="inspect-btn")
                with gr.Column(scale=3):
                    inspect_notes = gr.Markdown("Press *Show the model's attention* once the model has loaded.",
                                                elem_id="inspect-notes")
                    inspect_grid = gr.Plot(show_label=False, format="png", elem_id="inspect-grid")
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3):
                            inspect_big = gr.Plot(show_label=False, format="png", elem_id="inspect-big")
                        with gr.Column(scale=2):
                            gr.Markdown(INSIDE_READ)
            gr.Markdown(QUANT_HELP)
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    quant_prompt = gr.Textbox(DEFAULT_NEXT_PROMPT, label="Prompt", elem_id="quant-prompt")
                    quant_btn = gr.Button("Compare 4-bit with full precision", elem_id="quant-btn")
                with gr.Column(scale=3):
                    quant_md = gr.Markdown("The full-precision copy loads on the first click (it takes a while).",
                                           elem_id="quant-summary")
                    quant_table = gr.Dataframe(headers=["token", "4-bit p", "full p", "4-bit rank", "full rank"],
                                               show_label=False, interactive=False, elem_id="quant-table")

        with gr.Tab("4-bit Chat", id="chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        label="Chat", height=430, elem_id="chatbot", buttons=["copy"],
                        placeholder="The model is a small *base* model: it continues text more than it "
                        "follows instructions. Short questions work best.",
                    )
                    with gr.Row():
                        msg = gr.Textbox(
                            placeholder="Type a message and press Enter", show_label=False, scale=5,
                            lines=1, max_lines=6, elem_id="chat-input", autofocus=False,
                        )
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
                    with gr.Row():
                        stop = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
                        retry = gr.Button("↻ Retry", elem_id="retry-btn")
                        undo = gr.Button("↩ Undo", elem_id="undo-btn")
                        clear = gr.Button("✕ Clear", elem_id="clear-btn")
                    gr.Examples(EXAMPLE_PROMPTS, inputs=[msg], label="Try one of these")
                    tokens = gr.HTML(token_preview_html(None, ""), label="Tokenization", elem_id="token-preview")
                    with gr.Accordion("What comes next? Next-token probabilities under these sliders", open=True):
                        with gr.Row():
                            next_prompt = gr.Textbox(DEFAULT_NEXT_PROMPT, show_label=False, scale=4,
                                                     elem_id="next-prompt")
                            next_btn = gr.Button("Show", scale=1, elem_id="next-btn")
                        next_md = gr.Markdown("Press *Show*, then move temperature, top-p or top-k: "
                                              "the table follows.", elem_id="next-notes")
                        next_table = gr.Dataframe(
                            headers=["token", "model p", "after temperature", "chance to be drawn", "status"],
                            show_label=False, interactive=False, elem_id="next-table",
                        )
                with gr.Column(scale=1, min_width=280):
                    system = gr.Textbox(label="System prompt", placeholder="optional", lines=2)
                    temperature = gr.Slider(0.0, 2.0, value=DEFAULT_PARAMS.temperature, step=0.05,
                                            label="temperature", info="0 = always the most likely token",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=DEFAULT_PARAMS.top_p, step=0.05, label="top-p", elem_id="top-p")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_PARAMS.max_new_tokens, step=1,
                                        label="max new tokens", elem_id="max-new")
                    top_k = gr.Slider(0, 200, value=DEFAULT_PARAMS.top_k, step=1, label="top-k (0 = off)", elem_id="top-k")
                    rep = gr.Slider(1.0, 2.0, value=DEFAULT_PARAMS.repetition_penalty, step=0.05,
                                    label="repetition penalty")
                    seed_chat = gr.Number(-1, precision=0, label="seed (-1 = random)", elem_id="chat-seed")
        go = gr.State(False)
        inspect_auto = gr.State("")  # the last exchange fill_inspect put in the model-attention box
        lab_result = gr.State(None)  # this user's last LabResult, for the step-by-step view

        # -- wiring: Attention Lab ----------------------------------------------------------
        # Its own concurrency group with more slots than the chat has: never stuck behind a reply.
        lab_kw = dict(concurrency_id=LAB_GROUP, concurrency_limit=LAB_CONCURRENCY)
        lab_inputs = [text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head]
        redraw = dict(fn=state.lab_update, inputs=[*lab_inputs, head],
                      outputs=[heatmaps, trace, lab_msg, head, lab_result], show_progress="minimal", **lab_kw)
        explain = dict(fn=state.steps_update, inputs=[lab_result, head], outputs=[steps], show_progress="minimal",
                       api_visibility="private", **lab_kw)
        gr.on([text.submit, dropout.release, seed.release, n_kv_heads.release, causal.input,
               multi_head.input, n_heads.input], **redraw, api_name="lab_update",
              api_visibility="undocumented").then(**explain)
        # Handlers that may call gr.Warning go through the queue: toasts travel on its event stream.
        emb_dim.release(state.head_choices, [emb_dim, n_heads], [n_heads], show_progress="hidden",
                        api_visibility="private", **lab_kw).then(**redraw, api_visibility="private").then(**explain)
        head.release(**explain)
        demo.load(**redraw, api_visibility="private").then(**explain)
        gr.on([], state.attention_api, inputs=lab_inputs, outputs=[heatmaps], api_name="attention", **lab_kw)

        # -- wiring: chat ---------------------------------------------------------------------
        private = dict(api_visibility="private")
        sampling = [system, max_new, temperature, top_p, top_k, rep, seed_chat]
        bot = dict(fn=state.bot_turn, inputs=[go, chatbot, *sampling], outputs=[chatbot, status, user_stats],
                   show_progress="minimal", concurrency_id=CHAT_GROUP,
                   concurrency_limit=state.settings.chat_concurrency, **private)
        sent = gr.on([msg.submit, send.click], state.user_turn, [msg, chatbot], [msg, chatbot, tokens, go],
                     show_progress="hidden", **lab_kw, **private).then(**bot)
        retried = retry.click(state.retry, [chatbot], [chatbot, go], show_progress="hidden",
                              **lab_kw, **private).then(**bot)
        # (sent/retried stay the bot events: they are what Stop cancels.) A finished reply becomes
        # the model-attention text unless the user typed their own there.
        for chain in (sent, retried):
            chain.then(fill_inspect, [inspect_text, inspect_auto, chatbot], [inspect_text, inspect_auto],
                       queue=False, show_progress="hidden", **private)
        # Stop sets this session's stop event at once (queue=False: not behind anything) and cancels.
        stop.click(state.stop, None, None, queue=False, cancels=[sent, retried], **private)
        # Undo and Clear cancel the reply too: set the stop event so its worker ends (and a reply
        # cancelled while still queued does not leave this session marked as generating).
        gr.on([undo.click, clear.click], state.stop, None, None, queue=False, **private)
        undo.click(state.undo, [chatbot], [chatbot, msg], queue=False, cancels=[sent, retried], **private)
        clear.click(lambda: ([], ""), None, [chatbot, user_stats], queue=False, cancels=[sent, retried],
                    **private)
        msg.change(state.preview, [msg], [tokens], queue=False, trigger_mode="always_last",
                   show_progress="hidden", **private)
        # On page load too: the Markdown's initial value is frozen at build time ("Loading ...").
        gr.on([demo.load, timer.tick], state.status_tick, [user_stats], [status, timer, layer], queue=False,
              show_progress="hidden", **private)

        # -- wiring: inside the chat model (forward passes of the shared model, bounded) ----------
        inspect_kw = dict(concurrency_id=INSPECT_GROUP, concurrency_limit=INSPECT_CONCURRENCY)
        show = dict(fn=state.inspect_update, inputs=[inspect_text, layer, inspect_head, hide_special, chatbot],
                    outputs=[inspect_grid, inspect_big, inspect_notes, inspect_head], **inspect_kw, **private)
        gr.on([show_map.click, inspect_text.submit, layer.release, inspect_head.release, hide_special.input], **show)
        use_chat.click(last_exchange, [chatbot], [inspect_text], queue=False, **private).then(**show)
        # The API takes the layer as a plain integer (a hidden Number has no maximum): the slider's
        # bound is frozen at build time, before the model says how many layers it has, and gradio
        # validates API inputs against it. model_attention does the range check for the real model.
        api_layer = gr.Number(0, visible=False, label="layer")  # no precision: 2.5 is refused, not rounded
        gr.on([], state.model_attention_api, inputs=[inspect_text, api_layer, hide_special], outputs=[inspect_grid],
              api_name="model_attention", **inspect_kw)
        gr.on([next_btn.click, next_prompt.submit, temperature.release, top_p.release, top_k.release, rep.release],
              state.next_token_update, [next_prompt, temperature, top_p, top_k, rep], [next_table, next_md],
              show_progress="minimal", trigger_mode="always_last", **inspect_kw, **private)
        gr.api(_typed(state.next_token_api), api_name="next_token", **inspect_kw)
        quant_btn.click(state.quant_update, [quant_prompt], [quant_md, quant_table], **inspect_kw, **private)

        gr.api(_typed(state.chat_api), api_name="chat", concurrency_id=CHAT_GROUP,
               concurrency_limit=state.settings.chat_concurrency)
        gr.api(_typed(state.model_status_api), api_name="model_status", queue=False)
    return demo


def main() -> int:
    """`python app.py`: start loading the model in the background and serve (blocks)."""
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
    demo.launch(
        server_name=settings.server_name,
        server_port=settings.server_port,
        share=False,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        prevent_thread_lock=True,
        quiet=True,
    )
    print(f"Attention Lab is serving on http://{settings.server_name}:{settings.server_port}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
