"""The chat engine's fast CPU decode step: every running row of a Gemma 3 NF4 model in one lean pass.

`generation.fastpath` has the levers for one stream (`FastDecoder`); this is the same forward for
the n rows of the engine's batch, on the engine's own KV cache (`SlotKVCache`), so one user and
thirty users both get them:

* the projections call bitsandbytes' NF4 kernel directly on the modules' own bytes (M = n rows in
  one call, as the model's own forward makes it), into activation buffers reused every step;
* no `generate()`/`forward()` machinery: no mask tensors, no cache objects, no per-step `isin`;
* attention row by row with exactly the sdpa call the engine's model path makes
  (`decode_attention_rows`), so a row's numbers are the model path's, bit for bit, whatever else
  is in the batch (the tests compare the two paths' logits);
* the logits from the int8 copy of the LM head (`QuantizedHead`), chosen exactly: a greedy row
  gets the bf16 head's own argmax (`greedy_token`), a sampled row's 64 most likely tokens get the
  bf16 head's exact logits (the rest of the vocabulary, the tail of the distribution, keeps the
  int8 values: perplexity -0.1% vs the bf16 head, measured in bench/generation.py).

Prefill stays on the model's own forward (long prompts are where the batched matmuls pay); only
its last hidden state goes through the head here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .fastpath import RESCORE_K, QuantizedHead, _rms, fast_path_supported, prepare_layers, rope_tables
from .sampling import BatchSampler, RowSampling

__all__ = ["BatchDecodeStep", "pick_tokens"]

# Rows the activation buffers hold at first; they grow with the batch.
_MIN_ROWS = 8


class BatchDecodeStep:
    """One decode step for n rows of a Gemma 3 NF4 model (CPU): tokens in, final hidden states out.

    The model is only read (its modules, packed NF4 bytes, norms and tied embedding). The caller
    owns the KV cache: an object with `prepare(n, write_pos, span)` and `update(k, v, layer)` as
    `generation.engine.SlotKVCache` has them.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        why = fast_path_supported(model)
        if why is not None:
            raise ValueError(f"fast path not supported: {why}")
        cfg = model.config
        body = model.model
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.head_dim)
        self.window = int(cfg.sliding_window or 0) or None
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.hidden_size = int(cfg.hidden_size)
        self.intermediate = int(cfg.intermediate_size)
        self.embed = body.embed_tokens.weight.detach()  # (V, D) bf16, the model's own tensor
        self.embed_scale = body.embed_tokens.embed_scale.to(self.embed.dtype)
        self.final_norm = 1.0 + body.norm.weight.detach().float()
        self._rotary = body.rotary_emb
        self.layers = prepare_layers(model)
        self.max_len = 0
        self._cos: dict = {}
        self._sin_signed: dict = {}
        self._rows = 0
        self._grow_rows(_MIN_ROWS)
        self._grow_positions(256)

    def _grow_rows(self, n: int) -> None:
        """Activation buffers for at least n rows: q|k|v side by side, o_proj out, gate|up, down out."""
        if n <= self._rows:
            return
        n = max(n, 2 * self._rows)
        hd, nh, nkv, d = self.head_dim, self.n_heads, self.n_kv, self.hidden_size
        self._qkv = torch.empty(n, (nh + 2 * nkv) * hd, dtype=torch.bfloat16)
        self._o = torch.empty(n, d, dtype=torch.bfloat16)
        self._gu = torch.empty(n, 2 * self.intermediate, dtype=torch.bfloat16)
        self._down = torch.empty(n, d, dtype=torch.bfloat16)
        self._rows = n

    def _grow_positions(self, n: int) -> None:
        if n <= self.max_len:
            return
        n = max(n, 2 * self.max_len)
        self._cos, _, self._sin_signed = rope_tables(self._rotary, n, self.head_dim)
        self.max_len = n

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """tokens (n,) long, row b's token at position positions[b] ((n,) long) -> final-normed
        hidden (n, D) bf16. Writes each row's keys/values into rows 0..n-1 of `cache`; row b
        attends to its positions [0, positions[b]] (the last `window` on sliding layers)."""
        from .engine import decode_attention_rows

        n = int(tokens.shape[0])
        pos = positions.reshape(-1).to(torch.long)
        ends = [int(p) + 1 for p in pos.tolist()]
        self._grow_rows(n)
        self._grow_positions(max(ends))
        cache.prepare(n, pos.unsqueeze(1), max(ends))
        eps, nh, nkv, hd = self.eps, self.n_heads, self.n_kv, self.head_dim
        qd, kd, inter = nh * hd, nkv * hd, self.intermediate
        qkv, gu, o, down = self._qkv[:n], self._gu[:n], self._o[:n], self._down[:n]
        q_out, k_out, v_out = qkv[:, :qd], qkv[:, qd : qd + kd], qkv[:, qd + kd :]
        gate_out, up_out = gu[:, :inter], gu[:, inter:]
        rope = {s: (self._cos[s][pos].unsqueeze(1), self._sin_signed[s][pos].unsqueeze(1)) for s in (True, False)}
        x = F.embedding(tokens.reshape(-1), self.embed) * self.embed_scale  # (n, D)
        for li, L in enumerate(self.layers):
            h = _rms(x, L.in_norm, eps)
            L.q(h, q_out)
            L.k(h, k_out)
            L.v(h, v_out)
            # q and k heads normed and rotated together: (n, H + KV, hd), each head its own norm weight
            qk = qkv[:, : qd + kd].view(n, nh + nkv, hd)
            qk = (F.rms_norm(qk.float(), (hd,), None, eps) * L.qk_norm).to(torch.bfloat16)
            cos, sin = rope[L.sliding]  # (n, 1, hd)
            qk = qk * cos + torch.roll(qk, hd // 2, -1) * sin
            keys, values = cache.update(qk[:, nh:].unsqueeze(2), v_out.view(n, nkv, 1, hd), li)  # (n, KV, S, hd)
            attn = decode_attention_rows(qk[:, :nh].unsqueeze(2), keys, values, ends,
                                         self.window if L.sliding else None, nh // nkv, self.scaling)  # (n, H, 1, hd)
            L.o(attn.view(n, qd), o)
            x = x + _rms(o, L.post_attn_norm, eps)
            h = _rms(x, L.pre_ff_norm, eps)
            L.gate(h, gate_out)
            L.up(h, up_out)
            L.down(F.gelu(gate_out, approximate="tanh") * up_out, down)
            x = x + _rms(down, L.post_ff_norm, eps)
        return _rms(x, self.final_norm, eps)


def pick_tokens(hidden: torch.Tensor, head: QuantizedHead, rows: Sequence[RowSampling], sampler: BatchSampler,
                out: torch.Tensor | None = None) -> list[int]:
    """The next token of each row from final hidden states (n, D) through the int8 head.

    Greedy rows: exactly the bf16 head's argmax (`QuantizedHead.greedy_token`); with a repetition
    penalty, which reorders tokens, the row's exact bf16 logits go through the sampler instead.
    Sampled rows: int8 logits with the RESCORE_K largest replaced by exact ones, then `sampler`
    (each row's own parameters and generator). Every row's numbers come from its own hidden state
    only, so a reply does not depend on the batch. out: an (n, V) fp32 buffer to reuse.
    """
    n = hidden.shape[0]
    logits = head.logits(hidden, out=out)  # (n, V) fp32
    tokens = [0] * n
    rest = []
    for i, r in enumerate(rows):
        p = r.params
        h = hidden[i : i + 1]
        if p.greedy and p.repetition_penalty == 1.0:
            tokens[i] = head.greedy_token(h, logits[i])[0]
            continue
        if p.greedy:
            logits[i].copy_(F.linear(h, head.exact)[0])
        else:
            top = torch.topk(logits[i], RESCORE_K).indices
            logits[i].index_copy_(0, top, head.rescore(h, top).float())
        rest.append(i)
    if rest:
        sub = logits if len(rest) == n else logits[torch.tensor(rest)]
        for i, tok in zip(rest, sampler.sample(sub, [rows[i] for i in rest]).tolist()):
            tokens[i] = tok
    return tokens
