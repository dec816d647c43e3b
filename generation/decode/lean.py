"""The chat engine's lean decode step: every running row of an NF4 model in one pass (CPU).

One step for every family `generation.decode.family` describes (Gemma 3, Qwen2, Qwen3, Llama,
Mistral): the differences (norm form, sandwich norms, q/k norms, biases, embedding scale,
activation, sliding-window layers, RoPE) are read from the model's `Architecture`.

The same forward as the model's own for the n rows of the engine's batch, on the engine's KV
cache (`SlotKVCache`), without the model's per-step machinery:

* the projections call bitsandbytes' NF4 kernel directly on the modules' own bytes (M = n rows in
  one call, as the model's own forward makes it), into activation buffers reused every step;
* no `generate()`/`forward()` machinery: no mask tensors, no cache objects, no per-step `isin`;
* each layer's RMSNorms, residual adds, q/k norms and RoPE in three C calls that give torch's
  bits in the family's norm form (`generation.kernels`, checked against torch first; torch's ops where they cannot be
  built or differ);
* attention (the default) for every row in one C call per layer (`generation.kernels.attention`,
  fp32 within its error bound of the exact attention; where it cannot run, torch's sdpa row by
  row with the query heads of a key/value head packed into one call), or, with
  `exact_attention`, row by row with exactly the sdpa call the engine's model path makes
  (`decode_attention_rows`), so a row's numbers are the model path's, bit for bit, whatever else
  is in the batch (the tests compare the two paths' logits).

Its output is the final hidden state; `generation.decode.head.pick_tokens` turns it into tokens
through the int8 LM head. Prefill stays on the model's own forward (long prompts are where the
batched matmuls pay).

`single_threaded` and `one_thread_here` keep the many small ops of a step (and the app's other
model work) out of OpenMP's parallel regions where those cost more than they save.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..kernels import KernelStatus, attention_kernel, norm_kernels, norm_weight, torch_qk_norm_rope, torch_rms
from .cache import decode_attention_rows
from .family import describe
from .nf4 import FusedNF4Linear, fast_path_supported, prepare_layers, rope_tables

__all__ = ["MANY_THREADS_ROWS", "BatchDecodeStep", "one_thread_here", "openmp_runtime", "single_threaded"]

# Rows the activation buffers hold at first; they grow with the batch.
_MIN_ROWS = 8
# From this many rows on the NF4 matmuls run on every thread; below, waking the other threads for
# each small matmul costs more than they share out (see `single_threaded`; bench/README.md).
MANY_THREADS_ROWS = 12


class BatchDecodeStep:
    """One decode step for n rows of an NF4 model of a described family (CPU): tokens in, final
    hidden states out.

    The model is only read (its modules, packed NF4 bytes, norms and embedding). The caller
    owns the KV cache: an object with `prepare(n, write_pos, span)` and `update(k, v, layer)` as
    `generation.decode.SlotKVCache` has them.
    """

    def __init__(self, model: torch.nn.Module, *, exact_attention: bool = False, native_norms: bool = True,
                 native_attention: bool = True) -> None:
        from transformers.activations import ACT2FN

        why = fast_path_supported(model)
        if why is not None:
            raise ValueError(f"fast path not supported: {why}")
        body = model.model
        self.arch = arch = describe(model.config, tied_head=_tied(model))
        self.norm_form = arch.norm
        self.eps = arch.eps
        self.n_heads, self.n_kv, self.head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
        self.window = arch.window
        # the attention modules' own scaling where they have it (the same number, as transformers computes it)
        self.scaling = float(getattr(body.layers[0].self_attn, "scaling", arch.scaling))
        self.hidden_size = arch.hidden_size
        self.intermediate = arch.intermediate_size
        self.act = ACT2FN[arch.activation]  # transformers' own activation module (its bits)
        self.embed = body.embed_tokens.weight.detach()  # (V, D) bf16, the model's own tensor
        self.embed_scale = (None if arch.embed_scale is None
                            else torch.tensor(arch.embed_scale).to(self.embed.dtype))  # as Gemma's embedding has it
        self.final_norm = norm_weight(body.norm, self.norm_form)
        self._rotary = body.rotary_emb
        self.layers = prepare_layers(model)
        # q|k|v and gate|up of each layer as one NF4 call each, straight into the activation
        # buffers laid out the same way: fewer kernel calls per step, for copies of their codes
        # (`fused_bytes`)
        self._fused = [(FusedNF4Linear(L.q, L.k, L.v), FusedNF4Linear(L.gate, L.up)) for L in self.layers]
        self.fused_bytes = sum(a.nbytes + b.nbytes for a, b in self._fused)
        self.exact_attention = exact_attention
        # norm_status: which norms run (KernelStatus), and why
        self._kernels, self.norm_status = (
            norm_kernels(self.hidden_size, self.n_heads + self.n_kv, self.head_dim, self.eps, self.norm_form)
            if native_norms
            else (None, KernelStatus("torch ops", False, "native norms not asked for")))
        # attention_status: what computes the packed attention (KernelStatus), and why; the exact
        # attention is always torch's own call
        self._attention, self.attention_status = (
            attention_kernel(self.n_heads // self.n_kv, self.head_dim)
            if native_attention and not exact_attention
            else (None, KernelStatus("torch sdpa per row", False,
                                     "the model's own attention call asked for" if exact_attention
                                     else "native attention not asked for")))
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
        self._h = torch.empty(n, d, dtype=torch.bfloat16)
        self._attn = torch.empty(n, nh, hd, dtype=torch.bfloat16)
        self._rows = n

    def _grow_positions(self, n: int) -> None:
        if n <= self.max_len:
            return
        n = max(n, 2 * self.max_len)
        cos, _, sin_signed = rope_tables(self._rotary, n, self.head_dim, self.arch.family.rope_by_layer_type)
        self._cos = {k: v.contiguous() for k, v in cos.items()}
        self._sin_signed = {k: v.contiguous() for k, v in sin_signed.items()}
        self.max_len = n

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """tokens (n,) long, row b's token at position positions[b] ((n,) long) -> final-normed
        hidden (n, D) bf16. Writes each row's keys/values into rows 0..n-1 of `cache`; row b
        attends to its positions [0, positions[b]] (the last `window` on sliding layers)."""
        n = int(tokens.shape[0])
        pos = positions.reshape(-1).to(torch.long).contiguous()
        ends = [int(p) + 1 for p in pos.tolist()]
        self._grow_rows(n)
        self._grow_positions(max(ends))
        cache.prepare(n, pos.unsqueeze(1), max(ends))
        eps, nh, nkv, hd, form = self.eps, self.n_heads, self.n_kv, self.head_dim, self.norm_form
        rms = functools.partial(torch_rms, form=form)
        qd, kd, inter = nh * hd, nkv * hd, self.intermediate
        qkv, gu, o, down = self._qkv[:n], self._gu[:n], self._o[:n], self._down[:n]
        v_out = qkv[:, qd + kd :]  # q | k | v side by side, as the fused projection writes them
        gate_out, up_out = gu[:, :inter], gu[:, inter:]
        kern = self._kernels
        attend = self._attention
        if attend is not None:  # each row's keys [first, end) on the full and the sliding layers
            end_t = pos + 1
            spans = {False: torch.zeros_like(end_t),
                     True: (end_t - self.window).clamp_(min=0) if self.window else torch.zeros_like(end_t)}
            attn_out = self._attn[:n]
        if kern is None:
            # (n, 1, hd) cos and signed sin per layer kind
            rope = {s: (self._cos[s][pos].unsqueeze(1), self._sin_signed[s][pos].unsqueeze(1)) for s in (True, False)}
        layers = self.layers
        with single_threaded() as serial:
            matmul_threads = serial.all_threads(n >= MANY_THREADS_ROWS)  # big batches' matmuls share out
            threads = serial.count(n >= MANY_THREADS_ROWS)  # and so does the attention kernel's work
            x = F.embedding(tokens.reshape(-1), self.embed)  # (n, D), this step's own
            if self.embed_scale is not None:
                x = x * self.embed_scale
            if kern is not None:
                h = kern.rms(x, layers[0].in_norm, eps, self._h[:n])  # (n, D)
            for li, (L, (qkv_proj, gate_up_proj)) in enumerate(zip(layers, self._fused)):
                if kern is None:
                    h = rms(x, L.in_norm, eps)
                with matmul_threads:
                    qkv_proj(h, qkv)  # (n, H*hd | KV*hd | KV*hd)
                # q and k heads normed and rotated together: (n, H + KV, hd), each head its own norm weight
                qk = qkv[:, : qd + kd].view(n, nh + nkv, hd)
                if kern is not None:  # in place, in qkv
                    kern.qk_norm_rope(qkv, nh + nkv, hd, L.qk_norm, eps, self._cos[L.sliding],
                                      self._sin_signed[L.sliding], pos)
                else:
                    qk = torch_qk_norm_rope(qk, L.qk_norm, eps, *rope[L.sliding], form)
                keys, values = cache.update(qk[:, nh:].unsqueeze(2), v_out.view(n, nkv, 1, hd), li)  # (n, KV, S, hd)
                window = self.window if L.sliding else None
                if attend is not None:
                    attn = attend(qk[:, :nh], keys, values, spans[L.sliding], end_t, self.scaling, attn_out,
                                  threads)  # (n, H, hd)
                elif self.exact_attention:
                    attn = decode_attention_rows(qk[:, :nh].unsqueeze(2), keys, values, ends, window, nh // nkv,
                                                 self.scaling)  # (n, H, 1, hd)
                else:
                    attn = _packed_attention_rows(qk[:, :nh], keys, values, ends, window, self.scaling)  # (n, H, hd)
                with matmul_threads:
                    L.o(attn.view(n, qd), o)
                # x += post_attn_norm(o) (Gemma's sandwich norm; else x += o); h = pre_ff_norm(x)
                if kern is not None:
                    kern.add_rms(x, o, L.post_attn_norm, L.pre_ff_norm, eps, h)
                else:
                    x = x + (o if L.post_attn_norm is None else rms(o, L.post_attn_norm, eps))
                    h = rms(x, L.pre_ff_norm, eps)
                with matmul_threads:
                    gate_up_proj(h, gu)  # (n, I | I)
                a = self.act(gate_out) * up_out
                with matmul_threads:
                    L.down(a, down)
                if kern is not None:  # x += post_ff_norm(down) (or down); h = the next layer's input norm (or the final norm)
                    nxt = layers[li + 1].in_norm if li + 1 < len(layers) else self.final_norm
                    kern.add_rms(x, down, L.post_ff_norm, nxt, eps, h)
                else:
                    x = x + (down if L.post_ff_norm is None else rms(down, L.post_ff_norm, eps))
        return h.clone() if kern is not None else rms(x, self.final_norm, eps)


def _tied(model: torch.nn.Module) -> bool:
    """Whether the LM head is the embedding itself (the same storage)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@functools.cache
def openmp_runtime():
    """The OpenMP runtime torch runs on (ctypes), or None where it cannot be found."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    try:
        lib = ctypes.CDLL(path) if os.path.exists(path) else None
    except OSError:
        return None
    if lib is not None:
        lib.omp_get_max_threads.restype = ctypes.c_int
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
    return lib


def one_thread_here() -> None:
    """From now on, this thread's torch ops run without parallel regions (OpenMP's per-thread
    setting; other threads and torch's global thread count are untouched). A no-op in the main thread.

    For the app's worker threads that run the model for the inside views while the chat engine's
    loop owns the main thread: a second thread with a parallel team of its own stops OpenMP's
    workers from spinning, for the engine too, which then slows far more than the worker gains
    (bench/README.md has the figures).
    """
    lib = _worker_runtime()
    if lib is not None:
        lib.omp_set_num_threads(1)


def _worker_runtime():
    """openmp_runtime() in a thread other than the main one (None in the main thread, whose team
    is left alone), once torch has set this thread's team size: after torch.set_num_threads (app.py
    calls it), torch sizes a new thread's team at its first parallel call, which would undo a size
    set before it."""
    if threading.current_thread() is threading.main_thread():
        return None
    torch.get_num_threads()  # that first call
    return openmp_runtime()


class single_threaded:
    """Context: this thread's torch ops run without parallel regions (OpenMP's per-thread setting;
    other threads and torch's global thread count are untouched), except inside `all_threads()`.
    A no-op in the process's main thread.

    For runs of small ops, such as one sdpa call per row. GNU OpenMP keeps its workers spinning
    between parallel regions only while the process has no more OpenMP threads than cores, which
    a second thread with parallel regions already breaks (it brings its own team); then every
    region wakes its workers with a futex, which costs more than a small op itself, and a 30-row
    step makes hundreds of attention calls. In the main thread alone (`ChatEngine.run_here`, as
    `python app.py` runs the engine) the workers spin and parallel regions are cheap; switching the
    team size there costs more than it saves, so it is left alone.
    """

    def __enter__(self) -> single_threaded:
        self._lib = _worker_runtime()
        self._before = self._lib.omp_get_max_threads() if self._lib is not None else 1
        if self._before > 1:
            self._lib.omp_set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before > 1:
            self._lib.omp_set_num_threads(self._before)

    def count(self, when: bool = True) -> int:
        """The threads for a kernel that takes its own count (OpenMP's num_threads): those from
        before where `when`, else this thread's present count."""
        return self._before if when and self._before > 1 else torch.get_num_threads()

    def all_threads(self, when: bool = True) -> _ThreadsRestored:
        """Context inside: the thread count from before, for the kernels that pay for it (a no-op
        context when `when` is False)."""
        return _ThreadsRestored(self._lib, self._before if when else 1)


class _ThreadsRestored:
    """Inside `single_threaded`: the thread count from before while in this context."""

    __slots__ = ("_lib", "_n")

    def __init__(self, lib, n: int) -> None:
        self._lib, self._n = lib, n

    def __enter__(self) -> None:
        if self._n > 1:
            self._lib.omp_set_num_threads(self._n)

    def __exit__(self, *exc: object) -> None:
        if self._n > 1:
            self._lib.omp_set_num_threads(1)


def _packed_attention_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ends: Sequence[int],
                           window: int | None, scale: float) -> torch.Tensor:
    """Row by row, the query heads that share a key/value head as the rows of one query (transformers'
    pack_gqa): query (n, H, hd), keys/values (n, KV, S, hd) -> (n, H, hd). One sdpa call per row
    reads each key once; the call a single-sequence generate() makes (enable_gqa, one query per
    head) reads every key once per query head. The fp32 softmax sums may round differently from
    that call (a logit then moves by about one bf16 step)."""
    sdpa = F.scaled_dot_product_attention
    n, h, hd = query.shape
    kv = keys.shape[1]
    outs = []
    for b, end in enumerate(ends):
        first = max(0, end - window) if window else 0
        # the row's keys as they lie in the cache (strided over the capacity): sdpa reads them in
        # place, where a contiguous copy first would cost as much as the call itself
        k, v = keys[b : b + 1, :, first:end], values[b : b + 1, :, first:end]
        outs.append(sdpa(query[b].view(1, kv, h // kv, hd), k, v, scale=scale))  # (1, KV, H/KV, hd)
    return torch.cat(outs).view(n, h, hd)
