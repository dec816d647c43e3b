"""After the codes and scales: the rounded model's norm weights, tuned end to end.

Not in the app's snapshot: it lowers the perplexity on held-out text and the KL on prompts with the
example exchanges, and costs answers to short questions (bench/README.md, "The norm weights, tuned end to
end"); bench/norm_tuning.py measures it.

GPTQ and the scale refit see one linear layer at a time; a learner sees the last layer's
distribution over the vocabulary. The RMSNorm weights are per-channel scales in front of (in Gemma
also behind) every rounded linear layer, kept in full precision by any NF4 checkpoint: a few tens of
thousands of numbers that can take back part of the rounding's drift, as AWQ folds its channel
scales into a norm. Only they move; the NF4 codes and scales stay as chosen.

The objective is KL(full || rounded) of the next-token distributions, to second order in the change
of the final hidden state h (after the final norm):

    KL ~ 1/2 dh^T F dh,   F = E^T (diag p - p p^T) E

with E the unembedding and p the full model's distribution: the Fisher metric p puts on h. F is
averaged over sampled positions, with p cut to its `top_k` most likely tokens, once; every step then
learns from every position of its rows for the price of the decoder layers alone, where the exact
KL needs a vocabulary-wide softmax and its backward pass at each position it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NormTuning:
    """Adam on the norm weights: `steps` steps of `rows` calibration rows each, learning rate `lr`;
    the metric from `metric_positions` sampled positions with p cut to `top_k` tokens; `seed` picks
    the rows and positions."""

    steps: int = 10
    rows: int = 4
    lr: float = 6e-3
    metric_positions: int = 256
    top_k: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rows", "metric_positions", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr!r}")


def fisher_metric(unembed: Tensor, hidden: Tensor, top_k: int) -> Tensor:
    """Mean over the rows of `hidden` (P, D) of E^T (diag p - p p^T) E, p = softmax(hidden @ E^T)
    cut to its top_k tokens (not renormalised), E = `unembed` (V, D). Returns (D, D) fp32."""
    e = unembed.float()  # (V, D)
    p = (hidden.float() @ e.T).softmax(-1)  # (P, V)
    pk, ik = p.topk(min(top_k, e.shape[0]), dim=-1)  # (P, k)
    metric = torch.zeros(e.shape[1], e.shape[1])  # (D, D)
    for j in range(hidden.shape[0]):
        ek = e[ik[j]]  # (k, D)
        mu = pk[j] @ ek  # (D,)
        metric += (ek * pk[j, :, None]).T @ ek - torch.outer(mu, mu)
    return metric / hidden.shape[0]


def norm_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The RMSNorms inside the decoder layers (pre-, post-, q/k norms), by module name."""
    found = {name: mod for name, mod in model.named_modules()
             if type(mod).__name__.endswith("RMSNorm") and ".layers." in f".{name}."
             and isinstance(getattr(mod, "weight", None), torch.nn.Parameter)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no RMSNorm inside its decoder layers to tune")
    return found


def final_hidden(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """The final hidden states (N, T, D) the model's head reads, for token ids (N, T)."""
    with torch.no_grad():
        return model.model(input_ids=ids, use_cache=False).last_hidden_state.detach().clone()


def tune_norms(model: torch.nn.Module, ids: Tensor, target: Tensor, cfg: NormTuning = NormTuning()) -> dict[str, Tensor]:
    """Tune the decoder layers' norm weights of `model` (already rounded) in place so its final hidden
    states on token ids (N, T) come towards `target` (N, T, D), the full-precision model's
    (`final_hidden`), in the Fisher metric of the full model's next-token distributions. The first
    position of each row (BOS) is left out. Returns {module name: the new weight, in its dtype}."""
    if target.shape[:2] != ids.shape:
        raise ValueError(f"target {tuple(target.shape)} does not match ids {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise ValueError("each row needs at least two tokens")
    norms = norm_modules(model)
    g = torch.Generator().manual_seed(cfg.seed)
    head = model.get_output_embeddings().weight
    later = target[:, 1:].reshape(-1, target.shape[-1])  # (N * (T - 1), D)
    pick = torch.randperm(later.shape[0], generator=g)[: cfg.metric_positions]
    with torch.no_grad():
        metric = fisher_metric(head, later[pick], cfg.top_k)  # (D, D)
    kept = {name: (mod.weight.dtype, mod.weight.requires_grad) for name, mod in norms.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for mod in norms.values():  # fp32 while tuning: an Adam step is far below a bf16 weight's spacing
        mod.weight = torch.nn.Parameter(mod.weight.detach().float())
    opt = torch.optim.Adam([mod.weight for mod in norms.values()], lr=cfg.lr)
    order = torch.randperm(ids.shape[0], generator=g)
    try:
        with torch.enable_grad():
            for step in range(cfg.steps):
                r = order[(torch.arange(cfg.rows) + step * cfg.rows) % ids.shape[0]]
                h = model.model(input_ids=ids[r], use_cache=False).last_hidden_state  # (R, T, D)
                dh = (h.float() - target[r].float())[:, 1:].reshape(-1, h.shape[-1])  # (R * (T - 1), D)
                loss = 0.5 * ((dh @ metric) * dh).sum(-1).mean()  # ~ KL(full || rounded), nats
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for name, mod in norms.items():
            dtype, grad = kept[name]
            mod.weight = torch.nn.Parameter(mod.weight.detach().to(dtype), requires_grad=grad)
        for p in frozen:
            p.requires_grad_(True)
    return {name: mod.weight.detach() for name, mod in norms.items()}
