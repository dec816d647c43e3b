"""Attention maps in words: the one line under each heatmap that a screen reader reads.

`describe_map` says where a head's map (T, T) puts its attention; `describe_row` names the tokens
one query attends to most.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def describe_map(weights: Tensor, hidden_mass: Tensor | None = None) -> str:
    """One line on where a head's map (T, T) puts its attention, for a screen reader: the largest of
    the shares on the previous token, the token itself, the first shown token and (hidden_mass (T,),
    what each row gives to hidden special tokens such as <bos>) the hidden ones, averaged over rows.
    """
    if weights.dim() != 2 or weights.shape[0] != weights.shape[1] or weights.shape[0] == 0:
        raise ValueError(f"weights must be one square map (T, T), got {tuple(weights.shape)}")
    t = int(weights.shape[0])
    w = weights.float()
    shares = {"itself": float(w.diagonal().mean())}
    if t > 1:
        shares["the token just before it"] = float(w.diagonal(-1).mean())
        shares["the first token shown"] = float(w[1:, 0].mean())
    if hidden_mass is not None and hidden_mass.numel():
        shares["the hidden special tokens (<bos>)"] = float(hidden_mass.float().mean())
    where, share = max(shares.items(), key=lambda x: x[1])
    return f"mostly attends to {where} (on average {share:.2f} of each row)"


def describe_row(weights: Tensor, tokens: Sequence[str], hidden: Sequence[bool] | None = None, top: int = 3) -> str:
    """'most to 'France' (0.31), 'capital' (0.12), 'Paris' (0.08)': one query's weights (K,) over
    tokens (K labels), the `top` largest among those not hidden."""
    if weights.dim() != 1 or len(tokens) != weights.shape[0] or weights.shape[0] == 0:
        raise ValueError(f"weights must be one row (K,) with one label per weight, got {tuple(weights.shape)} "
                         f"and {len(tokens)} labels")
    keep = [i for i in range(len(tokens)) if not (hidden and hidden[i])]
    if not keep:
        raise ValueError("every token is hidden: nothing to describe")
    order = sorted(keep, key=lambda i: -float(weights[i]))[:top]
    return "most to " + ", ".join(f"'{tokens[i]}' ({float(weights[i]):.2f})" for i in order)
