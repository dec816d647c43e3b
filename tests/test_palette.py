"""Every figure for everyone: the colour-blind-safe setting reaches the Lab's heatmaps and
step-by-step view, the model view, a reply's attention strip and the reply-token colours (the
inside maps and lenses: test_lens*.py), and each map has its line in words for a screen reader.
Figures only, no model."""

from __future__ import annotations

import pytest
import torch
from matplotlib import colormaps
from matplotlib.colors import is_color_like

from attention.palette import COLOURBLIND_PALETTE, DEFAULT_PALETTE, PALETTES, palette_named
from attention.plot import plot_model_view, plot_steps, plot_token_attention


def image_cmaps(fig) -> set[str]:
    return {im.get_cmap().name for ax in fig.axes for im in ax.get_images()}


@pytest.mark.parametrize("palette", list(PALETTES.values()), ids=list(PALETTES))
def test_palette_colours_exist(palette):
    for name in (palette.cmap, palette.diverging, palette.strip):
        assert name in colormaps
    assert is_color_like(palette.highlight) and all(is_color_like(c) for c in palette.series)


def test_palette_named():
    assert palette_named(True) is COLOURBLIND_PALETTE and palette_named(False) is DEFAULT_PALETTE


@pytest.mark.parametrize("colourblind", [False, True])
def test_the_lab_follows_the_setting(colourblind):
    from ui.lab import LabHandlers

    h = LabHandlers()
    palette = palette_named(colourblind)
    heat, _, _, _, result = h.lab_update("The cat sat on the mat", 32, 4, 2, 0.0, 0, True, True, 0, colourblind)
    assert image_cmaps(heat) == {palette.cmap}
    steps = h.steps_update(result, 1, colourblind)
    assert image_cmaps(steps) == {palette.cmap, palette.diverging}  # scores diverging, the softmax sequential


def test_a_setting_that_is_not_true_is_the_default():
    from ui.common import palette_of

    assert palette_of("yes") is DEFAULT_PALETTE and palette_of(1) is DEFAULT_PALETTE and palette_of(True) is COLOURBLIND_PALETTE


@pytest.mark.parametrize("colourblind", [False, True])
def test_model_view_and_strip_follow_the_setting(colourblind):
    palette = palette_named(colourblind)
    w = torch.rand(3, 2, 5, 5).softmax(-1)
    grid = plot_model_view(w, selected=(1, 1), cmap=palette.cmap, highlight=palette.highlight)
    assert image_cmaps(grid) == {palette.cmap}
    edges = {p.get_edgecolor() for ax in grid.axes for p in ax.patches if not p.get_fill()}
    assert any(is_color_like(e) and tuple(round(x, 3) for x in e[:3]) ==
               tuple(round(int(palette.highlight[i:i + 2], 16) / 255, 3) for i in (1, 3, 5)) for e in edges)
    strip = plot_token_attention(torch.tensor([0.5, 0.3, 0.2]), ["a", "b", "c"], target="d", cmap=palette.strip,
                                 highlight=palette.highlight)
    assert image_cmaps(strip) <= {palette.strip}  # the colour bar strip


def test_bad_colours_are_value_errors():
    steps = [("QKᵀ", torch.randn(3, 3)), ("softmax", torch.rand(3, 3))]
    with pytest.raises(ValueError, match="diverging"):
        plot_steps(steps, ["a", "b", "c"], diverging="nope")
    with pytest.raises(ValueError, match="cmap"):
        plot_steps(steps, ["a", "b", "c"], cmap="nope")
    with pytest.raises(ValueError, match="highlight"):
        plot_model_view(torch.rand(1, 1, 3, 3), highlight="not a colour")
    with pytest.raises(ValueError, match="highlight"):
        plot_token_attention(torch.tensor([1.0]), ["a"], highlight="not a colour")


def test_reply_token_colours_have_a_colour_blind_set():
    from ui.tokens_view import COLOURBLIND_COLOURS, COLOURS

    assert list(COLOURBLIND_COLOURS) == list(COLOURS) and all(is_color_like(c) for c in COLOURBLIND_COLOURS.values())


def test_rows_and_maps_in_words():
    from attention.describe import describe_map, describe_row

    row = torch.tensor([0.5, 0.1, 0.3, 0.1])
    assert describe_row(row, ["<bos>", "a", "b", "c"], [True, False, False, False], top=2) == "most to 'b' (0.30), 'a' (0.10)"
    with pytest.raises(ValueError, match="hidden"):
        describe_row(row[:1], ["<bos>"], [True])
    with pytest.raises(ValueError, match="one label per weight"):
        describe_row(row, ["a"])
    assert describe_map(torch.eye(3)).startswith("mostly attends to itself (on average 1.00")
