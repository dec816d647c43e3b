"""The decode levers' single-stream reference: `FastDecoder`, a lean Gemma 3 decoder for one stream.

Not part of the app (the chat engine decodes every row of its batch through
`generation.decode.BatchDecodeStep`); bench/generation.py measures the levers with it one by one
and compares its greedy tokens with `generate()`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from generation.decode import (
    RESCORE_K,
    NF4Linear,
    QuantizedHead,
    argmax_first,
    fast_path_supported,
    prepare_layers,
    rope_tables,
)
from generation.kernels import torch_rms as rms

__all__ = ["FastDecoder", "ModuleLinear"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor, in its bf16 op order: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class ModuleLinear:
    """Adapter with NF4Linear's call signature over the bitsandbytes module's own forward (to
    measure the decode loop without lever 2)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.n = layer.out_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer(x.unsqueeze(0))[0]
        return y if out is None else out.copy_(y)


class FastDecoder:
    """Decode one stream of a Gemma 3 NF4 model on CPU, token by token.

    `prefill(ids)` starts a sequence and `step(token)` appends one; both return the next-token
    logits (V,): fp32 with the int8 head, bf16 (as the model's own) with the exact head. `greedy`
    yields greedy tokens, always exactly those of the bf16 head. The KV cache (layers, KV heads,
    max_len, head_dim) bf16 and every per-step activation are allocated once and reused (the
    cache grows by doubling when a sequence outgrows it). The model is only read: one decoder per
    concurrent stream, sharing the weights.

    Numerics: the model's own, op for op (the tests check the logits bit for bit), except the
    single-query attention step, which by default runs the query heads that share a key/value head
    as the rows of one query (transformers' pack_gqa). sdpa's CPU kernel then reads the keys once
    instead of once per head (6-10x faster here) but may round its fp32 softmax sums differently,
    so a logit can differ from `generate()`'s by about one bf16 step; exact_attention=True makes
    the same call as transformers (enable_gqa), bit-equal and slower.

    head: None = the exact bf16 head (the tied embedding); direct_nf4=False calls the Linear4bit
    modules instead of their kernel (to measure the levers apart).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        head: QuantizedHead | None = None,
        *,
        max_len: int = 1024,
        direct_nf4: bool = True,
        exact_attention: bool = False,
    ) -> None:
        why = fast_path_supported(model)
        if why is not None:
            raise ValueError(f"fast path not supported: {why}")
        cfg = model.config
        body = model.model
        self.config = cfg
        self.head = head
        self.exact_attention = exact_attention
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.head_dim)
        self.window = int(cfg.sliding_window or 0)
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.embed = body.embed_tokens.weight.detach()  # (V, D) bf16, the model's own tensor
        self.embed_scale = body.embed_tokens.embed_scale.to(self.embed.dtype)
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.final_norm = 1.0 + body.norm.weight.detach().float()
        self._rotary = body.rotary_emb
        linear = NF4Linear if direct_nf4 else ModuleLinear
        self.layers = prepare_layers(model, linear)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        d, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
        self.second_steps = 0  # greedy picks that needed greedy_token's second step
        self.steps = 0
        self.pos = 0
        self.max_len = 0
        # Per-step buffers, reused: the token, q|k|v side by side, o_proj out, gate|up, down out, logits.
        self._tok = torch.zeros(1, dtype=torch.long)
        self._qkv = torch.empty(1, (nh + 2 * nkv) * hd, dtype=torch.bfloat16)
        self._o = torch.empty(1, d, dtype=torch.bfloat16)
        self._gu = torch.empty(1, 2 * inter, dtype=torch.bfloat16)
        self._down = torch.empty(1, d, dtype=torch.bfloat16)
        self._logits = torch.empty(1, int(cfg.vocab_size), dtype=torch.float32)
        self.last_hidden = torch.empty(1, d, dtype=torch.bfloat16)
        self._window_mask = torch.ones(1, 1, 1, max(self.window, 1), dtype=torch.bool)
        self.k_cache = self.v_cache = torch.empty(0, dtype=torch.bfloat16)
        self._cos = self._sin = self._sin_signed = torch.empty(0)
        self._ensure_capacity(max_len)

    def _ensure_capacity(self, n: int) -> None:
        """Hold at least `n` positions: grow the KV cache (keeping its contents) and RoPE tables."""
        if n <= self.max_len:
            return
        n = max(n, 2 * self.max_len)
        shape = (len(self.layers), self.n_kv, n, self.head_dim)
        k = torch.zeros(shape, dtype=torch.bfloat16)
        v = torch.zeros(shape, dtype=torch.bfloat16)
        if self.pos:
            k[:, :, : self.pos] = self.k_cache[:, :, : self.pos]
            v[:, :, : self.pos] = self.v_cache[:, :, : self.pos]
        self.k_cache, self.v_cache = k, v
        self._cos, self._sin, self._sin_signed = rope_tables(self._rotary, n, self.head_dim)
        self.max_len = n

    # -- prefill: T new tokens at once (allocates; once per request) ------------------------------

    def _forward_many(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> last token's final-normed hidden (1, D); appends T positions to the cache.

        transformers' op order (bitsandbytes' kernel tiles the T rows, sdpa with GQA, causal).
        """
        t = int(ids.shape[0])
        p0, end = self.pos, self.pos + t
        self._ensure_capacity(end)
        eps, nh, nkv, hd = self.eps, self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed) * self.embed_scale  # (T, D)
        for li, L in enumerate(self.layers):
            h = rms(x, L.in_norm, eps)
            # qk_norm holds q_norm's weight in its first H rows, k_norm's in the KV rows after them
            q = rms(L.q(h).view(t, nh, hd), L.qk_norm[0], eps)  # (T, H, hd)
            k = rms(L.k(h).view(t, nkv, hd), L.qk_norm[nh], eps)  # (T, KV, hd)
            v = L.v(h).view(t, nkv, hd)
            cos = self._cos[L.sliding][p0:end].unsqueeze(1)  # (T, 1, hd)
            sin = self._sin[L.sliding][p0:end].unsqueeze(1)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.k_cache[li, :, p0:end] = k.transpose(0, 1)
            self.v_cache[li, :, p0:end] = v.transpose(0, 1)
            mask, causal = self._mask(L.sliding, p0, t)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), self.k_cache[li, :, :end].unsqueeze(0),
                self.v_cache[li, :, :end].unsqueeze(0), attn_mask=mask, is_causal=causal,
                scale=self.scaling, enable_gqa=nkv != nh,
            )  # (1, H, T, hd)
            attn = attn[0].transpose(0, 1).reshape(t, nh * hd)
            x = x + rms(L.o(attn), L.post_attn_norm, eps)
            h = rms(x, L.pre_ff_norm, eps)
            a = F.gelu(L.gate(h), approximate="tanh") * L.up(h)
            x = x + rms(L.down(a), L.post_ff_norm, eps)
        self.pos = end
        return rms(x[-1:], self.final_norm, eps)

    def _mask(self, sliding: bool, p0: int, t: int) -> tuple[torch.Tensor | None, bool]:
        """(bool mask (T, p0+T) or None, is_causal) for T new queries after p0 cached positions."""
        windowed = sliding and self.window > 0
        if p0 == 0 and not (windowed and t > self.window):
            return None, True
        q_pos = torch.arange(p0, p0 + t).unsqueeze(1)
        k_pos = torch.arange(p0 + t).unsqueeze(0)
        allowed = k_pos <= q_pos
        if windowed:
            allowed &= k_pos > q_pos - self.window
        return allowed, False

    # -- decode: one token, preallocated buffers -------------------------------------------------

    def _decode_one(self, token: int) -> torch.Tensor:
        """One token at position pos -> final-normed hidden (1, D); writes its K/V into the cache."""
        p = self.pos
        self._ensure_capacity(p + 1)
        eps, nh, nkv, hd = self.eps, self.n_heads, self.n_kv, self.head_dim
        qd, kd = nh * hd, nkv * hd
        qkv, gu, inter = self._qkv, self._gu, self._gu.shape[1] // 2
        q_out, k_out, v_out = qkv[:, :qd], qkv[:, qd : qd + kd], qkv[:, qd + kd :]
        gate_out, up_out = gu[:, :inter], gu[:, inter:]
        self._tok[0] = token
        x = F.embedding(self._tok, self.embed) * self.embed_scale  # (1, D)
        for li, L in enumerate(self.layers):
            h = rms(x, L.in_norm, eps)
            L.q(h, q_out)
            L.k(h, k_out)
            L.v(h, v_out)
            # q and k heads normed and rotated together: (H + KV, hd) rows, each its own norm weight
            qk = qkv[:, : qd + kd].view(nh + nkv, hd)
            qk = (F.rms_norm(qk.float(), (hd,), None, eps) * L.qk_norm).to(torch.bfloat16)
            qk = qk * self._cos[L.sliding][p] + torch.roll(qk, hd // 2, -1) * self._sin_signed[L.sliding][p]
            self.k_cache[li, :, p] = qk[nh:]
            self.v_cache[li, :, p] = v_out.view(nkv, hd)
            start, mask = 0, None
            if L.sliding and self.window and p + 1 >= self.window:
                # The last `window` positions; transformers then passes an all-true mask, which
                # sends sdpa down its masked path: the same mask keeps the same rounding.
                start, mask = p + 1 - self.window, self._window_mask
            keys = self.k_cache[li, :, start : p + 1].unsqueeze(0)  # (1, KV, n, hd)
            vals = self.v_cache[li, :, start : p + 1].unsqueeze(0)
            if mask is None and self.exact_attention:  # transformers' call without a mask
                attn = F.scaled_dot_product_attention(
                    qk[:nh].view(1, nh, 1, hd), keys, vals, scale=self.scaling, enable_gqa=nkv != nh
                )  # (1, H, 1, hd)
            else:
                # The heads sharing a key/value head as the rows of one query (transformers'
                # pack_gqa, its own layout when it passes a mask): sdpa reads each key block once
                # instead of once per head, 6-10x faster here than enable_gqa.
                attn = F.scaled_dot_product_attention(
                    qk[:nh].view(1, nkv, nh // nkv, hd), keys, vals, attn_mask=mask, scale=self.scaling
                )  # (1, KV, H/KV, hd)
            L.o(attn.view(1, qd), self._o)
            x = x + rms(self._o, L.post_attn_norm, eps)
            h = rms(x, L.pre_ff_norm, eps)
            L.gate(h, gate_out)
            L.up(h, up_out)
            L.down(F.gelu(gate_out, approximate="tanh") * up_out, self._down)
            x = x + rms(self._down, L.post_ff_norm, eps)
        self.pos = p + 1
        return rms(x, self.final_norm, eps)

    # -- public API ------------------------------------------------------------------------------

    def _logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        self.last_hidden.copy_(hidden)
        if self.head is not None:
            return self.head.logits(self.last_hidden, out=self._logits)[0]
        return F.linear(self.last_hidden, self.lm_head)[0]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence: input_ids (1, T) or (T,) -> next-token logits (V,)."""
        self.pos = 0
        ids = input_ids.reshape(-1).to(torch.long)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        return self._logits_of(self._forward_many(ids))

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append `token` to the sequence -> next-token logits (V,)."""
        if self.pos == 0:
            raise RuntimeError("step() before prefill()")
        return self._logits_of(self._decode_one(int(token)))

    @torch.inference_mode()
    def exact_top(self, logits: torch.Tensor, k: int = RESCORE_K) -> torch.Tensor:
        """For sampling: the (V,) logits of the last prefill/step with their k largest replaced, in
        place, by the bf16 head's exact values (a no-op with the exact head)."""
        if self.head is not None:
            self.head.make_exact(logits, self.last_hidden, torch.topk(logits, k).indices)
        return logits

    @torch.inference_mode()
    def greedy_pick(self, logits: torch.Tensor) -> int:
        """The greedy token for `logits` from the last prefill/step: exactly the bf16 head's argmax."""
        self.steps += 1
        if self.head is None:
            return argmax_first(logits)
        tok, one_step = self.head.greedy_token(self.last_hidden, logits)
        self.second_steps += not one_step
        return tok

    def greedy(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield up to max_new_tokens greedy tokens; an EOS token is yielded, then it stops.

        The bf16 head's argmax at every step (also with the int8 head), so the same tokens as greedy
        `generate()` unless the attention rounding (see the class docstring) flips a near-tie; with
        exact_attention=True always the same. `should_stop()` is checked after each token.
        """
        eos = frozenset(int(e) for e in eos_token_ids)
        logits = self.prefill(input_ids)
        for i in range(max_new_tokens):
            tok = self.greedy_pick(logits)
            yield tok
            if tok in eos or i + 1 == max_new_tokens or (should_stop is not None and should_stop()):
                return
            logits = self.step(tok)
