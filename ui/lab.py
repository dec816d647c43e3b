"""The Attention Lab view: sliders build a real attention module; heatmaps, trace, step-by-step.

`build_lab(...)` lays out its widgets inside the current `gr.Blocks` and wires its events and the
`/attention` endpoint; `LabHandlers` holds the handlers, plain methods tests call without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.describe import describe_map
from attention.lab import LabConfig, run_lab, tokenize, valid_head_counts
from attention.palette import DEFAULT_PALETTE, Palette
from attention.plot import figure_bytes, plot_heads, plot_steps, weights_csv
from attention.trace import explain_head

from .common import (
    API_TEXT_CHARS,
    LAB_EVENTS,
    PRIVATE,
    REDRAW,
    DownloadDir,
    PlotPayload,
    as_bool,
    as_float,
    as_int,
    as_text,
    error_text,
    palette_of,
    plot_payload,
    typed_api,
    written_back,
)
from .share import Field, bool_field, clamp_index, float_field, int_field, query_of, read_fields, text_field, warn

# The notebook's sentence.
DEFAULT_SENTENCE = "The cat sat on the mat because it was tired."

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

STEPS_HELP = """
**QKᵀ**: raw similarity of every query with every key. **÷ √d_k**: scaled so the softmax does not
saturate as heads get wider. **mask**: blocked cells (causal: the future) become −∞.
**softmax**: each row turns into weights that sum to 1, the heatmap above.
"""

MAX_KV_HEADS = 16  # the n_kv_heads slider's top

# The lab's inputs in a shared link, in the order of `LabView.inputs`.
LAB_DEFAULTS = dict(sentence=DEFAULT_SENTENCE, multi_head=True, emb_dim=32, n_heads=4, n_kv_heads=4, dropout=0.0,
                    seed=0, causal=False, head=0)
LAB_FIELDS: tuple[Field, ...] = (
    text_field("sentence", LAB_DEFAULTS["sentence"]),
    bool_field("multi_head", LAB_DEFAULTS["multi_head"]),
    int_field("emb_dim", 4, 128, 4, LAB_DEFAULTS["emb_dim"]),
    int_field("n_heads", 1, 128, default=LAB_DEFAULTS["n_heads"]),
    int_field("n_kv_heads", 1, MAX_KV_HEADS, default=LAB_DEFAULTS["n_kv_heads"]),
    float_field("dropout", 0.0, 0.5, LAB_DEFAULTS["dropout"]),
    int_field("seed", 0, 100, default=LAB_DEFAULTS["seed"]),
    bool_field("causal", LAB_DEFAULTS["causal"]),
    int_field("head", 0, 127, default=LAB_DEFAULTS["head"]),
)

# What /attention accepts: the lab's widget ranges (the library's own limits are wider).
API_RANGES = dict(emb_dim=(4, 128), n_heads=(1, 128), n_kv_heads=(1, 16), dropout=(0.0, 0.5), seed=(0, 100))

LAB_HELP = """
**Try:** switch on the *causal mask* (a token may only look back), change the *seed* (new random
projections → new patterns), lower *n_kv_heads* (grouped-query attention: query heads share keys and
values), or raise *dropout* (training-time noise). `d_k = emb_dim / n_heads` is the size of each head.
"""


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
        text=as_text(text, "text", none_ok=True),
        emb_dim=as_int(emb_dim, "emb_dim"),
        n_heads=as_int(n_heads, "n_heads"),
        n_kv_heads=as_int(n_kv_heads, "n_kv_heads"),
        dropout=as_float(dropout, "dropout"),
        seed=as_int(seed, "seed"),
        causal=as_bool(causal, "causal"),
        multi_head=as_bool(multi_head, "multi_head"),
    )


def nearest(choices: Sequence[int], value: int) -> int:
    """The choice closest to `value`, the smaller one on a tie (as the n_heads dropdown does)."""
    return min(choices, key=lambda c: (abs(c - value), c))


def repair_setup(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A shared link's parsed lab values (`read_fields` over LAB_FIELDS) -> (values to set, problems).

    Every value valid on its own is kept; a sentence with nothing to attend over is dropped; the
    head counts that do not fit are repaired to the nearest that does, the link's emb_dim winning
    over its n_heads, and n_heads over n_kv_heads (a default that no longer fits is repaired and
    set too); a head beyond the heads is clamped. Each drop or repair is one problem naming the
    parameter. With LAB_DEFAULTS for the rest, the values always pass `lab_config`.
    """
    out = dict(values)
    problems: list[str] = []
    if "sentence" in out and not tokenize(out["sentence"])[0]:
        del out["sentence"]
        problems.append("'sentence' was ignored: it has no words or punctuation to attend over")
    v = {**LAB_DEFAULTS, **out}

    def fit(name: str, choices: list[int], why: str) -> None:
        if v[name] in choices:
            return
        fixed = nearest(choices, v[name])
        default = "" if name in values else " (the default)"
        problems.append(f"'{name}' was {v[name]}{default}, which does not divide {why}: set to {fixed}")
        out[name] = v[name] = fixed

    fit("n_heads", valid_head_counts(v["emb_dim"]), f"emb_dim {v['emb_dim']}")
    fit("n_kv_heads", [c for c in valid_head_counts(v["n_heads"]) if c <= MAX_KV_HEADS],
        f"{v['n_heads']} query head{'s' if v['n_heads'] > 1 else ''}")
    out, clamped = clamp_index(out, "head", v["n_heads"] if v["multi_head"] else 1, "head")
    return out, problems + clamped


def read_setup(query: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """A shared link's query -> (lab values to set, one problem per parameter ignored or repaired)."""
    values, problems = read_fields(LAB_FIELDS, query)
    values, repaired = repair_setup(values)
    return values, problems + repaired


def lab_figure(cfg: LabConfig, result: Any, palette: Palette = DEFAULT_PALETTE) -> Any:
    """The per-head heatmap grid for a lab result."""
    n_heads = int(result.weights.shape[0])
    kind = "causal" if cfg.causal else "bidirectional"
    if cfg.multi_head:
        title = f"{n_heads} heads × d_k={cfg.emb_dim // n_heads} · {cfg.n_kv_heads} K/V heads · {kind}"
        groups = list(result.kv_groups) if cfg.n_kv_heads < n_heads else None
    else:
        title = f"single head · d_k={cfg.emb_dim} · {kind}"
        groups = None
    return plot_heads(result.weights, result.tokens, title=title, kv_groups=groups, cmap=palette.cmap)


def trace_rows(trace: Any) -> list[list[str]]:
    """The debug-mode shape trace as table rows: step, shape, what it is."""
    return [
        [step.name, str(tuple(step.shape)), TRACE_MEANING.get(step.name, "")]
        for step in trace
        if step.printed
    ]


def steps_figure(result: Any, head: Any, palette: Palette = DEFAULT_PALETTE) -> Any:
    """Step-by-step maths (QKᵀ, ÷√d_k, mask, softmax) for one head of a lab result."""
    n_heads = int(result.weights.shape[0])
    h = min(max(as_int(head, "head"), 0), n_heads - 1)
    return plot_steps(explain_head(result.trace, h), result.tokens, cmap=palette.cmap, diverging=palette.diverging)


def lab_summary(result: Any) -> str:
    """The heatmaps in words, one clause per head (what a screen reader reads under the figure)."""
    return "; ".join(f"head {h} {describe_map(w)}" for h, w in enumerate(result.weights)).capitalize() + "."


def lab_notice(cfg: LabConfig, result: Any) -> str:
    """The line under the heatmaps: token count, whether the sentence was cut, what dropout does;
    then the heatmaps in words."""
    n_tok = len(result.tokens)
    msg = f"{n_tok} tokens"
    if getattr(result, "capped", False):
        msg += f" (the sentence was cut to the first {cfg.max_tokens} tokens)"
    if cfg.dropout > 0:
        msg += f" · dropout {cfg.dropout:g} is applied to the weights as in training, so rows no longer sum to 1"
    return f"{msg}\n\n{lab_summary(result)}"


class LabHandlers:
    """The Attention Lab's event handlers (each user's last result lives in gr.State)."""

    def __init__(self) -> None:
        self.files = DownloadDir()

    def lab_files(self, text: str, emb_dim: float, n_heads: Any, n_kv_heads: Any, dropout: float, seed: float,
                  causal: bool, multi_head: bool, head: float, colourblind: bool = False) -> Any:
        """UI: the heatmaps and the step-by-step view as PNG and SVG, every head's weights as CSV, for
        the current sliders (made on request: a list of files). Bad settings -> gr.Warning."""
        try:
            cfg = lab_config(text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head)
            result = run_lab(cfg)
            palette = palette_of(colourblind)
            heat = lab_figure(cfg, result, palette)
            steps = steps_figure(result, 0 if head is None or head == "" else head, palette)
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Cannot make the files")
            return gr.skip()
        n = int(result.weights.shape[0])
        h = min(max(as_int(0 if head is None or head == "" else head, "head"), 0), n - 1)
        name = f"lab_{cfg.emb_dim}d_{n}heads{'_causal' if cfg.causal else ''}_seed{cfg.seed}"
        paths = self.files.write({
            f"{name}.png": figure_bytes(heat, "png"),
            f"{name}.svg": figure_bytes(heat, "svg"),
            f"{name}_head{h}_steps.png": figure_bytes(steps, "png"),
            f"{name}_head{h}_steps.svg": figure_bytes(steps, "svg"),
            f"{name}_weights.csv": weights_csv(result.weights, result.tokens, result.tokens),
        })
        return gr.update(value=paths, visible=True)

    def head_choices(self, emb_dim: float, n_heads: Any) -> Any:
        """New n_heads dropdown (divisors of emb_dim), keeping the current value when still valid."""
        try:
            choices = valid_head_counts(as_int(emb_dim, "emb_dim"))
        except ValueError as exc:
            gr.Warning(error_text(exc))
            return gr.skip()
        try:
            current = as_int(n_heads, "n_heads")
        except ValueError:
            current = choices[0]
        kept = current in choices
        if not kept:
            current = min(choices, key=lambda c: (abs(c - current), c))
        return written_back(gr.Dropdown, current, not kept, choices=choices)

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
        colourblind: bool = False,
    ) -> tuple[Any, Any, Any, Any, Any]:
        """UI: recompute the lab -> (heatmaps, trace rows, notice, head slider, result for `steps_update`).

        The step-by-step figure follows in a chained event from the stored result, so the heatmaps
        show up without waiting for it. Bad settings -> gr.Warning and the previous plots stay.
        """
        try:
            cfg = lab_config(text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head)
            head_i = as_int(0 if head is None or head == "" else head, "head")
            result = run_lab(cfg)
            heat = lab_figure(cfg, result, palette_of(colourblind))
        except ValueError as exc:
            gr.Warning(error_text(exc), title="Invalid settings")
            return gr.skip(), gr.skip(), f"**Not drawn:** {error_text(exc)}", gr.skip(), None
        n_heads_out = int(result.weights.shape[0])
        shown = min(max(head_i, 0), n_heads_out - 1)
        return (
            heat,
            trace_rows(result.trace),
            lab_notice(cfg, result),
            written_back(gr.Slider, shown, shown != head or head is None, maximum=max(n_heads_out - 1, 1),
                         interactive=n_heads_out > 1),
            result,
        )

    @staticmethod
    def steps_update(result: Any, head: float, colourblind: bool = False) -> Any:
        """UI: the step-by-step view of one head of the last lab result (nothing recomputed)."""
        if result is None:
            return gr.skip()
        try:
            return steps_figure(result, head, palette_of(colourblind))
        except ValueError as exc:
            gr.Warning(error_text(exc))
            return gr.skip()

    def apply_setup(self, request: gr.Request) -> tuple[Any, ...]:
        """Page load: the lab's fields from the page URL's query (a shared link), or no change.

        Every value valid on its own is applied; those refused or repaired to fit the others (8
        heads in 12 dimensions -> 6) are named in one warning (`read_setup`)."""
        values, problems = read_setup(query_of(request))
        v = {**LAB_DEFAULTS, **values}
        try:  # repair_setup follows lab_config's rules; should they drift apart, no half-applied setup
            lab_config(v["sentence"], v["emb_dim"], v["n_heads"], v["n_kv_heads"], v["dropout"], v["seed"],
                       v["causal"], v["multi_head"])
        except ValueError as exc:
            problems, values = [*problems, f"the lab settings do not fit together ({exc})"], {}
        warn(problems)
        if not values:
            return tuple(gr.skip() for _ in LAB_FIELDS)
        out = [values[f.name] if f.name in values else gr.skip() for f in LAB_FIELDS]
        # The head-count choices follow emb_dim, as when the slider moves; the head slider's range
        # follows the head count before the first drawing reads it (gradio checks its bounds).
        out[3] = gr.Dropdown(choices=valid_head_counts(v["emb_dim"]), value=v["n_heads"])
        n_out = v["n_heads"] if v["multi_head"] else 1
        out[8] = gr.Slider(maximum=max(n_out - 1, 1), value=v["head"], interactive=n_out > 1)
        return tuple(out)

    def attention_api(
        self,
        text: str = DEFAULT_SENTENCE,
        emb_dim: int = LAB_DEFAULTS["emb_dim"],
        n_heads: int = LAB_DEFAULTS["n_heads"],
        n_kv_heads: int = LAB_DEFAULTS["n_kv_heads"],
        dropout: float = LAB_DEFAULTS["dropout"],
        seed: int = LAB_DEFAULTS["seed"],
        causal: bool = LAB_DEFAULTS["causal"],
        multi_head: bool = LAB_DEFAULTS["multi_head"],
    ) -> PlotPayload:
        """API /attention: the lab's settings -> the per-head heatmaps as {"type": "matplotlib", "plot":
        a PNG data URL}. text: up to 10,000 characters (the first 32 tokens are drawn); emb_dim 4-128;
        n_heads 1-128, a divisor of emb_dim; n_kv_heads 1-16, a divisor of n_heads; dropout 0-0.5;
        seed 0-100; causal, multi_head: true or false. gr.Error naming the input on bad values."""
        try:
            r = API_RANGES
            cfg = lab_config(
                as_text(text, "text", max_chars=API_TEXT_CHARS), as_int(emb_dim, "emb_dim", *r["emb_dim"]),
                as_int(n_heads, "n_heads", *r["n_heads"]), as_int(n_kv_heads, "n_kv_heads", *r["n_kv_heads"]),
                as_float(dropout, "dropout", *r["dropout"]), as_int(seed, "seed", *r["seed"]),
                as_bool(causal, "causal"), as_bool(multi_head, "multi_head"),
            )
            return plot_payload(lab_figure(cfg, run_lab(cfg)))
        except ValueError as exc:
            raise gr.Error(error_text(exc), title="Invalid settings", print_exception=False) from None


@dataclass
class LabView:
    """The lab's widgets other code may need (tests, screenshots, the shared link)."""

    inputs: list[Any]  # in the order of LAB_FIELDS
    heatmaps: gr.Plot
    steps: gr.Plot


def build_lab(demo: gr.Blocks, handlers: LabHandlers | None = None, colourblind: gr.Checkbox | None = None) -> LabView:
    """Lay out the Attention Lab inside the current Blocks/Tab and wire it (plus `/attention`).

    colourblind: the page's colour-blind-safe checkbox (ui.common.palette_checkbox); none: the default colours."""
    state = handlers or LabHandlers()
    palette = colourblind if colourblind is not None else gr.State(False)
    heads0 = valid_head_counts(32)
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
            files_btn = gr.Button("Files of this setup: PNG, SVG, CSV", size="sm", elem_id="lab-files-btn")
            files = gr.File(file_count="multiple", interactive=False, show_label=False, visible=False,
                            elem_id="lab-files")
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

    lab_result = gr.State(None)  # this user's last LabResult, for the step-by-step view

    # -- wiring: Attention Lab ----------------------------------------------------------
    # Its own concurrency group with more slots than the chat has: never stuck behind a reply.
    lab_kw = LAB_EVENTS
    lab_inputs = [text, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, multi_head]
    redraw = dict(fn=state.lab_update, inputs=[*lab_inputs, head, palette],
                  outputs=[heatmaps, trace, lab_msg, head, lab_result], show_progress="minimal", **lab_kw, **REDRAW)
    explain = dict(fn=state.steps_update, inputs=[lab_result, head, palette], outputs=[steps], show_progress="minimal",
                   api_visibility="private", **lab_kw, **REDRAW)
    gr.on([text.submit, dropout.release, seed.release, n_kv_heads.release, causal.input,
           multi_head.input, n_heads.input, *([colourblind.input] if colourblind is not None else [])],
          **redraw, **PRIVATE).then(**explain)
    # Handlers that may call gr.Warning go through the queue: toasts travel on its event stream.
    emb_dim.release(state.head_choices, [emb_dim, n_heads], [n_heads], show_progress="hidden",
                    api_visibility="private", **lab_kw, **REDRAW).then(**redraw, api_visibility="private").then(**explain)
    head.release(**explain)
    files_btn.click(state.lab_files, [*lab_inputs, head, palette], [files], show_progress="minimal", **lab_kw, **PRIVATE)
    # A shared link's setup first, then the first drawing with it.
    demo.load(state.apply_setup, None, [text, multi_head, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, head],
              show_progress="hidden", api_visibility="private", **lab_kw).then(
        **redraw, api_visibility="private").then(**explain)
    # The endpoint takes plain typed values and checks them itself (the widgets' own checks would
    # refuse bad input before it, with no message); its defaults are the widgets' first values.
    gr.api(typed_api(state.attention_api), api_name="attention", **lab_kw)
    return LabView(inputs=[text, multi_head, emb_dim, n_heads, n_kv_heads, dropout, seed, causal, head],
                   heatmaps=heatmaps, steps=steps)
