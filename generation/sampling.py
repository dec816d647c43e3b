"""Sampling controls, validated on creation, and their translation into `generate()` kwargs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
from transformers import TopPLogitsWarper

MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_SEED = 2**63 - 1


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling controls; defaults are the original notebook's (128 tokens, T=0.7, top-p 0.95).

    temperature 0 means greedy decoding (top_p/top_k/seed are then irrelevant); top_k 0 means off.
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {m!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not 1.0 <= r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [1, {MAX_REPETITION_PENALTY}] (1 = off), got {r!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**63-1], got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        """kwargs for `model.generate()`; call once per generation (a sampled call owns a fresh RNG).

        transformers 5.23's `generate()` takes no `torch.Generator` and samples from the global RNG,
        which concurrent callers share (one call's draws shift another's). So sampling happens in our
        own last logits processor, `SeededSampler`, with a per-call `torch.Generator`; it leaves only
        the drawn token finite and `generate()` runs greedy, which then picks exactly that token.
        Repetition penalty stays with `generate()` (it comes first, as in HF's sampling order).
        """
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": self.repetition_penalty,
        }
        if not self.greedy:
            procs: list[LogitsProcessor] = [TemperatureLogitsWarper(self.temperature)]
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
            procs.append(SeededSampler(self.seed))
            kw["logits_processor"] = LogitsProcessorList(procs)
        return kw


class SeededSampler(LogitsProcessor):
    """Draws the next token from softmax(scores) with a private generator and keeps only it.

    scores (B, V) -> (B, V) with 0 at the drawn token and -inf elsewhere.
    """

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # fresh OS entropy: independent draws per call
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (B, V)
        gen = self.generator
        if probs.device.type != "cpu":  # sample on CPU with the CPU generator: device-independent results
            probs = probs.cpu()
        nxt = torch.multinomial(probs, num_samples=1, generator=gen).to(scores.device)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))  # (B, V)
        return out.scatter_(1, nxt, 0.0)
