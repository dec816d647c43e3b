"""How sure the model was of every token of a reply, and what else it weighed there.

One teacher-forced forward over the chat's prompt and the reply (the prompt from
`generation.prompt.build_prompt`, as the chat built it) gives, at every reply position, the
model's own distribution over the next token (temperature 1, before any sampling control): the
probability of the token the reply has there and the `k` most likely alternatives. The LM head
runs over a few positions at a time, so a long reply never holds a (tokens x vocabulary) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..prompt import Prompt
from ..sampling import ranked_ids
from ..tokens import reply_text_ids, token_texts
from .introspect import check_int, model_device

REPLY_TOKENS_LIMIT = 1024  # reply tokens read at most (the chat writes at most 512)
ALTERNATIVES_LIMIT = 100
HEAD_CHUNK = 32  # positions per LM-head call: 32 x 262k float32 logits = 32 MiB


@dataclass(frozen=True)
class Alternative:
    """A token the model weighed at one position, with its probability (temperature 1)."""

    token: str  # its text (a byte of a multi-byte character: the raw piece, e.g. "<0xE2>")
    token_id: int
    prob: float


@dataclass(frozen=True)
class ReplyToken:
    """One token of the reply: its share of the reply's text, the model's probability for it, its
    rank among all tokens (0 = the most likely) and the `k` most likely tokens there."""

    token: str
    token_id: int
    prob: float
    rank: int
    alternatives: list[Alternative]


@dataclass(frozen=True)
class ReplyTokens:
    """A reply read token by token. `tokens` spell the reply (with the leading space the chat
    strips, when the model wrote one); `ids` (1, P + R) are the prompt then the reply tokens read,
    so `ids[:, :prompt_tokens + r]` is what the model had read before writing token r."""

    tokens: list[ReplyToken]
    ids: Tensor
    prompt_tokens: int
    capped: bool  # the reply had more than REPLY_TOKENS_LIMIT tokens: only the first are read
    notice: str

    def context(self, r: int) -> Tensor:
        """(1, P + r): the prompt and the reply's first r tokens, what token r was written after."""
        check_int("reply token", r, 0, len(self.tokens) - 1)
        return self.ids[:, : self.prompt_tokens + r]


def _label(tok: Any, token_id: int) -> str:
    text = tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return str(tok.convert_ids_to_tokens(token_id)) if "\ufffd" in text else text


def _head_logits(model: Any, hidden: Tensor) -> Tensor:
    """The LM head (and a final logit soft-cap where the model has one) on hidden states (n, D) -> (n, V) float32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def reply_token_probs(lm: Any, prompt: Prompt, reply: str, *, k: int = 10) -> ReplyTokens:
    """Every token of `reply` (as the chat shows it, after `prompt`) with its probability and the
    `k` (1-100) most likely tokens at its position, from one forward over prompt + reply.

    ValueError for an empty reply or a bad k.
    """
    if not isinstance(prompt, Prompt):
        raise ValueError(f"prompt must be a generation.prompt.Prompt (build_prompt's), got {type(prompt).__name__}")
    check_int("k", k, 1, ALTERNATIVES_LIMIT)
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError("the reply is empty: there is no token to look at")
    model, tok = lm.model, lm.tokenizer
    reply_ids = reply_text_ids(tok, prompt.text, reply)
    capped = len(reply_ids) > REPLY_TOKENS_LIMIT
    reply_ids = reply_ids[:REPLY_TOKENS_LIMIT]
    n_prompt = int(prompt.input_ids.shape[1])
    ids = torch.cat([prompt.input_ids.reshape(1, -1).long(), torch.tensor([reply_ids])], dim=1)
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=ids.to(model_device(model)), use_cache=False).last_hidden_state[0]
        # The distribution over reply token r comes from the position before it.
        hidden = hidden[n_prompt - 1 : n_prompt - 1 + len(reply_ids)]
        target = torch.tensor(reply_ids)
        probs, ranks, top_p, top_i = [], [], [], []
        for start in range(0, len(reply_ids), HEAD_CHUNK):
            logp = _head_logits(model, hidden[start : start + HEAD_CHUNK]).log_softmax(-1).cpu()  # (n, V)
            want = target[start : start + logp.shape[0]]
            mine = logp.gather(1, want[:, None])  # (n, 1)
            probs += mine[:, 0].exp().tolist()
            ranks += (logp > mine).sum(-1).tolist()
            best = ranked_ids(logp, k)  # (n, k): ties in id order, the greedy choice first
            top_p.append(logp.gather(1, best).exp())
            top_i.append(best)
    top_p, top_i = torch.cat(top_p).tolist(), torch.cat(top_i).tolist()
    texts = token_texts(tok, reply_ids)
    tokens = [
        ReplyToken(token=texts[r], token_id=reply_ids[r], prob=probs[r], rank=int(ranks[r]),
                   alternatives=[Alternative(_label(tok, i), i, p) for i, p in zip(top_i[r], top_p[r])])
        for r in range(len(reply_ids))
    ]
    notice = (f"The reply has more than {REPLY_TOKENS_LIMIT} tokens; its first {REPLY_TOKENS_LIMIT} are shown."
              if capped else "")
    return ReplyTokens(tokens=tokens, ids=ids, prompt_tokens=n_prompt, capped=capped, notice=notice)
