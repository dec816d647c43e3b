"""The drawing primitives every attention figure shares: sizes in inches laid out by hand, token
labels drawn from cached bitmaps (`Labels`), heatmaps as images in one Axes spanning the figure
(`new_canvas`, `draw_heatmap`, `decorate`, `annotate_cells`), and the checks of their inputs.

Why by hand: a figure must be cheap enough to redraw on every slider release on a 2-core CPU
(bench/lab_update.py): constrained layout measured ~0.3 s for 8 heads, an Axes costs ~3 ms to
build, a colour bar ~8 ms, and a ``Text`` ~0.5 ms in matplotlib 3.11, where a grid of 8 heads x
32 tokens has ~200 labels. `attention.plot` and `attention.lens_plot` build the figures from these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.artist import Artist, allow_rasterization
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text
from matplotlib.transforms import Bbox, IdentityTransform, Transform
from torch import Tensor


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
VALUE_SIZE = 7.0  # pt, values written in cells
_VALUE_CELL = 0.25  # inches: a cell that holds "1.00" or "−3.2" at VALUE_SIZE
_TICK_GAP = 0.05  # inches between a heatmap and its labels
_XROTATION = 60.0  # key labels: slanted, readable without turning one's head


@functools.cache
def _drawable_code_points() -> frozenset[int]:
    """The code points the figures' font (matplotlib's default sans-serif, DejaVu Sans as shipped)
    has glyphs for."""
    from matplotlib import font_manager, ft2font

    return frozenset(ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


@functools.lru_cache(maxsize=4096)  # a figure redraw labels the same few tokens again
def drawable(text: str) -> str:
    """`text` with each character the figures' font has no glyph for (CJK, Thai, ... in DejaVu Sans),
    or that is not printable, written as its escape ("\\u7684"): the model predicts such tokens, and
    a learner should see which character it is, not an empty box."""
    cover = _drawable_code_points()
    return "".join(c if c.isprintable() and ord(c) in cover else c.encode("unicode_escape").decode() for c in text)


def short_label(token: str, n: int = _MAX_LABEL) -> str:
    """A token as a figure label: drawable, cut to n characters with "…", "$" kept literal."""
    token = drawable(token)
    token = token if len(token) <= n else token[: max(n - 1, 1)] + "…"
    return token.replace("$", r"\$")  # a lone "$" would start mathtext


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def check_tokens(tokens: Sequence[str], t_q: int, t_k: int) -> list[str]:
    if isinstance(tokens, str) or not all(isinstance(tok, str) for tok in tokens):
        raise ValueError("tokens must be a list of strings, one per position")
    if len(tokens) != t_k or t_q > t_k:
        raise ValueError(f"got {len(tokens)} tokens for a {t_q} x {t_k} attention matrix; need one token per key "
                         f"position ({t_k})")
    return list(tokens)


def check_matrix(weights: object, ndim: int, what: str) -> Tensor:
    if not isinstance(weights, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != ndim:
        expected = "(H, T, T)" if ndim == 3 else "(T, T)"
        raise ValueError(f"{what} has shape {tuple(weights.shape)}; expected {expected}")
    if weights.shape[-2] < 1 or weights.shape[-1] < 1:
        raise ValueError(f"{what} has shape {tuple(weights.shape)}; it needs at least one query and one key")
    return weights


def label_size(t: int) -> float:
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


def panel_side(t: int, size: float, minimum: float, annotate: bool) -> float:
    """Width (inches) of a heatmap of T columns: one label pitch per column, a value's width if annotated."""
    pitched = t * size * _PITCH / 72
    return max(minimum, min(pitched, _MAX_SIDE) if t > 32 else pitched, t * _VALUE_CELL if annotate else 0.0)


def ink_extent(texts: Sequence[str], size: float, rotation: float, ha: str, va: str,
         rotation_mode: str = "default") -> np.ndarray:
    """(left, top, right, bottom) of each string's ink, in inches from its anchor (y down), as Labels draws it.

    Measured on the very bitmaps that will be drawn (same cache key), so the layout costs no
    extra rendering and leaves room for wide strings ("WWW…") that a per-character guess would clip.
    """
    boxes = np.zeros((len(texts), 4))
    for i, text in enumerate(texts):
        bitmap, dx, dy = _bitmap(text, float(size), float(rotation), ha, va, rotation_mode, float(DPI))
        boxes[i] = dx, dy, dx + bitmap.shape[1], dy + bitmap.shape[0]
    return boxes / DPI


def label_room(tokens_q: Sequence[str], tokens_k: Sequence[str], size: float, dx: float) -> tuple[float, float]:
    """(left, below): inches the query labels need left of a heatmap, and its rotated key labels under it.

    dx is the column width: the first key labels, slanting left, may reach past the heatmap's left edge.
    """
    ylab = ink_extent([short_label(t) for t in tokens_q], size, 0.0, "right", "center")
    xlab = ink_extent([short_label(t) for t in tokens_k], size, _XROTATION, "right", "top", "anchor")
    overhang = -((np.arange(len(tokens_k)) + 0.5) * dx + xlab[:, 0])
    below = _TICK_GAP + max(float(xlab[:, 3].max()), 0.0)
    return max(_TICK_GAP - float(ylab[:, 0].min()), float(overhang.max())), below


def fit_columns(n: int, cols: int, width: Callable[[int], float]) -> int:
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


class Labels(Artist):
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
            raise ValueError("Labels needs one position and one colour per string")
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


def new_canvas(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure (inches) and one Axes spanning it whose data coordinates are inches from the top-left corner.

    Every heatmap is an image placed in this one Axes, every label a Labels artist in it: an
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


def draw_text(ax: Axes, x: float, y: float, text: str, size: float, *, va: str = "center", **kw: object) -> None:
    """One string centred on x (inches from the top-left corner)."""
    ax.add_artist(Labels([(x, y)], [text], ax.transData, size=size, ha="center", va=va, **kw))


def draw_heatmap(ax: Axes, x: float, y: float, w: float, h: float, data: np.ndarray, cmap: Colormap, norm: Normalize,
             label: str) -> AxesImage:
    # extent (left, right, bottom, top): row 0 at the top edge y, as in a matrix
    return ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto", extent=(x, x + w, y + h, y),
                     label=label)


def decorate(ax: Axes, x: float, y: float, w: float, h: float, tokens_q: list[str], tokens_k: list[str],
              size: float, *, xlabels: bool, ylabels: bool) -> None:
    """Query labels left of the heatmap at (x, y, w, h), key labels under it (rotated), one per cell."""
    if ylabels:
        dy = h / len(tokens_q)
        ax.add_artist(Labels([(x - _TICK_GAP, y + (i + 0.5) * dy) for i in range(len(tokens_q))],
                              [short_label(t) for t in tokens_q], ax.transData, size=size, ha="right", va="center"))
    if xlabels:
        dx = w / len(tokens_k)
        ax.add_artist(Labels([(x + (j + 0.5) * dx, y + h + _TICK_GAP) for j in range(len(tokens_k))],
                              [short_label(t) for t in tokens_k], ax.transData, size=size, ha="right", va="top",
                              rotation=_XROTATION, rotation_mode="anchor"))


def _prob_text(v: float) -> str:
    return f"{v:.2f}".removeprefix("0")  # ".43" fits a small cell better than "0.43"


def annotate_cells(ax: Axes, x: float, y: float, w: float, h: float, values: np.ndarray, norm: Normalize, cmap: Colormap,
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
        ax.add_artist(Labels(xy, texts, ax.transData, size=size, colors=colours, ha="center", va="center"))


def grid_shape(n: int) -> tuple[int, int]:
    if n <= 4:
        return 1, n
    for cols in (4, 3, 5, 6, 8):
        if n % cols == 0 and n // cols <= cols:
            return n // cols, cols
    cols = 4 if n <= 16 else 8
    return math.ceil(n / cols), cols
