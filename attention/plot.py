"""Classroom-friendly attention heatmaps, built on ``matplotlib.figure.Figure`` (never pyplot).

Rows are queries ("who is looking"), columns are keys ("who is looked at"). Readable when
projected: token labels are at least 7 pt up to 32 tokens (one size per T, shared by every
figure), the heatmaps grow with T to fit them, and a grid takes fewer columns (more rows) rather
than grow wider than the app's plot column (FIT_WIDTH), where the browser would shrink it.

Made to be cheap enough to redraw on every slider release on a 2-core CPU (bench/lab_update.py): the layout is
computed by hand in inches (constrained layout measured ~0.3 s for 8 heads), every heatmap is an
image in one Axes that spans the figure (an Axes costs ~3 ms to build, a colour bar ~8 ms), and
all text is drawn by ``_Labels`` from cached bitmaps (a ``Text`` costs ~0.5 ms in matplotlib
3.11, and a grid of 8 heads x 32 tokens has ~200 labels). Only the outer heatmaps carry labels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.artist import Artist, allow_rasterization
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm, is_color_like
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.text import Text
from matplotlib.transforms import Bbox, IdentityTransform, Transform
from torch import Tensor

from .functional import keep_from_mask

__all__ = [
    "plot_heads", "plot_head", "plot_steps", "plot_model_view", "model_view_cells", "model_view_cell",
    "plot_token_attention", "figure_bytes", "weights_csv", "ANNOTATE_MAX_TOKENS", "ANNOTATE_MAX_CELLS", "DPI",
    "MASKED_COLOUR",
]

ANNOTATE_MAX_TOKENS = 10  # write the value in every cell up to this many tokens
ANNOTATE_MAX_CELLS = 256  # ... and up to this many cells over all heads of a grid
DPI = 80
MASKED_COLOUR = "#d0d0d0"
# gr.Plot shows a PNG at one CSS pixel per pixel, scaled down to its column: ~900 px on a 1400-px
# screen (the app's plot columns; less on a laptop). A wider figure is shrunk, and its labels with
# it, so grids and step views take fewer columns (more rows) rather than grow past this width.
FIT_WIDTH = 11.5  # inches (920 px at DPI)
_MAX_LABEL = 12  # characters; a longer token is cut with "…" so one long word can't widen the layout
_PITCH = 1.3  # label pitch / font size: a row per label with ~2 px between neighbours at 7 pt
_MAX_SIDE = 4.5  # inches: for T > 32 the labels shrink (to 5 pt) rather than heatmaps grow past this (2 fit FIT_WIDTH)
_VALUE_SIZE = 7.0  # pt, values written in cells
_VALUE_CELL = 0.25  # inches: a cell that holds "1.00" or "−3.2" at _VALUE_SIZE
_TICK_GAP = 0.05  # inches between a heatmap and its labels
_XROTATION = 60.0  # key labels: slanted, readable without turning one's head


def _label(token: str) -> str:
    token = token if len(token) <= _MAX_LABEL else token[: _MAX_LABEL - 1] + "…"
    return token.replace("$", r"\$")  # a lone "$" would start mathtext


def _as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _check_tokens(tokens: Sequence[str], t_q: int, t_k: int) -> list[str]:
    if isinstance(tokens, str) or not all(isinstance(tok, str) for tok in tokens):
        raise ValueError("tokens must be a list of strings, one per position")
    if len(tokens) != t_k or t_q > t_k:
        raise ValueError(f"got {len(tokens)} tokens for a {t_q} x {t_k} attention matrix; need one token per key "
                         f"position ({t_k})")
    return list(tokens)


def _check_matrix(weights: object, ndim: int, what: str) -> Tensor:
    if not isinstance(weights, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != ndim:
        expected = "(H, T, T)" if ndim == 3 else "(T, T)"
        raise ValueError(f"{what} has shape {tuple(weights.shape)}; expected {expected}")
    if weights.shape[-2] < 1 or weights.shape[-1] < 1:
        raise ValueError(f"{what} has shape {tuple(weights.shape)}; it needs at least one query and one key")
    return weights


def _label_size(t: int) -> float:
    """Font size (pt) of the token labels of a T-token figure.

    A function of T alone, so the grid and the step view draw the same labels at the same size and
    a new sentence's label bitmaps are drawn once for both (the first update after typing it).
    Up to 32 tokens (the lab's cap) at least 7 pt, i.e. ~8 px at DPI; the heatmaps grow with T
    instead. Beyond that (the model's maps go to 64 tokens) the labels shrink, down to 5 pt.
    """
    if t <= 12:
        return 9.0
    if t <= 24:
        return 8.0
    if t <= 32:
        return 7.0
    return max(5.0, min(7.0, math.floor(2 * _MAX_SIDE * 72 / (t * _PITCH)) / 2))


def _side(t: int, size: float, minimum: float, annotate: bool) -> float:
    """Width (inches) of a heatmap of T columns: one label pitch per column, a value's width if annotated."""
    pitched = t * size * _PITCH / 72
    return max(minimum, min(pitched, _MAX_SIDE) if t > 32 else pitched, t * _VALUE_CELL if annotate else 0.0)


def _ink(texts: Sequence[str], size: float, rotation: float, ha: str, va: str,
         rotation_mode: str = "default") -> np.ndarray:
    """(left, top, right, bottom) of each string's ink, in inches from its anchor (y down), as _Labels draws it.

    Measured on the very bitmaps that will be drawn (same cache key), so the layout costs no
    extra rendering and leaves room for wide strings ("WWW…") that a per-character guess would clip.
    """
    boxes = np.zeros((len(texts), 4))
    for i, text in enumerate(texts):
        bitmap, dx, dy = _bitmap(text, float(size), float(rotation), ha, va, rotation_mode, float(DPI))
        boxes[i] = dx, dy, dx + bitmap.shape[1], dy + bitmap.shape[0]
    return boxes / DPI


def _label_room(tokens_q: Sequence[str], tokens_k: Sequence[str], size: float, dx: float) -> tuple[float, float]:
    """(left, below): inches the query labels need left of a heatmap, and its rotated key labels under it.

    dx is the column width: the first key labels, slanting left, may reach past the heatmap's left edge.
    """
    ylab = _ink([_label(t) for t in tokens_q], size, 0.0, "right", "center")
    xlab = _ink([_label(t) for t in tokens_k], size, _XROTATION, "right", "top", "anchor")
    overhang = -((np.arange(len(tokens_k)) + 0.5) * dx + xlab[:, 0])
    below = _TICK_GAP + max(float(xlab[:, 3].max()), 0.0)
    return max(_TICK_GAP - float(ylab[:, 0].min()), float(overhang.max())), below


def _fit_columns(n: int, cols: int, width: Callable[[int], float]) -> int:
    """The most columns (at most cols) whose figure fits FIT_WIDTH, then as few as keep that many rows."""
    while cols > 1 and width(cols) > FIT_WIDTH:
        cols -= 1
    return math.ceil(n / math.ceil(n / cols))


@functools.lru_cache(maxsize=4096)
def _bitmap(text: str, size: float, rotation: float, ha: str, va: str, rotation_mode: str,
            dpi: float) -> tuple[np.ndarray, float, float]:
    """A string as matplotlib's own ``Text`` draws it: (coverage (h, w) uint8, dx, dy).

    (dx, dy) is the offset in pixels (y down) of the bitmap's top-left corner from the text's
    anchor point. Cached: a heatmap grid repeats the same few tokens, titles and values over and
    over, across heads, panels and requests. Threads share the arrays, so nothing may write to them
    (they are not flagged read-only only because Agg's draw_text_image insists on a mutable buffer).
    """
    half = math.ceil(size * dpi / 72 * (len(text) + 2)) + 4  # wider than the text, at any rotation
    renderer = RendererAgg(2 * half, 2 * half, dpi)  # transparent; no Figure or canvas needed to draw one Text
    label = Text(half, half, text, fontsize=size, rotation=rotation, ha=ha, va=va, rotation_mode=rotation_mode,
                 transform=IdentityTransform())
    label.set_figure(_dpi_figure(dpi))  # Text reads the dpi from its figure
    label.draw(renderer)
    alpha = np.asarray(renderer.buffer_rgba())[..., 3]
    rows, cols = np.nonzero(alpha)
    if rows.size == 0:
        return np.zeros((0, 0), np.uint8), 0.0, 0.0
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return np.ascontiguousarray(alpha[r0:r1, c0:c1]), float(c0 - half), float(r0 - half)


@functools.lru_cache(maxsize=8)
def _dpi_figure(dpi: float) -> Figure:
    # Never drawn or changed: only lends its dpi to the Text artists _bitmap renders.
    return Figure(dpi=dpi)


class _Labels(Artist):
    """Many short strings (token labels, titles, cell values) drawn as one artist.

    matplotlib 3.11 positions and rasterizes every glyph of every ``Text`` in Python: ~0.5 ms a
    label here, and a grid of 8 heads x 32 tokens has ~200 labels. On the Agg renderer (PNG, as
    gradio's gr.Plot saves it) each string is drawn from a cached bitmap that ``Text`` itself
    rendered once, i.e. the same pixels for ~20 us; on other renderers (PDF, SVG) every string is
    drawn as a plain ``Text``. xy are anchor points in ``transform``'s coordinates.
    """

    zorder = 3  # as Text: above the heatmap image

    def __init__(self, xy: Sequence[tuple[float, float]], texts: Sequence[str], transform: Transform, *,
                 size: float, colors: str | Sequence[str] = "black", rotation: float = 0.0, ha: str = "left",
                 va: str = "baseline", rotation_mode: str = "default") -> None:
        super().__init__()
        self._xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        self._texts = list(texts)
        self._colors = [colors] * len(self._texts) if isinstance(colors, str) else list(colors)
        if not len(self._xy) == len(self._texts) == len(self._colors):
            raise ValueError("_Labels needs one position and one colour per string")
        self._style = (float(size), float(rotation), ha, va, rotation_mode)
        self.set_transform(transform)

    def get_texts(self) -> list[str]:
        """The strings drawn, in order."""
        return list(self._texts)

    def _placed(self, renderer: RendererBase, keep_empty: bool = False) -> list[tuple[int, int, np.ndarray, str]]:
        # (left, top, bitmap, colour) in pixels, y down, as the Agg buffer is laid out.
        height = renderer.get_canvas_width_height()[1]
        points = self.get_transform().transform(self._xy)
        placed = []
        for (x, y), text, colour in zip(points, self._texts, self._colors):
            bitmap, dx, dy = _bitmap(text, *self._style, renderer.points_to_pixels(72.0))
            if bitmap.size or keep_empty:
                placed.append((round(x + dx), round(height - y + dy), bitmap, colour))
        return placed

    @allow_rasterization
    def draw(self, renderer: RendererBase) -> None:
        if not self.get_visible() or not self._texts:
            return
        if not isinstance(renderer, RendererAgg):
            for text in self._as_text():
                text.draw(renderer)
            self.stale = False
            return
        gc = renderer.new_gc()
        gc.set_alpha(self.get_alpha())
        for left, top, bitmap, colour in self._placed(renderer):
            gc.set_foreground(colour)
            # the Agg call Text uses, glyph by glyph; its y is the bitmap's bottom edge
            renderer._renderer.draw_text_image(bitmap, left, top + bitmap.shape[0], 0, gc)
        gc.restore()
        self.stale = False

    def _as_text(self) -> list[Text]:
        size, rotation, ha, va, rotation_mode = self._style
        texts = []
        for (x, y), text, colour in zip(self._xy, self._texts, self._colors):
            t = Text(x, y, text, fontsize=size, rotation=rotation, ha=ha, va=va, rotation_mode=rotation_mode,
                     color=colour, transform=self.get_transform(), alpha=self.get_alpha())
            t.set_figure(self.get_figure(root=False))
            texts.append(t)
        return texts

    def get_window_extents(self, renderer: RendererBase | None = None) -> list[Bbox]:
        """The display box of every string, in order (empty strings get a null box)."""
        if renderer is None:
            renderer = self.get_figure(root=True)._get_renderer()
        if not isinstance(renderer, RendererAgg):
            return [t.get_window_extent(renderer) for t in self._as_text()]
        height = renderer.get_canvas_width_height()[1]
        return [Bbox.from_extents(left, height - top - bitmap.shape[0], left + bitmap.shape[1], height - top)
                if bitmap.size else Bbox.null() for left, top, bitmap, _ in self._placed(renderer, keep_empty=True)]

    def get_window_extent(self, renderer: RendererBase | None = None) -> Bbox:
        # what bbox_inches="tight" and constrained layouts ask for
        return Bbox.union([b for b in self.get_window_extents(renderer) if b.width > 0] or [Bbox.null()])


class _PngCanvas(FigureCanvasAgg):
    """Agg canvas whose PNGs use zlib level 3 (Pillow's default is 6), unless pil_kwargs say otherwise.

    gr.Plot saves with a bare ``savefig(buffer, format="png")``, and the taller layouts of many
    heads at 32 tokens made PNG encoding the largest cost of an update: for 16 heads (~800 x 2900
    px) level 6 took ~55 ms, level 3 ~41 ms for ~15% more bytes (lossless either way). A canvas,
    not a Figure subclass: gradio recognises a matplotlib figure by its class's module.
    """

    def print_png(self, filename_or_obj: Any, *, metadata: dict[str, str] | None = None,
                  pil_kwargs: dict[str, Any] | None = None, **applied: Any) -> None:
        # applied: dpi, facecolor, ... which print_figure passes to a third-party canvas but has
        # already set on the figure (matplotlib drops them for its own print_png)
        super().print_png(filename_or_obj, metadata=metadata, pil_kwargs={"compress_level": 3, **(pil_kwargs or {})})


def _canvas(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure (inches) and one Axes spanning it whose data coordinates are inches from the top-left corner.

    Every heatmap is an image placed in this one Axes, every label a _Labels artist in it: an
    Axes costs ~3 ms to build here (ticks, spines, callbacks) and a colour bar ~8 ms, which was
    most of a figure's time once the labels were cheap.
    """
    fig = Figure(figsize=(width, height), dpi=DPI)
    _PngCanvas(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0.0, width)
    ax.set_ylim(height, 0.0)  # y grows downwards, as the layout is written
    return fig, ax


def _text(ax: Axes, x: float, y: float, text: str, size: float, *, va: str = "center", **kw: object) -> None:
    """One string centred on x (inches from the top-left corner)."""
    ax.add_artist(_Labels([(x, y)], [text], ax.transData, size=size, ha="center", va=va, **kw))


def _heatmap(ax: Axes, x: float, y: float, w: float, h: float, data: np.ndarray, cmap: Colormap, norm: Normalize,
             label: str) -> AxesImage:
    # extent (left, right, bottom, top): row 0 at the top edge y, as in a matrix
    return ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto", extent=(x, x + w, y + h, y),
                     label=label)


def _decorate(ax: Axes, x: float, y: float, w: float, h: float, tokens_q: list[str], tokens_k: list[str],
              size: float, *, xlabels: bool, ylabels: bool) -> None:
    """Query labels left of the heatmap at (x, y, w, h), key labels under it (rotated), one per cell."""
    if ylabels:
        dy = h / len(tokens_q)
        ax.add_artist(_Labels([(x - _TICK_GAP, y + (i + 0.5) * dy) for i in range(len(tokens_q))],
                              [_label(t) for t in tokens_q], ax.transData, size=size, ha="right", va="center"))
    if xlabels:
        dx = w / len(tokens_k)
        ax.add_artist(_Labels([(x + (j + 0.5) * dx, y + h + _TICK_GAP) for j in range(len(tokens_k))],
                              [_label(t) for t in tokens_k], ax.transData, size=size, ha="right", va="top",
                              rotation=_XROTATION, rotation_mode="anchor"))


def _prob_text(v: float) -> str:
    return f"{v:.2f}".removeprefix("0")  # ".43" fits a small cell better than "0.43"


def _annotate(ax: Axes, x: float, y: float, w: float, h: float, values: np.ndarray, norm: Normalize, cmap: Colormap,
              size: float, *, probs: bool, hidden: np.ndarray | None = None, hidden_text: str = "") -> None:
    """The value of every cell of the heatmap at (x, y, w, h), white on dark cells."""
    dx, dy = w / values.shape[1], h / values.shape[0]
    xy: list[tuple[float, float]] = []
    texts: list[str] = []
    colours: list[str] = []
    rgb = cmap(norm(np.where(np.isfinite(values), values, 0.0)))  # (T, T, 4); -inf cells are hidden anyway
    dark = rgb[..., :3] @ np.array([0.299, 0.587, 0.114]) < 0.5  # white text on dark cells
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if hidden is not None and hidden[i, j]:
                if hidden_text:
                    xy.append((x + (j + 0.5) * dx, y + (i + 0.5) * dy))
                    texts.append(hidden_text)
                    colours.append("#555555")
                continue
            v = float(values[i, j])
            xy.append((x + (j + 0.5) * dx, y + (i + 0.5) * dy))
            texts.append(_prob_text(v) if probs else f"{v:.1f}")
            colours.append("white" if dark[i, j] else "black")
    if texts:
        ax.add_artist(_Labels(xy, texts, ax.transData, size=size, colors=colours, ha="center", va="center"))


def _grid(n: int) -> tuple[int, int]:
    if n <= 4:
        return 1, n
    for cols in (4, 3, 5, 6, 8):
        if n % cols == 0 and n // cols <= cols:
            return n // cols, cols
    cols = 4 if n <= 16 else 8
    return math.ceil(n / cols), cols


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
    weights = _check_matrix(weights, 3, "weights")
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
    weights = _check_matrix(weights, 2, "weights")
    return _heatmap_grid(weights[None], tokens, title=title, subtitles=None, cmap=cmap, min_side=5.5, annotate=True,
                         vmax=vmax)


def _heatmap_grid(weights: Tensor, tokens: Sequence[str], *, title: str | None, subtitles: list[str] | None,
                  cmap: str, min_side: float, annotate: bool, vmax: float | None) -> Figure:
    n_heads, t_q, t_k = weights.shape
    toks = _check_tokens(tokens, t_q, t_k)
    if cmap not in colormaps:
        raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap; try 'viridis', 'magma' or 'Blues'")
    if vmax is not None and (isinstance(vmax, bool) or not isinstance(vmax, (int, float)) or not vmax > 0):
        raise ValueError(f"vmax={vmax!r} must be a positive number, or None for the largest weight shown")
    tokens_q = toks[t_k - t_q:]

    annotate = annotate and t_k <= ANNOTATE_MAX_TOKENS
    size = _label_size(t_k)
    cell_w = _side(t_k, size, min_side, annotate)
    cell_h = cell_w * t_q / t_k
    room, xlab = _label_room(tokens_q, toks, size, cell_w / t_k)
    # bar: gap, colour bar, its ticks and label (on an automatic scale "0.05" and a 2-line label are wider)
    head_title, gap_w, bar = (0.3 if subtitles else 0.0), 0.12, 0.2 + 0.15 + (0.6 if vmax is not None else 0.9)
    left, top, bottom = room + 0.3, (0.45 if title else 0.1), xlab + 0.4

    def grid_width(cols: int) -> float:
        return left + cols * cell_w + (cols - 1) * gap_w + bar

    cols = _fit_columns(n_heads, _grid(n_heads)[1], grid_width)
    rows = math.ceil(n_heads / cols)
    row_y = [top + head_title]
    for r in range(rows - 1):  # key labels under a head with an empty cell below it (last row part-full) need room
        row_y.append(row_y[-1] + cell_h + head_title + (xlab if (r + 2) * cols > n_heads else 0.05))
    grid_w = cols * cell_w + (cols - 1) * gap_w
    grid_h = row_y[-1] + cell_h - row_y[0]
    width, height = grid_width(cols), top + head_title + grid_h + bottom
    fig, ax = _canvas(width, height)

    values = _as_numpy(weights)
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
        image = _heatmap(ax, x, y, cell_w, cell_h, shown[h], colours, norm, subtitles[h] if subtitles else "head")
        _decorate(ax, x, y, cell_w, cell_h, tokens_q, toks, size, xlabels=h + cols >= n_heads, ylabels=c == 0)
        if subtitles:
            _text(ax, x + cell_w / 2, y - 0.02 * cell_h, subtitles[h], 10, va="bottom")
        if annotate:
            _annotate(ax, x, y, cell_w, cell_h, values[h], norm, colours, _VALUE_SIZE, probs=True,
                      hidden=zero[h])
    # The one real colour bar (its own Axes): shared by all heads.
    cax = fig.add_axes(((left + grid_w + 0.2) / width, 1 - (top + head_title + grid_h) / height, 0.15 / width,
                        grid_h / height), label="colour bar")
    # two lines on an automatic scale: one would be taller than a single row of small heatmaps
    fig.colorbar(image, cax=cax, label="attention weight" + ("\n(scale: 0 to the largest shown)" if vmax is None else ""))
    if title:
        _text(ax, width / 2, 0.25, title, 12)
    caption = "key (attended to)" + ("      grey = weight 0 (masked or dropped)" if zero.any() else "")
    _text(ax, left + grid_w / 2, height - 0.2, caption, 9)
    _text(ax, 0.15, top + head_title + grid_h / 2, "query (attending)", 9, rotation=90)
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
    ax.add_artist(_Labels([(t, y + h + 0.07) for t in at], [f"{t:g}".replace("-", "−") for t in ticks],
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
        checked.append((item[0], _check_matrix(item[1], 2, f"step {item[0]!r}")))
    shape = checked[0][1].shape
    for label, mat in checked:
        if mat.shape != shape:
            raise ValueError(f"step {label!r} has shape {tuple(mat.shape)}, but the first step has {tuple(shape)}")
    t_q, t_k = shape
    toks = _check_tokens(tokens, t_q, t_k)
    tokens_q = toks[t_k - t_q:]

    n = len(checked)
    annotate = t_k <= ANNOTATE_MAX_TOKENS
    size = _label_size(t_k)  # as plot_heads: the same label bitmaps serve both figures
    panel_w, gap_w, title_h = _side(t_k, size, 2.3, annotate), 0.25, 0.3
    panel_h = panel_w * t_q / t_k
    room, xlab = _label_room(tokens_q, toks, size, panel_w / t_k)
    left, top, cbar_gap, cbar_h = room + 0.1, 0.4, xlab + 0.1, 0.12
    block_h = title_h + panel_h + cbar_gap + cbar_h + 0.4  # a row of panels: title, heatmap, labels, colour bar, ticks

    def steps_width(cols: int) -> float:
        return left + cols * panel_w + (cols - 1) * gap_w + 0.2

    cols = _fit_columns(n, n, steps_width)  # at T > 16, QKᵀ ÷√d_k above mask softmax: still read left to right
    rows = math.ceil(n / cols)
    width, height = steps_width(cols), top + rows * block_h - 0.1
    fig, ax = _canvas(width, height)
    hidden: np.ndarray | None = None
    for idx, (label, mat) in enumerate(checked):
        values = _as_numpy(mat)
        if label == "mask" or (hidden is None and not np.isfinite(values).all()):
            hidden = ~_as_numpy(keep_from_mask(mat.to(torch.float32))).astype(bool)
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
        _heatmap(ax, x, y, panel_w, panel_h, shown, colours, norm, label)
        _decorate(ax, x, y, panel_w, panel_h, tokens_q, toks, size, xlabels=True, ylabels=c == 0)
        _text(ax, x + panel_w / 2, y - 0.04, label, 12, va="bottom")
        if annotate:
            _annotate(ax, x, y, panel_w, panel_h, values, norm, colours, _VALUE_SIZE, probs=probs,
                      hidden=hidden, hidden_text="" if probs else "−∞")
        _colour_strip(ax, x + 0.1 * panel_w, y + panel_h + cbar_gap, 0.8 * panel_w, cbar_h, colours, norm,
                      f"colour bar: {label}")
    note = "rows: queries · columns: keys"
    if hidden is not None and bool(hidden.any()):
        note += " · grey = masked (−∞ before softmax, weight 0 after)"
    _text(ax, width / 2, 0.2, note, 9, colors="#444444")
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
    row_ink = _ink(rows, row_size, 0.0, "right", "center")
    col_ink = _ink(cols, col_size, 0.0, "center", "bottom")
    col_w = max(thumb, float((col_ink[:, 2] - col_ink[:, 0]).max()) + 0.05)
    left = 0.15 + float(-row_ink[:, 0].min()) + 0.12
    room = FIT_WIDTH - left - 0.2 - (n_heads - 1) * _THUMB_GAP  # what the columns may take
    if n_heads * col_w > room:  # many heads (e.g. 16): short column labels, smaller thumbnails
        cols = [f"h{h}" for h in range(n_heads)]
        col_ink = _ink(cols, col_size, 0.0, "center", "bottom")
        thumb = max(0.3, min(thumb, room / n_heads))
        col_w = max(thumb, float((col_ink[:, 2] - col_ink[:, 0]).max()) + 0.05)
    cell_h = thumb * t_q / t_k
    top = (0.45 if title else 0.1) + 0.25 + float(-col_ink[:, 1].min())
    bar_h = 0.55 if scale == "shared" else 0.0
    width = max(left + n_heads * col_w + (n_heads - 1) * _THUMB_GAP + 0.2, 4.0)  # 4 in: room for the legend
    height = top + n_layers * (cell_h + _THUMB_GAP) + bar_h + 0.5
    fig, ax = _canvas(width, height)

    values = _as_numpy(weights)  # (L, H, T, S)
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
            image = _heatmap(ax, x, y, thumb, cell_h, shown[layer, head], colours, norm, f"L{layer} H{head}")
            image.set_gid(f"{_CELL_GID}:{layer}:{head}")
    ax.add_artist(_Labels([(left - 0.12, top + i * (cell_h + _THUMB_GAP) + cell_h / 2) for i in range(n_layers)],
                          rows, ax.transData, size=row_size, ha="right", va="center",
                          colors=[_GLOBAL_COLOUR if g else "black" for g in is_global]))
    ax.add_artist(_Labels([(left + h * (col_w + _THUMB_GAP) + col_w / 2, top - 0.08) for h in range(n_heads)],
                          cols, ax.transData, size=col_size, ha="center", va="bottom"))
    if selected is not None:
        layer, head = selected
        x = left + head * (col_w + _THUMB_GAP) + (col_w - thumb) / 2
        y = top + layer * (cell_h + _THUMB_GAP)
        ax.add_patch(Rectangle((x - 0.02, y - 0.02), thumb + 0.04, cell_h + 0.04, fill=False, edgecolor=highlight,
                               linewidth=2.0, zorder=4))
    if title:
        _text(ax, width / 2, 0.25, title, 12)
    bottom_y = top + n_layers * (cell_h + _THUMB_GAP)
    if scale == "shared":
        _colour_strip(ax, left, bottom_y + 0.1, min(grid_w, 3.0), 0.12, colours, norm, "colour bar: attention weight")
        bottom_y += bar_h
    legend = "rows: layers · columns: heads" + (" · shaded: global layers" if any(is_global) else "")
    _text(ax, width / 2, bottom_y + 0.15, legend, 8, colors="#444444")
    scale_note = "each thumbnail scaled 0 to its own max" if scale == "each" else "one scale for all thumbnails"
    _text(ax, width / 2, bottom_y + 0.32, scale_note + " · grey = weight 0", 8, colors="#444444")
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
                x0, x1, y1, y0 = image.get_extent()  # inches from the top-left, y down (see _heatmap)
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

    values = _as_numpy(weights).astype(np.float64)
    shown_max = float(values[~hide].max())
    norm = Normalize(0.0, max(shown_max, 1e-6))
    colours = colormaps[cmap]
    labels = [_label(t) for t in tokens]
    strip_w = FIT_WIDTH - 0.6
    ink = _ink(labels + ([_label(target)] if target is not None else []), _STRIP_SIZE, 0.0, "left", "center")
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
    fig, ax = _canvas(FIT_WIDTH, height)

    if title:
        _text(ax, FIT_WIDTH / 2, 0.25, title, 12)
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
        texts.append(labels[i] if i < k else _label(target or ""))
        text_colours.append(colour)
    ax.add_artist(_Labels(texts_xy, texts, ax.transData, size=_STRIP_SIZE, colors=text_colours, ha="left",
                          va="center"))
    if underline:
        ax.add_line(Line2D([v for a, b, _ in underline for v in (a, b, np.nan)],
                           [v for _, _, y in underline for v in (y, y, np.nan)], color="#1f5fbf", linewidth=1.5))
    _colour_strip(ax, left, strip_top + strip_h + 0.2, 3.0, 0.1, colours, norm, "colour bar: attention weight")

    # Bars of the most attended tokens, with their positions (the same word can occur twice).
    _text(ax, left + 1.5, bar_top, f"the {len(order)} most attended tokens" + (" (hidden ones left out)"
                                                                                 if hide.any() else ""), 9)
    names = [f"{labels[i]}  #{i}" for i in order]
    name_ink = _ink(names, 8.0, 0.0, "right", "center")
    bar_x = left + max(1.0, float(-name_ink[:, 0].min()) + 0.1)
    bar_len = FIT_WIDTH - bar_x - 1.0
    for row, i in enumerate(order):
        y = bar_top + 0.25 + row * bar_row
        ax.add_patch(Rectangle((bar_x, y), bar_len * values[i] / max(shown_max, 1e-12), bar_row * 0.75,
                               facecolor=rgba[i], edgecolor="#444444", linewidth=0.5))
    ax.add_artist(_Labels([(bar_x - 0.08, bar_top + 0.25 + r * bar_row + bar_row * 0.375) for r in range(len(order))],
                          names, ax.transData, size=8.0, ha="right", va="center"))
    ax.add_artist(_Labels([(bar_x + bar_len * values[i] / max(shown_max, 1e-12) + 0.06,
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
    _text(ax, FIT_WIDTH / 2, height - 0.2, " · ".join(notes) or "scale: 0 to the largest weight shown", 8,
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


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(token: str) -> str:
    # A cell starting with = + - @ is run as a formula by spreadsheet programs (CSV injection), and
    # tokens come from whatever a user typed: a leading apostrophe makes the cell plain text there.
    return "'" + token if token.startswith(_FORMULA_START) else token


def weights_csv(weights: Tensor, tokens_q: Sequence[str], tokens_k: Sequence[str]) -> str:
    """Attention weights as CSV text.

    weights (T, S): a matrix, first row "query \\ key" then the S key tokens, then one row per
    query: its token and S weights. weights (..., T, S) with leading axes (e.g. (H, T, S) or
    (L, H, T, S)): long format, one row per cell, columns "axis0, ..., query_pos, query, key_pos,
    key, weight" (the leading axes named "layer", "head" for 4-D, "head" for 3-D). Weights are
    written with 6 significant digits. Cells that would start a spreadsheet formula (a token such
    as "=" or "-") get a leading apostrophe.
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
    qs, ks = [_csv_text(t) for t in tokens_q], [_csv_text(t) for t in tokens_k]
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
