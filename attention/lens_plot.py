"""Figures of the lenses (what every layer predicts, 4-bit against full precision, head roles) and
the palettes every figure of the app can be drawn with.

Built on ``matplotlib.figure.Figure`` (never pyplot), at the DPI and in the classroom style of
``attention.plot``: large labels, one colour scale per figure, grey for "nothing here". Inputs are
plain numbers and labels (the lens maths lives in ``generation.inside.lens``).

Palettes: the default colour map is viridis (already readable with the common colour-vision
deficiencies); the colour-blind-safe palette switches heat maps to cividis (designed to look the
same to people with and without red-green deficiency) and categorical colours to Okabe & Ito's
eight, which stay distinct under protanopia, deuteranopia and tritanopia.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .canvas import DPI, FIT_WIDTH, MASKED_COLOUR, short_label
from .palette import COLOURBLIND_PALETTE, DEFAULT_PALETTE, OKABE_ITO, PALETTES, Palette, palette_named  # noqa: F401

__all__ = [
    "Palette", "PALETTES", "DEFAULT_PALETTE", "COLOURBLIND_PALETTE", "OKABE_ITO", "palette_named",
    "LensLayout", "plot_logit_lens", "lens_cell", "plot_quant_lens", "plot_head_roles",
]


def _ink(rgba: np.ndarray) -> str:
    """Black or white text, whichever reads on a cell of this colour (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


# ---------------------------------------------------------------------------------------------
# Logit lens: positions x layers, each cell the top token, coloured by its probability


@dataclass(frozen=True)
class LensLayout:
    """Where the logit-lens grid lies in the figure's PNG (pixels from the top-left): for clicks."""

    left: float
    top: float
    cell_w: float
    cell_h: float
    rows: int  # layers; row 0 at the top is the LAST layer (the output on top, as the model stacks them)
    cols: int  # positions


def lens_cell(layout: LensLayout, x: float, y: float) -> tuple[int, int] | None:
    """(layer, position) of the cell at pixel (x, y) of the figure's PNG, or None outside the grid."""
    c = int((x - layout.left) // layout.cell_w)
    r = int((y - layout.top) // layout.cell_h)
    if x < layout.left or y < layout.top or not (0 <= r < layout.rows and 0 <= c < layout.cols):
        return None
    return layout.rows - 1 - r, c


def plot_logit_lens(top_tokens: Sequence[Sequence[str]], top_probs: Sequence[Sequence[float]],
                    tokens: Sequence[str], *, title: str | None = None, palette: Palette = DEFAULT_PALETTE,
                    selected: tuple[int, int] | None = None) -> tuple[Figure, LensLayout]:
    """The lens grid: top_tokens/top_probs (L, T) -> (figure, where its cells are).

    Rows are layers, the last on top; columns are positions, labelled with the token read there
    (each cell guesses the NEXT token). A cell shows its top token; its colour is that token's
    probability on a 0..1 scale. `selected` (layer, position) is outlined.
    """
    probs = np.asarray(top_probs, dtype=float)
    if probs.ndim != 2 or len(top_tokens) != probs.shape[0] or any(len(r) != probs.shape[1] for r in top_tokens):
        raise ValueError(f"top_tokens and top_probs must both be (layers, positions), got {probs.shape}")
    n_layers, t = probs.shape
    if len(tokens) != t:
        raise ValueError(f"tokens must have one label per position ({t}), got {len(tokens)}")
    left, top, right, bottom = 0.75, (0.55 if title else 0.2), 1.1, 1.3
    cell_w = min(0.85, (FIT_WIDTH - left - right) / t)
    cell_h = 0.26
    chars = max(int(cell_w * 72 / 4.6), 2)  # ~4.6 pt per character at 7.5 pt
    width, height = left + t * cell_w + right, top + n_layers * cell_h + bottom
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((left / width, bottom / height, t * cell_w / width, n_layers * cell_h / height))
    cmap = colormaps[palette.cmap]
    norm = Normalize(0.0, 1.0)
    grid = probs[::-1]  # the last layer on top
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
                      extent=(-0.5, t - 0.5, -0.5, n_layers - 0.5), origin="upper")
    colours = cmap(norm(grid))
    for r in range(n_layers):
        layer = n_layers - 1 - r
        for c in range(t):
            ax.text(c, n_layers - 1 - r, short_label(top_tokens[layer][c], chars), ha="center", va="center", fontsize=7.5,
                    color=_ink(colours[r, c]))
    ax.set_yticks(range(n_layers), [f"L{i}" for i in range(n_layers)], fontsize=8)  # y = layer: L0 at the bottom
    ax.set_xticks(range(t), [short_label(s, 10) for s in tokens], rotation=60, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_xlabel("position (token read there; each cell guesses the next one)", fontsize=9)
    ax.set_ylabel("after layer", fontsize=9)
    if selected is not None:
        layer, c = selected
        ax.add_patch(_box(c - 0.5, layer - 0.5, palette.highlight))
    cax = fig.add_axes(((left + t * cell_w + 0.2) / width, bottom / height, 0.15 / width, n_layers * cell_h / height))
    fig.colorbar(image, cax=cax, label="probability of the top token")
    if title:
        fig.text(0.5, 1 - 0.3 / height, title, ha="center", va="center", fontsize=12)
    layout = LensLayout(left=left * DPI, top=top * DPI, cell_w=cell_w * DPI, cell_h=cell_h * DPI, rows=n_layers, cols=t)
    return fig, layout


def _box(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1.0, 1.0, fill=False, edgecolor=colour, linewidth=2.5)


# ---------------------------------------------------------------------------------------------
# Quantization lens: KL per layer, and each model's top token


def plot_quant_lens(kl: Sequence[float], top1_4bit: Sequence[str], top1_full: Sequence[str], *,
                    labels: tuple[str, str] = ("NF4 4-bit", "full precision"), title: str | None = None,
                    palette: Palette = DEFAULT_PALETTE) -> Figure:
    """Bars of KL(full || 4-bit) per layer (log scale), with each model's top token under every bar;
    layers where the two top tokens differ are marked in the palette's highlight colour."""
    kl = np.asarray(kl, dtype=float)
    n = len(kl)
    if n == 0 or len(top1_4bit) != n or len(top1_full) != n:
        raise ValueError(f"kl, top1_4bit and top1_full must have one entry per layer, got {n}, "
                         f"{len(top1_4bit)}, {len(top1_full)}")
    width = min(FIT_WIDTH, 1.8 + 0.55 * n)
    height = 4.6
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((1.3 / width, 1.75 / height, 1 - 1.4 / width, 1 - (1.75 + (0.55 if title else 0.2)) / height))
    floor = 1e-6  # KL can be exactly 0 (identical layers): drawn at the floor of the log scale
    shown = np.maximum(kl, floor)
    flips = [a != b for a, b in zip(top1_4bit, top1_full)]
    colours = [palette.highlight if f else palette.series[0] for f in flips]
    ax.bar(range(n), shown, color=colours, width=0.7)
    ax.set_yscale("log")
    ax.set_ylim(max(floor, float(shown.min()) / 3), max(float(shown.max()) * 3, 1e-3))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=8)
    ax.set_ylabel("KL(full ‖ 4-bit), nats", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("after layer", fontsize=9, labelpad=2)
    chars = max(int(0.55 * 72 / 4.4), 3)
    for row, (name, tops) in enumerate(((labels[1], top1_full), (labels[0], top1_4bit))):
        y = -0.3 - 0.12 * row  # rows of top tokens under the axis label
        ax.text(-0.7, y, f"{name}:", transform=ax.get_xaxis_transform(), ha="right", va="center", fontsize=7.5)
        for i in range(n):
            ax.text(i, y, short_label(tops[i], chars), transform=ax.get_xaxis_transform(), ha="center", va="center",
                    fontsize=7, color=palette.highlight if flips[i] else "black")
    fig.text(0.2 / width, 0.1 / height, "top token of each model after every layer; "
             + ("the highlighted layers are where they differ" if any(flips) else "they agree after every layer"),
             fontsize=8.5, va="bottom")
    if title:
        fig.text(0.5, 1 - 0.3 / height, title, ha="center", va="center", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------
# Head roles: one layers x heads heat map per role


def plot_head_roles(scores: dict[str, Sequence[Sequence[float]]], *, title: str | None = None,
                    palette: Palette = DEFAULT_PALETTE) -> Figure:
    """One heat map per role ({"previous-token": (L, H) scores in [0, 1], ...}): rows are layers,
    columns heads, each cell's score written in it."""
    if not scores:
        raise ValueError("scores must name at least one role")
    grids = {name: np.asarray(s, dtype=float) for name, s in scores.items()}
    shapes = {g.shape for g in grids.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every role's scores must be one (layers, heads) grid, got shapes {sorted(shapes)}")
    n_layers, n_heads = next(iter(shapes))
    cell_w, cell_h, gap = 0.55, 0.27, 0.5
    k = len(grids)
    left, top, bottom = 0.6, (0.9 if title else 0.55), 0.55
    width = left + k * n_heads * cell_w + (k - 1) * gap + 1.1
    height = top + n_layers * cell_h + bottom
    fig = Figure(figsize=(width, height), dpi=DPI)
    cmap, norm = colormaps[palette.cmap].with_extremes(bad=MASKED_COLOUR), Normalize(0.0, 1.0)
    image = None
    for i, (name, grid) in enumerate(grids.items()):
        x = left + i * (n_heads * cell_w + gap)
        ax = fig.add_axes((x / width, bottom / height, n_heads * cell_w / width, n_layers * cell_h / height))
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        colours = cmap(norm(grid))
        for r in range(n_layers):
            for c in range(n_heads):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7, color=_ink(colours[r, c]))
        ax.set_xticks(range(n_heads), [f"h{h}" for h in range(n_heads)], fontsize=8)
        ax.set_yticks(range(n_layers), [f"L{r}" for r in range(n_layers)] if i == 0 else [], fontsize=8)
        ax.set_title(name, fontsize=10)
    cax = fig.add_axes(((width - 0.85) / width, bottom / height, 0.15 / width, n_layers * cell_h / height))
    fig.colorbar(image, cax=cax, label="score (mean attention weight)")
    if title:
        fig.text(0.5, 1 - 0.3 / height, title, ha="center", va="center", fontsize=12)
    return fig

