"""Lenses inside the chat model: what every layer predicts, where 4-bit goes wrong, what each head is for.

One accordion under the inside view's teaching panels, with three parts:

* **The logit lens** (`/logit_lens`): the model's next-token guess after every layer at every
  position, as a grid; a click on a cell (or the layer/position sliders) lists its top 10.
* **The quantization lens** (`/quant_lens`): the same lens on the 4-bit model and its
  full-precision copy: KL per layer and each model's top token (where the error enters, where the
  prediction flips). The copy is the "What 4-bit costs" one (`FullPrecisionCache`, loaded once).
* **Head roles** (`/head_roles`): every head scored on previous-token, first-token and induction
  attention; the model view's large map is titled with its head's role (`role_title`).

Every figure is drawn once as a PNG (shown, downloadable) and once as an SVG, with its numbers as
CSV, and has a one-line summary under it (what a screen reader reads). The colour-blind-safe
setting (`palette_of`) switches their colours. `LensHandlers` holds the handlers, plain methods
tests call directly.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.lens_plot import LensLayout, lens_cell, plot_head_roles, plot_logit_lens, plot_quant_lens
from attention.plot import csv_cell, figure_bytes
from generation import Settings
from generation.inside import (
    LENS_MAX_TOKENS,
    ROLES,
    FullPrecisionCache,
    HeadRoles,
    LogitLens,
    QuantLens,
    head_roles,
    logit_lens,
    quant_lens,
)

from .common import (
    API_TEXT_CHARS,
    INSPECT_EVENTS,
    PRIVATE,
    REDRAW,
    DownloadDir,
    ModelSlot,
    PlotPayload,
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
from .share import Field, bool_field, query_of, read_fields, text_field, warn

DEFAULT_LENS_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_QUANT_LENS_TEXT = "The capital of France is"
FILES = [("PNG", "png"), ("SVG", "svg"), ("CSV", "csv")]  # each lens figure's downloads
ROLE_NAMES = {"previous_token": "previous-token", "first_token": "first-token", "induction": "induction"}

# The lenses' inputs in a shared link, in the order of `LensView.inputs`.
LENS_FIELDS: tuple[Field, ...] = (
    text_field("lens_text", DEFAULT_LENS_TEXT),
    bool_field("colourblind", False),
)

LENS_HELP = f"""
### The logit lens: what every layer predicts
The model's **final norm and output layer applied after every layer**: the next token it would
predict if it stopped there. Rows are layers (the last on top: the model's real output), columns
are positions (the token read there; each cell guesses the *next* one), colour = probability of
the cell's top token. **Click a cell** (or use the sliders) to list its top 10. The text's last
{LENS_MAX_TOKENS} tokens are read.
"""

QUANT_LENS_HELP = """
### The quantization lens: where 4-bit goes wrong
The same lens on the 4-bit model and on its full-precision copy, at the text's last position:
**KL(full ‖ 4-bit)** after every layer (how far apart the two predictions are; 0 = identical) and
each model's top token. Highlighted layers (≠ in the table) are where the two predictions differ. The
full-precision copy loads on first use (as for *What 4-bit costs*).
"""

ROLES_HELP = """
### Head roles: what each head is for
Every head scored in [0, 1] on three jobs, measured on the model itself: **previous-token**
(weight on the token just before, over your text), **first-token** (weight on the first token, the
"attention sink"), and **induction** (on a random token sequence repeated twice: weight on the
token *after* the earlier occurrence of the current one, how a model continues a pattern it has
seen). The model view above names each large head by its strongest role.
"""


def lens_csv(lens: LogitLens) -> str:
    """Every cell's top 10 as CSV rows: layer, position, the token read there, rank, token, probability."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "position", "token read", "rank", "next token", "probability"])
    for layer, row in enumerate(lens.top):
        for pos, cell in enumerate(row):
            for rank, c in enumerate(cell, 1):
                w.writerow([layer, pos, csv_cell(lens.tokens[pos]), rank, csv_cell(c.token), f"{c.prob:.6g}"])
    return buf.getvalue()


def quant_csv(q: QuantLens) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "kl_full_to_4bit", "top1_full", "p_full", "top1_4bit", "p_4bit"])
    for r in q.layers:
        w.writerow([r.layer, f"{r.kl:.6g}", csv_cell(r.top1_full), f"{r.p_full:.6g}", csv_cell(r.top1_4bit),
                    f"{r.p_4bit:.6g}"])
    return buf.getvalue()


def roles_csv(roles: HeadRoles) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "head", *ROLES, "induction_baseline", "role"])
    n_layers, n_heads = roles.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            w.writerow([layer, head, *(f"{roles.scores(r)[layer][head]:.6g}" for r in ROLES),
                        f"{roles.induction_baseline[layer][head]:.6g}", roles.label(layer, head)])
    return buf.getvalue()


def lens_figure(lens: LogitLens, palette: Any, selected: tuple[int, int] | None = None) -> tuple[Any, LensLayout]:
    tops = [[cell[0].token for cell in row] for row in lens.top]
    probs = [[cell[0].prob for cell in row] for row in lens.top]
    title = f"{lens.model_id.rsplit('/', 1)[-1]} · logit lens · {len(lens.tokens)} tokens"
    return plot_logit_lens(tops, probs, lens.tokens, title=title, palette=palette, selected=selected)


def quant_figure(q: QuantLens, palette: Any) -> Any:
    return plot_quant_lens([r.kl for r in q.layers], [r.top1_4bit for r in q.layers], [r.top1_full for r in q.layers],
                           labels=(q.label_4bit, q.label_full), title="4-bit against full precision, layer by layer",
                           palette=palette)


def roles_figure(roles: HeadRoles, palette: Any) -> Any:
    return plot_head_roles({ROLE_NAMES[r]: roles.scores(r) for r in ROLES}, title="What each head is for",
                           palette=palette)


def _md(text: str) -> str:
    """Text for a gr.Markdown: "<bos>" and the like shown, not read as markup."""
    return html.escape(text, quote=False)


class LensHandlers:
    """Handlers of the lenses: forward passes of the shared model (and of the full-precision copy)."""

    def __init__(self, settings: Settings, model: ModelSlot, full_precision: FullPrecisionCache) -> None:
        self.settings = settings
        self.model = model
        self.full_precision = full_precision  # shared with "What 4-bit costs": one copy, loaded once
        self.files = DownloadDir()
        self._role_cache: dict[str, HeadRoles] = {}  # the model view's role titles, per model (one text)

    def _text(self, text: Any, what: str = "text") -> str:
        text = as_text(text, what, none_ok=True, max_chars=API_TEXT_CHARS)
        if not text.strip():
            raise ValueError("Type a text to run the model on.")
        return text

    # -- 1. logit lens ------------------------------------------------------------------------

    def _lens(self, text: Any, max_tokens: Any = LENS_MAX_TOKENS) -> LogitLens:
        text = self._text(text)
        max_tokens = as_int(max_tokens, "max_tokens", 1, 64)
        return logit_lens(self.model.require(), text, max_tokens=max_tokens)

    @staticmethod
    def cell_table(lens: LogitLens, layer: int, pos: int) -> tuple[list[list[str]], str]:
        """The top 10 of one cell as table rows, and the line above them."""
        cell = lens.top[layer][pos]
        nxt = f"the token after {csv_cell(lens.tokens[pos])!r} (position {pos})"
        rows = [[str(i), csv_cell(c.token), pct(c.prob)] for i, c in enumerate(cell, 1)]
        return rows, f"**After layer {layer}, guessing {_md(nxt)}:**"

    def _lens_outputs(self, lens: LogitLens, layer: Any, pos: Any, colourblind: Any, picked: bool = False) -> tuple:
        """(grid image, layout, cell heading, cell table, layer slider, position slider, PNG, SVG, CSV).
        `picked`: layer and pos are the sliders' own values, written back only where out of range."""
        asked = (layer, pos)
        layer = min(max(as_int(layer, "layer"), 0), lens.n_layers - 1)
        pos = min(max(as_int(pos, "position"), 0), len(lens.tokens) - 1)
        fig, layout = lens_figure(lens, palette_of(colourblind), (layer, pos))
        paths = self.files.write({"logit_lens.png": figure_bytes(fig, "png"), "logit_lens.svg": figure_bytes(fig, "svg"),
                                  "logit_lens.csv": lens_csv(lens)})
        rows, heading = self.cell_table(lens, layer, pos)
        return (paths[0], layout, heading, rows,
                written_back(gr.Slider, layer, not picked or layer != asked[0], maximum=max(lens.n_layers - 1, 1)),
                written_back(gr.Slider, pos, not picked or pos != asked[1], maximum=max(len(lens.tokens) - 1, 1)),
                *(ready_button(p) for p in paths))

    def lens_update(self, text: str, colourblind: bool) -> tuple:
        """UI: the lens of the text, the last layer's last cell listed. Outputs: (lens state, summary,
        grid, layout, heading, table, layer, position, 3 downloads); bad input -> gr.Warning."""
        try:
            lens = self._lens(text)
            summary = f"{_md(lens.summary())}  \n{_md(lens.notice)}"
            return (lens, summary, *self._lens_outputs(lens, lens.n_layers - 1, len(lens.tokens) - 1, colourblind))
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="The logit lens")
            return (gr.skip(),) * 11

    def lens_pick(self, lens: LogitLens | None, layer: Any, pos: Any, colourblind: bool) -> tuple:
        """UI: the sliders (or the palette) -> that cell listed and outlined."""
        if lens is None:
            return (gr.skip(),) * 9
        try:
            return self._lens_outputs(lens, layer, pos, colourblind, picked=True)
        except ValueError as exc:
            gr.Warning(error_text(exc), title="The logit lens")
            return (gr.skip(),) * 9

    def lens_select(self, lens: LogitLens | None, layout: LensLayout | None, colourblind: bool,
                    evt: gr.SelectData) -> tuple:
        """UI: a click on the grid at pixel evt.index = [x, y] -> that cell's top 10."""
        index = getattr(evt, "index", None)
        if lens is None or layout is None or not isinstance(index, (list, tuple)) or len(index) != 2:
            return (gr.skip(),) * 9
        hit = lens_cell(layout, float(index[0]), float(index[1]))
        return (gr.skip(),) * 9 if hit is None else self._lens_outputs(lens, hit[0], hit[1], colourblind)

    def logit_lens_api(self, text: str = DEFAULT_LENS_TEXT,
                       max_tokens: int = LENS_MAX_TOKENS) -> tuple[PlotPayload, dict[str, Any]]:
        """API /logit_lens: the chat model's next-token guess after every layer for `text` (up to
        10,000 characters; its last max_tokens tokens, 1-64) -> (the grid as {"type": "matplotlib",
        "plot": a PNG data URL}, {"tokens", "layers": one per decoder layer {"layer", "top": the 10
        most likely next tokens at the last position as {"token", "prob"}}, "grid": each layer's top
        token at every position, "summary", "notice"}). gr.Error naming the input on bad values."""
        try:
            lens = self._lens(as_text(text, "text", max_chars=API_TEXT_CHARS), max_tokens)
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        info = {"tokens": lens.tokens,
                "layers": [{"layer": i, "top": [{"token": c.token, "prob": c.prob} for c in lens.last(i)]}
                           for i in range(lens.n_layers)],
                "grid": [[cell[0].token for cell in row] for row in lens.top],
                "summary": lens.summary(), "notice": lens.notice}
        return plot_payload(lens_figure(lens, palette_of(False))[0]), info

    # -- 2. quantization lens -----------------------------------------------------------------

    def _quant(self, text: Any, progress: Any = None) -> QuantLens:
        text = self._text(text)
        lm4 = self.model.require()
        if progress is not None and not self.full_precision.loaded():
            progress(0.1, desc="Loading the full-precision model (first time only) …")
        full = self.full_precision.get(self.settings)
        return quant_lens(lm4, full, text)

    def quant_update(self, text: str, colourblind: bool, progress: gr.Progress = gr.Progress()) -> tuple:
        """UI: (figure, summary, table, PNG, SVG, CSV); bad input -> gr.Warning."""
        try:
            q = self._quant(text, progress)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="The quantization lens")
            return (gr.skip(),) * 6
        fig = quant_figure(q, palette_of(colourblind))
        paths = self.files.write({"quant_lens.png": figure_bytes(fig, "png"), "quant_lens.svg": figure_bytes(fig, "svg"),
                                  "quant_lens.csv": quant_csv(q)})
        rows = [[str(r.layer), f"{r.kl:.2g}", csv_cell(r.top1_full), csv_cell(r.top1_4bit),
                 "" if r.agree else "≠"] for r in q.layers]  # ≠: the two top tokens differ
        summary = f"{_md(q.summary())}  \n{_md(q.notice)}"
        return (paths[0], summary, rows, *(ready_button(p) for p in paths))

    def quant_lens_api(self, text: str = DEFAULT_QUANT_LENS_TEXT) -> tuple[PlotPayload, dict[str, Any]]:
        """API /quant_lens: the logit lens of the 4-bit model against its full-precision copy at the
        last position of `text` (up to 10,000 characters; the copy loads on first use) -> (the figure
        as {"type": "matplotlib", "plot": a PNG data URL}, {"layers": one per decoder layer {"layer",
        "kl" (KL(full || 4-bit), nats), "top1_4bit", "top1_full"}, "first_flip" (the first layer whose
        top tokens differ, or null), "summary", "notice"}). gr.Error naming the input on bad values."""
        try:
            q = self._quant(as_text(text, "text", max_chars=API_TEXT_CHARS))
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        info = {"layers": [{"layer": r.layer, "kl": r.kl, "top1_4bit": r.top1_4bit, "top1_full": r.top1_full}
                           for r in q.layers],
                "first_flip": q.first_flip(), "tokens": q.tokens, "summary": q.summary(), "notice": q.notice}
        return plot_payload(quant_figure(q, palette_of(False))), info

    # -- 3. head roles ------------------------------------------------------------------------

    def _roles(self, text: Any) -> HeadRoles:
        return head_roles(self.model.require(), self._text(text))

    def roles_update(self, text: str, colourblind: bool) -> tuple:
        """UI: (figure, summary, table of the clearest heads, PNG, SVG, CSV); bad input -> gr.Warning."""
        try:
            roles = self._roles(text)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Head roles")
            return (gr.skip(),) * 6
        fig = roles_figure(roles, palette_of(colourblind))
        paths = self.files.write({"head_roles.png": figure_bytes(fig, "png"), "head_roles.svg": figure_bytes(fig, "svg"),
                                  "head_roles.csv": roles_csv(roles)})
        rows = []
        for role in ROLES:
            layer, head, score = roles.strongest(role)
            rows.append([ROLE_NAMES[role], f"{layer}:{head}", f"{score:.2f}"])
        summary = f"{_md(roles.summary())}  \n{_md(roles.notice)}"
        return (paths[0], summary, rows, *(ready_button(p) for p in paths))

    def head_roles_api(self, text: str = DEFAULT_LENS_TEXT) -> tuple[PlotPayload, dict[str, Any]]:
        """API /head_roles: every head of the chat model scored in [0, 1] on its role, previous-token and
        first-token over `text` (up to 10,000 characters; its first 64 tokens), induction over a
        random token sequence repeated twice -> (the figure as {"type": "matplotlib", "plot": a PNG data
        URL}, {"previous_token", "first_token", "induction", "induction_baseline": layers x heads
        scores, "roles": layers x heads strongest role ("" = none clear), "strongest": {role: {"layer",
        "head", "score"}}, "summary", "notice"}). gr.Error naming the input on bad values."""
        try:
            roles = self._roles(as_text(text, "text", max_chars=API_TEXT_CHARS))
        except ValueError as exc:
            raise gr.Error(error_text(exc), print_exception=False) from None
        n_layers, n_heads = roles.shape
        info: dict[str, Any] = {r: roles.scores(r) for r in ROLES}
        info["induction_baseline"] = roles.induction_baseline
        info["roles"] = [[roles.label(layer, h) for h in range(n_heads)] for layer in range(n_layers)]
        info["strongest"] = {r: dict(zip(("layer", "head", "score"), roles.strongest(r))) for r in ROLES}
        info.update(summary=roles.summary(), notice=roles.notice)
        return plot_payload(roles_figure(roles, palette_of(False))), info

    def role_title(self, layer: int, head: int) -> str:
        """The model view's tag for one head's strongest role, e.g. "induction head 0.90" ("" while the
        model loads, for a head with no clear role, or one the scores do not cover).

        Scored once per model on the default text (induction does not depend on it) and kept."""
        lm = self.model.lm
        if lm is None:
            return ""
        key = str(getattr(lm, "model_id", ""))
        try:
            if key not in self._role_cache:
                self._role_cache[key] = head_roles(lm, DEFAULT_LENS_TEXT)
            roles = self._role_cache[key]
        except ValueError:
            return ""
        if not (0 <= layer < roles.shape[0] and 0 <= head < roles.shape[1]):
            return ""
        role, score = roles.role_of(layer, head)
        return "" if role is None else f"{ROLE_NAMES[role]} head {score:.2f}"

    # -- page load ----------------------------------------------------------------------------

    def apply_setup(self, request: gr.Request) -> tuple:
        """Page load: the lens fields from a shared link, the accordion opened, and whether to draw."""
        values, problems = read_fields(LENS_FIELDS, query_of(request))
        warn(problems)
        shared = "lens_text" in values
        return (*(values.get(f.name, gr.skip()) for f in LENS_FIELDS),
                gr.Accordion(open=True) if shared else gr.skip(), shared)

    def show_shared(self, shared: bool, text: str, colourblind: bool) -> tuple:
        """After a shared link's setup: draw its logit lens once the model is loaded."""
        if not shared or not self.model.ready:
            return (gr.skip(),) * 11
        return self.lens_update(text, colourblind)


@dataclass
class LensView:
    """The lenses' widgets."""

    text: gr.Textbox
    colourblind: gr.Checkbox
    accordion: gr.Accordion

    @property
    def inputs(self) -> list[Any]:
        """The shareable inputs, in the order of LENS_FIELDS."""
        return [self.text, self.colourblind]


def _build_logit_lens(state: LensHandlers, text: gr.Textbox, colourblind: gr.Checkbox) -> tuple[list, list]:
    gr.Markdown(LENS_HELP)
    run = gr.Button("Show the logit lens", variant="primary", elem_id="lens-btn")
    summary = gr.Markdown("Press *Show the logit lens* once the model has loaded.", elem_id="lens-summary")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            grid = gr.Image(None, show_label=False, interactive=False, elem_id="lens-grid", buttons=["fullscreen"],
                            alt_text="The next-token guess after every layer at every position")
            with gr.Row():
                dls = download_buttons("lens", FILES)
        with gr.Column(scale=2, min_width=240):
            layer = gr.Slider(0, 17, value=17, step=1, label="Layer", elem_id="lens-layer")
            pos = gr.Slider(0, LENS_MAX_TOKENS - 1, value=0, step=1, label="Position", elem_id="lens-pos")
            heading = gr.Markdown("", elem_id="lens-cell")
            table = gr.Dataframe(headers=["#", "next token", "p"], show_label=False, interactive=False,
                                 elem_id="lens-table")
    lens_state, layout = gr.State(None), gr.State(None)
    draw = [grid, layout, heading, table, layer, pos, *dls]
    outputs = [lens_state, summary, *draw]
    gr.on([run.click, text.submit], state.lens_update, [text, colourblind], outputs, **INSPECT_EVENTS, **REDRAW,
          **PRIVATE)
    gr.on([layer.release, pos.release, colourblind.input], state.lens_pick, [lens_state, layer, pos, colourblind],
          draw, **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    grid.select(state.lens_select, [lens_state, layout, colourblind], draw, **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    gr.api(typed_api(state.logit_lens_api), api_name="logit_lens", **INSPECT_EVENTS)
    return [text, colourblind], outputs


def _figure_and_table(prefix: str, alt: str, headers: list[str],
                      widths: list[str] | None = None) -> tuple[gr.Image, list, gr.Dataframe]:
    """A lens figure with its PNG/SVG/CSV downloads under it, and its table beside it (headers wrap;
    `widths` share the narrow column out where one width for all would clip a column)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            fig = gr.Image(None, show_label=False, interactive=False, elem_id=f"{prefix}-plot", buttons=["fullscreen"],
                           alt_text=alt)
            with gr.Row():
                dls = download_buttons(prefix, FILES)
        with gr.Column(scale=2, min_width=240):
            table = gr.Dataframe(headers=headers, show_label=False, interactive=False, wrap=True,
                                 column_widths=widths, elem_id=f"{prefix}-table")
    return fig, dls, table


def _build_quant_lens(state: LensHandlers, text: gr.Textbox, colourblind: gr.Checkbox) -> None:
    gr.Markdown(QUANT_LENS_HELP)
    run = gr.Button("Compare the two models layer by layer", elem_id="quant-lens-btn")
    summary = gr.Markdown("The full-precision copy loads on the first click (it takes a while).",
                          elem_id="quant-lens-summary")
    fig, dls, table = _figure_and_table("quant-lens", "KL between the 4-bit and full-precision lenses after every layer",
                                        ["layer", "KL", "full", "4-bit", "≠"], ["17%", "25%", "23%", "23%", "12%"])
    run.click(state.quant_update, [text, colourblind], [fig, summary, table, *dls], **INSPECT_EVENTS, **PRIVATE)
    gr.api(typed_api(state.quant_lens_api), api_name="quant_lens", **INSPECT_EVENTS)


def _build_roles(state: LensHandlers, text: gr.Textbox, colourblind: gr.Checkbox) -> None:
    gr.Markdown(ROLES_HELP)
    run = gr.Button("Score every head", elem_id="roles-btn")
    summary = gr.Markdown("", elem_id="roles-summary")
    fig, dls, table = _figure_and_table("roles", "Every head's previous-token, first-token and induction scores",
                                        ["role", "clearest head (layer:head)", "score"])
    run.click(state.roles_update, [text, colourblind], [fig, summary, table, *dls], **INSPECT_EVENTS, **PRIVATE)
    gr.api(typed_api(state.head_roles_api), api_name="head_roles", **INSPECT_EVENTS)


def build_lens(demo: gr.Blocks, handlers: LensHandlers, colourblind: gr.Checkbox) -> LensView:
    """Lay out the lenses (one accordion) in the current Blocks; wires /logit_lens, /quant_lens, /head_roles.

    colourblind: the inside view's colour-blind-safe checkbox (its value picks every figure's palette)."""
    with gr.Accordion("Lenses: what every layer predicts, where 4-bit goes wrong, what each head is for",
                      open=False, elem_id="lens-accordion") as accordion:
        text = gr.Textbox(DEFAULT_LENS_TEXT, label="Text", lines=2, max_lines=6, elem_id="lens-text")
        inputs, lens_outputs = _build_logit_lens(handlers, text, colourblind)
        _build_quant_lens(handlers, text, colourblind)
        _build_roles(handlers, text, colourblind)
    shared = gr.State(False)
    demo.load(handlers.apply_setup, None, [text, colourblind, accordion, shared], show_progress="hidden",
              queue=False, **PRIVATE).then(handlers.show_shared, [shared, *inputs], lens_outputs, **INSPECT_EVENTS,
                                           **PRIVATE)
    return LensView(text=text, colourblind=colourblind, accordion=accordion)
