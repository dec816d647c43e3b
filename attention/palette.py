"""The app's two palettes: the default colours and a colour-blind-safe set (cividis for heat maps,
ColorBrewer's purple-orange for signed scores, Okabe-Ito for categories), one per figure setting."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Palette", "PALETTES", "DEFAULT_PALETTE", "COLOURBLIND_PALETTE", "OKABE_ITO", "palette_named"]

# Okabe & Ito (2008), "Color Universal Design": black, orange, sky blue, bluish green, yellow,
# blue, vermillion, reddish purple.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")


@dataclass(frozen=True)
class Palette:
    """The colours of a figure: a heat map's colour map and categorical colours (series, highlights)."""

    name: str
    cmap: str  # heat maps (0 = dark, high = bright)
    series: tuple[str, ...]  # categorical colours, in order
    highlight: str  # what a figure marks (the chosen cell, a flipped prediction)
    diverging: str  # signed values centred on 0 (attention scores before the softmax)
    strip: str  # a token's background behind dark text (light = little, dark = much)


DEFAULT_PALETTE = Palette("default", "viridis", ("#4f46e5", "#f97316", "#0ea5e9", "#16a34a", "#dc2626"),
                          highlight="#e4002b", diverging="RdBu_r", strip="Oranges")
COLOURBLIND_PALETTE = Palette("colour-blind safe", "cividis",
                              (OKABE_ITO[5], OKABE_ITO[1], OKABE_ITO[2], OKABE_ITO[3], OKABE_ITO[7]),
                              highlight=OKABE_ITO[6], diverging="PuOr_r", strip="Blues")
PALETTES = {"default": DEFAULT_PALETTE, "colourblind": COLOURBLIND_PALETTE}


def palette_named(colourblind: bool) -> Palette:
    """The palette for the app's colour-blind-safe setting."""
    return COLOURBLIND_PALETTE if colourblind else DEFAULT_PALETTE
