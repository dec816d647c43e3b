"""Teaching depth inside the chat model: every layer at once, heads switched off, what a reply looked at.

* `model_view`: one forward over a short text gives every layer's attention, weights (L, H, T, T),
  for the grid of thumbnails (`attention.plot.plot_model_view`).
* `ablate_heads`: the next-token distribution and a short greedy continuation with and without a
  set of (layer, head) pairs switched off (their output zeroed before ``o_proj``), for this request
  only (`capture.ablate` is per thread). `parse_heads`, `heads_of_layer` and
  `head_in_every_layer` turn a typed spec or a preset into the pairs.
* `reply_attention`: for a chat reply, what the model attended to while writing each reply token
  (one forward over prompt + reply, one layer kept), for `attention.plot.plot_token_attention`.

No gradio here: the UI wires these functions in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..prompt import Prompt
from ..sampling import greedy_ids, scale
from ..tokens import reply_text_ids
from .capture import ablate
from .introspect import (
    DEFAULT_MAX_TOKENS,
    captured_maps,
    check_int,
    check_layer,
    check_text,
    ensure_capture,
    hidden_note,
    layer_kind,
    model_device,
    prompt_token_ids,
    shown_fields,
    shown_positions,
    split_hidden,
    text_config,
    token_label,
)

__all__ = [
    "ABLATION_MAX_NEW_TOKENS",
    "MODEL_VIEW_MAX_TOKENS",
    "REPLY_MAX_TOKENS",
    "ModelView",
    "model_view",
    "Head",
    "check_heads",
    "parse_heads",
    "format_heads",
    "heads_of_layer",
    "head_in_every_layer",
    "AblationRow",
    "Ablation",
    "ablate_heads",
    "ReplyAttention",
    "reply_attention",
]

MODEL_VIEW_MAX_TOKENS = DEFAULT_MAX_TOKENS  # 64: beyond it a 0.8-inch thumbnail has < 1 pixel per token
REPLY_MAX_TOKENS = 384  # default cap on prompt + reply (the default system text alone is ~150 tokens) for "what did it look at while writing"
REPLY_MAX_TOKENS_LIMIT = 2048  # what a caller may ask for: the one kept map is (H, T, T) float32
ABLATION_MAX_NEW_TOKENS = 64  # greedy continuation of an ablation, each way

Head = tuple[int, int]  # (layer, head)


def _shape(lm: Any) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of the loaded model."""
    cfg = text_config(lm.model)
    n_heads = int(cfg.num_attention_heads)
    return int(cfg.num_hidden_layers), n_heads, int(getattr(cfg, "num_key_value_heads", None) or n_heads)


# ---------------------------------------------------------------------------------------------
# 1. Model view: every layer x every head from one forward


@dataclass(frozen=True)
class ModelView:
    """Every layer's attention for a text, from a single forward pass.

    weights (L, H, T, T) float32: weights[l, h] is layer l, head h, row i = query token i, column
    j = key token j, over the shown tokens. With `hidden_tokens` non-empty (special tokens such as
    Gemma's <bos> left out of the view) a row sums to 1 - hidden_mass[l, h, i]; otherwise to 1.
    weights[l] equals `model_attention(lm, text, layer=l).weights` for the same text and options.
    """

    tokens: list[str]  # display labels of the shown tokens (T)
    token_ids: list[int]  # (T)
    weights: Tensor  # (L, H, T, T) float32
    layer_kinds: list[str]  # per layer: "sliding" | "global"
    window: int | None  # the sliding layers' window in tokens (None if the model has none)
    kv_groups: list[int]  # KV head read by each query head, length H
    n_kv_heads: int
    capped: bool  # the text had more than max_tokens tokens; only the first max_tokens were used
    n_text_tokens: int  # tokens of the whole text (special tokens included) before the cap
    hidden_tokens: list[str]  # labels of the special tokens left out of the view
    hidden_mass: Tensor  # (L, H, T): attention each shown query row puts on the hidden tokens
    notice: str  # what the UI should say about the cap and hidden tokens ("" if nothing)
    model_id: str

    @property
    def n_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, H, T, T), what the API reports."""
        return tuple(int(n) for n in self.weights.shape)  # type: ignore[return-value]

    def layer_labels(self) -> list[str]:
        """'L0 (sliding)', ..., 'L5 (global)': the grid's row labels."""
        return [f"L{i} ({kind})" for i, kind in enumerate(self.layer_kinds)]

    def head_labels(self) -> list[str]:
        """'head h · KV k' per query head: the grid's column labels."""
        return [f"head {h} · KV {g}" for h, g in enumerate(self.kv_groups)]

    def head(self, layer: int, head: int) -> Tensor:
        """One thumbnail's map (T, T), e.g. for `attention.plot.plot_head` after a click."""
        check_int("layer", layer, 0, self.n_layers - 1)
        check_int("head", head, 0, self.n_heads - 1)
        return self.weights[layer, head]

    def describe(self, layer: int, head: int) -> str:
        """Title for the large view of one thumbnail: 'layer 5 (global) · head 2 · reads KV head 0'."""
        check_int("layer", layer, 0, self.n_layers - 1)
        check_int("head", head, 0, self.n_heads - 1)
        kind = self.layer_kinds[layer]
        if kind == "sliding" and self.window is not None:
            kind = f"sliding window {self.window}"
        return f"layer {layer} ({kind}) · head {head} · reads KV head {self.kv_groups[head]}"


def model_view(
    lm: Any,
    text: str,
    *,
    max_tokens: int = MODEL_VIEW_MAX_TOKENS,
    hide_special: bool = True,
) -> ModelView:
    """Every layer's attention for `text` from ONE forward pass: weights (L, H, T, T).

    lm: a `LoadedModel`. The text is tokenized as the model reads it (with <bos> for Gemma) and
    capped at its first `max_tokens` tokens (1..64; `capped` + `notice` say so). hide_special:
    leave special tokens out of the view, their share of each row in `hidden_mass` (L, H, T).
    Raises ValueError for an empty text or a bad max_tokens, CaptureUnsupported (a ValueError)
    for a model whose attention does not go through transformers' AttentionInterface.
    """
    tok = lm.tokenizer
    check_text(text)
    check_int("max_tokens", max_tokens, 1, MODEL_VIEW_MAX_TOKENS)
    ensure_capture(lm)
    cfg = text_config(lm.model)
    n_layers, n_heads, n_kv = _shape(lm)

    ids = tok(text, return_tensors="pt").input_ids  # (1, N)
    n_text = int(ids.shape[1])
    capped = n_text > max_tokens
    ids = ids[:, :max_tokens]  # (1, T)
    maps = captured_maps(lm, ids, None)  # one forward: {layer: (H, T, T)}
    weights = torch.stack([maps[i] for i in range(n_layers)])  # (L, H, T, T)
    id_list = ids[0].tolist()
    keep, hidden = shown_positions(tok, id_list, hide_special)
    shown, hidden_mass = split_hidden(weights, keep, hidden)  # (L, H, T', T'), (L, H, T')

    kinds = [layer_kind(cfg, i) for i in range(n_layers)]
    labels_all = [token_label(tok, t) for t in id_list]
    notes = []
    if capped:
        notes.append(f"The text has {n_text} tokens; showing the first {max_tokens}.")
    if hidden:
        notes.append(hidden_note([labels_all[i] for i in hidden], hidden_mass, " (over all layers and heads)"))
    window = next((w for k, w in kinds if k == "sliding"), None)
    if window is not None:
        cut = "cuts nothing here" if len(id_list) <= window else "hides keys further back than that"
        notes.append(f"Sliding-window layers see at most the last {window} tokens; this text's window {cut}.")
    return ModelView(
        weights=shown,
        layer_kinds=[k for k, _ in kinds],
        window=window,
        **shown_fields(lm, labels_all, id_list, keep, hidden, hidden_mass, n_heads, n_kv, capped, n_text, notes),
    )


# ---------------------------------------------------------------------------------------------
# 2. Switching heads off


def check_heads(heads: Iterable[Head], n_layers: int, n_heads: int) -> tuple[Head, ...]:
    """Validate (layer, head) pairs for a model of n_layers x n_heads: sorted, duplicates merged.

    Raises ValueError naming the first bad pair and the valid ranges.
    """
    check_int("n_layers", n_layers, 1, 10_000)
    check_int("n_heads", n_heads, 1, 10_000)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise ValueError(f"heads must be (layer, head) pairs, got {heads!r}; to parse text use parse_heads")
    out = set()
    for pair in heads:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"each head must be a (layer, head) pair, got {pair!r}")
        layer, head = pair
        for v in (layer, head):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"layer and head must be integers, got {pair!r}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} does not exist: this model has {n_layers} layers, 0 to {n_layers - 1}")
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} (in layer {layer}) does not exist: each layer has {n_heads} heads, "
                             f"0 to {n_heads - 1}")
        out.add((layer, head))
    return tuple(sorted(out))


def heads_of_layer(layer: int, n_layers: int, n_heads: int) -> tuple[Head, ...]:
    """Preset "all heads of layer L": ((L, 0), ..., (L, H-1))."""
    check_int("n_layers", n_layers, 1, 10_000)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} does not exist: this model has {n_layers} layers, 0 to {n_layers - 1}")
    return check_heads(((layer, h) for h in range(n_heads)), n_layers, n_heads)


def head_in_every_layer(head: int, n_layers: int, n_heads: int) -> tuple[Head, ...]:
    """Preset "head H in every layer": ((0, H), ..., (L-1, H))."""
    check_int("n_heads", n_heads, 1, 10_000)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"head {head!r} does not exist: each layer has {n_heads} heads, 0 to {n_heads - 1}")
    return check_heads(((layer, head) for layer in range(n_layers)), n_layers, n_heads)


_PAIR = re.compile(r"^(\*|\d+)[:/](\*|\d+)$")
_SPEC_HELP = (
    'write layer:head pairs separated by commas, e.g. "3:1, 5:0"; "4:*" = all heads of layer 4, '
    '"*:2" = head 2 in every layer'
)


def parse_heads(spec: str, n_layers: int, n_heads: int) -> tuple[Head, ...]:
    """A typed spec -> sorted (layer, head) pairs, validated for the model.

    Grammar: items separated by commas, semicolons or whitespace; each item "layer:head" (or
    "layer/head"), where "*" means every layer or every head: "3:1, 5:0", "4:*" (all heads of
    layer 4), "*:2" (head 2 in every layer). Spaces around ":" are fine. "" = nothing switched
    off. Raises ValueError quoting the bad item and the grammar.
    """
    if not isinstance(spec, str):
        raise ValueError(f"the heads to switch off must be text, got {type(spec).__name__}; {_SPEC_HELP}")
    check_int("n_layers", n_layers, 1, 10_000)
    check_int("n_heads", n_heads, 1, 10_000)
    tight = re.sub(r"\s*([:/])\s*", r"\1", spec.strip())  # "3 : 1" -> "3:1", so whitespace only separates items
    pairs: list[Head] = []
    for item in re.split(r"[,;\s]+", tight):
        if not item:
            continue
        m = _PAIR.match(item)
        if not m:
            raise ValueError(f"cannot read {item!r} as a head: {_SPEC_HELP}")
        layer_s, head_s = m.groups()
        layers = range(n_layers) if layer_s == "*" else [int(layer_s)]
        heads = range(n_heads) if head_s == "*" else [int(head_s)]
        pairs.extend((lay, h) for lay in layers for h in heads)
    return check_heads(pairs, n_layers, n_heads)


def format_heads(heads: Iterable[Head]) -> str:
    """Pairs -> the spec parse_heads reads back: "3:1, 5:0" ("" for none), sorted."""
    return ", ".join(f"{layer}:{head}" for layer, head in sorted(set(heads)))


@dataclass(frozen=True)
class AblationRow:
    """A candidate next token with and without the heads switched off (temperature 1, no filtering)."""

    token: str  # readable label (see token_label)
    token_id: int
    p_plain: float
    p_ablated: float
    rank_plain: int  # 1 = most likely
    rank_ablated: int


@dataclass(frozen=True)
class Ablation:
    """The model with `heads` switched off beside the plain model, on the same prompt."""

    heads: tuple[Head, ...]  # the switched-off (layer, head) pairs, sorted
    spec: str  # the same as text, e.g. "3:1, 5:0" (parse_heads reads it back)
    rows: list[AblationRow]  # union of both top-k, ordered by plain probability (most likely first)
    kl_plain_to_ablated: float  # KL(P_plain || P_ablated) of the next-token distributions, in nats
    top1_changed: bool
    continuation_plain: str  # greedy continuation, new_tokens tokens at most (stops at end-of-text)
    continuation_ablated: str
    continuation_plain_ids: list[int]
    continuation_ablated_ids: list[int]
    prompt_tokens: int  # tokens the model read (after the cap)
    capped: bool  # the prompt was longer than max_tokens: only its last max_tokens were read
    notice: str


def _stop_ids(lm: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def _greedy(lm: Any, ids: Tensor, new_tokens: int) -> tuple[Tensor, list[int]]:
    """(first next-token logits (V,) float32, greedy token ids) with the KV cache, as generate() does.

    Written out rather than `generate()` so that both runs of an ablation share one code path and
    the first step's logits come from the same prefill. Runs in the calling thread, so an active
    `capture.ablate` block applies to every step.
    """
    model = lm.model
    stops = _stop_ids(lm)
    out_ids: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=ids.to(model_device(model)), use_cache=True, logits_to_keep=1)
        first = scale(out.logits[0, -1]).cpu()  # (V,) float32, temperature 1
        logits = first
        for step in range(new_tokens):
            nxt = int(greedy_ids(logits))
            out_ids.append(nxt)
            if nxt in stops or step == new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[nxt]], device=model_device(model)),
                past_key_values=out.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = scale(out.logits[0, -1])
    return first, out_ids


def ablate_heads(
    lm: Any,
    prompt: str | Tensor | Prompt,
    heads: Iterable[Head],
    *,
    k: int = 10,
    new_tokens: int = 8,
    max_tokens: int = 1024,
) -> Ablation:
    """Next-token distribution and greedy continuation with `heads` switched off vs the plain model.

    prompt: raw text (tokenized with the tokenizer's special tokens), ready ids (1, T), or a chat
    `Prompt` from `build_prompt` (longer prompts keep their last `max_tokens` tokens). heads:
    (layer, head) pairs (see parse_heads / heads_of_layer / head_in_every_layer); empty = no
    ablation, and both sides are the one plain run. A switched-off head's output, its slice of
    o_proj's input, is zero in every forward of THIS call only (per thread: chats generating at
    the same time are untouched). Costs two prefills + 2 x (new_tokens - 1) decode steps
    (bench/introspect.py times it). Raises ValueError for a bad head, k, new_tokens, or prompt.
    """
    tok = lm.tokenizer
    n_layers, n_heads, _ = _shape(lm)
    pairs = check_heads(heads, n_layers, n_heads)
    check_int("k", k, 1, 1000)
    check_int("new_tokens", new_tokens, 1, ABLATION_MAX_NEW_TOKENS)
    check_int("max_tokens", max_tokens, 1, 1_000_000)
    ensure_capture(lm)
    ids = prompt_token_ids(tok, prompt.input_ids if isinstance(prompt, Prompt) else prompt)  # (1, N)
    capped = ids.shape[1] > max_tokens
    ids = ids[:, -max_tokens:]  # (1, T)

    plain_logits, plain_ids = _greedy(lm, ids, new_tokens)
    if pairs:
        with ablate(pairs):
            abl_logits, abl_ids = _greedy(lm, ids, new_tokens)
    else:  # nothing switched off: the same run, not a second one that could only match it
        abl_logits, abl_ids = plain_logits, list(plain_ids)

    # float64: KL and probabilities over 262k tokens stay exact to ~1e-12
    logp, logq = plain_logits.double().log_softmax(-1), abl_logits.double().log_softmax(-1)  # (V,)
    kl = float((logp.exp() * (logp - logq)).sum())
    vocab = int(logp.shape[-1])
    k = min(k, vocab)
    # Stable: bf16 logits tie often, and a tie must rank as greedy decoding picks (argmax: the lower id).
    order_p = torch.argsort(logp, descending=True, stable=True)
    order_q = torch.argsort(logq, descending=True, stable=True)
    rank_p = torch.empty(vocab, dtype=torch.long)
    rank_p[order_p] = torch.arange(vocab)
    rank_q = torch.empty(vocab, dtype=torch.long)
    rank_q[order_q] = torch.arange(vocab)
    union = set(order_p[:k].tolist()) | set(order_q[:k].tolist())
    rows = [
        AblationRow(
            token=token_label(tok, i),
            token_id=i,
            p_plain=float(logp[i].exp()),
            p_ablated=float(logq[i].exp()),
            rank_plain=int(rank_p[i]) + 1,
            rank_ablated=int(rank_q[i]) + 1,
        )
        for i in sorted(union, key=lambda i: int(rank_p[i]))
    ]
    notes = []
    if not pairs:
        notes.append("No head is switched off: both sides are the plain model.")
    else:
        share = 100 * len(pairs) / (n_layers * n_heads)
        notes.append(f"{len(pairs)} of {n_layers * n_heads} heads switched off ({share:.0f}%), for this request only.")
    if capped:
        notes.append(f"The prompt is longer than {max_tokens} tokens; the model read its last {max_tokens}.")
    notes.append("KL(plain || ablated) is in nats at temperature 1; continuations are greedy.")
    top1_changed = int(order_p[0]) != int(order_q[0])
    return Ablation(
        heads=pairs,
        spec=format_heads(pairs),
        rows=rows,
        kl_plain_to_ablated=kl,
        top1_changed=top1_changed,
        continuation_plain=tok.decode(plain_ids, skip_special_tokens=True),
        continuation_ablated=tok.decode(abl_ids, skip_special_tokens=True),
        continuation_plain_ids=plain_ids,
        continuation_ablated_ids=abl_ids,
        prompt_tokens=int(ids.shape[1]),
        capped=capped,
        notice=" ".join(notes),
    )


# ---------------------------------------------------------------------------------------------
# 3. What did it look at while writing?


@dataclass(frozen=True)
class ReplyAttention:
    """One layer's attention over a chat prompt + its reply, read from one forward pass.

    Positions 0..T-1 are the prompt (0..reply_start-1) then the reply tokens. weights (H, T, T) is
    the layer's full map (row = query position). Reply token r sits at position p = reply_start + r.

    mode "writing" (default): row r of `rows` is the attention of the query that WROTE reply token
    r, i.e. position p - 1, whose output predicted token p: rows[r, h, j] = weights[h, p - 1, j]
    for j < p (every earlier token, prompt and reply), 0 from p on. mode "reading": the reply
    token's own query, rows[r, h, j] = weights[h, p, j] for j <= p (it and every earlier token).
    A row sums to 1 (up to bf16 rounding) over all positions, special tokens included.
    """

    tokens: list[str]  # display labels of every position read (T)
    token_ids: list[int]  # (T)
    special: list[bool]  # (T) True for special tokens (<bos>, ...): plots may hide them
    reply_start: int  # position of the first reply token (= prompt tokens read)
    weights: Tensor  # (H, T, T) float32: the layer's whole map
    rows: Tensor  # (R, H, T) float32: per reply token, per head, the row described above
    mode: str  # "writing" | "reading"
    layer: int
    n_layers: int
    layer_kind: str  # "sliding" | "global"
    window: int | None
    capped: bool  # prompt + reply had more than max_tokens tokens; later reply tokens are not shown
    n_reply_tokens: int  # tokens of the whole reply before the cap (R <= this)
    notice: str

    @property
    def reply_tokens(self) -> list[str]:
        """Labels of the R reply tokens shown, selectable in the UI (index r)."""
        return self.tokens[self.reply_start:self.reply_start + int(self.rows.shape[0])]

    @property
    def mean(self) -> Tensor:
        """(R, T) the rows averaged over heads."""
        return self.rows.mean(dim=1)

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[0])

    def context(self, r: int) -> int:
        """How many positions reply token r's row covers: p (writing) or p + 1 (reading)."""
        check_int("reply token", r, 0, int(self.rows.shape[0]) - 1)
        return self.reply_start + r + (1 if self.mode == "reading" else 0)

    def row(self, r: int, head: int | None = None) -> Tensor:
        """(context(r),) weights of reply token r over the positions it could see: one head, or the
        mean over heads (head=None). Labels: tokens[:context(r)]."""
        n = self.context(r)
        if head is None:
            return self.rows[r, :, :n].mean(dim=0)
        check_int("head", head, 0, self.n_heads - 1)
        return self.rows[r, head, :n]


def _reply_ids(tok: Any, prompt_text: str, reply: str | Sequence[int] | Tensor) -> list[int]:
    if isinstance(reply, Tensor):
        if reply.dim() == 2 and reply.shape[0] == 1:
            reply = reply[0]
        if reply.dim() != 1 or reply.dtype not in (torch.long, torch.int):
            raise ValueError(f"reply ids must be an integer tensor of shape (R,) or (1, R), got {tuple(reply.shape)}")
        ids = reply.tolist()
    elif isinstance(reply, str):
        if not reply.strip():
            raise ValueError("the reply is empty: there is no written token to look at")
        ids = reply_text_ids(tok, prompt_text, reply)  # the leading space the chat strips, put back
    elif isinstance(reply, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in reply):
        ids = list(reply)
    else:
        raise ValueError(f"reply must be text or token ids, got {type(reply).__name__}")
    if not ids:
        raise ValueError("the reply is empty: there is no written token to look at")
    return [int(i) for i in ids]


def reply_attention(
    lm: Any,
    prompt: Prompt | str | Tensor,
    reply: str | Sequence[int] | Tensor,
    *,
    layer: int,
    max_tokens: int = REPLY_MAX_TOKENS,
    mode: str = "writing",
) -> ReplyAttention:
    """What the model attended to while writing each token of `reply`: rows (R, H, T) of one layer.

    prompt: the prompt the chat used, ideally the `Prompt` from `build_prompt(lm.tokenizer, message,
    history, system=..., max_input_tokens=...)` (what `stream_reply` built), so positions match what
    the model saw; or ready ids (1, T); or raw prompt text (tokenized with special tokens). reply:
    the reply text as the chat shows it (re-tokenized; a leading space is restored after a prompt
    that ends without whitespace, e.g. "Assistant:"), or the generated token ids.

    One forward over prompt + reply (every layer through the project's attention code, only
    `layer` kept), capped at the first `max_tokens` positions (default 384): the rows of the
    positions kept are exactly what the full forward gives, as attention is causal. One forward
    re-reads what generation computed step by step with the KV cache: the same attention up to
    floating-point rounding. Raises ValueError for a bad layer, mode or max_tokens, an empty reply,
    or a prompt that alone fills max_tokens.
    """
    model, tok = lm.model, lm.tokenizer
    n_layers, _, _ = _shape(lm)
    check_layer(layer, n_layers)
    check_int("max_tokens", max_tokens, 2, REPLY_MAX_TOKENS_LIMIT)
    if mode not in ("writing", "reading"):
        raise ValueError(f"mode must be 'writing' or 'reading', got {mode!r}")
    ensure_capture(lm)
    if isinstance(prompt, Prompt):
        prompt_ids, prompt_text = prompt.input_ids, prompt.text
    else:
        prompt_ids = prompt_token_ids(tok, prompt)
        prompt_text = prompt if isinstance(prompt, str) else tok.decode(prompt_ids[0, -1:])
    prompt_ids = prompt_ids.reshape(1, -1).long()
    n_prompt = int(prompt_ids.shape[1])
    reply_ids = _reply_ids(tok, prompt_text, reply)
    if n_prompt >= max_tokens:
        raise ValueError(
            f"the prompt alone has {n_prompt} tokens, at or over this view's cap of {max_tokens}: no reply token "
            "fits. Clear older chat turns (or shorten the system prompt) to look inside a reply."
        )
    ids = torch.cat([prompt_ids, torch.tensor([reply_ids])], dim=1)  # (1, N)
    capped = ids.shape[1] > max_tokens
    ids = ids[:, :max_tokens]  # (1, T): the start is kept, so every kept row is exact
    weights = captured_maps(lm, ids, [layer])[layer]  # (H, T, T)
    t = int(ids.shape[1])
    n_rows = t - n_prompt
    pos = torch.arange(n_prompt, t)  # (R,) positions of the reply tokens
    query = pos - 1 if mode == "writing" else pos
    rows = weights[:, query].transpose(0, 1).clone()  # (R, H, T)
    # Causality already zeroes keys after the query; keys at the written token itself (writing mode)
    # are beyond its query too. This only guards against a mask bug showing up as a "look ahead".
    visible = torch.arange(t)[None, :] <= query[:, None]  # (R, T)
    rows = rows * visible[:, None, :]

    id_list = ids[0].tolist()
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    kind, window = layer_kind(text_config(model), layer)
    notes = []
    if capped:
        notes.append(
            f"Prompt + reply have {n_prompt + len(reply_ids)} tokens; this view reads the first {max_tokens}, "
            f"so only the first {n_rows} of the reply's {len(reply_ids)} tokens can be chosen."
        )
    if mode == "writing":
        notes.append(
            "A token is written by the model's pass over the token before it: the weights shown are that pass's "
            "attention over everything before the chosen token."
        )
    if kind == "sliding" and window is not None and t > window:
        notes.append(f"Sliding-window layer: a token sees only the last {window} tokens.")
    return ReplyAttention(
        tokens=[token_label(tok, i) for i in id_list],
        token_ids=id_list,
        special=[i in special_ids for i in id_list],
        reply_start=n_prompt,
        weights=weights,
        rows=rows,
        mode=mode,
        layer=layer,
        n_layers=n_layers,
        layer_kind=kind,
        window=window,
        capped=capped,
        n_reply_tokens=len(reply_ids),
        notice=" ".join(notes),
    )
