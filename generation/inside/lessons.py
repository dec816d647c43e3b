"""Lessons that ask before they tell: each step asks the learner to predict what the model does,
then runs the live model and shows what it did.

A lesson is data (`Lesson`, `Step`); a step's `measure(lm, full)` runs the model and returns a
`Reveal`: which choice the model's behaviour matches and the figures that show it. Nothing here is
a stored answer: another model (`MODEL_ID`), or the other rounding, may answer differently, and the
lesson then says so. `full` is a callable that returns the full-precision copy (loaded on first use);
only the 4-bit lesson calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..sampling import SamplingParams
from .introspect import (
    captured_maps,
    compare_quantization,
    ensure_capture,
    next_token_candidates,
    prompt_token_ids,
    token_label,
)
from .lens import head_roles, induction_tokens

HEADS_TEXT = "The cat sat on the mat because it was tired."
PROMPT = "The capital of France is"
INDUCTION_LENGTH = 24  # random tokens, repeated once


@dataclass(frozen=True)
class Reveal:
    """What the live model did: the choice it matches, why (markdown) and the figures (a table)."""

    answer: int  # index into the step's choices
    explanation: str
    headers: tuple[str, ...]
    rows: list[list[str]]


@dataclass(frozen=True)
class Step:
    question: str  # markdown: what to predict
    choices: tuple[str, ...]
    measure: Callable[[Any, Callable[[], Any]], Reveal]


@dataclass(frozen=True)
class Lesson:
    key: str
    title: str
    intro: str
    steps: tuple[Step, ...]


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def _bin(value: float, edges: tuple[float, ...]) -> int:
    """Index of the bin of `value`: edges are the upper bounds of all bins but the last."""
    return next((i for i, e in enumerate(edges) if value <= e), len(edges))


# ---------------------------------------------------------------------------------------------
# 1. What a head looks at


def _last_word_maps(lm: Any) -> tuple[list[str], torch.Tensor]:
    """(token labels, every layer's maps (L, H, T, T)) of HEADS_TEXT, special tokens included."""
    ensure_capture(lm)
    ids = prompt_token_ids(lm.tokenizer, HEADS_TEXT)  # (1, T)
    maps = captured_maps(lm, ids, None)  # {layer: (H, T, T)}
    labels = [token_label(lm.tokenizer, i) for i in ids[0].tolist()]
    return labels, torch.stack([maps[i] for i in sorted(maps)])  # (L, H, T, T)


def _where_last_word_looks(lm: Any, full: Callable[[], Any]) -> Reveal:
    labels, maps = _last_word_maps(lm)
    t = len(labels)
    q = t - 2 if labels[-1] == "." else t - 1  # the last word, not the full stop
    row = maps[:, :, q, : q + 1].mean((0, 1))  # (q + 1,) averaged over layers and heads
    cat = next((i for i, s in enumerate(labels) if s.lower() == "cat"), -1)
    top = int(row.argmax())
    answer = {0: 0, q - 1: 1, q: 2, cat: 3}.get(top, 4)
    order = row.argsort(descending=True, stable=True)[:6].tolist()  # ties as argmax: the lower index first
    rows = [[labels[i], _pct(float(row[i]))] for i in order]
    explanation = (
        f"Averaged over all {maps.shape[0]} layers × {maps.shape[1]} heads, **'{labels[q]}'** puts "
        f"{_pct(float(row[top]))} of its attention on **'{labels[top]}'**"
        + (" — the first token. Heads with nothing to do here rest on it (an *attention sink*): "
           "softmax must put the weight somewhere." if top == 0 else ".")
    )
    return Reveal(answer, explanation, ("token looked at", "mean weight"), rows)


def _heads_on_the_sink(lm: Any, full: Callable[[], Any]) -> Reveal:
    labels, maps = _last_word_maps(lm)
    t = len(labels)
    q = t - 2 if labels[-1] == "." else t - 1
    sink = maps[:, :, q, 0]  # (L, H): weight each head puts on the first token
    share = float((sink > 0.5).float().mean())
    answer = _bin(share, (0.0, 0.25, 0.75))
    per_layer = (sink > 0.5).sum(1).tolist()
    rows = [[str(layer), f"{n} of {maps.shape[1]}", _pct(float(sink[layer].mean()))]
            for layer, n in enumerate(per_layer)]
    explanation = (
        f"**{int((sink > 0.5).sum())} of {sink.numel()} heads** ({_pct(share)}) put more than half of "
        f"'{labels[q]}''s attention on the first token. A head's map is only worth reading where it "
        "does not rest: that is why the model view hides the first token by default."
    )
    return Reveal(answer, explanation, ("layer", "heads over half on it", "mean weight on it"), rows)


HEADS = Lesson(
    "heads", "What a head looks at",
    f"The real model reads *{HEADS_TEXT}* Every head of every layer spreads each word's attention over "
    "the words before it (row sums to 1). Where does it go?",
    (
        Step("Averaged over every head of every layer, where does the last word, **'tired'**, put most "
             "of its attention?",
             ("on the first token (<bos>)", "on the word just before it ('was')", "on itself",
              "on 'cat', the one who is tired", "on another word"),
             _where_last_word_looks),
        Step("Now head by head: how many of the model's heads put **more than half** of 'tired''s "
             "attention on the first token?",
             ("none", "a few (under a quarter)", "a quarter to three quarters", "most (over three quarters)"),
             _heads_on_the_sink),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. What temperature does


def _candidates(lm: Any, temperature: float, top_p: float = 1.0) -> Any:
    return next_token_candidates(lm, PROMPT, SamplingParams(temperature=temperature, top_p=top_p), k=5)


def _colder_is_sharper(lm: Any, full: Callable[[], Any]) -> Reveal:
    temps = (0.5, 1.0, 1.5)
    nts = [_candidates(lm, t) for t in temps]
    top = nts[1].candidates[0]
    p = {t: next(c.prob_temperature for c in nt.candidates if c.token_id == top.token_id) for t, nt in zip(temps, nts)}
    diff = p[0.5] - p[1.0]
    answer = 2 if abs(diff) < 1e-6 else (0 if diff > 0 else 1)
    # Temperature scales every logit alike, so the order of the candidates is the same at every T.
    rows = [[cs[1].token] + [_pct(c.prob_temperature) for c in cs] for cs in zip(*(nt.candidates for nt in nts))]
    explanation = (
        f"The top candidate **'{top.token}'**: {_pct(p[1.0])} at T = 1, **{_pct(p[0.5])} at T = 0.5**, "
        f"{_pct(p[1.5])} at T = 1.5. Temperature divides the logits before the softmax: below 1 it "
        "stretches their gaps (the favourite gains), above 1 it shrinks them (the others catch up)."
    )
    return Reveal(answer, explanation, ("token", "T = 0.5", "T = 1", "T = 1.5"), rows)


def _how_many_top_p_keeps(lm: Any, full: Callable[[], Any]) -> Reveal:
    nt = _candidates(lm, 1.0, top_p=0.9)
    answer = _bin(nt.kept, (1, 10, 100))
    chat = _candidates(lm, 0.7, top_p=0.95)
    rows = [[c.token, _pct(c.prob_temperature), "kept" if c.removed_by is None else "cut"] for c in nt.candidates]
    explanation = (
        f"Top-p 0.9 keeps the most likely tokens until their probabilities add up to 0.9: here "
        f"**{nt.kept:,} of {nt.vocab_size:,} tokens**. With the chat's own settings (T 0.7, top-p 0.95) "
        f"it keeps {chat.kept:,}. A sure model keeps few; an unsure one many."
    )
    return Reveal(answer, explanation, ("token", "p at T = 1", "top-p 0.9"), rows)


TEMPERATURE = Lesson(
    "temperature", "What temperature does",
    f"The model's next-token distribution after *{PROMPT}*, and what the chat's sampling controls do to it.",
    (
        Step("At temperature 1 the model gives its favourite next token some probability. At "
             "**temperature 0.5**, is the favourite's probability …",
             ("higher", "lower", "the same"),
             _colder_is_sharper),
        Step("With **top-p 0.9** at temperature 1, how many tokens of the vocabulary may the chat draw "
             "from?",
             ("just 1", "2 to 10", "11 to 100", "more than 100"),
             _how_many_top_p_keeps),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. What 4-bit costs


SIZE_CHOICES = (1.5, 2.0, 4.0, 8.0)


def _how_much_smaller(lm: Any, full: Callable[[], Any]) -> Reveal:
    cmp = compare_quantization(lm, full(), PROMPT, decode_tokens=1)
    ratio = cmp.size_ratio
    answer = min(range(len(SIZE_CHOICES)), key=lambda i: abs(math.log(SIZE_CHOICES[i] / ratio)))
    emb = lm.model.get_input_embeddings().weight
    emb_bytes = emb.numel() * emb.element_size()
    rows = [[cmp.quantized.label, f"{cmp.quantized.weight_bytes / 2**20:.1f} MiB"],
            [cmp.full.label, f"{cmp.full.weight_bytes / 2**20:.1f} MiB"],
            ["of which the embedding table (not quantized)", f"{emb_bytes / 2**20:.1f} MiB"]]
    blocks = sorted({int(m.weight.quant_state.blocksize) for m in lm.model.modules()
                     if getattr(getattr(m, "weight", None), "quant_state", None) is not None})
    explanation = (
        f"The full-precision weights are **{ratio:.2f}× larger**, not 4×: bitsandbytes quantizes the "
        f"linear layers (4 bits a weight plus a scale per block of {' or '.join(map(str, blocks)) or 'a few dozen'} "
        f"weights), while the embedding table — "
        f"{tuple(emb.shape)[0]:,} tokens × {tuple(emb.shape)[1]} numbers, {emb_bytes / 2**20:.0f} MiB — "
        "keeps 16 bits. In a small model with a large vocabulary, that table is most of the bytes."
    )
    return Reveal(answer, explanation, ("weights", "bytes"), rows)


def _same_top_token(lm: Any, full: Callable[[], Any]) -> Reveal:
    cmp = compare_quantization(lm, full(), PROMPT, decode_tokens=1)
    rows = [[r.token, _pct(r.prob_4bit), _pct(r.prob_full), str(r.rank_4bit), str(r.rank_full)] for r in cmp.rows[:6]]
    explanation = (
        f"The 4-bit model's favourite is {'the same' if cmp.top1_agree else '**not** the same'} as full "
        f"precision's; the two distributions differ by **KL = {cmp.kl_full_to_4bit:.4f} nats**. Rounding "
        "every weight to one of 16 values moves each probability a little; what matters for a chat is "
        "whether the order of the candidates survives."
    )
    return Reveal(0 if cmp.top1_agree else 1, explanation,
                  ("token", "4-bit p", "full p", "4-bit rank", "full rank"), rows)


WRITTEN = 9  # tokens each model writes in the last step
AGREE_CHOICES = ("all of them", "the first few, then they part", "they differ from the first token on")


def _how_long_they_agree(lm: Any, full: Callable[[], Any]) -> Reveal:
    cmp = compare_quantization(lm, full(), PROMPT, decode_tokens=WRITTEN - 1)
    mine, theirs = cmp.quantized.written, cmp.full.written
    agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    answer = 0 if agree == len(mine) else 2 if agree == 0 else 1
    rows = [[str(i + 1), token_label(lm.tokenizer, a), token_label(lm.tokenizer, b), "same" if a == b else "differs"]
            for i, (a, b) in enumerate(zip(mine, theirs))]
    parted = ("They write the same tokens all the way." if agree == len(mine) else
              f"They part at token {agree + 1}." if agree else "They part at the very first token.")
    explanation = (
        f"Greedy, {len(mine)} tokens each: the two agree on the first **{agree} of {len(mine)}**. {parted} "
        "Each token is chosen from the ones before it, so after the first token that differs, the two "
        "models continue two different texts: a small change in one next-token distribution can change "
        "everything a chat writes after it. (What 4-bit costs, in the Attention Lab tab, shows this for "
        "your own text, and for bitsandbytes' plain rounding too.)"
    )
    return Reveal(answer, explanation, ("token", cmp.quantized.label, cmp.full.label, "same?"), rows)


FOUR_BIT = Lesson(
    "four_bit", "What 4-bit costs",
    "The chat's model stores its layers' weights in 4 bits (NF4) instead of 16. The lesson loads a "
    "full-precision copy beside it (the first time takes a while).",
    (
        Step("4 bits instead of 16 for each weight: how much smaller is the **whole model** in memory?",
             tuple(f"about {r:g}×" for r in SIZE_CHOICES),
             _how_much_smaller),
        Step(f"After *{PROMPT}*, does the 4-bit model pick the **same most likely next token** as the "
             "full-precision one?",
             ("yes, the same token", "no, another token"),
             _same_top_token),
        Step(f"Both models now write on after *{PROMPT}*, always taking their most likely token. Of "
             f"the next {WRITTEN} tokens, how many are the same?",
             AGREE_CHOICES,
             _how_long_they_agree),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. An induction head


OFFSETS = ("the token just before it", "the first token", "the earlier copy of the same token",
           "the token that came after the earlier copy")


def _induction_maps(lm: Any) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(maps (L, H, T, T) of a random sequence repeated once, second-copy query positions, n, start)."""
    ensure_capture(lm)
    tok = lm.tokenizer
    bos = [] if tok.bos_token_id is None else [int(tok.bos_token_id)]
    rand = induction_tokens(tok, INDUCTION_LENGTH)
    maps = captured_maps(lm, torch.tensor([bos + rand * 2]), None)
    start = len(bos)
    q = torch.arange(start + INDUCTION_LENGTH + 1, start + 2 * INDUCTION_LENGTH)
    return torch.stack([maps[i] for i in sorted(maps)]), q, INDUCTION_LENGTH, start


def _where_induction_looks(lm: Any, full: Callable[[], Any]) -> Reveal:
    maps, q, n, start = _induction_maps(lm)
    keys = (q - 1, torch.zeros_like(q), q - n, q - n + 1)  # one per choice in OFFSETS
    scores = torch.stack([maps[:, :, q, k].mean(-1) for k in keys])  # (4, L, H)
    layer, head = divmod(int(scores[3].argmax()), maps.shape[1])
    here = scores[:, layer, head]  # (4,)
    answer = int(here.argmax())
    rows = [[what, _pct(float(s))] for what, s in zip(OFFSETS, here)]
    explanation = (
        f"The model's clearest induction head, **layer {layer}, head {head}**, puts {_pct(float(here[answer]))} "
        f"of a second-copy token's attention on {OFFSETS[answer]}. That is how a model continues a "
        "pattern it has seen once: find the last time this token appeared, look at what came next, copy it."
    )
    return Reveal(answer, explanation, (f"layer {layer}, head {head} looks at", "mean weight"), rows)


def _where_induction_lives(lm: Any, full: Callable[[], Any]) -> Reveal:
    roles = head_roles(lm, HEADS_TEXT, n_random=INDUCTION_LENGTH)
    layer, head, score = roles.strongest("induction")
    n_layers = len(roles.induction)
    answer = min(3 * layer // n_layers, 2)
    best = sorted(((s, l_, h) for l_, row in enumerate(roles.induction) for h, s in enumerate(row)), reverse=True)[:5]
    rows = [[str(l_), str(h), f"{s:.2f}", f"{roles.induction_baseline[l_][h]:.2f}"] for s, l_, h in best]
    explanation = (
        f"The strongest induction head is in **layer {layer} of 0–{n_layers - 1}** (score {score:.2f}; "
        "the same place on a sequence with no repeat gets the baseline column). Induction needs an "
        "earlier head to write 'the token before me was X' into each position first, so it cannot "
        "happen in the very first layer."
    )
    return Reveal(answer, explanation, ("layer", "head", "induction score", "no-repeat baseline"), rows)


INDUCTION = Lesson(
    "induction", "An induction head",
    f"The model reads {INDUCTION_LENGTH} random tokens, then the same {INDUCTION_LENGTH} again. On the "
    "second copy it could predict every token: if it has an *induction head*.",
    (
        Step("Reading the second copy, say at token C of … A B **C** D …, where does an induction head "
             "look?",
             tuple(f"at {o}" + (" (B)" if i == 0 else " (D)" if i == 3 else " (C)" if i == 2 else "")
                   for i, o in enumerate(OFFSETS)),
             _where_induction_looks),
        Step("Where in the model is the strongest induction head?",
             ("in the first third of the layers", "in the middle third", "in the last third"),
             _where_induction_lives),
    ),
)

LESSONS: tuple[Lesson, ...] = (HEADS, TEMPERATURE, FOUR_BIT, INDUCTION)


def get_lesson(key: object) -> Lesson:
    """The lesson named `key`; ValueError naming the lessons otherwise."""
    found = next((x for x in LESSONS if x.key == key), None)
    if found is None:
        names = ", ".join(repr(x.key) for x in LESSONS)
        raise ValueError(f"lesson must be one of {names}, got {str(key)[:40]!r}")
    return found


def run_step(lm: Any, key: str, step: int, full: Callable[[], Any] | None = None) -> Reveal:
    """Run step `step` (0-based) of lesson `key` on the live model `lm`."""
    les = get_lesson(key)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(les.steps):
        raise ValueError(f"step must be an integer in [0, {len(les.steps) - 1}] for lesson {key!r}, got {step!r}")

    def no_full() -> Any:
        raise ValueError("this step needs the full-precision copy of the model")

    return les.steps[step].measure(lm, full or no_full)
