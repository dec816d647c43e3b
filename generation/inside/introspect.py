"""Inside the chat model: its real attention maps, its next-token distribution, and what 4-bit costs.

* `model_attention` runs the loaded model once on a short text and returns one layer's attention
  weights (H, T, T), computed by the project's own `attention.functional.scaled_dot_product`
  plugged into transformers through its AttentionInterface (see generation/inside/capture.py:
  per-thread, so chats generating at the same moment are untouched).
* `next_token_candidates` shows the next-token distribution before and after the chat tab's
  sampling controls, through the functions that choose the chat's tokens (`generation.sampling`):
  repetition penalty, temperature, top-k, top-p.
* `compare_quantization` puts the 4-bit model beside the full-precision one; `FullPrecisionCache`
  loads that second copy lazily, once.

No gradio here: the app wires these functions into the UI.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..sampling import SamplingParams, greedy_ids, kept_probs, kept_mask, ranked_ids, scale, top_k_mask
from .capture import CaptureUnsupported, capture, install, is_installed, unsupported_reason

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_CANDIDATES",
    "CaptureUnsupported",
    "ModelAttention",
    "model_attention",
    "model_layers",
    "Candidate",
    "NextToken",
    "next_token_candidates",
    "QuantSide",
    "QuantRow",
    "QuantComparison",
    "compare_quantization",
    "FullPrecisionCache",
    "token_label",
]

DEFAULT_MAX_TOKENS = 64  # a 64 x 64 map is still readable; beyond that labels overlap
MAX_MAP_TOKENS = 256
DEFAULT_MAX_PROMPT_TOKENS = 1024  # Settings.max_input_tokens' default
MAX_CANDIDATES = 1000


# ---------------------------------------------------------------------------------------------
# Shared helpers: teaching.py builds its views from these too (validation, the prompt's ids, one
# captured forward and what of it is shown), so they are public names of this module.


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_text(text: object, what: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty: type a sentence first")
    return text


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_device(model: Any) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def token_label(tokenizer: Any, token_id: int) -> str:
    """Readable label for one token: tokenizer markers ('▁', 'Ġ') become spaces and are trimmed,
    newline/tab shown as '↵'/'⇥', a pure-space token as '␣'."""
    piece = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" in piece:  # a fragment of a multi-byte character: show the raw token instead
        piece = str(tokenizer.convert_ids_to_tokens(token_id))
    piece = piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n")
    if piece and not piece.strip(" "):
        return "␣"
    label = piece.strip(" ").replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return label or "␣"


def prompt_token_ids(tokenizer: Any, prompt: str | Tensor) -> Tensor:
    """(1, T) ids of a text prompt (with the tokenizer's special tokens, e.g. Gemma's <bos>) or given ids."""
    if isinstance(prompt, Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"prompt ids must be a non-empty integer tensor of shape (1, T), got {tuple(prompt.shape)}")
        return ids.long()
    check_text(prompt, "prompt")
    return tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)


# ---------------------------------------------------------------------------------------------
# 1. Attention maps


@dataclass(frozen=True)
class ModelAttention:
    """One layer's attention for a text, as computed inside the loaded model.

    weights (H, T, T) float32: row i = query token i, column j = key token j, over the shown
    tokens. With `hidden_tokens` non-empty (special tokens such as Gemma's <bos> removed from the
    view) a row sums to 1 - hidden_mass[h, i]; otherwise every row sums to 1.
    """

    tokens: list[str]  # display labels of the shown tokens (T)
    token_ids: list[int]  # (T)
    weights: Tensor  # (H, T, T) float32
    layer: int
    n_layers: int
    layer_kind: str  # "sliding" | "global"
    window: int | None  # sliding-window size in tokens for a "sliding" layer, else None
    kv_groups: list[int]  # KV head read by each query head (grouped-query attention), length H
    n_kv_heads: int
    capped: bool  # the text had more than max_tokens tokens; only the first max_tokens were used
    n_text_tokens: int  # tokens of the whole text (special tokens included) before the cap
    hidden_tokens: list[str]  # labels of the special tokens left out of the view
    hidden_mass: Tensor  # (H, T): attention each shown query row puts on the hidden tokens
    notice: str  # what the UI should say about the cap, hidden tokens and the window ("" if nothing)
    model_id: str

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[0])

    def head_titles(self) -> list[str]:
        """'head h · KV k' per query head (heads with the same k share keys and values)."""
        return [f"head {h} · KV {g}" for h, g in enumerate(self.kv_groups)]

    def describe(self) -> str:
        """One line: layer, kind, heads and GQA sharing, for a caption."""
        kind = f"sliding window of {self.window} tokens" if self.layer_kind == "sliding" else "global attention"
        share = (
            f"{self.n_heads} query heads share {self.n_kv_heads} KV head{'s' if self.n_kv_heads > 1 else ''}"
            if self.n_kv_heads < self.n_heads
            else f"{self.n_heads} heads, each with its own keys and values"
        )
        return f"layer {self.layer} of 0-{self.n_layers - 1} · {kind} · {share}"


def model_layers(lm: Any) -> dict[str, Any]:
    """What the UI needs before any map: {"n_layers", "layer_kinds" (list of "sliding"|"global"),
    "n_heads", "n_kv_heads", "window" (int | None)} for the loaded model."""
    cfg = text_config(lm.model)
    n_layers = int(cfg.num_hidden_layers)
    kinds = [layer_kind(cfg, i) for i in range(n_layers)]
    return {
        "n_layers": n_layers,
        "layer_kinds": [k for k, _ in kinds],
        "n_heads": int(cfg.num_attention_heads),
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "window": next((w for k, w in kinds if k == "sliding"), None),
    }


def layer_kind(cfg: Any, layer: int) -> tuple[str, int | None]:
    layer_types = getattr(cfg, "layer_types", None)
    kind = layer_types[layer] if layer_types else "full_attention"
    window = getattr(cfg, "sliding_window", None)
    if kind in ("sliding_attention", "chunked_attention") and window:
        return "sliding", int(window)
    return "global", None


def hidden_note(labels: list[str], hidden_mass: Tensor, scope: str = "") -> str:
    """The note under a map whose special tokens are hidden: which, and their mean share of a row.

    hidden_mass (..., T): each shown row's attention on the hidden tokens; scope e.g. " (over all
    layers and heads)".
    """
    names = ", ".join(sorted(set(labels)))
    share = float(hidden_mass.mean()) * 100
    return (f"Hidden special token(s) {names}: on average {share:.0f}% of each row's attention goes to them"
            f"{scope}, so the shown rows sum to less than 1.")


def ensure_capture(lm: Any) -> None:
    reason = unsupported_reason(lm.model)
    if reason is not None and not is_installed(lm.model):
        raise CaptureUnsupported(f"cannot show this model's attention: {reason}")
    # Normally done once by load_model; idempotent, and harmless if it happens here while another thread
    # generates: the dispatcher computes exactly what the model's previous implementation did.
    install(lm.model)


def check_layer(layer: object, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range: this model has {n_layers} layers, valid 0 to {n_layers - 1}")
    return layer


def captured_maps(lm: Any, ids: Tensor, layers: list[int] | None) -> dict[int, Tensor]:
    """One forward over ids (1, T): {layer: weights (H, T, T) float32 on the CPU} for `layers`
    (None = all). Raises CaptureUnsupported if a layer's attention did not go through the dispatcher.

    Every layer runs through the project's code in this forward (cheap at these lengths), so the
    maps are what the model computes end to end with that code, as transformers' eager path would;
    only the requested layers' maps are kept.
    """
    model = lm.model
    dev = model_device(model)
    with torch.inference_mode(), capture(None, record=layers) as captured:
        model(
            input_ids=ids.to(dev),
            attention_mask=torch.ones_like(ids).to(dev),
            use_cache=False,
            logits_to_keep=1,  # only the attention is wanted; skip most of the (large) vocabulary projection
        )
    wanted = range(int(text_config(model).num_hidden_layers)) if layers is None else layers
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise CaptureUnsupported(
            f"{type(model).__name__} did not send layer {missing[0]}'s attention through transformers' "
            "AttentionInterface, so its map cannot be computed by the project's code"
        )
    return {i: captured[i][0].float().cpu() for i in wanted}


def shown_positions(tok: Any, id_list: list[int], hide_special: bool) -> tuple[list[int], list[int]]:
    """(positions shown, positions hidden): special tokens (<bos>, ...) are hidden when asked."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    keep = [i for i, t in enumerate(id_list) if not (hide_special and t in special)]
    if not keep:
        raise ValueError("the text has only special tokens; type some ordinary text")
    hidden = [i for i in range(len(id_list)) if i not in keep]
    return keep, hidden


def split_hidden(weights: Tensor, keep: list[int], hidden: list[int]) -> tuple[Tensor, Tensor]:
    """weights (..., T, T) -> (shown (..., T', T'), hidden_mass (..., T')): the rows and columns kept,
    and the share of each kept row that goes to the hidden columns."""
    keep_t = torch.tensor(keep)
    rows = weights.index_select(-2, keep_t)  # (..., T', T)
    if hidden:
        hidden_mass = rows.index_select(-1, torch.tensor(hidden)).sum(-1)
    else:
        hidden_mass = torch.zeros(rows.shape[:-1])
    return rows.index_select(-1, keep_t), hidden_mass


def shown_fields(lm: Any, labels: list[str], id_list: list[int], keep: list[int], hidden: list[int],
                  hidden_mass: Tensor, n_heads: int, n_kv: int, capped: bool, n_text: int,
                  notes: list[str]) -> dict[str, Any]:
    """The fields a ModelAttention and a ModelView share: the shown tokens and their ids, which
    key/value head each query head reads, what was cut or hidden, the notes, the model's id."""
    return dict(
        tokens=[labels[i] for i in keep],
        token_ids=[id_list[i] for i in keep],
        kv_groups=[h // (n_heads // n_kv) for h in range(n_heads)],  # HF repeat_kv: head h reads KV h // groups
        n_kv_heads=n_kv,
        capped=capped,
        n_text_tokens=n_text,
        hidden_tokens=[labels[i] for i in hidden],
        hidden_mass=hidden_mass,
        notice=" ".join(notes),
        model_id=str(getattr(lm, "model_id", "")),
    )


def model_attention(
    lm: Any,
    text: str,
    *,
    layer: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    hide_special: bool = True,
) -> ModelAttention:
    """Attention weights of one layer of the loaded model for `text`: weights (H, T, T).

    lm: a `LoadedModel` (4-bit or full precision). The text is tokenized as the model reads it
    (with <bos> for Gemma) and capped at the first `max_tokens` tokens (`capped` + `notice` say so).
    hide_special: leave special tokens (<bos>, ...) out of the view; their share of each row is in
    `hidden_mass`. Raises ValueError for an empty text, a layer outside 0..n_layers-1, a bad
    max_tokens, or a model whose attention does not go through transformers' AttentionInterface.
    """
    model, tok = lm.model, lm.tokenizer
    check_text(text)
    check_int("max_tokens", max_tokens, 1, MAX_MAP_TOKENS)
    cfg = text_config(model)
    n_layers = int(cfg.num_hidden_layers)
    check_layer(layer, n_layers)
    ensure_capture(lm)

    ids = tok(text, return_tensors="pt").input_ids  # (1, N)
    n_text = int(ids.shape[1])
    capped = n_text > max_tokens
    ids = ids[:, :max_tokens]  # (1, T)
    weights = captured_maps(lm, ids, [layer])[layer]  # (H, T, T), every layer through the project's code
    id_list = ids[0].tolist()
    keep, hidden = shown_positions(tok, id_list, hide_special)
    shown, hidden_mass = split_hidden(weights, keep, hidden)  # (H, T', T'), (H, T')

    kind, window = layer_kind(cfg, layer)
    n_heads = int(shown.shape[0])
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    labels_all = [token_label(tok, t) for t in id_list]

    notes = []
    if capped:
        notes.append(f"The text has {n_text} tokens; showing the first {max_tokens}.")
    if hidden:
        notes.append(hidden_note([labels_all[i] for i in hidden], hidden_mass))
    if kind == "sliding" and window is not None:
        if len(id_list) <= window:
            notes.append(
                f"Sliding-window layer: each token sees at most the last {window} tokens; this text is shorter, "
                "so the window cuts nothing here."
            )
        else:
            notes.append(f"Sliding-window layer: each token sees only the last {window} tokens.")
    return ModelAttention(
        weights=shown,
        layer=layer,
        n_layers=n_layers,
        layer_kind=kind,
        window=window,
        **shown_fields(lm, labels_all, id_list, keep, hidden, hidden_mass, n_heads, n_kv, capped, n_text, notes),
    )


# ---------------------------------------------------------------------------------------------
# 2. Next-token probabilities


@dataclass(frozen=True)
class Candidate:
    """One possible next token and what the sampling controls do to it."""

    token: str  # readable label (see token_label)
    token_id: int
    prob: float  # the model's own distribution: softmax(logits), T = 1, before any control
    prob_temperature: float  # softmax(penalised logits / T) over the whole vocabulary; greedy: 1 for the argmax
    sampling_prob: float  # chance of being drawn: after top-k/top-p, renormalised (0 if removed)
    removed_by: str | None  # None (kept) | "top_k" | "top_p" | "greedy" (T = 0 keeps only the argmax)


@dataclass(frozen=True)
class NextToken:
    """The next-token distribution of a prompt under the given sampling controls.

    For every distribution, sum(c.<field> for c in candidates) + rest_<field> == 1.
    """

    candidates: list[Candidate]  # the k most likely after penalty and temperature, most likely first
    prompt_tokens: int  # tokens the model read (after the cap)
    capped: bool  # the prompt was longer than max_tokens: only its last max_tokens were read
    greedy: bool  # temperature 0: the argmax is taken, nothing is sampled
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    kept: int  # vocabulary tokens that survive top-k/top-p (1 when greedy)
    vocab_size: int
    rest_prob: float  # mass outside `candidates` under each distribution
    rest_prob_temperature: float
    rest_sampling_prob: float
    notice: str


def next_token_candidates(
    lm: Any,
    prompt: str | Tensor,
    params: SamplingParams,
    k: int = 10,
    *,
    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> NextToken:
    """The `k` most likely next tokens of `prompt` before and after the sampling controls.

    prompt: raw text (tokenized with the tokenizer's special tokens) or ready ids (1, T), e.g.
    `build_prompt(...).input_ids` to see the first token of the chat's reply. Longer prompts keep
    their last `max_tokens` tokens. The processing is the chat's own (`generation.sampling`):
    repetition penalty on the prompt ids, then temperature, top-k, top-p; temperature 0 is greedy
    (the argmax of the penalised logits).
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    model, tok = lm.model, lm.tokenizer
    check_int("k", k, 1, MAX_CANDIDATES)
    check_int("max_tokens", max_tokens, 1, 1_000_000)
    ids = prompt_token_ids(tok, prompt)  # (1, N)
    capped = ids.shape[1] > max_tokens
    ids = ids[:, -max_tokens:]  # (1, T)
    logits = _last_logits(model, ids)  # (V,) float32, as generate() upcasts
    vocab = int(logits.shape[-1])
    k = min(k, vocab)

    # The controls run on float32 logits through the chat's own `generation.sampling` functions;
    # the reported probabilities are softmaxes in float64 so that, over 262k tokens, they still
    # sum to 1 within 1e-12.
    probs = logits.double().softmax(-1)  # (V,)
    scaled = scale(logits, params.temperature, penalty=params.repetition_penalty, seen=ids[0])  # (V,)
    order = ranked_ids(scaled, k)  # equal scores in id order: the greedy choice is listed first
    if params.greedy:
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[int(greedy_ids(scaled))] = True
        probs_t = keep.double()  # the T -> 0 limit: all mass on the argmax
        sampling = probs_t
    else:
        probs_t = scaled.double().softmax(-1)  # (V,)
        keep_k = top_k_mask(scaled, params.top_k)
        keep = kept_mask(scaled, params.top_k, params.top_p)
        sampling = kept_probs(scaled, keep)  # (V,) renormalised over the kept tokens
    cands = []
    for i in order.tolist():
        if keep[i]:
            why = None
        elif params.greedy:
            why = "greedy"
        else:
            why = "top_k" if not keep_k[i] else "top_p"
        cands.append(
            Candidate(
                token=token_label(tok, i),
                token_id=i,
                prob=float(probs[i]),
                prob_temperature=float(probs_t[i]),
                sampling_prob=float(sampling[i]),
                removed_by=why,
            )
        )
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[order] = False  # the tokens not listed: their mass, summed directly (never negative)
    notes = []
    if capped:
        notes.append(f"The prompt is longer than {max_tokens} tokens; the model read its last {max_tokens}.")
    if params.greedy:
        notes.append("Temperature 0 is greedy decoding: the most likely token is always taken.")
    elif params.top_k or params.top_p < 1.0:
        notes.append(f"{int(keep.sum())} of {vocab} tokens survive top-k/top-p; sampling renormalises over them.")
    return NextToken(
        candidates=cands,
        prompt_tokens=int(ids.shape[1]),
        capped=capped,
        greedy=params.greedy,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        kept=int(keep.sum()),
        vocab_size=vocab,
        rest_prob=float(probs[rest].sum()),
        rest_prob_temperature=float(probs_t[rest].sum()),
        rest_sampling_prob=float(sampling[rest].sum()),
        notice=" ".join(notes),
    )


def _last_logits(model: Any, ids: Tensor) -> Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids.to(model_device(model)), use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float().cpu()  # (V,)


# ---------------------------------------------------------------------------------------------
# 3. What 4-bit costs


@dataclass(frozen=True)
class QuantSide:
    """One of the two models in the comparison."""

    label: str  # e.g. "NF4 4-bit" or "float32"
    quantization: str  # "nf4" | "none"
    dtype: str
    weight_bytes: int
    prefill_seconds: float  # one forward over the prompt
    seconds_per_token: float  # median of the timed decode steps (one token each, with the KV cache)
    written: tuple[int, ...] = ()  # the greedy token ids of those steps (the prefill's choice first)
    continuation: str = ""  # the same as text: what this model writes next


@dataclass(frozen=True)
class QuantRow:
    """A candidate next token under both models."""

    token: str
    token_id: int
    prob_4bit: float
    prob_full: float
    rank_4bit: int  # 1 = most likely
    rank_full: int


@dataclass(frozen=True)
class QuantComparison:
    """The 4-bit model beside the full-precision one on the same prompt (temperature 1, no filtering)."""

    quantized: QuantSide
    full: QuantSide
    rows: list[QuantRow]  # union of both models' top k, ordered by full-precision probability
    kl_full_to_4bit: float  # KL(P_full || P_4bit) of the next-token distributions, in nats
    top1_agree: bool
    prompt_tokens: int
    decode_tokens: int  # decode steps timed per model
    notice: str

    @property
    def size_ratio(self) -> float:
        """full bytes / 4-bit bytes."""
        return self.full.weight_bytes / max(self.quantized.weight_bytes, 1)


def _timed_logits(model: Any, ids: Tensor, decode_tokens: int) -> tuple[Tensor, float, float, list[int]]:
    """(next-token logits (V,) float32, prefill seconds, median seconds per decode step, the greedy
    token ids: decode_tokens + 1, the prefill's choice first).

    Decode steps feed the greedy token back with the KV cache, as generation does; the median
    drops the first step's one-off costs and stray stalls from other threads.
    """
    dev = model_device(model)
    ids = ids.to(dev)

    def clock() -> float:
        # CUDA kernels run asynchronously: without a sync the clock would time the launches only.
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    with torch.inference_mode():
        t0 = clock()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = clock() - t0
        logits = out.logits[0, -1].float().cpu()  # (V,)
        past, nxt = out.past_key_values, greedy_ids(out.logits[:, -1:])  # (1, 1)
        steps, written = [], [int(nxt)]
        for _ in range(decode_tokens):
            t0 = clock()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            steps.append(clock() - t0)
            past, nxt = out.past_key_values, greedy_ids(out.logits[:, -1:])
            written.append(int(nxt))
    return logits, prefill, statistics.median(steps), written


def _side(lm: Any, prefill: float, per_token: float, written: list[int]) -> QuantSide:
    quant = str(getattr(lm, "quantization", "none"))
    dtype = str(getattr(lm, "dtype", ""))
    rounding = str(getattr(lm, "rounding", "") or "")
    return QuantSide(
        label=(f"NF4 4-bit, {rounding}" if rounding else "NF4 4-bit") if quant == "nf4" else dtype,
        quantization=quant,
        dtype=dtype,
        weight_bytes=int(getattr(lm, "weight_bytes", 0)),
        prefill_seconds=prefill,
        seconds_per_token=per_token,
        written=tuple(written),
        continuation=lm.tokenizer.decode(written, skip_special_tokens=True),
    )


def compare_quantization(
    lm4: Any,
    lm_full: Any,
    prompt: str | Tensor,
    k: int = 10,
    *,
    decode_tokens: int = 8,
    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> QuantComparison:
    """The 4-bit and full-precision models on the same prompt: bytes, time per token, top-k, KL,
    and how each continues the prompt.

    Both must share the tokenizer (same vocabulary). Time per token is the median of
    `decode_tokens` single-token decode steps with the KV cache after one prefill forward (what a
    chat spends per generated token); other requests running at the same time slow it down. Those
    steps decode greedily, so each side's `written` holds its decode_tokens + 1 greedy tokens and
    `continuation` their text: where the two models part, the rounding changed what the model says.
    """
    check_int("k", k, 1, MAX_CANDIDATES)
    check_int("decode_tokens", decode_tokens, 1, 64)
    check_int("max_tokens", max_tokens, 1, 1_000_000)
    if lm4.tokenizer.get_vocab() != lm_full.tokenizer.get_vocab():
        raise ValueError("the two models use different tokenizers; compare a model with its own full-precision copy")
    ids = prompt_token_ids(lm4.tokenizer, prompt)[:, -max_tokens:]  # (1, T)
    l4, pre4, tok4, out4 = _timed_logits(lm4.model, ids, decode_tokens)
    lf, pref, tokf, outf = _timed_logits(lm_full.model, ids, decode_tokens)
    if l4.shape != lf.shape:
        raise ValueError(f"vocabulary sizes differ: {l4.shape[-1]} vs {lf.shape[-1]}")
    logp4, logpf = l4.double().log_softmax(-1), lf.double().log_softmax(-1)  # (V,)
    kl = float((logpf.exp() * (logpf - logp4)).sum())
    rank4 = torch.argsort(logp4, descending=True, stable=True)  # ties rank as greedy decoding picks
    rankf = torch.argsort(logpf, descending=True, stable=True)
    pos4 = torch.empty_like(rank4)
    pos4[rank4] = torch.arange(rank4.numel())
    posf = torch.empty_like(rankf)
    posf[rankf] = torch.arange(rankf.numel())
    union = sorted(set(rank4[:k].tolist()) | set(rankf[:k].tolist()), key=lambda i: int(posf[i]))
    rows = [
        QuantRow(
            token=token_label(lm4.tokenizer, i),
            token_id=i,
            prob_4bit=float(logp4[i].exp()),
            prob_full=float(logpf[i].exp()),
            rank_4bit=int(pos4[i]) + 1,
            rank_full=int(posf[i]) + 1,
        )
        for i in union
    ]
    return QuantComparison(
        quantized=_side(lm4, pre4, tok4, out4),
        full=_side(lm_full, pref, tokf, outf),
        rows=rows,
        kl_full_to_4bit=kl,
        top1_agree=bool(rank4[0] == rankf[0]),
        prompt_tokens=int(ids.shape[1]),
        decode_tokens=decode_tokens,
        notice=(
            "Time per token is the median of single-token decode steps on this machine, measured while "
            "other users may be generating. KL(full || 4-bit) is in nats at temperature 1."
        ),
    )


class FullPrecisionCache:
    """The full-precision twin of the chat model, loaded on first use and only once.

    Thread-safe: concurrent first callers wait for the one load instead of starting their own.
    A failed load is not cached (the next call tries again).
    """

    def __init__(self, loader: Callable[..., Any] | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}

    def loaded(self, model_id: str | None = None) -> bool:
        """True when the full-precision copy of `model_id` (default: any) is already in memory."""
        return bool(self._models) if model_id is None else model_id in self._models

    def get(self, settings: Any = None, model_id: str | None = None) -> Any:
        """The full-precision `LoadedModel` for `model_id` (default `settings.model_id`)."""
        from ..settings import Settings

        settings = settings or Settings.from_env()
        key = (model_id or settings.model_id).strip()
        lm = self._models.get(key)
        if lm is not None:
            return lm
        with self._lock:
            lm = self._models.get(key)
            if lm is None:
                loader = self._loader
                if loader is None:
                    from ..model import load_model as loader
                lm = loader(key, load_4bit=False, settings=settings)
                self._models[key] = lm
            return lm
