"""What the lean decode step needs to know about a model family: a small description per family.

The decoder-only families transformers writes the same way (Gemma 3, Qwen2, Qwen3, Llama,
Mistral) differ in a few explicit places, and the lean step (`generation.decode.lean`) reads them
from an `Architecture` instead of being written once per family:

* the RMSNorm form: Gemma's normed-in-fp32 times (1 + w), one rounding ("gemma"), or Llama's
  normed, rounded to bf16, times the bf16 weight ("llama"; Qwen2/3 and Mistral alike);
* Gemma's sandwich norms (a norm after attention and after the MLP, besides the pre-norms);
* q/k norms (Gemma 3, Qwen3), biases (Qwen2's q/k/v; Llama's and Qwen3's `attention_bias`,
  Llama's `mlp_bias`), Gemma's embedding scale (sqrt of the hidden size), the MLP activation;
* the sliding-window layers (Gemma 3's local layers, Qwen2/3's `layer_types`, every layer of a
  Mistral with a window) and RoPE, whose tables come from the model's own rotary module (its
  inverse frequencies and attention scaling are transformers' rope init functions', Llama 3's
  rope scaling included), per layer kind where Gemma 3's local and global bases differ;
* a tied or separate LM head (the int8 head copies whichever `get_output_embeddings()` gives).

`describe(config)` resolves a model's config into its `Architecture`, or raises ValueError saying
why the fast path does not take it (the model's own forward serves it then).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILIES", "Architecture", "Family", "describe"]


@dataclass(frozen=True)
class Family:
    """What is fixed per model type (transformers' `model_type`)."""

    model_type: str
    norm: str  # "gemma" | "llama" (see the module notes)
    sandwich: bool  # post-attention and post-MLP norms (Gemma 3) besides the pre-norms
    qk_norm: bool
    qkv_bias: bool | str  # True, False, or the config flag that says
    o_bias: bool | str
    mlp_bias: bool | str
    embed_scaled: bool  # embeddings times sqrt(hidden size) (Gemma)
    activation_key: str  # the config field naming the MLP activation
    windows: str  # "layer_types" (per layer, from config.layer_types) | "all" (config.sliding_window) | "none"
    rope_by_layer_type: bool  # the rotary module takes the layer type (per-kind RoPE bases)
    attention_scalar_key: str | None = None  # scaling = config[key] ** -0.5 instead of head_dim ** -0.5


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gemma3_text", norm="gemma", sandwich=True, qk_norm=True, qkv_bias="attention_bias",
           o_bias="attention_bias", mlp_bias=False, embed_scaled=True, activation_key="hidden_activation",
           windows="layer_types", rope_by_layer_type=True, attention_scalar_key="query_pre_attn_scalar"),
    Family("qwen2", norm="llama", sandwich=False, qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False,
           embed_scaled=False, activation_key="hidden_act", windows="layer_types", rope_by_layer_type=False),
    Family("qwen3", norm="llama", sandwich=False, qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias",
           mlp_bias=False, embed_scaled=False, activation_key="hidden_act", windows="layer_types",
           rope_by_layer_type=False),
    Family("llama", norm="llama", sandwich=False, qk_norm=False, qkv_bias="attention_bias", o_bias="attention_bias",
           mlp_bias="mlp_bias", embed_scaled=False, activation_key="hidden_act", windows="none",
           rope_by_layer_type=False),
    Family("mistral", norm="llama", sandwich=False, qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False,
           embed_scaled=False, activation_key="hidden_act", windows="all", rope_by_layer_type=False),
)}

# RoPE types whose tables depend only on the position: the tables are computed once for all positions.
# ("dynamic" and "longrope" rescale with the sequence length.)
_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn", "proportional"})


@dataclass(frozen=True)
class Architecture:
    """One model's family with its config resolved: everything the lean step reads."""

    family: Family
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    activation: str  # a transformers ACT2FN name
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    embed_scale: float | None  # None: embeddings used as they are
    sliding_layers: tuple[bool, ...]  # per layer: attends within the window
    window: int | None
    scaling: float  # attention's query scaling
    rope_types: tuple[str, ...]  # the RoPE types in use (for the status line and the tests)
    tied_head: bool

    @property
    def norm(self) -> str:
        return self.family.norm


def _flag(config, value: bool | str) -> bool:
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


def _rope_types(config, family: Family) -> tuple[str, ...]:
    params = getattr(config, "rope_parameters", None) or {}
    if family.rope_by_layer_type:
        kinds = [params.get(kind) for kind in sorted(set(config.layer_types))]
    else:
        kinds = [params]
    return tuple((p or {}).get("rope_type", "default") for p in kinds)


def _sliding_layers(config, family: Family) -> tuple[tuple[bool, ...], int | None]:
    n = int(config.num_hidden_layers)
    window = int(getattr(config, "sliding_window", None) or 0) or None
    if family.windows == "all":
        return (window is not None,) * n, window
    types = tuple(getattr(config, "layer_types", None) or ("full_attention",) * n) if family.windows != "none" else (
        ("full_attention",) * n)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"attention layers {sorted(unknown)} (the fast path implements full and sliding-window)")
    sliding = tuple(t == "sliding_attention" for t in types)
    if any(sliding) and window is None:
        raise ValueError("sliding-window layers without a window size")
    return sliding, window if any(sliding) else None


def describe(config, tied_head: bool | None = None) -> Architecture:
    """The `Architecture` of a model with this (text) config; ValueError (one line) where the fast
    path does not implement it. tied_head: whether the LM head is the embedding (default: the
    config's tie_word_embeddings)."""
    model_type = getattr(config, "model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model type {model_type!r} (the fast path implements {', '.join(sorted(FAMILIES))})")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        raise ValueError("logit soft-capping is not implemented in the fast path")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention is not implemented in the fast path")
    rope_types = _rope_types(config, family)
    moving = sorted(set(rope_types) - _STATIC_ROPE)
    if moving:
        raise ValueError(f"RoPE type {'/'.join(moving)} (its tables change with the length; the fast path "
                         f"implements {', '.join(sorted(_STATIC_ROPE))})")
    sliding, window = _sliding_layers(config, family)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    scalar = getattr(config, family.attention_scalar_key, None) if family.attention_scalar_key else None
    return Architecture(
        family=family,
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        n_heads=heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
        activation=str(getattr(config, family.activation_key)),
        qkv_bias=_flag(config, family.qkv_bias),
        o_bias=_flag(config, family.o_bias),
        mlp_bias=_flag(config, family.mlp_bias),
        embed_scale=float(config.hidden_size) ** 0.5 if family.embed_scaled else None,
        sliding_layers=sliding,
        window=window,
        scaling=float(scalar if scalar is not None else head_dim) ** -0.5,
        rope_types=rope_types,
        tied_head=bool(getattr(config, "tie_word_embeddings", False)) if tied_head is None else tied_head,
    )
