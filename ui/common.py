"""What every view uses: theme and CSS, the background model slot, widget-value parsing, API typing.

Concurrency groups live here too: each view's events name the group whose slots they take, and
the groups are what keeps a chat from starving the Attention Lab.
"""

from __future__ import annotations

import atexit
import base64
import functools
import inspect
import math
import os
import re
import reprlib
import shutil
import tempfile
import threading
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Before gradio is imported: gradio reads it at import time. The app must make no internet calls.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from attention.palette import Palette, palette_named  # noqa: E402
from attention.plot import figure_bytes  # noqa: E402
from generation import LoadedModel, Settings, load_model  # noqa: E402

TITLE = "Attention Lab"

# Lab events are cheap (T <= 32 toy tensors) and must never queue behind a chat, so they get
# their own concurrency group with more slots than generation has.
LAB_CONCURRENCY = 4
LAB_GROUP = "lab"
CHAT_GROUP = "chat"
# Forward passes of the shared model for the "inside the chat model" views: bounded apart from chats.
INSPECT_GROUP = "inspect"
INSPECT_CONCURRENCY = 2

LAB_EVENTS = dict(concurrency_id=LAB_GROUP, concurrency_limit=LAB_CONCURRENCY)
INSPECT_EVENTS = dict(concurrency_id=INSPECT_GROUP, concurrency_limit=INSPECT_CONCURRENCY)
PRIVATE = dict(api_visibility="private")
# Events that draw a view from the widgets' values. A trigger while the last drawing is still
# running is run after it: gradio's default for most events drops it, which leaves a picture that
# no longer matches the widgets (a student moves a second slider while a busy server draws the first).
REDRAW = dict(trigger_mode="always_last")

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


# gradio's queue looks for new work every 1 ms while it is idle, and for progress every 10 ms: on a
# 2-core machine those wake-ups keep taking a core from the chat engine's parallel regions (figures
# in bench/README.md). A job that starts up to 10 ms later is not seen by anyone; progress shown 10
# times a second is smooth.
QUEUE_POLL_S = 0.01
QUEUE_PROGRESS_POLL_S = 0.1
# After every finished event gradio rebuilds a pandas summary of the last 10,000 events for its
# /monitoring page (a few ms of the GIL each, growing over a class's hour); every hundredth event is
# often enough for a dashboard.
QUEUE_ANALYTICS_EVERY = 100

# gradio keeps a server-side state for every session it has seen (each page load and each API
# client is one): a copy of every component's config plus the last value of each input and output,
# figures included, until `state_session_capacity` sessions (gradio's default: 10,000) push out the
# least recently used. Closed tabs are never dropped before that, so a day of classes would keep
# thousands. This cap keeps memory bounded; a class of 30-60 students, each reloading now and then,
# stays far below it, and only the longest-idle sessions are evicted (an evicted tab that comes back
# starts with its gr.State values reset; its chat history lives in the browser and is kept).
SESSION_CAPACITY = 256

def tune_queue(demo: gr.Blocks) -> list[str]:
    """Set the queue's polling and monitoring intervals above (after `demo.queue()`); the names
    of the settings this gradio version lacks (the tests check that none is missing)."""
    queue = demo._queue
    wanted = {"sleep_when_free": QUEUE_POLL_S, "progress_update_sleep_when_free": QUEUE_PROGRESS_POLL_S,
              "ANAYLTICS_CACHE_FREQUENCY": QUEUE_ANALYTICS_EVERY}  # (gradio's spelling)
    missing = [name for name in wanted if not hasattr(queue, name)]
    for name, value in wanted.items():
        if name not in missing:
            setattr(queue, name, value)
    return missing


def written_back(widget: type[gr.components.Component], value: Any, moved: bool, **props: Any) -> Any:
    """The update of a widget that is also its event's input: `props`, and `value` only where the
    handler had to move it (out of the model's range). A drawing still running when the student
    changes the widget must not put the old value back."""
    return widget(**props, value=value) if moved else widget(**props)


def dot(colour: str) -> str:
    """A coloured status dot as HTML."""
    # A coloured status dot that needs no emoji font (projectors and CI browsers often lack one).
    return f"<span style='color:{colour}'>●</span>"


@dataclass
class ModelSlot:
    """One model loaded at most once in a background thread and then shared read-only."""

    settings: Settings
    load_4bit: bool = True
    # Lazy: nothing loads at start; the first `require()` starts loading (a chat served by a remote
    # server needs local weights only for the inside-the-model views).
    lazy: bool = False
    lm: LoadedModel | None = None
    error: str | None = None
    started_at: float | None = None
    # Set when the local chat engine's loop owns the main thread (`python app.py`): the views then
    # run the model on one thread each, so that they do not slow every chat (see require()).
    views_one_thread: bool = False
    stage: str = ""  # where loading is (generation.model's LoadProgress), for the status line
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
            self.lm = load_model(self.settings.model_id, load_4bit=self.load_4bit, settings=self.settings,
                                 progress=self._at_stage)
        except Exception as exc:  # any failure must become a message in the UI, not a dead thread
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            print(f"Model failed to load: {self.error}", flush=True)
        else:
            print(f"Model ready: {self.lm.summary()}", flush=True)
        finally:
            self._ready.set()

    def _at_stage(self, stage: str) -> None:
        self.stage = stage
        print(f"  {stage}", flush=True)

    @property
    def ready(self) -> bool:
        """True once the model is loaded and usable."""
        return self.lm is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (or failed); True when the model is usable."""
        self._ready.wait(timeout)
        return self.ready

    def require(self) -> LoadedModel:
        """The model, or a gr.Error saying why it is not there (loading, failed, not started).

        With views_one_thread, the calling worker thread computes on one thread from then on
        (generation.decode.one_thread_here): a view's forward takes ~25% longer, the chats
        beside it keep their speed."""
        if self.lm is not None:
            if self.views_one_thread:
                from generation.decode import one_thread_here

                one_thread_here()
            return self.lm
        if self.lazy and self.started_at is None:
            self.start()
        raise gr.Error(self.not_ready_message(), title="Model not ready")

    def not_ready_message(self) -> str:
        """Why the chat model cannot be used yet (failed, not started, or still loading for how long)."""
        if self.error is not None:
            return f"The chat model could not be loaded: {self.error}"
        if self.started_at is None:
            return "The chat model is not loaded (the app was started without loading it)."
        secs = time.perf_counter() - self.started_at
        now = f" Now: {self.stage}." if self.stage else ""
        return (
            f"The {'local ' if self.lazy else 'chat '}model is still loading ({secs:.0f} s so far).{now} A first "
            "start on two CPU cores takes about a minute and a half, a later one seconds. The Attention "
            "Lab works meanwhile."
        )

    def status(self) -> str:
        """One line of markdown for the status bar."""
        if self.lm is not None:
            lm = self.lm
            four = "on (NF4)" if lm.quantization == "nf4" else "off"
            return (
                f"{dot('#16a34a')} **{lm.model_id}** · 4-bit: {four} · device: {lm.device} · "
                f"weights: {lm.weight_bytes / 2**20:.1f} MiB ({lm.weight_bytes:,} bytes)"
            )
        if self.error is not None:
            return f"{dot('#dc2626')} Model failed to load: {self.error}"
        if self.started_at is None:
            if self.lazy:
                return f"{dot('#9ca3af')} local model **{self.settings.model_id}**: loads on first use of the inside views"
            return f"{dot('#9ca3af')} Model not loaded"
        now = f" · {self.stage}" if self.stage else ""
        return (f"{dot('#d97706')} Loading **{self.settings.model_id}** … "
                f"{time.perf_counter() - self.started_at:.0f} s{now}")


# ---------------------------------------------------------------------------------------------
# Values checked by type, and values echoed in error messages
#
# An API client can send anything JSON holds (and a widget's value can be edited in the browser).
# Each check names the input and says what it accepts; a message quotes the refused value only
# cut short and never as markup (gr.Error and gr.Warning render HTML), so a 100,000-character or
# script-bearing value never comes back as a 100 KB message or as live HTML.

QUOTE_CHARS = 40  # a quoted value is cut to about this many characters, then "…"
MESSAGE_CHARS = 400  # any error message, the libraries' too, is cut to this many
# A text input of an endpoint (other than a chat message, capped by its token budget) is at most
# this long: each view reads only its first tokens, and a library's message may quote the text.
API_TEXT_CHARS = 10_000
_LONG_RUN = re.compile(r"\S{61,}")  # a run this long without a space is a value, not words
_BIG_DIGITS = 15  # a longer integer is shown as a power of ten


def _no_markup(text: str) -> str:
    # As a Python literal writes them: unambiguous to read, inert in any HTML that shows it.
    return text.replace("<", "\\x3c").replace(">", "\\x3e")


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message may show it: repr-like, cut to about `limit` characters (then
    "…" and the full length), `<` and `>` escaped, a huge integer as a power of ten."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)  # short whatever the value: 1e+308, nan, inf
    if isinstance(value, int):
        digits = str(abs(value))
        if len(digits) <= _BIG_DIGITS:
            return str(value)
        sign = "-" if value < 0 else ""
        return f"{sign}{digits[0]}.{digits[1:3]}e+{len(digits) - 1} (an integer of {len(digits)} digits)"
    if isinstance(value, str):
        shown = _no_markup(repr(value[:limit]))  # escapes ("\\n", "\\x3c") can lengthen it: cut again
        if len(value) <= limit and len(shown) <= limit + 10:
            return shown
        return f"{shown[:limit + 2]}… ({len(value):,} characters)"
    short = reprlib.Repr()  # containers: the first few items, each cut short
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 2, limit, limit, 2 * _BIG_DIGITS
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    text = _no_markup(short.repr(value))
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "…"


def kind(value: Any) -> str:
    """What a JSON value is, in words: "null", "a boolean", "a number", "text", "a list", "an object"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _got(value: Any) -> str:
    # A string or number speaks for itself; anything else also says what it is ("[1] (a list)").
    shown = quote(value)
    return shown if isinstance(value, (str, int, float)) and not isinstance(value, bool) else f"{shown} ({kind(value)})"


def safe_text(message: str, limit: int = MESSAGE_CHARS) -> str:
    """Any message made safe to show: no markup (`<`, `>` become ‹ ›), each run of more than 60
    characters without a space cut (a value the library quoted in full), at most `limit` characters."""
    text = str(message).replace("<", "‹").replace(">", "›")
    text = _LONG_RUN.sub(lambda m: m[0][:60] + "…", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _range(lo: float | None, hi: float | None, fmt: str) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo:{fmt}}, {hi:{fmt}}]"
    if lo is not None:
        return f" >= {lo:{fmt}}"
    return "" if hi is None else f" <= {hi:{fmt}}"


def as_float(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """A widget or API value -> a finite float (in [lo, hi] when given), or ValueError naming the
    field and what it accepts. Numbers and numeric text are read; a boolean is not a number."""
    what = f"a number{_range(lo, hi, 'g')}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty; it must be {what}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be {what}, got {_got(value)}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {_got(value)}") from None
    # float("1e400") is inf and float("nan") is nan: neither is a setting anyone means.
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {_got(value)}")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise ValueError(f"{name} must be {what}, got {_got(value)}")
    return f


def as_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """A widget or API value -> an int (4.0 is fine, 4.5 is not), in [lo, hi] when given;
    ValueError naming the field and what it accepts otherwise. A boolean is not a number."""
    what = f"an integer{_range(lo, hi, 'd')}"
    if isinstance(value, int) and not isinstance(value, bool):
        i = value  # exact, however long (float() would overflow)
    elif value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty; it must be {what}")
    elif isinstance(value, (float, str)):
        f = as_float(value, name)
        if f != int(f):
            raise ValueError(f"{name} must be a whole number, got {_got(value)}")
        i = int(f)
    else:
        raise ValueError(f"{name} must be {what}, got {_got(value)}")
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        raise ValueError(f"{name} must be {what}, got {_got(value)}")
    return i


def as_bool(value: Any, name: str) -> bool:
    """A widget or API value -> a bool: true or false, or the text "true"/"false" (any case; what
    a client that reads the API info as text sends). Numbers, lists and other text are refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {_got(value)}")


def as_text(value: Any, name: str, *, max_chars: int | None = None, none_ok: bool = False) -> str:
    """A widget or API value -> a string (None -> "" with none_ok), at most `max_chars` long;
    ValueError naming the field otherwise. A number is not text."""
    if value is None and none_ok:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (a string), got {_got(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{name} is {len(value):,} characters long; at most {max_chars:,} are accepted")
    return value


def error_text(exc: BaseException) -> str:
    """The message of a ValueError or gr.Error (gr.Error keeps it in .message), safe to show (safe_text)."""
    return safe_text(getattr(exc, "message", None) or str(exc))


def session_key(request: Any) -> str:
    """The browser session's key for per-user state (stop events)."""
    return getattr(request, "session_hash", None) or str(id(request))


def api_error(exc: Exception) -> gr.Error:
    """The gr.Error an API client gets for `exc`: its message made safe (safe_text) for a gr.Error
    or ValueError (bad input), else a line naming the failure without its details (they go to the
    server's log): never a message-less error, never a traceback."""
    if isinstance(exc, gr.Error):
        return gr.Error(error_text(exc), title=exc.title, print_exception=False)
    if isinstance(exc, ValueError):
        return gr.Error(error_text(exc), title="Invalid input", print_exception=False)
    traceback.print_exception(exc)
    return gr.Error(f"The request failed on the server ({type(exc).__name__}); the server's log has the details.",
                    title="Server error", print_exception=False)


def typed_api(fn: Callable) -> Callable:
    """`fn` as a public endpoint for gr.api: its string annotations evaluated (gr.api reads the
    types from the raw signature, and `from __future__ import annotations` would leave them as
    strings), and every exception turned into a gr.Error with a safe message (api_error).

    A generator stays a generator (gradio streams it and closes it on cancel); its return type is
    what each step yields (Iterator[str] -> str)."""
    sig = inspect.signature(fn, eval_str=True)
    if inspect.isgeneratorfunction(fn):
        (item,) = typing.get_args(sig.return_annotation)

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # GeneratorExit (a cancel) is no Exception: it passes
                raise api_error(exc) from None

        stream.__signature__ = sig.replace(return_annotation=item)  # type: ignore[attr-defined]
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise api_error(exc) from None

    call.__signature__ = sig  # type: ignore[attr-defined]
    return call


class PlotPayload(typing.TypedDict):
    """A figure as gr.Plot sends it to a client (and as the API info describes it)."""

    type: typing.Literal["matplotlib"]
    plot: str  # "data:image/png;base64,..."


def plot_payload(fig: Any) -> PlotPayload:
    """A matplotlib Figure as gr.Plot sends it to a client ({"type": "matplotlib", "plot": a PNG
    data URL}): what a gr.api endpoint returns where a Plot output used to be."""
    data = base64.b64encode(figure_bytes(fig, "png")).decode("ascii")
    return {"type": "matplotlib", "plot": f"data:image/png;base64,{data}"}


# Chat history as text (the chat and the inside view both read it)


def content_text(content: Any) -> str:
    """Chatbot message content (str or list of parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(content_text(c) for c in content)
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
        text = content_text(content)
        if role not in ("user", "assistant"):
            continue
        if role == "user":
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            turns.append({"role": "user", "content": text})
        elif turns and turns[-1]["role"] == "user":
            turns.append({"role": "assistant", "content": text})
    return turns


def last_exchange(history: list[Any]) -> str:
    """The last user message and the reply to it, as one text (for the model-attention view)."""
    turns = model_history(history)
    if turns and turns[-1]["role"] == "assistant":
        return f"{turns[-2]['content']}\n{turns[-1]['content']}" if len(turns) > 1 else turns[-1]["content"]
    return turns[-1]["content"] if turns else ""


def message_role(msg: Any) -> str | None:
    """A chat message's role (dict or ChatMessage)."""
    return msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)


def reply_turn(history: list[Any]) -> tuple[int, str]:
    """The turn a reply to `history` answers: the chat's length up to its last user message, and
    that message's text (replies already written after it do not count). Whitespace does not
    count either: the Chatbot hands a message back to the next step re-indented (gradio passes
    a string message through `inspect.cleandoc`)."""
    n = len(history or [])
    while n and message_role(history[n - 1]) != "user":
        n -= 1
    if not n:
        return 0, ""
    last = history[n - 1]
    text = content_text(last.get("content") if isinstance(last, dict) else getattr(last, "content", ""))
    return n, "".join(text.split())


def pct(p: float) -> str:
    """A probability as a percentage readable at any size (1e-6 too); a token that cannot be drawn
    at all (cut by top-k/top-p) reads 0 %."""
    if p == 0:
        return "0 %"
    return f"{p * 100:.2f} %" if p >= 0.0001 else f"{p * 100:.1e} %"


def palette_of(colourblind: Any) -> Palette:
    """The figures' palette for the colour-blind-safe checkbox's value (anything not true: the default)."""
    return palette_named(colourblind is True)


def palette_checkbox() -> gr.Checkbox:
    """The page's one colour setting: every figure of every view follows it (and a shared link's `colourblind`)."""
    return gr.Checkbox(False, label="Colour-blind-safe colours in every figure (cividis, purple-orange and Okabe-Ito)",
                       elem_id="colourblind", container=False)


# ---------------------------------------------------------------------------------------------
# Files for the download buttons


def download_buttons(prefix: str, kinds: list[tuple[str, str]], alone: bool = False) -> list[gr.DownloadButton]:
    """Small download buttons, (label, suffix) each, disabled until a figure fills them (ready_button).
    alone: a single button in its Row, kept to its label's width (one line) instead of the column's."""
    return [gr.DownloadButton(label, size="sm", interactive=False, elem_id=f"{prefix}-{suffix}",
                              min_width=120 if alone else 80, scale=0 if alone else None) for label, suffix in kinds]


def ready_button(path: str) -> Any:
    """A download button's update: holding `path`, ready to click."""
    return gr.update(value=path, interactive=True)


class DownloadDir:
    """Files for download buttons, in the system's temp dir: gradio serves files from there (it
    copies a returned path into its cache). Every call gets a folder of its own, so two users never
    overwrite each other's files; folders older than `keep_s` are removed on later calls, and the
    whole root when the process exits."""

    def __init__(self, keep_s: float = 600.0) -> None:
        self.keep_s = keep_s
        self._root: str | None = None
        self._lock = threading.Lock()

    def write(self, files: dict[str, bytes | str]) -> list[str]:
        """Write {file name: bytes or text} into a fresh folder; their paths, in order."""
        with self._lock:
            if self._root is None or not os.path.isdir(self._root):
                self._root = tempfile.mkdtemp(prefix="attention-lab-downloads-", dir=tempfile.gettempdir())
                atexit.register(shutil.rmtree, self._root, ignore_errors=True)
            root = self._root
            self._sweep(root)
        folder = tempfile.mkdtemp(dir=root)
        paths = []
        for name, data in files.items():
            path = os.path.join(folder, name)
            if isinstance(data, bytes):
                with open(path, "wb") as f:
                    f.write(data)
            else:
                with open(path, "w", encoding="utf-8", newline="") as f:
                    f.write(data)
            paths.append(path)
        return paths

    def _sweep(self, root: str) -> None:
        cutoff = time.time() - self.keep_s
        for entry in os.scandir(root):
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
