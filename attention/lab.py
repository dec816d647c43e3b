"""The maths behind the app's Attention Lab tab (the app itself only wires widgets to this).

A sentence is split into words and punctuation, each word gets a deterministic toy embedding
(seeded by the word itself, so the same word always gets the same vector) plus a sinusoidal
position code, and a freshly seeded attention module runs over it with its trace recorded.
Nothing here touches torch's global random state, so concurrent users cannot disturb each other.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .modules import AttentionConfig, MultiHeadAttention, SingleHeadAttention, valid_head_counts
from .trace import Trace, explain_head

__all__ = ["LabConfig", "LabResult", "run_lab", "tokenize", "toy_embeddings", "valid_head_counts", "MAX_EMB_DIM",
           "MAX_TOKENS_LIMIT"]

MAX_EMB_DIM = 1024  # keeps one update cheap on a 2-core CPU, whatever the request says
MAX_TOKENS_LIMIT = 256
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tokenize(text: str, max_tokens: int = 32) -> tuple[list[str], bool]:
    """Split into words and punctuation marks; returns (tokens[:max_tokens], capped)."""
    tokens = _TOKEN_RE.findall(text)
    return tokens[:max_tokens], len(tokens) > max_tokens


@dataclass(frozen=True)
class LabConfig:
    """One Attention Lab request, validated on creation.

    text: the sentence; emb_dim: model width D (1..1024); n_heads / n_kv_heads: query and K/V
    heads (only used when multi_head; n_kv_heads None = n_heads); dropout in [0, 1); seed in 0..2**32-1
    (weights, embeddings and dropout); causal: mask future tokens; multi_head: False = the
    notebook's SingleHeadAttention; max_tokens: cap on the number of tokens (1..256).
    """

    text: str
    emb_dim: int = 64
    n_heads: int = 8
    n_kv_heads: int | None = None
    dropout: float = 0.0
    seed: int = 0
    causal: bool = False
    multi_head: bool = True
    max_tokens: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int in 1..{MAX_TOKENS_LIMIT}")
        if not _TOKEN_RE.search(self.text):
            raise ValueError("text has no words or punctuation to attend over; type a sentence, e.g. 'The cat sat.'")
        if not _is_int(self.emb_dim) or not 1 <= self.emb_dim <= MAX_EMB_DIM:
            raise ValueError(f"emb_dim={self.emb_dim!r} must be an int in 1..{MAX_EMB_DIM}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an int in 0..{2**32 - 1}")
        for label, flag in (("causal", self.causal), ("multi_head", self.multi_head)):
            if not isinstance(flag, bool):
                raise ValueError(f"{label}={flag!r} must be True or False")
        # AttentionConfig words the head/dropout errors ("n_heads=6 does not divide emb_dim=64; choose one of ...").
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if self.multi_head:
            AttentionConfig(self.emb_dim, self.n_heads, n_kv, self.dropout)
        else:
            AttentionConfig(self.emb_dim, 1, 1, self.dropout)
        object.__setattr__(self, "n_kv_heads", n_kv)
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def heads(self) -> int:
        """Query heads actually used (1 for single-head)."""
        return self.n_heads if self.multi_head else 1

    @property
    def kv_heads(self) -> int:
        """K/V heads actually used (1 for single-head)."""
        return self.n_kv_heads if self.multi_head else 1  # type: ignore[return-value]


@dataclass(frozen=True)
class LabResult:
    """What one Attention Lab update shows.

    tokens: the T tokens; weights (H, T, T): the attention applied to V, i.e. the softmax
    probabilities after dropout when dropout > 0 (dropped cells are 0, survivors scaled by
    1/(1-p)), otherwise equal to ``probs``; probs (H, T, T): softmax before dropout (rows sum
    to 1); trace: every intermediate of batch item 0; out (T, D): the module's output;
    capped: the text had more than max_tokens tokens; kv_groups: the KV head of each query head.
    """

    tokens: list[str]
    weights: Tensor
    trace: Trace
    out: Tensor
    capped: bool = False
    probs: Tensor | None = None
    kv_groups: list[int] = field(default_factory=list)
    config: LabConfig | None = None

    def explain(self, head: int) -> list[tuple[str, Tensor]]:
        """Step-by-step (T, T) matrices of one head (see :func:`attention.trace.explain_head`)."""
        return explain_head(self.trace, head)


def _word_seed(word: str, seed: int) -> int:
    # crc32 is stable across processes (Python's hash() is salted per process); it mixes seed and
    # word into 32 bits because torch's CPU generator (mt19937) only uses the low 32 bits of a seed.
    return zlib.crc32(f"{seed}:{word.lower()}".encode("utf-8"))


def sinusoidal_positions(n: int, dim: int) -> Tensor:
    """(n, dim) sine/cosine position codes from "Attention Is All You Need"."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (T, 1)
    i = torch.arange(0, dim, 2, dtype=torch.float32)  # (ceil(D/2),)
    angle = pos / (10000.0 ** (i / dim))  # (T, ceil(D/2))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe  # (T, D)


def toy_embeddings(tokens: list[str], emb_dim: int, seed: int = 0) -> Tensor:
    """(T, D) embeddings: a seeded N(0, 1) vector per (lower-cased) word plus sinusoidal positions."""
    rows = []
    for word in tokens:
        g = torch.Generator().manual_seed(_word_seed(word, seed))
        rows.append(torch.randn(emb_dim, generator=g))
    return torch.stack(rows) + sinusoidal_positions(len(tokens), emb_dim)  # (T, D)


def _build_module(cfg: LabConfig) -> nn.Module:
    # Built on the meta device and filled from a private generator, so nn.Linear's default init
    # does not draw from (and advance) torch's global RNG.
    with torch.device("meta"):
        if cfg.multi_head:
            module: nn.Module = MultiHeadAttention(cfg.emb_dim, cfg.n_heads, cfg.dropout, n_kv_heads=cfg.n_kv_heads)
        else:
            module = SingleHeadAttention(cfg.emb_dim, cfg.dropout)
    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(module, name).weight
            # std 1/sqrt(D) keeps q·k/sqrt(d) around unit size, so the heatmaps are neither flat nor one-hot.
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(cfg.emb_dim))
    return module


def run_lab(cfg: LabConfig) -> LabResult:
    """Run the configured module over the sentence; weights (H, T, T), out (T, D), trace of batch 1.

    Dropout choice: when cfg.dropout > 0 the module runs in train mode with a generator seeded by
    cfg.seed, so the heatmaps show which weights dropout removed, reproducibly; with dropout 0 it
    runs in eval mode.
    """
    tokens, capped = tokenize(cfg.text, cfg.max_tokens)
    x = toy_embeddings(tokens, cfg.emb_dim, cfg.seed)[None]  # (1, T, D)
    module = _build_module(cfg)
    module.train(cfg.dropout > 0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        out, probs, trace = module(x, causal=cfg.causal, return_weights=True, return_trace=True, generator=g)
    probs = probs[0]  # (H, T, T)
    weights = probs
    if "dropped" in trace:
        dropped = trace.get("dropped").tensor[0]
        weights = dropped if dropped.dim() == 3 else dropped[None]  # (H, T, T)
    group = cfg.heads // cfg.kv_heads
    return LabResult(tokens=tokens, weights=weights, trace=trace, out=out[0], capped=capped, probs=probs,
                     kv_groups=[h // group for h in range(cfg.heads)], config=cfg)
