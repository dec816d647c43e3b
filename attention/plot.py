"""Classroom-friendly attention heatmaps, built on ``matplotlib.figure.Figure`` (never pyplot).

Rows are queries ("who is looking"), columns are keys ("who is looked at"). Readable when
projected: token labels are at least 7 pt up to 32 tokens (one size per T, shared by every
figure), the heatmaps grow with T to fit them, and a grid takes fewer columns (more rows) rather
than grow wider than the app's plot column (FIT_WIDTH), where the browser would shrink it.

Made to be cheap enough to redraw on every slider release on a 2-core CPU: laid out by hand in
inches with the primitives of `attention.canvas` (heatmaps as images, labels from cached bitmaps).
Only the outer heatmaps carry labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm, is_color_like
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from .canvas import (  # noqa: F401  (the constants are part of this module's names)
    ANNOTATE_MAX_CELLS,
    ANNOTATE_MAX_TOKENS,
    DPI,
    FIT_WIDTH,
    Labels,
    MASKED_COLOUR,
    VALUE_SIZE,
    annotate_cells,
    as_numpy,
    check_matrix,
    check_tokens,
    decorate,
    draw_heatmap,
    draw_text,
    fit_columns,
    grid_shape,
    ink_extent,
    label_room,
    label_size,
    new_canvas,
    panel_side,
    short_label,
)
from .functional import keep_from_mask

__all__ = [
    "plot_heads", "plot_head", "plot_steps", "plot_model_view", "model_view_cells", "model_view_cell",
    "plot_token_attention", "figure_bytes", "weights_csv", "ANNOTATE_MAX_TOKENS", "ANNOTATE_MAX_CELLS", "DPI",
    "MASKED_COLOUR",
]


def plot_heads(
    weights: Tensor,
    tokens: Sequence[str],
    *,
    title: str | None = None,
    kv_groups: Sequence[int] | None = None,
    cmap: str = "viridis",
    vmax: float | None = 1.0,
) -> Figure:
    """Grid of per-head heatmaps of weights (H, T, T) (or (H, T, S), T <= S) with one shared 0..1 colour bar.

    vmax: top of the colour scale; None = the largest weight shown (for maps whose rows lose most
    of their mass to hidden tokens, which a fixed 0..1 scale would leave nearly black).

    tokens: one label per key position; query labels run down the left column, key labels under
    the bottom heatmap of each column. kv_groups: the KV head each query head reads; when given,
    every subplot title names it (grouped-query attention). Cells whose weight is exactly 0
    (masked, or removed by dropout) are grey. Values are written in the cells when
    T <= ANNOTATE_MAX_TOKENS and the grid has at most ANNOTATE_MAX_CELLS cells (each written value
    is a text artist, ~0.4 ms to draw here; more would also be too small to read).
    """
    weights = check_matrix(weights, 3, "weights")
    n_heads = weights.shape[0]
    if kv_groups is not None and (
        isinstance(kv_groups, str) or len(kv_groups) != n_heads or not all(isinstance(g, int) for g in kv_groups)
    ):
        raise ValueError(f"kv_groups must list one KV-head index per query head ({n_heads}), got {kv_groups!r}")
    subtitles = [f"head {h}" + (f" · KV head {kv_groups[h]}" if kv_groups is not None else "") for h in range(n_heads)]
    min_side = 3.6 if n_heads == 1 else 2.2 if n_heads <= 4 else 1.9
    return _heatmap_grid(weights, tokens, title=title, subtitles=subtitles, cmap=cmap, min_side=min_side,
                         annotate=weights.numel() <= ANNOTATE_MAX_CELLS, vmax=vmax)


def plot_head(weights: Tensor, tokens: Sequence[str], *, title: str | None = None, cmap: str = "viridis",
              vmax: float | None = 1.0) -> Figure:
    """One large heatmap of a single head's weights (T, T), with values written in when T <= 10 (vmax as plot_heads)."""
    weights = check_matrix(weights, 2, "weights")
    return _heatmap_grid(weights[None], tokens, title=title, subtitles=None, cmap=cmap, min_side=5.5, annotate=True,
                         vmax=vmax)


def _heatmap_grid(weights: Tensor, tokens: Sequence[str], *, title: str | None, subtitles: list[str] | None,
                  cmap: str, min_side: float, annotate: bool, vmax: float | None) -> Figure:
    n_heads, t_q, t_k = weights.shape
    toks = check_tokens(tokens, t_q, t_k)
    if cmap not in colormaps:
        raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap; try 'viridis', 'magma' or 'Blues'")
    if vmax is not None and (isinstance(vmax, bool) or not isinstance(vmax, (int, float)) or not vmax > 0):
        raise ValueError(f"vmax={vmax!r} must be a positive number, or None for the largest weight shown")
    tokens_q = toks[t_k - t_q:]

    annotate = annotate and t_k <= ANNOTATE_MAX_TOKENS
    size = label_size(t_k)
    cell_w = panel_side(t_k, size, min_side, annotate)
    cell_h = cell_w * t_q / t_k
    room, xlab = label_room(tokens_q, toks, size, cell_w / t_k)
    # bar: gap, colour bar, its ticks and label (on an automatic scale "0.05" and a 2-line label are wider)
    head_title, gap_w, bar = (0.3 if subtitles else 0.0), 0.12, 0.2 + 0.15 + (0.6 if vmax is not None else 0.9)
    left, top, bottom = room + 0.3, (0.45 if title else 0.1), xlab + 0.4

    def grid_width(cols: int) -> float:
        return left + cols * cell_w + (cols - 1) * gap_w + bar

    cols = fit_columns(n_heads, grid_shape(n_heads)[1], grid_width)
    rows = math.ceil(n_heads / cols)
    row_y = [top + head_title]
    for r in range(rows - 1):  # key labels under a head with an empty cell below it (last row part-full) need room
        row_y.append(row_y[-1] + cell_h + head_title + (xlab if (r + 2) * cols > n_heads else 0.05))
    grid_w = cols * cell_w + (cols - 1) * gap_w
    grid_h = row_y[-1] + cell_h - row_y[0]
    width, height = grid_width(cols), top + head_title + grid_h + bottom
    fig, ax = new_canvas(width, height)

    values = as_numpy(weights)
    if vmax is None:
        norm = Normalize(0.0, max(float(values.max()), 1e-6))
    else:  # dropout scales survivors by 1/(1-p): keep them on scale
        norm = Normalize(0.0, max(float(vmax), float(values.max())))
    colours = colormaps[cmap].with_extremes(bad=MASKED_COLOUR)
    zero = values == 0.0
    shown = np.ma.masked_array(values, mask=zero)
    image = None
    for h in range(n_heads):
        r, c = divmod(h, cols)
        x, y = left + c * (cell_w + gap_w), row_y[r]
        image = draw_heatmap(ax, x, y, cell_w, cell_h, shown[h], colours, norm, subtitles[h] if subtitles else "head")
        decorate(ax, x, y, cell_w, cell_h, tokens_q, toks, size, xlabels=h + cols >= n_heads, ylabels=c == 0)
        if subtitles:
            draw_text(ax, x + cell_w / 2, y - 0.02 * cell_h, subtitles[h], 10, va="bottom")
        if annotate:
            annotate_cells(ax, x, y, cell_w, cell_h, values[h], norm, colours, VALUE_SIZE, probs=True,
                      hidden=zero[h])
    # The one real colour bar (its own Axes): shared by all heads.
    cax = fig.add_axes(((left + grid_w + 0.2) / width, 1 - (top + head_title + grid_h) / height, 0.15 / width,
                        grid_h / height), label="colour bar")
    # two lines on an automatic scale: one would be taller than a single row of small heatmaps
    fig.colorbar(image, cax=cax, label="attention weight" + ("\n(scale: 0 to the largest shown)" if vmax is None else ""))
    if title:
        draw_text(ax, width / 2, 0.25, title, 12)
    caption = "key (attended to)" + ("      grey = weight 0 (masked or dropped)" if zero.any() else "")
    draw_text(ax, left + grid_w / 2, height - 0.2, caption, 9)
    draw_text(ax, 0.15, top + head_title + grid_h / 2, "query (attending)", 9, rotation=90)
    return fig


def _colour_strip(ax: Axes, x: float, y: float, w: float, h: float, cmap: Colormap, norm: Normalize,
                  label: str) -> None:
    """A horizontal colour bar drawn in ax (an image, an outline, ticks): a real one costs an Axes."""
    lo, hi = float(norm.vmin), float(norm.vmax)
    ax.imshow(np.linspace(lo, hi, 256)[None], cmap=cmap, norm=norm, interpolation="nearest", aspect="auto",
              extent=(x, x + w, y + h, y), label=label)
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="black", linewidth=0.8))
    ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 5, 10]).tick_values(lo, hi)
             if lo - 1e-9 * (hi - lo) <= t <= hi + 1e-9 * (hi - lo)]
    at = [x + w * (t - lo) / (hi - lo) for t in ticks]
    ax.add_line(Line2D([v for t in at for v in (t, t, np.nan)], [v for _ in at for v in (y + h, y + h + 0.05, np.nan)],
                       color="black", linewidth=0.8))
    ax.add_artist(Labels([(t, y + h + 0.07) for t in at], [f"{t:g}".replace("-", "−") for t in ticks],
                          ax.transData, size=8, ha="center", va="top"))


def plot_steps(steps: Sequence[tuple[str, Tensor]], tokens: Sequence[str], *, cmap: str = "viridis",
               diverging: str = "RdBu_r") -> Figure:
    """The step-by-step view: one panel per (label, (T, T) matrix), e.g. from ``explain_head``.

    Score panels use a diverging map (`diverging`) centred on 0, each with its own colour bar; from the "mask"
    step on, masked cells (-inf, or very negative for additive masks) are flat grey, marked "−∞"
    in score panels when T <= 10 (where values are written in); a "softmax" panel uses 0..1 (`cmap`).
    """
    for name, value in (("cmap", cmap), ("diverging", diverging)):
        if value not in colormaps:
            raise ValueError(f"{name}={value!r} is not a matplotlib colormap; try 'viridis' or 'RdBu_r'")
    if isinstance(steps, (str, Tensor)) or len(steps) == 0:
        raise ValueError("steps must be a non-empty list of (label, (T, T) tensor) pairs, e.g. explain_head(...)")
    checked: list[tuple[str, Tensor]] = []
    for item in steps:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"each step must be a (label, tensor) pair, got {item!r:.60}")
        checked.append((item[0], check_matrix(item[1], 2, f"step {item[0]!r}")))
    shape = checked[0][1].shape
    for label, mat in checked:
        if mat.shape != shape:
            raise ValueError(f"step {label!r} has shape {tuple(mat.shape)}, but the first step has {tuple(shape)}")
    t_q, t_k = shape
    toks = check_tokens(tokens, t_q, t_k)
    tokens_q = toks[t_k - t_q:]

    n = len(checked)
    annotate = t_k <= ANNOTATE_MAX_TOKENS
    size = label_size(t_k)  # as plot_heads: the same label bitmaps serve both figures
    panel_w, gap_w, title_h = panel_side(t_k, size, 2.3, annotate), 0.25, 0.3
    panel_h = panel_w * t_q / t_k
    room, xlab = label_room(tokens_q, toks, size, panel_w / t_k)
    left, top, cbar_gap, cbar_h = room + 0.1, 0.4, xlab + 0.1, 0.12
    block_h = title_h + panel_h + cbar_gap + cbar_h + 0.4  # a row of panels: title, heatmap, labels, colour bar, ticks

    def steps_width(cols: int) -> float:
        return left + cols * panel_w + (cols - 1) * gap_w + 0.2

    cols = fit_columns(n, n, steps_width)  # at T > 16, QKᵀ ÷√d_k above mask softmax: still read left to right
    rows = math.ceil(n / cols)
    width, height = steps_width(cols), top + rows * block_h - 0.1
    fig, ax = new_canvas(width, height)
    hidden: np.ndarray | None = None
    for idx, (label, mat) in enumerate(checked):
        values = as_numpy(mat)
        if label == "mask" or (hidden is None and not np.isfinite(values).all()):
            hidden = ~as_numpy(keep_from_mask(mat.to(torch.float32))).astype(bool)
        probs = label == "softmax"
        shown = np.ma.masked_array(np.where(np.isfinite(values), values, 0.0),
                                   mask=hidden if hidden is not None else False)
        if probs:
            colours = colormaps[cmap].with_extremes(bad=MASKED_COLOUR)
            norm: Normalize = Normalize(0.0, max(1.0, float(values.max())))
        else:
            colours = colormaps[diverging].with_extremes(bad=MASKED_COLOUR)
            finite = shown.compressed()
            bound = float(np.abs(finite).max()) if finite.size else 1.0
            norm = TwoSlopeNorm(0.0, -(bound or 1.0), bound or 1.0)
        r, c = divmod(idx, cols)
        x, y = left + c * (panel_w + gap_w), top + r * block_h + title_h
        draw_heatmap(ax, x, y, panel_w, panel_h, shown, colours, norm, label)
        decorate(ax, x, y, panel_w, panel_h, tokens_q, toks, size, xlabels=True, ylabels=c == 0)
        draw_text(ax, x + panel_w / 2, y - 0.04, label, 12, va="bottom")
        if annotate:
            annotate_cells(ax, x, y, panel_w, panel_h, values, norm, colours, VALUE_SIZE, probs=probs,
                      hidden=hidden, hidden_text="" if probs else "−∞")
        _colour_strip(ax, x + 0.1 * panel_w, y + panel_h + cbar_gap, 0.8 * panel_w, cbar_h, colours, norm,
                      f"colour bar: {label}")
    note = "rows: queries · columns: keys"
    if hidden is not None and bool(hidden.any()):
        note += " · grey = masked (−∞ before softmax, weight 0 after)"
    draw_text(ax, width / 2, 0.2, note, 9, colors="#444444")
    return fig


# ---------------------------------------------------------------------------------------------
# Every layer at once, one token's attention, and downloads

_THUMB_GAP = 0.08  # inches between thumbnails
_GLOBAL_SHADE = "#fde6c8"  # behind the rows of global layers
_GLOBAL_COLOUR = "#a34700"  # their row labels
_SELECTED = "#e4002b"
_CELL_GID = "model-view-cell"


def plot_model_view(
    weights: Tensor,
    *,
    layer_kinds: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
    thumb: float = 0.8,
    scale: str = "each",
    selected: tuple[int, int] | None = None,
    cmap: str = "viridis",
    highlight: str = _SELECTED,
) -> Figure:
    """Every layer x every head as a grid of small heatmaps: weights (L, H, T, T) (or (L, H, T, S)).

    Layers are rows ("L0 (sliding)", "L5 (global)" from layer_kinds; rows of "global" layers are
    shaded), heads are columns (head_labels, default "head h"). No token labels: at 64 tokens a
    thumbnail has about one pixel per token; show one large with plot_head. scale "each": every
    thumbnail runs from 0 to its own largest weight (patterns stay visible when a hidden <bos>
    takes most of a row); "shared": one 0..max scale with a colour bar. Weights exactly 0
    (masked) are grey. selected: (layer, head) outlined in `highlight` (red). thumb: thumbnail side in inches;
    with too many heads for FIT_WIDTH the thumbnails shrink (to 0.3 in at least) and the columns
    are labelled "h0", "h1", .... model_view_cell(fig, x, y) maps a pixel of the PNG back to (layer, head).
    """
    if not isinstance(weights, Tensor) or weights.dim() != 4 or min(weights.shape) < 1:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor (L, H, T, S) of every layer's attention, got {shape}")
    n_layers, n_heads, t_q, t_k = weights.shape
    if t_q > t_k:
        raise ValueError(f"weights has {t_q} queries but only {t_k} keys; expected (L, H, T, S) with T <= S")
    if layer_kinds is not None and (isinstance(layer_kinds, str) or len(layer_kinds) != n_layers
                                    or not all(isinstance(k, str) for k in layer_kinds)):
        raise ValueError(f"layer_kinds must name one kind per layer ({n_layers}), got {layer_kinds!r}")
    if head_labels is not None and (isinstance(head_labels, str) or len(head_labels) != n_heads
                                    or not all(isinstance(k, str) for k in head_labels)):
        raise ValueError(f"head_labels must give one label per head ({n_heads}), got {head_labels!r}")
    if isinstance(thumb, bool) or not isinstance(thumb, (int, float)) or not 0.3 <= thumb <= 3.0:
        raise ValueError(f"thumb={thumb!r} must be a thumbnail side in inches between 0.3 and 3")
    if scale not in ("each", "shared"):
        raise ValueError(f"scale must be 'each' (every thumbnail 0..its max) or 'shared', got {scale!r}")
    if not is_color_like(highlight):
        raise ValueError(f"highlight={highlight!r} is not a colour")
    if cmap not in colormaps:
        raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap; try 'viridis', 'magma' or 'Blues'")
    if selected is not None and not (
        isinstance(selected, tuple) and len(selected) == 2 and all(isinstance(v, int) for v in selected)
        and 0 <= selected[0] < n_layers and 0 <= selected[1] < n_heads
    ):
        raise ValueError(f"selected must be a (layer, head) pair within {n_layers} layers x {n_heads} heads, "
                         f"got {selected!r}")

    rows = [f"L{i}" + (f" ({layer_kinds[i]})" if layer_kinds is not None else "") for i in range(n_layers)]
    cols = list(head_labels) if head_labels is not None else [f"head {h}" for h in range(n_heads)]
    is_global = [layer_kinds is not None and layer_kinds[i] == "global" for i in range(n_layers)]
    row_size, col_size = 9.0, 8.0
    row_ink = ink_extent(rows, row_size, 0.0, "right", "center")
    col_ink = ink_extent(cols, col_size, 0.0, "center", "bottom")
    col_w = max(thumb, float((col_ink[:, 2] - col_ink[:, 0]).max()) + 0.05)
    left = 0.15 + float(-row_ink[:, 0].min()) + 0.12
    room = FIT_WIDTH - left - 0.2 - (n_heads - 1) * _THUMB_GAP  # what the columns may take
    if n_heads * col_w > room:  # many heads (e.g. 16): short column labels, smaller thumbnails
        cols = [f"h{h}" for h in range(n_heads)]
        col_ink = ink_extent(cols, col_size, 0.0, "center", "bottom")
        thumb = max(0.3, min(thumb, room / n_heads))
        col_w = max(thumb, float((col_ink[:, 2] - col_ink[:, 0]).max()) + 0.05)
    cell_h = thumb * t_q / t_k
    top = (0.45 if title else 0.1) + 0.25 + float(-col_ink[:, 1].min())
    bar_h = 0.55 if scale == "shared" else 0.0
    width = max(left + n_heads * col_w + (n_heads - 1) * _THUMB_GAP + 0.2, 4.0)  # 4 in: room for the legend
    height = top + n_layers * (cell_h + _THUMB_GAP) + bar_h + 0.5
    fig, ax = new_canvas(width, height)

    values = as_numpy(weights)  # (L, H, T, S)
    zero = values == 0.0
    if scale == "each":
        peak = values.max(axis=(2, 3), keepdims=True)
        values = values / np.maximum(peak, 1e-12)
        norm = Normalize(0.0, 1.0)
    else:
        norm = Normalize(0.0, max(float(values.max()), 1e-6))
    colours = colormaps[cmap].with_extremes(bad=MASKED_COLOUR)
    shown = np.ma.masked_array(values, mask=zero)
    grid_w = n_heads * col_w + (n_heads - 1) * _THUMB_GAP
    for layer in range(n_layers):
        y = top + layer * (cell_h + _THUMB_GAP)
        if is_global[layer]:  # the band marks the layers that see every earlier token
            ax.add_patch(Rectangle((left - 0.06, y - _THUMB_GAP / 2), grid_w + 0.12, cell_h + _THUMB_GAP,
                                   facecolor=_GLOBAL_SHADE, edgecolor="none", zorder=0))
        for head in range(n_heads):
            x = left + head * (col_w + _THUMB_GAP) + (col_w - thumb) / 2
            image = draw_heatmap(ax, x, y, thumb, cell_h, shown[layer, head], colours, norm, f"L{layer} H{head}")
            image.set_gid(f"{_CELL_GID}:{layer}:{head}")
    ax.add_artist(Labels([(left - 0.12, top + i * (cell_h + _THUMB_GAP) + cell_h / 2) for i in range(n_layers)],
                          rows, ax.transData, size=row_size, ha="right", va="center",
                          colors=[_GLOBAL_COLOUR if g else "black" for g in is_global]))
    ax.add_artist(Labels([(left + h * (col_w + _THUMB_GAP) + col_w / 2, top - 0.08) for h in range(n_heads)],
                          cols, ax.transData, size=col_size, ha="center", va="bottom"))
    if selected is not None:
        layer, head = selected
        x = left + head * (col_w + _THUMB_GAP) + (col_w - thumb) / 2
        y = top + layer * (cell_h + _THUMB_GAP)
        ax.add_patch(Rectangle((x - 0.02, y - 0.02), thumb + 0.04, cell_h + 0.04, fill=False, edgecolor=highlight,
                               linewidth=2.0, zorder=4))
    if title:
        draw_text(ax, width / 2, 0.25, title, 12)
    bottom_y = top + n_layers * (cell_h + _THUMB_GAP)
    if scale == "shared":
        _colour_strip(ax, left, bottom_y + 0.1, min(grid_w, 3.0), 0.12, colours, norm, "colour bar: attention weight")
        bottom_y += bar_h
    legend = "rows: layers · columns: heads" + (" · shaded: global layers" if any(is_global) else "")
    draw_text(ax, width / 2, bottom_y + 0.15, legend, 8, colors="#444444")
    scale_note = "each thumbnail scaled 0 to its own max" if scale == "each" else "one scale for all thumbnails"
    draw_text(ax, width / 2, bottom_y + 0.32, scale_note + " · grey = weight 0", 8, colors="#444444")
    return fig


def model_view_cells(fig: Figure, dpi: float | None = None) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    """{(layer, head): (left, top, right, bottom)} of every thumbnail of a plot_model_view figure, in
    pixels from the top-left corner of the image saved at `dpi` (default: the figure's own, as
    figure_bytes and gr.Plot save it)."""
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure from plot_model_view, got {type(fig).__name__}")
    scale = float(dpi if dpi is not None else fig.dpi)
    cells = {}
    for ax in fig.axes:
        for image in ax.get_images():
            gid = image.get_gid() or ""
            if gid.startswith(_CELL_GID + ":"):
                _, layer, head = gid.split(":")
                x0, x1, y1, y0 = image.get_extent()  # inches from the top-left, y down (see draw_heatmap)
                cells[int(layer), int(head)] = (x0 * scale, y0 * scale, x1 * scale, y1 * scale)
    if not cells:
        raise ValueError("this figure has no model-view thumbnails; make it with plot_model_view")
    return cells


def model_view_cell(fig: Figure | dict[tuple[int, int], tuple[float, float, float, float]], x: float, y: float, *,
                    dpi: float | None = None) -> tuple[int, int] | None:
    """The (layer, head) whose thumbnail contains pixel (x, y) of the saved image (from the top-left,
    as gr.Image's select event reports it), or None for a click between thumbnails.

    fig: the plot_model_view figure, or the dict model_view_cells(fig) returned (small and plain:
    what a UI keeps in its state instead of the figure; dpi is then ignored).
    """
    cells = fig if isinstance(fig, dict) else model_view_cells(fig, dpi)
    for key, (x0, y0, x1, y1) in cells.items():
        if x0 <= x <= x1 and y0 <= y <= y1:
            return key
    return None


_STRIP_SIZE = 9.0  # pt, tokens in the text strip
_STRIP_LINE = 0.26  # inches per line of the strip
_STRIP_PAD = 0.035  # inches of fill left and right of a token's ink
_STRIP_GAP = 0.04  # inches between tokens (word boundaries are not shown otherwise: labels are trimmed)


def plot_token_attention(
    weights: Tensor,
    tokens: Sequence[str],
    *,
    target: str | None = None,
    reply_start: int | None = None,
    hidden: Sequence[bool] | None = None,
    title: str | None = None,
    top: int = 10,
    cmap: str = "Oranges",
    highlight: str = _SELECTED,
) -> Figure:
    """How much one token attended to every earlier token: weights (K,) over tokens (K labels).

    Drawn as the text itself, each token on a background as dark as its weight (scale 0 to the
    largest shown), followed by `target` (the token being written) outlined in `highlight` (red); reply tokens
    (index >= reply_start) are underlined in blue. Below, the `top` most attended tokens as bars
    with their weights. hidden: per token, True = leave it out of the colours and bars (e.g.
    <bos>, which often takes most of a row); its share is written in the caption. Rows of a
    softmax sum to 1 over all K tokens, hidden ones included.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.shape[0] < 1:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be one row (K,) of attention over the K earlier tokens, got {shape}")
    k = int(weights.shape[0])
    if isinstance(tokens, str) or len(tokens) != k or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"tokens must be a list of {k} strings, one per weight")
    if target is not None and not isinstance(target, str):
        raise ValueError(f"target must be the written token's label or None, got {type(target).__name__}")
    if reply_start is not None and (isinstance(reply_start, bool) or not isinstance(reply_start, int)
                                    or not 0 <= reply_start <= k):
        raise ValueError(f"reply_start must be an index in 0..{k}, got {reply_start!r}")
    if hidden is None:
        hide = np.zeros(k, dtype=bool)
    elif isinstance(hidden, str) or len(hidden) != k:
        raise ValueError(f"hidden must give one True/False per token ({k})")
    else:
        hide = np.asarray([bool(h) for h in hidden])
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 50:
        raise ValueError(f"top must be an integer in [1, 50], got {top!r}")
    if cmap not in colormaps:
        raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap; try 'Oranges', 'Blues' or 'viridis'")
    if not is_color_like(highlight):
        raise ValueError(f"highlight={highlight!r} is not a colour")
    if hide.all():
        raise ValueError("every token is hidden: nothing left to show")

    values = as_numpy(weights).astype(np.float64)
    shown_max = float(values[~hide].max())
    norm = Normalize(0.0, max(shown_max, 1e-6))
    colours = colormaps[cmap]
    labels = [short_label(t) for t in tokens]
    strip_w = FIT_WIDTH - 0.6
    ink = ink_extent(labels + ([short_label(target)] if target is not None else []), _STRIP_SIZE, 0.0, "left", "center")
    widths = np.maximum(ink[:, 2] - ink[:, 0], 0.06) + 2 * _STRIP_PAD

    # Flow the tokens into lines like text.
    place: list[tuple[float, int]] = []  # (x, line) per token (and the target last)
    x, line = 0.0, 0
    for w in widths:
        if x > 0 and x + w > strip_w:
            x, line = 0.0, line + 1
        place.append((x, line))
        x += w + _STRIP_GAP
    n_lines = line + 1
    left = 0.3
    title_h = 0.45 if title else 0.15
    strip_top = title_h + 0.1
    strip_h = n_lines * _STRIP_LINE
    order = [i for i in np.argsort(-values, kind="stable") if not hide[i]][:top]
    bar_top = strip_top + strip_h + 0.75
    bar_row = 0.2
    height = bar_top + 0.3 + len(order) * bar_row + 0.55
    fig, ax = new_canvas(FIT_WIDTH, height)

    if title:
        draw_text(ax, FIT_WIDTH / 2, 0.25, title, 12)
    texts_xy, texts, text_colours = [], [], []
    underline: list[tuple[float, float, float]] = []
    rgba = colours(norm(values))
    dark = rgba[:, :3] @ np.array([0.299, 0.587, 0.114]) < 0.5
    for i, ((px, ln), w) in enumerate(zip(place, widths)):
        bx, by = left + px, strip_top + ln * _STRIP_LINE + 0.02
        bh = _STRIP_LINE - 0.04
        if i < k:
            if hide[i]:
                ax.add_patch(Rectangle((bx, by), w, bh, facecolor="white", edgecolor="#bbbbbb", linewidth=0.6,
                                       linestyle="--"))
                colour = "#888888"
            else:
                ax.add_patch(Rectangle((bx, by), w, bh, facecolor=rgba[i], edgecolor="none"))
                colour = "white" if dark[i] else "black"
            if reply_start is not None and i >= reply_start:
                underline.append((bx, bx + w, by + bh + 0.015))
        else:  # the token being written
            ax.add_patch(Rectangle((bx, by), w, bh, facecolor="white", edgecolor=highlight, linewidth=1.6))
            colour = highlight
        texts_xy.append((bx + _STRIP_PAD - ink[i, 0], by + bh / 2))
        texts.append(labels[i] if i < k else short_label(target or ""))
        text_colours.append(colour)
    ax.add_artist(Labels(texts_xy, texts, ax.transData, size=_STRIP_SIZE, colors=text_colours, ha="left",
                          va="center"))
    if underline:
        ax.add_line(Line2D([v for a, b, _ in underline for v in (a, b, np.nan)],
                           [v for _, _, y in underline for v in (y, y, np.nan)], color="#1f5fbf", linewidth=1.5))
    _colour_strip(ax, left, strip_top + strip_h + 0.2, 3.0, 0.1, colours, norm, "colour bar: attention weight")

    # Bars of the most attended tokens, with their positions (the same word can occur twice).
    draw_text(ax, left + 1.5, bar_top, f"the {len(order)} most attended tokens" + (" (hidden ones left out)"
                                                                                 if hide.any() else ""), 9)
    names = [f"{labels[i]}  #{i}" for i in order]
    name_ink = ink_extent(names, 8.0, 0.0, "right", "center")
    bar_x = left + max(1.0, float(-name_ink[:, 0].min()) + 0.1)
    bar_len = FIT_WIDTH - bar_x - 1.0
    for row, i in enumerate(order):
        y = bar_top + 0.25 + row * bar_row
        ax.add_patch(Rectangle((bar_x, y), bar_len * values[i] / max(shown_max, 1e-12), bar_row * 0.75,
                               facecolor=rgba[i], edgecolor="#444444", linewidth=0.5))
    ax.add_artist(Labels([(bar_x - 0.08, bar_top + 0.25 + r * bar_row + bar_row * 0.375) for r in range(len(order))],
                          names, ax.transData, size=8.0, ha="right", va="center"))
    ax.add_artist(Labels([(bar_x + bar_len * values[i] / max(shown_max, 1e-12) + 0.06,
                            bar_top + 0.25 + r * bar_row + bar_row * 0.375) for r, i in enumerate(order)],
                          [f"{values[i]:.3f}" for i in order], ax.transData, size=8.0, ha="left", va="center"))
    notes = []
    if hide.any():
        names_hidden = ", ".join(sorted({labels[i] for i in np.flatnonzero(hide)}))
        notes.append(f"hidden {names_hidden}: {100 * float(values[hide].sum()):.0f}% of the attention")
    if reply_start is not None and reply_start < k:
        notes.append("underlined: the reply written so far")
    if target is not None:
        notes.append("red: the token being written")
    draw_text(ax, FIT_WIDTH / 2, height - 0.2, " · ".join(notes) or "scale: 0 to the largest weight shown", 8,
          colors="#444444")
    return fig


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """The figure as a file's bytes, for a download button: fmt "png" (as gr.Plot shows it, at the
    figure's dpi) or "svg" (text kept as text; no timestamp, so the same figure gives the same bytes)."""
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be 'png' or 'svg', got {fmt!r}")
    import io

    buf = io.BytesIO()
    if fmt == "svg":
        from matplotlib import rc_context

        with rc_context({"svg.fonttype": "none", "svg.hashsalt": "attention-lab"}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png")
    return buf.getvalue()


def token_text(token: str) -> str:
    """A token label for a table, a list or a CSV cell: control characters written as escapes."""
    return token if token.isprintable() else token.encode("unicode_escape").decode()


def csv_cell(token: str) -> str:
    """A token as a CSV cell: control characters written as escapes (as the app's token labels
    write them), and a cell that would start with = + - @ quoted as text with a leading apostrophe.

    Spreadsheet programs run such a cell as a formula (CSV injection), and tokens come from
    whatever a user typed. Tab and carriage return, the other formula starts, are escaped first.
    """
    token = token_text(token)
    return "'" + token if token[:1] in ("=", "+", "-", "@") else token


def weights_csv(weights: Tensor, tokens_q: Sequence[str], tokens_k: Sequence[str]) -> str:
    """Attention weights as CSV text.

    weights (T, S): a matrix, first row "query \\ key" then the S key tokens, then one row per
    query: its token and S weights. weights (..., T, S) with leading axes (e.g. (H, T, S) or
    (L, H, T, S)): long format, one row per cell, columns "axis0, ..., query_pos, query, key_pos,
    key, weight" (the leading axes named "layer", "head" for 4-D, "head" for 3-D). Weights are
    written with 6 significant digits. Token cells are written by `csv_cell`: control characters
    as escapes, and a cell that would start a spreadsheet formula (a token such as "=" or "-")
    with a leading apostrophe.
    """
    if not isinstance(weights, Tensor) or weights.dim() < 2:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor (T, S) or (..., T, S), got {shape}")
    t_q, t_k = weights.shape[-2:]
    for name, toks, n in (("tokens_q", tokens_q, t_q), ("tokens_k", tokens_k, t_k)):
        if isinstance(toks, str) or len(toks) != n or not all(isinstance(t, str) for t in toks):
            raise ValueError(f"{name} must be {n} strings, one per {'query' if name == 'tokens_q' else 'key'} "
                             f"row/column of weights {tuple(weights.shape)}")
    import csv
    import io

    values = weights.detach().to("cpu", torch.float64).numpy()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    qs, ks = [csv_cell(t) for t in tokens_q], [csv_cell(t) for t in tokens_k]
    if values.ndim == 2:
        writer.writerow(["query \\ key", *ks])
        for i in range(t_q):
            writer.writerow([qs[i], *(f"{v:.6g}" for v in values[i])])
        return out.getvalue()
    lead = values.shape[:-2]
    names = {1: ["head"], 2: ["layer", "head"]}.get(len(lead), [f"axis{i}" for i in range(len(lead))])
    writer.writerow([*names, "query_pos", "query", "key_pos", "key", "weight"])
    for index in np.ndindex(*lead):
        block = values[index]
        for i in range(t_q):
            for j in range(t_k):
                writer.writerow([*index, i, qs[i], j, ks[j], f"{block[i, j]:.6g}"])
    return out.getvalue()
