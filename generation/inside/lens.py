"""Lenses on the chat model: what every layer predicts, where 4-bit goes wrong, what each head does.

* `logit_lens`: the model's own final norm and LM head applied to the residual stream after every
  decoder layer, at every position: the next-token guess the model would make if it stopped there
  (nostalgebraist's "logit lens"). The last layer's guess IS the model's output.
* `quant_lens`: the same lens on the 4-bit model and on its full-precision copy, layer by layer at
  the last position: KL(full || 4-bit) shows where the quantization error enters, and the two top
  tokens show where the prediction flips.
* `head_roles`: every head scored in [0, 1] on three jobs, measured on the model itself through the
  project's attention capture (`captured_maps`): previous-token, first-token (the attention sink),
  and induction (on a random token sequence repeated twice).

No gradio here: the UI wires these functions in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..sampling import ranked_ids
from .introspect import (
    captured_maps,
    check_int,
    check_text,
    ensure_capture,
    model_device,
    prompt_token_ids,
    text_config,
    token_label,
)

__all__ = [
    "LENS_MAX_TOKENS",
    "LENS_TOP",
    "ROLES",
    "LensToken",
    "LogitLens",
    "logit_lens",
    "QuantLensLayer",
    "QuantLens",
    "quant_lens",
    "HeadRoles",
    "head_roles",
    "induction_tokens",
]

LENS_MAX_TOKENS = 24  # positions read: 18 layers x 24 positions x 262k logits is ~1 s of LM head on 2 cores
LENS_MAX_TOKENS_LIMIT = 64  # what a caller may ask for (a 64-column grid is the most a screen shows)
LENS_TOP = 10  # tokens kept per layer and position (a cell "opens" its top 10)
INDUCTION_LENGTH = 24  # random tokens, repeated once: long enough to average, well inside any sliding window
INDUCTION_SEED = 0
ROLES = ("previous_token", "first_token", "induction")
CLEAR_SCORE = 0.3  # a job's mean weight from which a head is named by it (the random baseline is ~0.03)
SINK_SCORE = 0.5  # most of a head's attention on the first token
ROLE_WORDS = {
    "previous_token": "the token just before the current one",
    "first_token": "the first token (the attention sink)",
    "induction": "the token after the previous occurrence of the current one",
}


# ---------------------------------------------------------------------------------------------
# The lens itself: the model's final norm + LM head on a residual stream


def _final_norm_and_head(model: Any) -> tuple[Any, Any]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise ValueError(f"{type(model).__name__} has no final norm (decoder.norm) and LM head to read layers with")
    return norm, head


def _head_logits(model: Any, normed: Tensor) -> Tensor:
    """The LM head on already-normed states (..., D) -> logits (..., V) float32, softcapped as the model does."""
    _, head = _final_norm_and_head(model)
    logits = head(normed).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:  # Gemma 2 (and configs that set it): logits = cap * tanh(logits / cap)
        logits = torch.tanh(logits / cap) * cap
    return logits


def _residuals(model: Any, ids: Tensor) -> tuple[list[Tensor], Tensor]:
    """One forward: (per decoder layer, its output normed by the final norm (T, D); the model's own
    next-token logits (V,) float32 at the last position).

    transformers' hidden_states hold the embeddings, the outputs of layers 0..L-2, and last the
    final norm of layer L-1's output (what the LM head reads), so the last entry is used as it is.
    """
    norm, _ = _final_norm_and_head(model)
    n_layers = int(text_config(model).num_hidden_layers)
    out = model(input_ids=ids.to(model_device(model)), use_cache=False, output_hidden_states=True, logits_to_keep=1)
    states = out.hidden_states
    if states is None or len(states) != n_layers + 1:
        raise ValueError(f"{type(model).__name__} did not return one hidden state per layer; it cannot be lensed")
    normed = [norm(states[i + 1][0]) for i in range(n_layers - 1)] + [states[n_layers][0]]
    return normed, out.logits[0, -1].float()


# ---------------------------------------------------------------------------------------------
# 1. Logit lens


@dataclass(frozen=True)
class LensToken:
    """A candidate next token under the lens."""

    token: str  # readable label (token_label)
    token_id: int
    prob: float  # softmax over the whole vocabulary at temperature 1


@dataclass(frozen=True)
class LogitLens:
    """The lens after every decoder layer at every position read.

    top[l][t] lists the LENS_TOP most likely next tokens after layer l at position t (most likely
    first): position t's guess is for the token at t + 1. top[-1][-1] is the model's own output
    (its logits, not a recomputation), so its first token is what greedy decoding would write.
    """

    tokens: list[str]  # labels of the positions read (T), special tokens included
    token_ids: list[int]
    top: list[list[list[LensToken]]]  # (L, T, LENS_TOP)
    capped: bool  # the text had more than max_tokens tokens: its LAST max_tokens were read
    n_text_tokens: int
    notice: str
    model_id: str

    @property
    def n_layers(self) -> int:
        return len(self.top)

    def last(self, layer: int) -> list[LensToken]:
        """The top tokens after `layer` at the last position (the guess for the text's next token)."""
        check_int("layer", layer, 0, self.n_layers - 1)
        return self.top[layer][-1]

    def settles_at(self) -> int:
        """The first layer from which the last position's top token is the final one, up to the end."""
        final = self.top[-1][-1][0].token_id
        layer = self.n_layers - 1
        while layer > 0 and self.top[layer - 1][-1][0].token_id == final:
            layer -= 1
        return layer

    def summary(self) -> str:
        """One line for a screen reader: what the model guesses next and from which layer on."""
        top = self.top[-1][-1][0]
        first = self.settles_at()
        return (f"After the last layer the model's next-token guess is {top.token!r} (p = {top.prob:.2f}); "
                f"it is the top guess from layer {first} on, and earlier layers guess "
                f"{self.top[0][-1][0].token!r} (layer 0) and {self.top[self.n_layers // 2][-1][0].token!r} "
                f"(layer {self.n_layers // 2}).")


def _top(tok: Any, logits: Tensor, k: int) -> list[list[LensToken]]:
    """logits (N, V) -> per row the k most likely tokens with float64 softmax probabilities."""
    probs = logits.double().softmax(-1)  # (N, V)
    idx = ranked_ids(logits, k)  # (N, k): ties in id order, so the first is the greedy choice
    p = probs.gather(-1, idx)  # (N, k)
    return [[LensToken(token_label(tok, int(i)), int(i), float(q)) for q, i in zip(pr.tolist(), ir.tolist())]
            for pr, ir in zip(p, idx)]


def logit_lens(lm: Any, text: str, *, max_tokens: int = LENS_MAX_TOKENS, k: int = LENS_TOP) -> LogitLens:
    """The next-token guess after every decoder layer at every position of `text` (one forward).

    lm: a `LoadedModel`. The text is tokenized as the model reads it (<bos> first for Gemma); a
    longer one keeps its LAST `max_tokens` tokens (1..64), as the guess for what comes next is the
    point. Each layer's residual stream goes through the model's own final norm and LM head (and
    its logit softcapping, if any); the last layer's last position is the model's own output.
    Raises ValueError for an empty text, bad max_tokens or k, or a model without a final norm.
    """
    tok = lm.tokenizer
    check_text(text)
    check_int("max_tokens", max_tokens, 1, LENS_MAX_TOKENS_LIMIT)
    check_int("k", k, 1, 100)
    ids = prompt_token_ids(tok, text)  # (1, N)
    n_text = int(ids.shape[1])
    capped = n_text > max_tokens
    ids = ids[:, -max_tokens:]  # (1, T)
    with torch.inference_mode():
        normed, own = _residuals(lm.model, ids)
        top = []
        for layer, h in enumerate(normed):
            # One LM-head product per layer, (T, D) -> (T, V): every position at once, and only one
            # layer's logits (T x 262k for Gemma) in memory at a time.
            logits = _head_logits(lm.model, h)
            if layer == len(normed) - 1:
                logits[-1] = own
            top.append(_top(tok, logits, k))
    notes = []
    if capped:
        notes.append(f"The text has {n_text} tokens; the lens reads its last {max_tokens}.")
    notes.append("Each cell: the token the model would predict next if it stopped after that layer "
                 "(its final norm and LM head applied there), at temperature 1.")
    id_list = ids[0].tolist()
    return LogitLens(tokens=[token_label(tok, i) for i in id_list], token_ids=id_list, top=top, capped=capped,
                     n_text_tokens=n_text, notice=" ".join(notes), model_id=str(getattr(lm, "model_id", "")))


# ---------------------------------------------------------------------------------------------
# 2. Quantization lens


@dataclass(frozen=True)
class QuantLensLayer:
    """The lens of both models after one layer, at the last position."""

    layer: int
    kl: float  # KL(P_full || P_4bit) in nats, temperature 1
    top1_4bit: str
    top1_full: str
    p_4bit: float  # each model's probability of its own top token
    p_full: float

    @property
    def agree(self) -> bool:
        return self.top1_4bit == self.top1_full


@dataclass(frozen=True)
class QuantLens:
    """The logit lens of the 4-bit model against its full-precision copy, per decoder layer."""

    layers: list[QuantLensLayer]
    tokens: list[str]  # the positions read; the lens is at the last one
    label_4bit: str
    label_full: str
    capped: bool
    notice: str

    def first_flip(self) -> int | None:
        """The first layer whose top tokens differ (None: they agree everywhere)."""
        return next((r.layer for r in self.layers if not r.agree), None)

    def summary(self) -> str:
        """One line for a screen reader: how the KL grows and where the prediction flips."""
        worst = max(self.layers, key=lambda r: r.kl)
        flip = self.first_flip()
        last = self.layers[-1]
        where = ("the two models' top guesses agree after every layer" if flip is None
                 else f"their top guesses first differ after layer {flip}")
        return (f"KL(full ‖ 4-bit) is {self.layers[0].kl:.3g} nats after layer 0, largest after layer {worst.layer} "
                f"({worst.kl:.3g}) and {last.kl:.3g} after the last; {where}; final guesses "
                f"{last.top1_full!r} (full) and {last.top1_4bit!r} (4-bit).")


def _last_position_lens(lm: Any, ids: Tensor) -> Tensor:
    """(L, V) float64 log-probabilities of the lens at the last position, last layer = the model's own."""
    with torch.inference_mode():
        normed, own = _residuals(lm.model, ids)
        last = torch.stack([h[-1] for h in normed])  # (L, D)
        logits = _head_logits(lm.model, last)  # (L, V)
        logits[-1] = own
    return logits.double().log_softmax(-1)


def quant_lens(lm4: Any, lm_full: Any, text: str, *, max_tokens: int = 1024) -> QuantLens:
    """The logit lens of the 4-bit model and of its full-precision copy at the last position of `text`.

    Both must share the tokenizer and layer count. Per layer: KL(full || 4-bit) of the two lens
    distributions (nats, float64 over the whole vocabulary) and each model's top token. A longer
    text keeps its last `max_tokens` tokens. Raises ValueError for an empty text or mismatched models.
    """
    check_text(text)
    check_int("max_tokens", max_tokens, 1, 1_000_000)
    if lm4.tokenizer.get_vocab() != lm_full.tokenizer.get_vocab():
        raise ValueError("the two models use different tokenizers; compare a model with its own full-precision copy")
    n4, nf = (int(text_config(m.model).num_hidden_layers) for m in (lm4, lm_full))
    if n4 != nf:
        raise ValueError(f"the two models have {n4} and {nf} layers; compare a model with its own copy")
    ids = prompt_token_ids(lm4.tokenizer, text)
    capped = ids.shape[1] > max_tokens
    ids = ids[:, -max_tokens:]
    logq, logp = _last_position_lens(lm4, ids), _last_position_lens(lm_full, ids)  # (L, V) each
    if logq.shape != logp.shape:
        raise ValueError(f"vocabulary sizes differ: {logq.shape[-1]} vs {logp.shape[-1]}")
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (L,)
    tok = lm4.tokenizer
    q1, p1 = logq.argmax(-1), logp.argmax(-1)
    rows = [QuantLensLayer(layer=i, kl=max(float(kl[i]), 0.0), top1_4bit=token_label(tok, int(q1[i])),
                           top1_full=token_label(tok, int(p1[i])), p_4bit=float(logq[i, q1[i]].exp()),
                           p_full=float(logp[i, p1[i]].exp()))
            for i in range(n4)]
    notice = ("KL(full ‖ 4-bit) of the two lenses at the last position, in nats at temperature 1: 0 = the same "
              "distribution. The last layer's is the KL of the models' own outputs.")
    if capped:
        notice = f"The text is longer than {max_tokens} tokens; both models read its last {max_tokens}. " + notice
    return QuantLens(layers=rows, tokens=[token_label(tok, i) for i in ids[0].tolist()],
                     label_4bit=_label(lm4), label_full=_label(lm_full), capped=capped, notice=notice)


def _label(lm: Any) -> str:
    return "NF4 4-bit" if str(getattr(lm, "quantization", "none")) == "nf4" else str(getattr(lm, "dtype", "full"))


# ---------------------------------------------------------------------------------------------
# 3. Head roles


@dataclass(frozen=True)
class HeadRoles:
    """Per layer x head scores in [0, 1]: the mean attention weight a head puts where the role says.

    previous_token[l][h]: on the token just before (queries 2.. of the text: query 1's previous
    token is the first one, whose weight is the sink's). first_token[l][h]: on position 0 (queries
    1..). induction[l][h]: on the token after the previous occurrence of the current token, over
    the second half of a random token sequence repeated twice; induction_baseline: the same
    offset's weight on a sequence with no repeat (what the offset gets by chance).
    """

    previous_token: list[list[float]]
    first_token: list[list[float]]
    induction: list[list[float]]
    induction_baseline: list[list[float]]
    tokens: list[str]  # the text's positions (previous/first-token scores)
    induction_tokens: int  # length of the random sequence (repeated once)
    notice: str

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.induction), len(self.induction[0])

    def scores(self, role: str) -> list[list[float]]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return getattr(self, role)

    def strongest(self, role: str) -> tuple[int, int, float]:
        """(layer, head, score) of the head that scores highest on `role`."""
        grid = self.scores(role)
        return max(((l_, h, s) for l_, row in enumerate(grid) for h, s in enumerate(row)), key=lambda x: x[2])

    def role_of(self, layer: int, head: int) -> tuple[str | None, float]:
        """The head's strongest role and its score, (None, best score) when no role is clear.

        The sink is where most heads rest when their job does not apply (an induction head puts
        ~all its weight on the first token of a text with no repeat), so a head that does a job
        (induction, previous-token) at CLEAR_SCORE or more is named by that job; only then by the
        first token, if it takes most (SINK_SCORE) of its attention.
        """
        jobs = [(r, self.scores(r)[layer][head]) for r in ("induction", "previous_token")]
        role, score = max(jobs, key=lambda x: x[1])
        if score >= CLEAR_SCORE:
            return role, score
        sink = self.first_token[layer][head]
        return ("first_token", sink) if sink >= SINK_SCORE else (None, max(score, sink))

    def describe(self, layer: int, head: int) -> str:
        """'layer 5, head 1 mostly attends to the token after ... (induction 0.90)'."""
        role, score = self.role_of(layer, head)
        if role is None:
            return f"layer {layer}, head {head} has no clear role here (best score {score:.2f})"
        return f"layer {layer}, head {head} mostly attends to {ROLE_WORDS[role]} ({role.replace('_', '-')} {score:.2f})"

    def label(self, layer: int, head: int) -> str:
        """A short tag for a figure: 'induction', 'previous-token', 'first-token' or '' (no clear role)."""
        role, _ = self.role_of(layer, head)
        return "" if role is None else role.replace("_", "-")

    def summary(self) -> str:
        """One line for a screen reader: the clearest head of each role."""
        parts = []
        for role in ROLES:
            layer, head, score = self.strongest(role)
            parts.append(f"layer {layer}, head {head} attends to {ROLE_WORDS[role]} ({score:.2f})")
        return "Clearest heads: " + "; ".join(parts) + "."


def induction_tokens(tokenizer: Any, n: int = INDUCTION_LENGTH, seed: int = INDUCTION_SEED) -> list[int]:
    """n distinct random ordinary tokens (no special ones, none that decodes to nothing), fixed by `seed`."""
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    # Ordinary word pieces sit well inside the vocabulary; the first ids are control and byte tokens.
    lo, hi = min(1000, vocab // 4), vocab
    while len(out) < n:
        i = int(torch.randint(lo, hi, (1,), generator=gen))
        if i not in special and i not in out and tokenizer.decode([i]).strip():
            out.append(i)
    return out


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def _offset_scores(maps: dict[int, Tensor], queries: Tensor, keys: Tensor) -> list[list[float]]:
    """Per layer and head, the mean over the queries of the weight on their key: (L, H) as lists."""
    return [[float(v) for v in maps[layer][:, queries, keys].mean(-1)] for layer in sorted(maps)]


def head_roles(lm: Any, text: str, *, max_tokens: int = 64, n_random: int = INDUCTION_LENGTH) -> HeadRoles:
    """Score every head on previous-token and first-token attention over `text`, and on induction
    over a random sequence of `n_random` tokens repeated twice (plus a sequence with no repeat as
    the baseline). Three forwards, every layer through the project's attention code
    (`captured_maps`). Raises ValueError for an empty or one-token text or bad lengths.
    """
    tok = lm.tokenizer
    check_text(text)
    check_int("max_tokens", max_tokens, 3, 256)
    check_int("n_random", n_random, 4, 200)
    ensure_capture(lm)
    ids = prompt_token_ids(tok, text)[:, :max_tokens]  # (1, T)
    t = int(ids.shape[1])
    if t < 3:
        raise ValueError("the text is too short to score heads: type a few words")
    maps = captured_maps(lm, ids, None)  # {layer: (H, T, T)}
    q = torch.arange(2, t)
    previous = _offset_scores(maps, q, q - 1)
    q = torch.arange(1, t)
    first = _offset_scores(maps, q, torch.zeros_like(q))

    rand = induction_tokens(tok, 2 * n_random)
    bos = _bos(tok)
    start = len(bos)
    # Second copy's query at p (token R[j], j >= 1) -> key p - n + 1: the token after R[j]'s first occurrence.
    q = torch.arange(start + n_random + 1, start + 2 * n_random)
    keys = q - n_random + 1
    repeated = torch.tensor([bos + rand[:n_random] * 2])
    induction = _offset_scores(captured_maps(lm, repeated, None), q, keys)
    fresh = torch.tensor([bos + rand])  # no repeat: the same offset is an ordinary earlier token
    baseline = _offset_scores(captured_maps(lm, fresh, None), q, keys)
    notice = (f"Scores are mean attention weights in [0, 1]: previous-token and first-token over the text's "
              f"{t} tokens, induction over {n_random} random tokens repeated once (the baseline: the same "
              "positions with no repeat).")
    return HeadRoles(previous_token=previous, first_token=first, induction=induction, induction_baseline=baseline,
                     tokens=[token_label(tok, i) for i in ids[0].tolist()], induction_tokens=n_random,
                     notice=notice)
