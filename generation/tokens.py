"""Tokenisation preview, as the notebook's cell: token ids, their pieces and the decoded round trip."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenPreview:
    """ids/pieces (N,) for the first `limit` tokens; round_trip = decode(ids) of those tokens."""

    ids: list[int]
    pieces: list[str]
    round_trip: str
    truncated: bool


def preview_tokens(tokenizer, text: str, limit: int = 256) -> TokenPreview:
    """Tokenise `text` (with the tokenizer's special tokens, e.g. <bos>) and decode it back.

    pieces are the vocabulary strings of each id (SentencePiece's "▁" marks a leading space).
    Raises ValueError if `text` is not a string or `limit` is not a positive integer.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    ids = list(tokenizer(text)["input_ids"])
    truncated = len(ids) > limit
    ids = ids[:limit]
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    return TokenPreview(ids=ids, pieces=pieces, round_trip=tokenizer.decode(ids), truncated=truncated)
