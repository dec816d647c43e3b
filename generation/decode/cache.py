"""The chat engine's KV cache and attention masks: every row of a batch at its own length.

* `SlotKVCache`: per layer one (rows, kv_heads, capacity, head_dim) key and value buffer; row b
  holds its sequence at positions 0..len_b-1, every row at its own length. Before a forward the
  caller says where each new token goes (`prepare`); `update()` writes there and hands attention a
  view of the first `span` positions. Per-row RoPE positions and masks (causal, and causal within
  the sliding window for Gemma 3's local layers) make every row see exactly its own prefix.
* `RowAttentionMask`: with sdpa (the default, also behind the project's "attention_lab"
  dispatcher) attention runs row by row with the very call a single-sequence generate() makes, so
  a reply is bit for bit the same whatever else is in the batch (see the class for why). With
  eager attention `attention_masks` gives the additive float mask eager expects (one batched call).
* `PrefixStore`: keys/values of stored prompts, copied into a newcomer's row instead of being
  recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

__all__ = ["CAPACITY_STEP", "PrefixStore", "RowAttentionMask", "SlotKVCache", "attention_masks",
           "decode_attention_rows"]

# The KV buffers grow in steps of this many positions.
CAPACITY_STEP = 256

class RowAttentionMask(torch.Tensor):
    """A boolean attention mask (n, 1, T, S) that knows each row's real queries and keys, so the
    `scaled_dot_product_attention` call it reaches runs row by row, each with exactly the call a
    single-sequence `generate()` makes: no mask, the row's own key count, is_causal for a prefill
    from position 0, grouped-query heads as transformers passes them.

    Why not one call over the batch: CPU sdpa's result for a row depends on the padded key length
    (its blocking over keys), so a reply would depend on which other rows share the step. On the
    4-bit model that flips exact bf16 ties (the notebook's "capital of France" prompt has one at
    its 6th token) in most mixed batches. Row by row costs a little per step; exactness is worth it.

    It reaches sdpa through transformers' own `sdpa_attention_forward` (and the project's
    "attention_lab" dispatcher in front of it) untouched: PyTorch hands a call that has a tensor
    subclass among its arguments to the subclass (`__torch_function__`); every other operation on
    the mask sees a plain tensor with the batched mask's values.
    """

    _ends: list[int]
    _counts: list[int]
    _window: int | None
    _n_rep: int

    @staticmethod
    def wrap(mask: torch.Tensor, ends: list[int], counts: list[int], window: int | None, n_rep: int) -> RowAttentionMask:
        """mask (n, 1, T, S) bool; row b's real queries are its last counts[b] of T, at positions
        ends[b] - counts[b] .. ends[b] - 1; window = the sliding window of these layers (None = full)."""
        m = torch.Tensor._make_subclass(RowAttentionMask, mask)
        m._ends, m._counts, m._window, m._n_rep = ends, counts, window, n_rep
        return m

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if isinstance(mask, RowAttentionMask):
                rest = {k: v for k, v in kwargs.items() if k != "attn_mask"}
                with torch._C.DisableTorchFunctionSubclass():
                    return mask._rowwise(*args[:3], **rest)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def _rowwise(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """query (n, Hq, T, d) (or GQA-packed (n, Hkv, n_rep, d) for T = 1), key/value (n, Hk, S, d)
        -> (n, H, T, d); pad queries get zeros."""
        from transformers.integrations.sdpa_attention import repeat_kv

        sdpa = torch.nn.functional.scaled_dot_product_attention
        n, t, rep = query.shape[0], self.shape[2], self._n_rep
        if t == 1 and rep > 1 and query.shape[1] == key.shape[1] and query.shape[2] == rep:
            query = query.reshape(n, -1, 1, query.shape[-1])  # undo transformers' pack_gqa
        heads = query.shape[1]
        if rep > 1 and key.shape[1] == heads:  # undo repeat_kv: generate() passes the kv heads
            key, value = key[:, ::rep], value[:, ::rep]
        window, ends, counts = self._window, self._ends, self._counts
        if t == 1:
            return decode_attention_rows(query, key, value, ends, window, rep, scale, dropout_p)
        out = query.new_zeros(n, heads, t, value.shape[-1])
        for b in range(n):
            c, end = counts[b], ends[b]
            start = end - c
            q = query[b : b + 1, :, t - c :]
            if start == 0 and (window is None or c <= window):  # a causal prefill from 0, as generate()
                gqa_kw = _gqa_kw(key, value, rep)
                k, v = _row_kv(key, value, b, 0, end, rep, bool(gqa_kw))
                o = sdpa(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **gqa_kw)
            else:  # a chunk after cached positions (or past the window): an explicit mask
                j = torch.arange(end, device=q.device)
                pos = torch.arange(start, end, device=q.device).unsqueeze(1)
                keep = j <= pos
                if window:
                    keep &= j > pos - window
                k, v = key[b : b + 1, :, :end], value[b : b + 1, :, :end]
                if rep > 1:  # with a mask transformers repeats the kv heads
                    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
                o = sdpa(q, k, v, attn_mask=keep[None, None], dropout_p=dropout_p, scale=scale)
            out[b, :, t - c :] = o[0]
        return out


def _gqa_kw(key: torch.Tensor, value: torch.Tensor, rep: int) -> dict[str, bool]:
    """As transformers decides for one unpadded sequence (no mask): GQA inside sdpa, or ({}) the
    key/value heads repeated (_row_kv does that then)."""
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    return {"enable_gqa": True} if rep > 1 and use_gqa_in_sdpa(None, key, value) else {}


def _row_kv(key: torch.Tensor, value: torch.Tensor, b: int, first: int, end: int, rep: int,
            gqa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's keys/values at positions [first, end) -> (1, Hk or H, end - first, d), laid out as a
    single-sequence generate() hands them to sdpa (gqa: sdpa groups the heads itself)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    k, v = key[b : b + 1, :, first:end], value[b : b + 1, :, first:end]
    if key.shape[1] > 1:  # a row slice of several kv heads is strided; generate() has it contiguous
        k, v = k.contiguous(), v.contiguous()
    if rep > 1 and not gqa:
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    return k, v


def decode_attention_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ends: Sequence[int],
                          window: int | None, rep: int, scale: float | None, dropout_p: float = 0.0) -> torch.Tensor:
    """One new query per row, each row over its own keys with the very sdpa call a single-sequence
    generate() makes (see RowAttentionMask): query (n, H, 1, d), key/value (n, Hk, S, d) with
    H = Hk * rep; row b's keys are positions [0, ends[b]) (the last `window` on sliding layers)
    -> (n, H, 1, d)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa_kw = _gqa_kw(key, value, rep)
    outs = []
    for b, end in enumerate(ends):
        k, v = _row_kv(key, value, b, max(0, end - window) if window else 0, end, rep, bool(gqa_kw))
        outs.append(sdpa(query[b : b + 1], k, v, dropout_p=dropout_p, scale=scale, **gqa_kw))  # (1, H, 1, d)
    return torch.cat(outs)


class SlotKVCache(Cache):
    """Keys/values of up to `rows` sequences, each at its own length (a transformers `Cache`).

    Layer l holds key/value buffers (rows, kv_heads, capacity, head_dim), allocated on the first
    `update` with the layer's dtype and device. Call `prepare(n, write_pos, span)` before a forward
    of n rows: `update()` writes token t of row b at position write_pos[b, t] and returns the views
    [:n, :, :span] for attention.
    """

    def __init__(self, n_layers: int, rows: int, capacity: int) -> None:
        super().__init__(layers=[])
        self.n_layers = n_layers
        self.rows = rows
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self._pos: torch.Tensor | None = None
        self._flat: dict = {}
        self._span = 0

    def __len__(self) -> int:
        return self.n_layers

    def prepare(self, n: int, write_pos: torch.Tensor, span: int) -> None:
        """Next forward: n rows, token t of row b goes to position write_pos[b, t] ((n, T) long)."""
        self._pos = write_pos
        self._flat = {}  # per (kv_heads, device): flat row indices of the writes, built once per forward
        self._span = span

    def _flat_index(self, heads: int, device: torch.device) -> torch.Tensor:
        """(n * heads * T,) indices into a buffer viewed as (rows * heads * capacity, head_dim):
        row b, head h, position write_pos[b, t]. index_copy_ with these is far faster on CPU than
        advanced-index assignment (which goes through index_put's generic path)."""
        key = (heads, device)
        idx = self._flat.get(key)
        if idx is None:
            pos = self._pos.to(device)
            n = pos.shape[0]
            base = (torch.arange(n, device=device).unsqueeze(1) * heads + torch.arange(heads, device=device)) * self.capacity
            idx = (base.unsqueeze(-1) + pos.unsqueeze(1)).reshape(-1)  # (n, heads, T) flattened
            self._flat[key] = idx
        return idx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value_states (n, kv_heads, T, head_dim) -> all keys/values (n, kv_heads, span, head_dim)."""
        kb = self.keys[layer_idx]
        if kb is None:
            _, h, _, d = key_states.shape
            kb = key_states.new_zeros(self.rows, h, self.capacity, d)
            self.keys[layer_idx] = kb
            self.values[layer_idx] = value_states.new_zeros(self.rows, h, self.capacity, value_states.shape[-1])
        vb = self.values[layer_idx]
        n, h, _, d = key_states.shape
        idx = self._flat_index(h, kb.device)
        kb.view(-1, d).index_copy_(0, idx, key_states.reshape(-1, d))
        vb.view(-1, vb.shape[-1]).index_copy_(0, idx, value_states.reshape(-1, value_states.shape[-1]))
        return kb[:n, :, : self._span], vb[:n, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    def ensure(self, capacity: int) -> None:
        """Grow every layer's buffers to hold at least `capacity` positions (contents kept)."""
        if capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity)
        new_cap = -(-new_cap // CAPACITY_STEP) * CAPACITY_STEP
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                if old is not None:
                    grown = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                    grown[:, :, : self.capacity] = old
                    store[i] = grown
        self.capacity = new_cap

    def ensure_rows(self, rows: int, limit: int) -> None:
        """Hold at least `rows` sequences (contents kept): the row count doubles up to `limit`, so a
        lone learner's chat does not hold a whole class's buffers."""
        if rows <= self.rows:
            return
        if rows > limit:
            raise ValueError(f"{rows} rows asked for, at most {limit}")
        new_rows = min(limit, max(rows, 2 * self.rows))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                if old is not None:
                    grown = old.new_zeros(new_rows, *old.shape[1:])
                    grown[: self.rows] = old
                    store[i] = grown
        self.rows = new_rows

    def copy_row(self, dst: int, src_cache: SlotKVCache, src: int, length: int) -> None:
        """Positions [0, length) of `src_cache`'s row `src` into this cache's row `dst`."""
        self.ensure(length + 1)
        for store, other in ((self.keys, src_cache.keys), (self.values, src_cache.values)):
            for i, sb in enumerate(other):
                if sb is None:
                    continue
                if store[i] is None:
                    store[i] = sb.new_zeros(self.rows, sb.shape[1], self.capacity, sb.shape[3])
                store[i][dst, :, :length] = sb[src, :, :length]

    def write_prefix(self, row: int, keys: Sequence[torch.Tensor | None], values: Sequence[torch.Tensor | None],
                     length: int) -> None:
        """Per-layer (kv_heads, >= length, head_dim) keys/values into positions [0, length) of `row`."""
        self.ensure(length + 1)
        for store, src in ((self.keys, keys), (self.values, values)):
            for i, t in enumerate(src):
                if t is None:
                    continue
                if store[i] is None:
                    store[i] = t.new_zeros(self.rows, t.shape[0], self.capacity, t.shape[2])
                store[i][row, :, :length] = t[:, :length]

    def nbytes(self) -> int:
        """Bytes of the key/value buffers allocated (every row, the whole capacity)."""
        return sum(b.numel() * b.element_size() for store in (self.keys, self.values) for b in store if b is not None)

    def bytes_per_position(self) -> int:
        """Bytes one position of one row holds (keys and values of every layer); 0 before the first forward."""
        return sum(b[0, :, 0].numel() * b.element_size() for store in (self.keys, self.values) for b in store
                   if b is not None)

    def move_row(self, dst: int, src: int, length: int) -> None:
        """Row `src` (its first `length` positions) into row `dst` of this cache."""
        for store in (self.keys, self.values):
            for b in store:
                if b is not None:
                    b[dst, :, :length] = b[src, :, :length]


class PrefixStore:
    """Keys/values of stored prompts, so a newcomer sharing a beginning with one prefills only what
    is new. LRU, at most `entries` prompts of at most `max_tokens` tokens each; the engine stores
    only its warm-up prompt (see the module notes).

    A causal prefix's keys/values do not depend on what follows it; a prompt's prefill is split
    at the same place every time, so its numbers are reproducible.
    """

    def __init__(self, entries: int = 4, max_tokens: int = 2048) -> None:
        self.entries = entries
        self.max_tokens = max_tokens
        self._items: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []  # LRU first
        self.hits = 0
        self.tokens_saved = 0

    def nbytes(self) -> int:
        """Bytes of the stored keys/values."""
        return sum(t.numel() * t.element_size() for _, keys, values in self._items for t in keys + values
                   if t is not None)

    @staticmethod
    def _lcp(a: torch.Tensor, b: torch.Tensor) -> int:
        m = min(a.numel(), b.numel())
        diff = torch.nonzero(a[:m] != b[:m])
        return int(diff[0]) if diff.numel() else m

    def lookup(self, ids: torch.Tensor) -> tuple[int, int]:
        """(usable prefix length, entry index) for prompt ids (P,); the last prompt token is always
        left to compute (its logits give the first reply token). (0, -1) when nothing matches."""
        best, where = 0, -1
        for i, (e_ids, _, _) in enumerate(self._items):
            n = min(self._lcp(ids, e_ids), ids.numel() - 1)
            if n > best:
                best, where = n, i
        return best, where

    def copy_into(self, where: int, length: int, cache: SlotKVCache, row: int) -> None:
        """Positions [0, length) of entry `where` into `cache` row `row`; marks the entry recent."""
        item = self._items.pop(where)
        self._items.append(item)
        _, keys, values = item
        cache.write_prefix(row, keys, values, length)
        self.hits += 1
        self.tokens_saved += length

    def add(self, ids: torch.Tensor, cache: SlotKVCache, row: int) -> None:
        """Remember row `row` of `cache`, which holds the keys/values of prompt ids (P,)."""
        if self.entries <= 0 or ids.numel() > self.max_tokens:
            return
        n = ids.numel()
        for i, (e_ids, _, _) in enumerate(self._items):
            lcp = self._lcp(ids, e_ids)
            if lcp == n:  # already covered by a longer (or equal) entry
                self._items.append(self._items.pop(i))
                return
            if lcp == e_ids.numel():  # extends an entry: replace it
                self._items.pop(i)
                break
        keys = [k[row, :, :n].clone() if k is not None else None for k in cache.keys]
        values = [v[row, :, :n].clone() if v is not None else None for v in cache.values]
        self._items.append((ids.clone(), keys, values))
        while len(self._items) > self.entries:
            self._items.pop(0)


def attention_masks(qpos: torch.Tensor, span: int, ends: list[int], counts: list[int], *,
                    layer_types: Sequence[str], window: int | None, n_rep: int,
                    additive_dtype: torch.dtype | None = None) -> object:
    """Attention masks for queries at absolute positions qpos (n, T) over keys 0..span-1:
    {layer type: (n, 1, T, span)}. For sdpa a RowAttentionMask (bool, True = attend; row b's real
    queries are its last counts[b], ending at position ends[b] - 1); for eager attention
    (additive_dtype given) the additive float mask it expects. A model without per-layer types
    takes the one full-attention mask."""
    j = torch.arange(span, device=qpos.device)
    causal = j.view(1, 1, -1) <= qpos.unsqueeze(-1)  # (n, T, span)
    masks = {"full_attention": (causal, None)}
    if "sliding_attention" in layer_types and window:
        sliding = causal & (j.view(1, 1, -1) > qpos.unsqueeze(-1) - window)
        masks["sliding_attention"] = (sliding, window)
    out = {}
    for name, (m, win) in masks.items():
        m = m.unsqueeze(1)
        if additive_dtype is not None:
            m = torch.zeros(m.shape, dtype=additive_dtype, device=m.device).masked_fill_(
                ~m, torch.finfo(additive_dtype).min)
        else:
            m = RowAttentionMask.wrap(m, ends, counts, win, n_rep)
        out[name] = m
    if not layer_types:
        return out["full_attention"]
    out.setdefault("sliding_attention", out["full_attention"])
    return out
