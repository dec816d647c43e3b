"""Inside the chat model: the real model's attention maps per layer and what 4-bit costs.

`build_inside(...)` lays out the view inside the current `gr.Blocks` (it sits under the Attention
Lab); `InsideView.wire(...)` connects it to the chat it reads (the last exchange, the status line),
which `app.py` passes in. `InsideHandlers` holds the handlers, plain methods tests call directly.
"""

from __future__ import annotations

import dataclasses
import html
import re
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.describe import describe_map
from attention.plot import figure_bytes, plot_head, plot_heads, weights_csv
from generation import DEFAULT_MODEL_ID, Settings, load_model
from generation.inside import FullPrecisionCache, compare_quantization, model_attention, model_layers

from .common import (
    API_TEXT_CHARS,
    INSPECT_EVENTS,
    PRIVATE,
    REDRAW,
    ModelSlot,
    PlotPayload,
    as_bool,
    as_int,
    as_text,
    error_text,
    last_exchange,
    palette_of,
    pct,
    plot_payload,
    quote,
    typed_api,
    written_back,
)
from .lens import LENS_FIELDS, LensHandlers, LensView, build_lens
from .share import Field, bool_field, clamp_index, int_field, query_of, read_fields, text_field, warn
from .teaching import TEACHING_FIELDS, TeachingHandlers, TeachingView, build_teaching

DEFAULT_INSPECT_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_QUANT_PROMPT = "The capital of France is"

# The layer maps' inputs in a shared link, in the order of `InsideView.layer_inputs`. The layer's
# range is checked against the loaded model when the map is drawn.
LAYER_FIELDS: tuple[Field, ...] = (
    text_field("inspect_text", DEFAULT_INSPECT_TEXT),
    int_field("layer", 0, 255, default=0),
    int_field("inspect_head", 0, 63, default=0),
    bool_field("hide_special", True),
)
# The whole inside view's (the teaching panels' and the lenses' too), in the order of `InsideView.inputs`.
INSIDE_FIELDS: tuple[Field, ...] = LAYER_FIELDS + TEACHING_FIELDS + LENS_FIELDS

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
The 4-bit model beside a full-precision copy of the same model, and beside the same weights rounded
to NF4 the other way (the chat's model picks each layer's codes and scales for its output,
"calibrated"; bitsandbytes' own rounding, "plain", takes each block's largest value as its scale and
the nearest code): memory, speed, and how much the next-token distribution moves (KL divergence).
"""


def table_text(text: str) -> str:
    """Model-written text as a Markdown table cell shows it literally: HTML and Markdown characters
    escaped, a line break as ↵ (a cell holds one line)."""
    text = html.escape(text, quote=False).replace("\r", "").replace("\n", " ↵ ")
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", text)


def quant_markdown(cmp: Any, twin: Any = None) -> str:
    """4-bit vs full precision (a QuantComparison), and where given the same weights rounded the
    other way (`twin`, compared with the same full-precision copy): bytes, time per token, KL, and
    what each writes next (greedy)."""
    sides = [cmp.quantized] + ([twin.quantized] if twin else []) + [cmp.full]
    head = "| | " + " | ".join(s.label for s in sides) + " |\n|---|" + "---|" * len(sides) + "\n"
    rows = [
        ("weights", [f"{s.weight_bytes / 2**20:.1f} MiB" for s in sides]),
        ("time per token", [f"{s.seconds_per_token * 1000:.0f} ms" for s in sides]),
        (f"prompt ({cmp.prompt_tokens} tokens)", [f"{s.prefill_seconds * 1000:.0f} ms" for s in sides]),
    ]
    if twin:
        rows.append(("KL(full ‖ this)", [f"{cmp.kl_full_to_4bit:.4f}", f"{twin.kl_full_to_4bit:.4f}", "0"]))
    rows.append(("writes next (greedy)", [f"…{table_text(s.continuation)}" for s in sides]))
    table = head + "".join(f"| {name} | " + " | ".join(cells) + " |\n" for name, cells in rows)
    other = (f" · {twin.quantized.label}: KL {twin.kl_full_to_4bit:.4f} nats, most likely token "
             f"{'the same' if twin.top1_agree else 'differs'}") if twin else ""
    return (
        f"{table}\n**KL(full ‖ 4-bit) = {cmp.kl_full_to_4bit:.4f} nats** (the chat's model) · most likely token "
        f"{'the same' if cmp.top1_agree else 'differs'}{other} · the full-precision weights are "
        f"{cmp.size_ratio:.1f}× larger. {cmp.notice}"
    )


def head_summary(att: Any, head: int) -> str:
    """The one line under the layer maps a screen reader reads: where the large head's attention goes."""
    return f"Layer {att.layer}, head {head} {describe_map(att.weights[head], att.hidden_mass[head])}."


def fill_inspect(current: str, auto: str, history: list[Any]) -> tuple[Any, Any]:
    """After a reply: the model-attention text becomes the last exchange unless the user typed it.

    Replaced only when it is empty, the untouched default or what this function filled in last.
    Returns (text box, new auto-filled value).
    """
    exchange = last_exchange(history)
    if not exchange or (current or "").strip() not in ("", DEFAULT_INSPECT_TEXT, (auto or "").strip()):
        return gr.skip(), gr.skip()
    return exchange, exchange


class InsideHandlers:
    """Handlers of the inside view: forward passes of the shared model, plus the full-precision copy."""

    def __init__(self, settings: Settings, model: ModelSlot) -> None:
        self.settings = settings
        self.model = model
        self.full_precision = FullPrecisionCache()  # loaded on the first "What 4-bit costs" click
        # ... and the same weights rounded to NF4 the other way, keyed by rounding
        self.twins = FullPrecisionCache(loader=lambda rounding, load_4bit, settings: load_model(
            DEFAULT_MODEL_ID, load_4bit=True, settings=settings))
        self.teaching = TeachingHandlers(settings, model)  # every layer at once, heads off, while writing
        self.lens = LensHandlers(settings, model, self.full_precision)  # what every layer predicts, head roles
        self.teaching.role_of = self.lens.role_title  # the model view names a head by its role

    def _map(self, text: Any, layer: Any, hide_special: Any, history: list[Any] | None = None) -> Any:
        text = as_text(text, "text", none_ok=True, max_chars=API_TEXT_CHARS)
        layer = as_int(layer, "layer")
        hide_special = as_bool(hide_special, "hide_special")
        lm = self.model.require()
        text = text.strip() or last_exchange(history or [])
        if not text:
            raise ValueError("Type a text (or chat first): there is nothing to run the model on.")
        # The range is the loaded model's (another MODEL_ID has other layers); checked here so
        # that a huge number is quoted short, in the library's words.
        n = model_layers(lm)["n_layers"]
        if not 0 <= layer < n:
            raise ValueError(f"layer {quote(layer)} is out of range: this model has {n} layers, valid 0 to {n - 1}")
        return model_attention(lm, text, layer=layer, hide_special=hide_special)

    @staticmethod
    def _map_figures(att: Any, head: Any, colourblind: Any = False) -> tuple[Any, Any, int]:
        title = f"{att.model_id} · layer {att.layer} ({att.layer_kind})"
        cmap = palette_of(colourblind).cmap
        # Colour scale up to the largest weight shown: with <bos> hidden, rows keep only part of their
        # mass and a fixed 0..1 scale would leave the maps nearly black.
        grid = plot_heads(att.weights, att.tokens, title=title, kv_groups=list(att.kv_groups), vmax=None, cmap=cmap)
        h = min(max(as_int(head, "head"), 0), att.n_heads - 1)
        big = plot_head(att.weights[h], att.tokens, title=f"head {h} · reads KV head {att.kv_groups[h]}", vmax=None,
                        cmap=cmap)
        return grid, big, h

    def inspect_update(self, text: str, layer: Any, head: Any, hide_special: bool, history: list[Any],
                       colourblind: bool = False):
        """UI: the model's attention for one layer: all heads, one large, notes. Errors -> gr.Warning."""
        try:
            att = self._map(text, layer, hide_special, history)
            grid, big, h = self._map_figures(att, head, colourblind)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Cannot show the attention")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        notes = f"**{att.describe()}.** {html.escape(att.notice)}".strip()  # "<bos>" is not markup
        share = ", ".join(
            f"heads {', '.join(str(q) for q, g in enumerate(att.kv_groups) if g == kv)} share KV head {kv}"
            for kv in sorted(set(att.kv_groups))
        )
        notes += f"  \nGrouped-query attention: {share}.  \n{html.escape(head_summary(att, h))}"
        return grid, big, notes, written_back(gr.Slider, h, h != as_int(head, "head"), maximum=max(att.n_heads - 1, 1))

    def inspect_files(self, text: str, layer: Any, head: Any, hide_special: bool, history: list[Any],
                      colourblind: bool = False) -> Any:
        """UI: the layer's figures (every head, the head shown large) as PNG and SVG and that head's
        weights as CSV, made on request (a list of files); bad input -> gr.Warning."""
        try:
            att = self._map(text, layer, hide_special, history)
            grid, big, h = self._map_figures(att, head, colourblind)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Cannot make the files")
            return gr.skip()
        name = f"attention_layer{att.layer}"
        paths = self.teaching.files.write({
            f"{name}_heads.png": figure_bytes(grid, "png"),
            f"{name}_heads.svg": figure_bytes(grid, "svg"),
            f"{name}_head{h}.png": figure_bytes(big, "png"),
            f"{name}_head{h}.svg": figure_bytes(big, "svg"),
            f"{name}_head{h}.csv": weights_csv(att.weights[h], att.tokens, att.tokens),
        })
        return gr.update(value=paths, visible=True)

    def apply_setup(self, request: gr.Request) -> tuple[Any, ...]:
        """Page load: the layer maps' fields from a shared link (or no change), and whether the
        link set any (then the map is drawn at once, if the model is there). A layer or head beyond
        the loaded model's is clamped and named in the warning (while it loads, drawing checks the layer)."""
        values, problems = read_fields(LAYER_FIELDS, query_of(request))
        if self.model.lm is not None:
            info = model_layers(self.model.lm)
            values, clamped_layer = clamp_index(values, "layer", info["n_layers"], "layer")
            values, clamped_head = clamp_index(values, "inspect_head", info["n_heads"], "head")
            problems += clamped_layer + clamped_head
        warn(problems)
        return (*(values.get(f.name, gr.skip()) for f in LAYER_FIELDS), bool(values))

    def show_shared(self, shared: bool, text: str, layer: Any, head: Any, hide_special: bool,
                    history: list[Any], colourblind: bool = False):
        """After a shared link's setup: draw the map it names, once the model is loaded (else wait for a click)."""
        if not shared or not self.model.ready:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.inspect_update(text, layer, head, hide_special, history, colourblind)

    def model_attention_api(self, text: str = DEFAULT_INSPECT_TEXT, layer: int = 0,
                            hide_special: bool = True) -> PlotPayload:
        """API /model_attention: the chat model's attention grid (every head of one layer) for `text`
        (up to 10,000 characters; the first 64 tokens are drawn) at `layer` (0 to the model's layer
        count - 1), as {"type": "matplotlib", "plot": a PNG data URL}. hide_special: true or false
        (hide special tokens such as bos). gr.Error naming the input on bad values."""
        try:
            att = self._map(as_text(text, "text", max_chars=API_TEXT_CHARS), layer, hide_special)
            return plot_payload(self._map_figures(att, 0)[0])
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None

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
            twin = self.twin_rounding(lm4, progress)
            twin_cmp = compare_quantization(twin, full, prompt) if twin is not None else None
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="What 4-bit costs")
            return gr.skip(), gr.skip()
        other = {r.token_id: r.prob_4bit for r in twin_cmp.rows} if twin_cmp else {}
        rows = [[repr(r.token)[1:-1], pct(r.prob_4bit), pct(other[r.token_id]) if r.token_id in other else "–",
                 pct(r.prob_full), str(r.rank_4bit), str(r.rank_full)] for r in cmp.rows]
        return quant_markdown(cmp, twin_cmp), rows

    def twin_rounding(self, lm4: Any, progress: Any) -> Any:
        """The chat model's weights rounded the other way (calibrated <-> plain NF4), loaded on first
        use; None where only one rounding exists (any model but the default one)."""
        other = {"calibrated": "plain", "plain": "calibrated"}.get(getattr(lm4, "rounding", ""))
        if other is None or lm4.model_id != DEFAULT_MODEL_ID:
            return None
        if not self.twins.loaded(other):
            progress(0.5, desc=f"Loading the {other} NF4 model (first time only) …")
        settings = dataclasses.replace(self.settings, nf4_rounding=other)
        return self.twins.get(settings, other)


@dataclass
class InsideView:
    """The inside view's widgets; `wire` connects them to the chat once both are laid out."""

    demo: gr.Blocks
    handlers: InsideHandlers
    text: gr.Textbox
    auto: gr.State  # the last exchange fill_inspect put in the text box
    use_chat: gr.Button
    layer: gr.Slider
    head: gr.Slider
    hide_special: gr.Checkbox
    show: gr.Button
    notes: gr.Markdown
    grid: gr.Plot
    big: gr.Plot
    files_btn: gr.Button
    files: gr.File
    teaching: TeachingView  # every layer at once, switch heads off, what it looked at while writing
    lens: LensView  # what every layer predicts, 4-bit against full precision, head roles

    @property
    def layer_inputs(self) -> list[Any]:
        """The layer maps' shareable inputs, in the order of LAYER_FIELDS."""
        return [self.text, self.layer, self.head, self.hide_special]

    @property
    def inputs(self) -> list[Any]:
        """The shareable inputs, in the order of INSIDE_FIELDS."""
        return [*self.layer_inputs, *self.teaching.inputs, *self.lens.inputs]

    def wire(self, chatbot: gr.Chatbot, replies: list[Any], status: gr.Markdown,
             system: gr.Textbox | None = None) -> None:
        """Events that read the chat: the history (empty text = last exchange), finished replies
        (they fill the text box; the teaching view reads them), the system prompt the replies were
        written under, and the status line (the layer sliders fit the loaded model)."""
        state = self.handlers
        self.teaching.wire(chatbot, system, replies, status)
        colourblind = self.lens.colourblind
        show = dict(fn=state.inspect_update,
                    inputs=[self.text, self.layer, self.head, self.hide_special, chatbot, colourblind],
                    outputs=[self.grid, self.big, self.notes, self.head], **INSPECT_EVENTS, **REDRAW, **PRIVATE)
        self.files_btn.click(state.inspect_files,
                             [self.text, self.layer, self.head, self.hide_special, chatbot, colourblind],
                             [self.files], **INSPECT_EVENTS, **PRIVATE)
        gr.on([self.show.click, self.text.submit, self.layer.release, self.head.release, self.hide_special.input,
               colourblind.input],
              **show)
        self.use_chat.click(last_exchange, [chatbot], [self.text], queue=False, **PRIVATE).then(**show)
        # A finished reply becomes the model-attention text unless the user typed their own there.
        for chain in replies:
            chain.then(fill_inspect, [self.text, self.auto, chatbot], [self.text, self.auto],
                       queue=False, show_progress="hidden", **PRIVATE)
        # A shared link's fields on page load, and its map drawn when the model is there.
        shared = gr.State(False)
        self.demo.load(state.apply_setup, None, [*self.layer_inputs, shared], show_progress="hidden", **INSPECT_EVENTS,
                       **PRIVATE).then(state.show_shared, [shared, *self.layer_inputs, chatbot, colourblind],
                                       [self.grid, self.big, self.notes, self.head], **INSPECT_EVENTS, **PRIVATE)
        # The status line changes when the model arrives: fit the layer slider to it then.
        status.change(state.layer_slider, None, [self.layer], queue=False, show_progress="hidden", **PRIVATE)


def build_inside(demo: gr.Blocks, handlers: InsideHandlers, colourblind: gr.Checkbox) -> InsideView:
    """Lay out the inside view in the current Blocks/Tab; wires `/model_attention` and the 4-bit comparison.

    colourblind: the page's colour-blind-safe checkbox (ui.common.palette_checkbox)."""
    state = handlers
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
                    files_btn = gr.Button("Files of this layer: PNG, SVG, CSV", size="sm", elem_id="inspect-files-btn")
                    files = gr.File(file_count="multiple", interactive=False, show_label=False, visible=False,
                                    elem_id="inspect-files")  # shown once it holds files
    teaching = build_teaching(demo, handlers.teaching, colourblind)
    lens = build_lens(demo, handlers.lens, colourblind)
    gr.Markdown(QUANT_HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            quant_prompt = gr.Textbox(DEFAULT_QUANT_PROMPT, label="Prompt", elem_id="quant-prompt")
            quant_btn = gr.Button("Compare 4-bit with full precision", elem_id="quant-btn")
        with gr.Column(scale=3):
            quant_md = gr.Markdown("The full-precision copy loads on the first click (it takes a while).",
                                   elem_id="quant-summary", latex_delimiters=[])  # model text may hold $$
            quant_table = gr.Dataframe(headers=["token", "4-bit p", "other rounding p", "full p", "4-bit rank",
                                                "full rank"],
                                       show_label=False, interactive=False, elem_id="quant-table")

    inspect_auto = gr.State("")
    # The API takes plain typed values and checks them itself, the layer against the loaded model
    # (the slider's bound is frozen at build time, before the model says how many layers it has).
    gr.api(typed_api(state.model_attention_api), api_name="model_attention", **INSPECT_EVENTS)
    quant_btn.click(state.quant_update, [quant_prompt], [quant_md, quant_table], **INSPECT_EVENTS, **PRIVATE)
    return InsideView(demo=demo, handlers=state, text=inspect_text, auto=inspect_auto, use_chat=use_chat, layer=layer,
                      head=inspect_head, hide_special=hide_special, show=show_map, notes=inspect_notes,
                      grid=inspect_grid, big=inspect_big, files_btn=files_btn, files=files, teaching=teaching,
                      lens=lens)
