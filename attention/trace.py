"""Intermediates of an attention forward pass, kept as data and printed only when asked.

A :class:`Trace` is a small list-like record of :class:`TraceStep` (like x-transformers'
``Intermediates``). The modules fill it as they run; ``Trace.format()`` gives exactly the
original notebook's debug lines, and :func:`explain_head` pulls out the (T, T) matrices the
Attention Lab shows step by step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor

__all__ = ["TraceStep", "Trace", "explain_head", "format_line"]


def format_line(name: str, shape: tuple[int, ...]) -> str:
    """The notebook's debug line: ``f"{name:<12}{tuple(t.shape)}"``."""
    return f"{name:<12}{tuple(shape)}"


@dataclass(frozen=True)
class TraceStep:
    """One recorded intermediate.

    name: step name ("Q", "scores", ...); shape: the tensor's shape; tensor: the detached value;
    printed: whether it belongs to the notebook's debug printout (``Trace.format()``).
    """

    name: str
    shape: tuple[int, ...]
    tensor: Tensor
    printed: bool

    def line(self) -> str:
        """This step as a notebook debug line, e.g. ``"scores      (2, 5, 5)"``."""
        return format_line(self.name, self.shape)


class Trace(Sequence[TraceStep]):
    """Ordered list of :class:`TraceStep` records.

    With ``echo=True`` every printed step is also ``print``-ed the moment it is recorded, which is
    how ``debug=True`` prints the lines "as the forward runs".
    """

    def __init__(self, steps: Sequence[TraceStep] = (), *, echo: bool = False) -> None:
        self._steps: list[TraceStep] = list(steps)
        self.echo = echo

    def add(self, name: str, tensor: Tensor, *, printed: bool = True) -> TraceStep:
        """Record ``tensor`` (detached, not copied) under ``name``; print it when echoing."""
        step = TraceStep(name=name, shape=tuple(tensor.shape), tensor=tensor.detach(), printed=printed)
        self._steps.append(step)
        if self.echo and printed:
            print(step.line())
        return step

    @overload
    def __getitem__(self, index: int) -> TraceStep: ...
    @overload
    def __getitem__(self, index: slice) -> list[TraceStep]: ...
    def __getitem__(self, index: int | slice) -> TraceStep | list[TraceStep]:
        return self._steps[index]

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[TraceStep]:
        return iter(self._steps)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            return any(step.name == name for step in self._steps)
        return any(step is name for step in self._steps)

    def names(self) -> list[str]:
        """Step names in recording order."""
        return [step.name for step in self._steps]

    def get(self, name: str) -> TraceStep:
        """The first step called ``name``; ValueError listing the recorded names if there is none."""
        for step in self._steps:
            if step.name == name:
                return step
        raise ValueError(f"no step named {name!r} in this trace; recorded steps: {', '.join(self.names()) or '(none)'}")

    def printed_steps(self) -> list[TraceStep]:
        """Only the steps that belong to the notebook's printout, in order."""
        return [step for step in self._steps if step.printed]

    def format(self) -> str:
        """The notebook's debug printout: one ``f"{name:<12}{shape}"`` line per printed step."""
        return "\n".join(step.line() for step in self.printed_steps())

    def __repr__(self) -> str:
        return f"Trace({self.names()})"


def explain_head(trace: Trace, head: int, batch: int = 0) -> list[tuple[str, Tensor]]:
    """The (T, S) matrices of one head, step by step, for the Attention Lab's step view.

    Returns ``[("QKᵀ", qk), ("÷ √d_k", scores), ("mask", masked), ("softmax", weights)]``
    (plus ``("tanh softcap", ...)`` after the scaling when the trace used softcapping). Masked
    cells in the "mask" matrix are ``-inf`` (boolean masks) or very negative (additive masks).
    Works for multi-head traces (tensors (B, H, T, S)) and single-head ones (B, T, S), where
    ``head`` must be 0.
    """
    for needed in ("qk", "scores", "masked", "weights"):
        if needed not in trace:
            raise ValueError(
                f"trace has no {needed!r} step (recorded: {', '.join(trace.names()) or '(none)'}); "
                "pass a trace through scaled_dot_product or call the module with return_trace=True"
            )
    qk = trace.get("qk").tensor
    if qk.dim() == 4:
        n_batch, n_heads = qk.shape[0], qk.shape[1]
    elif qk.dim() == 3:
        n_batch, n_heads = qk.shape[0], 1
    else:
        raise ValueError(f"trace step 'qk' has shape {tuple(qk.shape)}; expected (B, H, T, S) or (B, T, S)")
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"head={head!r} is out of range; this trace has {n_heads} head(s): choose 0..{n_heads - 1}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < n_batch:
        raise ValueError(f"batch={batch!r} is out of range; this trace has batch size {n_batch}: choose 0..{n_batch - 1}")

    def pick(name: str) -> Tensor:
        t = trace.get(name).tensor
        return t[batch, head] if t.dim() == 4 else t[batch]

    steps = [("QKᵀ", pick("qk")), ("÷ √d_k", pick("scores"))]
    if "softcapped" in trace:
        steps.append(("tanh softcap", pick("softcapped")))
    steps += [("mask", pick("masked")), ("softmax", pick("weights"))]
    return [(label, t.to(torch.float32) if t.dtype != torch.float64 else t) for label, t in steps]
