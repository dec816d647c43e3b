"""Teaching depth inside the chat model: every layer at once, heads switched off, what a reply looked at.

Three panels under the inside view's layer maps, each in its own accordion:

* **Every layer at once** (`/model_view`): one forward pass over a short text gives every layer x
  every head as a grid of thumbnails; a click on one (or the layer/head sliders) shows it large.
* **Switch heads off** (`/ablate`): the next-token distribution and a greedy continuation with and
  without a set of (layer, head) pairs zeroed, side by side, with their KL divergence.
* **What did it look at while writing?**: after a chat reply, how much attention a chosen reply
  token paid to every earlier token (prompt and reply), per head or averaged, for one layer.

`build_teaching(...)` lays the panels out (`ui/inside.py` calls it); `TeachingView.wire(...)`
connects the third to the chat. `TeachingHandlers` holds the handlers, plain methods tests call
without a server. Every figure is drawn once as a PNG (shown, and downloadable) and once as an
SVG; the weights shown are downloadable as CSV.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.describe import describe_map
from attention.palette import DEFAULT_PALETTE, Palette
from attention.plot import (
    figure_bytes,
    model_view_cell,
    model_view_cells,
    plot_head,
    plot_model_view,
    token_text,
    weights_csv,
)
from generation import Settings
from generation.inside import (
    ABLATION_MAX_NEW_TOKENS,  # the continuation's cap
    MODEL_VIEW_MAX_TOKENS,
    Ablation,
    ModelView,
    ablate_heads,
    model_layers,
    model_view,
    parse_heads,
)

from .common import (
    API_TEXT_CHARS,
    INSPECT_EVENTS,
    PRIVATE,
    REDRAW,
    DownloadDir,
    ModelSlot,
    PlotPayload,
    as_bool,
    as_int,
    as_text,
    download_buttons,
    error_text,
    palette_of,
    pct,
    plot_payload,
    ready_button,
    typed_api,
    written_back,
)
from .reply_attention import DEFAULT_LAYER, ReplyAttentionHandlers, build_reply_attention
from .share import MAX_TEXT_CHARS, Field, query_of, read_fields, text_field, warn

DEFAULT_MV_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_ABLATE_PROMPT = "The capital of France is"
DEFAULT_ABLATE_HEADS = "5:*"  # all heads of layer 5, the default model's first global layer
DEFAULT_NEW_TOKENS = 8
ABLATE_K = 10  # candidates listed on each side
ABLATE_MAX_K = 1000  # /ablate's k: the library's cap
THUMB = 0.6  # inches per thumbnail: 18 layers fit one screen beside the large map

SCALES = [("each thumbnail 0 to its own max", "each"), ("one scale for all", "shared")]

# A heads spec in a shared link: digits, '*', ':' '/', separators. parse_heads checks it against
# the model when the ablation runs.
_SPEC_CHARS = re.compile(r"^[0-9*:/,;\s]*$")


def _heads_spec(raw: str) -> str:
    if len(raw) > MAX_TEXT_CHARS or not _SPEC_CHARS.match(raw):
        raise ValueError('layer:head pairs such as "5:*" or "3:1, 11:0"')
    return raw


# The teaching panels' inputs in a shared link, in the order of `TeachingView.inputs`.
TEACHING_FIELDS: tuple[Field, ...] = (
    text_field("mv_text", DEFAULT_MV_TEXT),
    text_field("ablate_prompt", DEFAULT_ABLATE_PROMPT),
    Field("ablate_heads", _heads_spec, str, DEFAULT_ABLATE_HEADS),
)

MV_HELP = f"""
### Every layer at once: the model view
One forward pass over a short text (at most {MODEL_VIEW_MAX_TOKENS} tokens) gives the attention of
**every layer and every head** at once: each thumbnail is one head's map, rows are layers, columns
are heads. Shaded rows are *global* layers (every token sees all earlier tokens); the others use a
*sliding window*. **Click a thumbnail** (or choose layer and head with the sliders) to see it large.
"""

MV_READ = """
**How to read it.** Within a thumbnail, row = the token looking, column = the token looked at, as
above. Look for patterns that repeat across the grid: a bright diagonal (each token looks at
itself), a line just below it (the previous token), a bright first column (a resting place).
Each thumbnail runs from 0 to its own largest weight so faint heads stay visible; choose *one scale
for all* to compare how concentrated heads are. Grey = weight 0 (the future is masked).
"""

ABLATE_HELP = """
### Switch heads off
Choose any set of (layer, head) pairs: the model runs with those heads' outputs set to zero (just
before the layer's output projection), **for this request only**; chats and other users are not
affected. Left, the plain model; right, the same model with the heads off: the most likely next
tokens, and a short greedy continuation of the prompt.
"""

ABLATE_READ = """
**How to read it.** Write heads as `layer:head` pairs separated by commas: `5:2, 11:0`;
`5:*` = every head of layer 5; `*:0` = head 0 in every layer; empty = nothing switched off. The KL
divergence measures how far the next-token distribution moved, in nats: 0 means not at all, above
1 a very different prediction. Many single heads change little (the model is redundant); compare a
whole layer, or one head in every layer.
"""



# ---------------------------------------------------------------------------------------------
# Figures


def grid_figure(mv: ModelView, scale: str = "each", selected: tuple[int, int] | None = None,
                palette: Palette = DEFAULT_PALETTE) -> Any:
    """The model view's grid of thumbnails (a matplotlib Figure from the library)."""
    title = f"{mv.model_id.rsplit('/', 1)[-1]} · {len(mv.tokens)} tokens"  # short: the grid is narrow
    return plot_model_view(mv.weights, layer_kinds=mv.layer_kinds, head_labels=mv.head_labels(), title=title,
                           scale=scale, selected=selected, thumb=THUMB, cmap=palette.cmap,
                           highlight=palette.highlight)


# ---------------------------------------------------------------------------------------------
# Handlers


class TeachingHandlers:
    """Handlers of the three teaching panels: forward passes of the shared model (INSPECT group)."""

    def __init__(self, settings: Settings, model: ModelSlot) -> None:
        self.settings = settings
        self.model = model
        self.files = DownloadDir()
        self.writing = ReplyAttentionHandlers(settings, model, self.files)  # what a reply looked at
        self.role_of = lambda layer, head: ""  # a head's role for the large map's title (ui/lens.py sets it)

    # -- 1. every layer at once ---------------------------------------------------------------

    def _model_view(self, text: Any, hide_special: Any, max_tokens: Any = MODEL_VIEW_MAX_TOKENS) -> ModelView:
        text = as_text(text, "text", none_ok=True, max_chars=API_TEXT_CHARS).strip()
        hide_special = as_bool(hide_special, "hide_special")
        max_tokens = as_int(max_tokens, "max_tokens", 1, MODEL_VIEW_MAX_TOKENS)
        lm = self.model.require()
        if not text:
            raise ValueError(f"Type a text to run the model on (the first {MODEL_VIEW_MAX_TOKENS} tokens are shown).")
        return model_view(lm, text, max_tokens=max_tokens, hide_special=hide_special)

    def _model_view_outputs(self, mv: ModelView, layer: Any, head: Any, scale: str, notes: str | None,
                            colourblind: Any = False, picked: bool = False) -> tuple:
        """(grid, large map, its summary, notes, cells, layer slider, head slider, 5 download buttons).
        `picked`: layer and head are the sliders' own values, written back only where out of range."""
        asked = (layer, head)
        layer = min(max(as_int(layer, "layer"), 0), mv.n_layers - 1)
        head = min(max(as_int(head, "head"), 0), mv.n_heads - 1)
        scale = scale if scale in ("each", "shared") else "each"
        palette = palette_of(colourblind)
        grid = grid_figure(mv, scale, (layer, head), palette)
        role = self.role_of(layer, head)
        title = mv.describe(layer, head) + (f" · {role}" if role else "")
        big = plot_head(mv.head(layer, head), mv.tokens, title=title, vmax=None, cmap=palette.cmap)
        grid_png = figure_bytes(grid, "png")
        cells = model_view_cells(grid)
        name = f"layer{layer}_head{head}"
        paths = self.files.write({
            "model_view.png": grid_png,
            "model_view.svg": figure_bytes(grid, "svg"),
            f"attention_{name}.png": figure_bytes(big, "png"),
            f"attention_{name}.svg": figure_bytes(big, "svg"),
            f"attention_{name}.csv": weights_csv(mv.head(layer, head), mv.tokens, mv.tokens),
        })
        summary = (f"Layer {layer}, head {head} "
                   f"{describe_map(mv.head(layer, head), mv.hidden_mass[layer, head])}.")
        return (paths[0], paths[2], summary, gr.skip() if notes is None else notes, cells,
                written_back(gr.Slider, layer, not picked or layer != asked[0], maximum=max(mv.n_layers - 1, 1)),
                written_back(gr.Slider, head, not picked or head != asked[1], maximum=max(mv.n_heads - 1, 1)),
                *(ready_button(p) for p in paths))

    def model_view_update(self, text: str, hide_special: bool, scale: str, layer: Any, head: Any,
                          colourblind: bool = False) -> tuple:
        """UI: every layer's attention for the text (one forward), the chosen head large. Outputs:
        (model view state, grid, large map, its summary, notes, cells, layer, head, 5 downloads); bad input -> gr.Warning."""
        try:
            t0 = time.perf_counter()
            mv = self._model_view(text, hide_special)
            secs = time.perf_counter() - t0
            l_, h, t = mv.shape[0], mv.shape[1], mv.shape[2]
            notes = (f"**{t} tokens × {l_} layers × {h} heads from one forward pass** ({secs:.2f} s): weights of "
                     f"shape (layers, heads, tokens, tokens) = ({l_}, {h}, {t}, {t}). Click a thumbnail to see it "
                     f"large. {html.escape(mv.notice)}").strip()
            return (mv, *self._model_view_outputs(mv, layer, head, scale, notes, colourblind, picked=True))
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Every layer at once")
            return (gr.skip(),) * 13

    def model_view_select(self, mv: ModelView | None, cells: dict | None, scale: str, colourblind: bool,
                          evt: gr.SelectData) -> tuple:
        """UI: a click on the grid at pixel evt.index = [x, y] -> that thumbnail large (nothing between them)."""
        index = getattr(evt, "index", None)
        if mv is None or not cells or not isinstance(index, (list, tuple)) or len(index) != 2:
            return (gr.skip(),) * 12
        hit = model_view_cell(cells, float(index[0]), float(index[1]))
        if hit is None:
            return (gr.skip(),) * 12
        return self._model_view_outputs(mv, hit[0], hit[1], scale, None, colourblind)

    def model_view_pick(self, mv: ModelView | None, scale: str, layer: Any, head: Any, colourblind: bool = False) -> tuple:
        """UI: the layer/head sliders (or the scale) -> that head large, outlined in the grid."""
        if mv is None:
            return (gr.skip(),) * 12
        try:
            return self._model_view_outputs(mv, layer, head, scale, None, colourblind, picked=True)
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Every layer at once")
            return (gr.skip(),) * 12

    def model_view_api(self, text: str = DEFAULT_MV_TEXT, hide_special: bool = True,
                       max_tokens: int = MODEL_VIEW_MAX_TOKENS) -> tuple[PlotPayload, dict[str, Any]]:
        """API /model_view: every layer's and head's attention for `text` (up to 10,000 characters; its
        first max_tokens tokens, 1-64) -> (the grid as {"type": "matplotlib", "plot": a PNG data URL},
        {"shape": [L, H, T, T], "tokens", "layer_kinds", "kv_groups", "notice"}). hide_special: true or
        false. gr.Error naming the input on bad values."""
        try:
            mv = self._model_view(as_text(text, "text", max_chars=API_TEXT_CHARS), hide_special, max_tokens)
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        info = {"shape": list(mv.shape), "tokens": mv.tokens, "layer_kinds": mv.layer_kinds,
                "kv_groups": mv.kv_groups, "notice": mv.notice}
        return plot_payload(grid_figure(mv)), info

    # -- 2. switch heads off ------------------------------------------------------------------

    def _ablate(self, prompt: Any, heads: Any, new_tokens: Any, k: Any = ABLATE_K) -> Ablation:
        prompt = as_text(prompt, "prompt", none_ok=True, max_chars=API_TEXT_CHARS)
        heads = as_text(heads, "heads", max_chars=API_TEXT_CHARS)  # its syntax is parse_heads' to check
        k = as_int(k, "k", 1, ABLATE_MAX_K)
        new_tokens = as_int(new_tokens, "new_tokens", 1, ABLATION_MAX_NEW_TOKENS)
        lm = self.model.require()
        if not prompt.strip():
            raise ValueError("Type a prompt: the model predicts what comes after it.")
        info = model_layers(lm)
        pairs = parse_heads(heads, info["n_layers"], info["n_heads"])
        return ablate_heads(lm, prompt, pairs, k=k, new_tokens=new_tokens)

    @staticmethod
    def ablation_tables(ab: Ablation, k: int = ABLATE_K) -> tuple[list[list[str]], list[list[str]]]:
        """The two sides' top-k candidates: plain [rank, token, p], switched off [rank, token, p, before]."""
        plain = sorted((r for r in ab.rows if r.rank_plain <= k), key=lambda r: r.rank_plain)
        off = sorted((r for r in ab.rows if r.rank_ablated <= k), key=lambda r: r.rank_ablated)
        return ([[str(r.rank_plain), token_text(r.token), pct(r.p_plain)] for r in plain],
                [[str(r.rank_ablated), token_text(r.token), pct(r.p_ablated),
                  f"#{r.rank_plain}, {pct(r.p_plain)}"] for r in off])

    @staticmethod
    def ablation_summary(ab: Ablation) -> str:
        """KL, whether the most likely token changed, which heads: one markdown paragraph."""
        top_p = html.escape(token_text(min(ab.rows, key=lambda r: r.rank_plain).token))
        top_q = html.escape(token_text(min(ab.rows, key=lambda r: r.rank_ablated).token))
        change = f"changed: **{top_p}** → **{top_q}**" if ab.top1_changed else f"unchanged (**{top_p}**)"
        heads = f"`{ab.spec}`" if ab.spec else "none"
        return (f"**KL(plain ‖ heads off) = {ab.kl_plain_to_ablated:.4f} nats** · most likely next token "
                f"{change} · heads switched off: {heads}. {html.escape(ab.notice)}")

    def ablate_update(self, prompt: str, heads: str, new_tokens: Any) -> tuple:
        """UI: (summary, plain table, switched-off table, plain continuation, switched-off continuation)."""
        try:
            ab = self._ablate(prompt, heads, new_tokens)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Switch heads off")
            return (gr.skip(),) * 5
        plain, off = self.ablation_tables(ab)
        return (self.ablation_summary(ab), plain, off, prompt + ab.continuation_plain,
                prompt + ab.continuation_ablated)

    def preset_layer(self, layer: Any) -> Any:
        """Preset "all heads of layer L" -> the spec "L:*"."""
        try:
            return f"{as_int(layer, 'layer')}:*"
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Switch heads off")
            return gr.skip()

    def preset_head(self, head: Any) -> Any:
        """Preset "head H in every layer" -> the spec "*:H"."""
        try:
            return f"*:{as_int(head, 'head')}"
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Switch heads off")
            return gr.skip()

    def ablate_api(self, prompt: str = DEFAULT_ABLATE_PROMPT, heads: str = DEFAULT_ABLATE_HEADS,
                   new_tokens: int = DEFAULT_NEW_TOKENS, k: int = ABLATE_K) -> dict:
        """API /ablate: the model with `heads` switched off (e.g. "5:*", "*:0", "3:1, 11:0"; "" = none)
        beside the plain model. Returns {"heads": [[layer, head], ...], "spec", "kl" (nats, KL(plain ||
        heads off)), "top1_changed", "plain" and "ablated": the k most likely next tokens as {token,
        token_id, p, rank}, "continuation_plain", "continuation_ablated" (greedy, new_tokens tokens at
        most), "prompt_tokens", "notice"}. gr.Error with the reason on bad input."""
        try:
            prompt = as_text(prompt, "prompt", max_chars=API_TEXT_CHARS)  # null too is refused here
            k = as_int(k, "k", 1, ABLATE_MAX_K)
            ab = self._ablate(prompt, heads, new_tokens, k)
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        side = {"plain": ("rank_plain", "p_plain"), "ablated": ("rank_ablated", "p_ablated")}
        out: dict[str, Any] = {"heads": [list(p) for p in ab.heads], "spec": ab.spec, "kl": ab.kl_plain_to_ablated,
                               "top1_changed": ab.top1_changed}
        for name, (rank, p) in side.items():
            rows = sorted((r for r in ab.rows if getattr(r, rank) <= k), key=lambda r: getattr(r, rank))
            out[name] = [{"token": r.token, "token_id": r.token_id, "p": getattr(r, p), "rank": getattr(r, rank)}
                         for r in rows]
        out.update(continuation_plain=ab.continuation_plain, continuation_ablated=ab.continuation_ablated,
                   prompt_tokens=ab.prompt_tokens, notice=ab.notice)
        return out

    # -- page load and model arrival ----------------------------------------------------------

    def apply_setup(self, request: gr.Request) -> tuple:
        """Page load: the teaching fields from a shared link, the accordions they concern opened, and
        whether the model view / the ablation should be drawn (`show_shared_*`)."""
        values, problems = read_fields(TEACHING_FIELDS, query_of(request))
        warn(problems)
        mv = "mv_text" in values
        ab = "ablate_prompt" in values or "ablate_heads" in values
        return (*(values.get(f.name, gr.skip()) for f in TEACHING_FIELDS),
                gr.Accordion(open=True) if mv else gr.skip(), gr.Accordion(open=True) if ab else gr.skip(), mv, ab)

    def show_shared_model_view(self, shared: bool, text: str, hide_special: bool, scale: str, layer: Any,
                               head: Any, colourblind: bool = False) -> tuple:
        """After a shared link's setup: draw its model view once the model is loaded."""
        if not shared or not self.model.ready:
            return (gr.skip(),) * 13
        return self.model_view_update(text, hide_special, scale, layer, head, colourblind)

    def show_shared_ablation(self, shared: bool, prompt: str, heads: str, new_tokens: Any) -> tuple:
        """After a shared link's setup: run its ablation once the model is loaded."""
        if not shared or not self.model.ready:
            return (gr.skip(),) * 5
        return self.ablate_update(prompt, heads, new_tokens)

    def fit_sliders(self) -> tuple:
        """Layer/head ranges fitted to the loaded model: (model-view layer, head, preset layer, preset head,
        writing layer); unchanged while it loads."""
        if self.model.lm is None:
            return (gr.skip(),) * 5
        info = model_layers(self.model.lm)
        top_l, top_h = max(info["n_layers"] - 1, 1), max(info["n_heads"] - 1, 1)
        return (gr.Slider(maximum=top_l), gr.Slider(maximum=top_h), gr.Number(maximum=top_l),
                gr.Number(maximum=top_h), gr.Slider(maximum=top_l))


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass
class TeachingView:
    """The teaching panels' widgets; `wire` connects the "while writing" panel to the chat."""

    demo: gr.Blocks
    handlers: TeachingHandlers
    mv_text: gr.Textbox
    ablate_prompt: gr.Textbox
    ablate_heads: gr.Textbox
    mv_accordion: gr.Accordion
    ablate_accordion: gr.Accordion
    sliders: list[Any]  # fitted to the model when it arrives (fit_sliders' order)
    mv_inputs: list[Any]  # text, hide special, scale, layer, head, colour-blind-safe
    mv_outputs: list[Any]
    ablate_inputs: list[Any]  # prompt, heads, new tokens
    ablate_outputs: list[Any]
    writing_btn: gr.Button
    writing_inputs: list[Any]  # layer, head, mode, hide special, colour-blind-safe
    writing_outputs: list[Any]  # state, tokens, reply, strip, notes, head, 3 downloads
    following: gr.State

    @property
    def inputs(self) -> list[Any]:
        """The shareable inputs, in the order of TEACHING_FIELDS."""
        return [self.mv_text, self.ablate_prompt, self.ablate_heads]

    def wire(self, chatbot: gr.Chatbot, system: gr.Textbox | None, replies: list[Any], status: gr.Markdown) -> None:
        """Events that read the chat (the last reply, the system prompt it was written under), a shared
        link's setup on page load, and the sliders fitted to the model when the status line changes."""
        state = self.handlers
        system_in = [system] if system is not None else [gr.State("")]
        read_in = [chatbot, *system_in, *self.writing_inputs]
        self.writing_btn.click(state.writing.read, read_in, [*self.writing_outputs, self.following],
                               **INSPECT_EVENTS, **PRIVATE)
        for chain in replies:  # a new reply is read at once by users who have read one before
            chain.then(state.writing.follow, [self.following, self.writing_outputs[0], *read_in],
                       [*self.writing_outputs, self.following],
                       show_progress="hidden", **INSPECT_EVENTS, **REDRAW, **PRIVATE)
        shared_mv, shared_ab = gr.State(False), gr.State(False)
        loaded = self.demo.load(state.apply_setup, None,
                                [*self.inputs, self.mv_accordion, self.ablate_accordion, shared_mv, shared_ab],
                                show_progress="hidden", queue=False, **PRIVATE)
        loaded.then(state.show_shared_model_view, [shared_mv, *self.mv_inputs], self.mv_outputs,
                    **INSPECT_EVENTS, **PRIVATE)
        loaded.then(state.show_shared_ablation, [shared_ab, *self.ablate_inputs], self.ablate_outputs,
                    **INSPECT_EVENTS, **PRIVATE)
        status.change(state.fit_sliders, None, self.sliders, queue=False, show_progress="hidden", **PRIVATE)


def _build_model_view(state: TeachingHandlers, colourblind: gr.Checkbox) -> dict[str, Any]:
    gr.Markdown(MV_HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=260):
            text = gr.Textbox(DEFAULT_MV_TEXT, label=f"Text (first {MODEL_VIEW_MAX_TOKENS} tokens)", lines=3,
                              max_lines=6, elem_id="mv-text")
            hide = gr.Checkbox(True, label="Hide special tokens such as <bos>", elem_id="mv-hide")
            scale = gr.Radio(SCALES, value="each", label="Colour scale", elem_id="mv-scale")
            show = gr.Button("Show every layer", variant="primary", elem_id="mv-btn")
            layer = gr.Slider(0, 17, value=DEFAULT_LAYER, step=1, label="Layer shown large",
                              elem_id="mv-layer")
            head = gr.Slider(0, 3, value=0, step=1, label="Head shown large", elem_id="mv-head")
            gr.Markdown(MV_READ)
        with gr.Column(scale=2, min_width=300):
            grid = gr.Image(None, show_label=False, interactive=False, elem_id="mv-grid", buttons=["fullscreen"],
                            placeholder="Press *Show every layer*.",
                            alt_text="Grid of attention maps: rows are layers, columns are heads")
            with gr.Row():
                grid_dl = download_buttons("mv-grid", [("Grid PNG", "png"), ("Grid SVG", "svg")])
        with gr.Column(scale=3, min_width=360):
            big = gr.Image(None, show_label=False, interactive=False, elem_id="mv-big", buttons=["fullscreen"],
                           placeholder="The chosen head, large, with its tokens.",
                           alt_text="The chosen head's attention map, with its tokens")
            big_summary = gr.Markdown(elem_id="mv-summary")  # the large map in words
            with gr.Row():
                big_dl = download_buttons("mv-big", [("Map PNG", "png"), ("Map SVG", "svg"), ("Weights CSV", "csv")])
            notes = gr.Markdown("Press *Show every layer* once the model has loaded.", elem_id="mv-notes")
    mv_state, cells = gr.State(None), gr.State(None)
    inputs = [text, hide, scale, layer, head, colourblind]
    draw = [grid, big, big_summary, notes, cells, layer, head, grid_dl[0], grid_dl[1], *big_dl]
    outputs = [mv_state, *draw]
    gr.on([show.click, text.submit, hide.input, colourblind.input], state.model_view_update, inputs, outputs,
          **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    grid.select(state.model_view_select, [mv_state, cells, scale, colourblind], draw, **INSPECT_EVENTS, **REDRAW,
                **PRIVATE)
    gr.on([layer.release, head.release, scale.input], state.model_view_pick, [mv_state, scale, layer, head, colourblind], draw,
          **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    # The API takes plain typed values with defaults and checks them itself (widgets would check
    # API input against their build-time bounds first, with no message).
    gr.api(typed_api(state.model_view_api), api_name="model_view", **INSPECT_EVENTS)
    return dict(text=text, inputs=inputs, outputs=outputs, sliders=[layer, head])


def _build_ablation(state: TeachingHandlers) -> dict[str, Any]:
    gr.Markdown(ABLATE_HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            prompt = gr.Textbox(DEFAULT_ABLATE_PROMPT, label="Prompt", elem_id="ablate-prompt")
            heads = gr.Textbox(DEFAULT_ABLATE_HEADS, label="Heads to switch off (layer:head, * = all)",
                               elem_id="ablate-heads")
            gr.Markdown("**Presets**")
            with gr.Row(equal_height=False):
                p_layer = gr.Number(DEFAULT_LAYER, minimum=0, maximum=17, step=1, label="L", scale=1, min_width=70,
                                    elem_id="ablate-layer")
                layer_btn = gr.Button("All heads of layer L", size="sm", scale=3, elem_id="preset-layer-btn")
            with gr.Row(equal_height=False):
                p_head = gr.Number(0, minimum=0, maximum=3, step=1, label="H", scale=1, min_width=70,
                                   elem_id="ablate-head")
                head_btn = gr.Button("Head H in every layer", size="sm", scale=3, elem_id="preset-head-btn")
            new_tokens = gr.Slider(1, 32, value=DEFAULT_NEW_TOKENS, step=1, label="greedy continuation: tokens",
                                   elem_id="ablate-new")
            run = gr.Button("Switch off and compare", variant="primary", elem_id="ablate-btn")
        with gr.Column(scale=5):
            summary = gr.Markdown("Press *Switch off and compare* once the model has loaded.", elem_id="ablate-summary")
            with gr.Row(equal_height=False):
                with gr.Column(elem_id="ablate-plain-col"):
                    gr.Markdown("#### Plain model")
                    plain_cont = gr.Textbox(label="greedy continuation", interactive=False, lines=2,
                                            elem_id="ablate-plain-text")
                    plain = gr.Dataframe(headers=["#", "next token", "p"], show_label=False, interactive=False,
                                         elem_id="ablate-plain")
                with gr.Column(elem_id="ablate-off-col"):
                    gr.Markdown("#### Heads switched off")
                    off_cont = gr.Textbox(label="greedy continuation", interactive=False, lines=2,
                                          elem_id="ablate-off-text")
                    off = gr.Dataframe(headers=["#", "next token", "p", "plain #, p"], show_label=False,
                                       interactive=False, wrap=True, column_widths=["9%", "27%", "22%", "42%"],
                                       elem_id="ablate-off")
            gr.Markdown(ABLATE_READ)
    inputs = [prompt, heads, new_tokens]
    outputs = [summary, plain, off, plain_cont, off_cont]
    ablate = dict(fn=state.ablate_update, inputs=inputs, outputs=outputs, **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    gr.on([run.click, prompt.submit, heads.submit], **ablate)
    layer_btn.click(state.preset_layer, [p_layer], [heads], queue=False, **PRIVATE).then(**ablate)
    head_btn.click(state.preset_head, [p_head], [heads], queue=False, **PRIVATE).then(**ablate)
    gr.api(typed_api(state.ablate_api), api_name="ablate", **INSPECT_EVENTS)
    return dict(prompt=prompt, heads=heads, inputs=inputs, outputs=outputs, sliders=[p_layer, p_head])


def build_teaching(demo: gr.Blocks, handlers: TeachingHandlers, colourblind: gr.Checkbox) -> TeachingView:
    """Lay out the three panels (accordions) in the current Blocks; wires `/model_view` and `/ablate`."""
    with gr.Accordion("Every layer at once: the model view", open=False, elem_id="mv-accordion") as mv_acc:
        mv = _build_model_view(handlers, colourblind)
    with gr.Accordion("Switch heads off: what changes without them?", open=False,
                      elem_id="ablate-accordion") as ab_acc:
        ab = _build_ablation(handlers)
    with gr.Accordion("What did it look at while writing? (after a chat reply)", open=False,
                      elem_id="writing-accordion"):
        wr = build_reply_attention(handlers.writing, colourblind)
    return TeachingView(
        demo=demo, handlers=handlers, mv_text=mv["text"], ablate_prompt=ab["prompt"], ablate_heads=ab["heads"],
        mv_accordion=mv_acc, ablate_accordion=ab_acc, sliders=[*mv["sliders"], *ab["sliders"], *wr["sliders"]],
        mv_inputs=mv["inputs"], mv_outputs=mv["outputs"], ablate_inputs=ab["inputs"], ablate_outputs=ab["outputs"],
        writing_btn=wr["button"], writing_inputs=wr["inputs"], writing_outputs=wr["outputs"],
        following=gr.State(False),
    )
