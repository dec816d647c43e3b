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


def reply_text_ids(tokenizer, prompt_text: str, reply: str) -> list[int]:
    """The token ids the model wrote for a reply shown as `reply`, after a prompt rendered as `prompt_text`.

    The chat shows a reply with its leading whitespace stripped, but the model wrote that
    whitespace: after "Assistant:" its first token is "▁The", not "The". The space is put back when
    the prompt ends without whitespace, so the ids (and their positions) are the ones the model wrote.
    """
    if not isinstance(reply, str):
        raise ValueError(f"reply must be text, got {type(reply).__name__}")
    spaced = reply[:1].isspace() or not prompt_text or prompt_text[-1:].isspace()
    text = reply if spaced or not reply else " " + reply
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text of `ids`: the pieces join to decode(ids) exactly.

    Decoded as a running prefix, so a token that ends a multi-byte character carries the whole
    character and the bytes before it carry "" (decoding them one by one would give "\\ufffd").
    """
    out, done = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")  # an incomplete character: it is spelled by a later token
            continue
        out.append(text[len(done):] if text.startswith(done) else text)
        done = text
    return out
