"""Share a setup: the Attention Lab's and the inside view's inputs as URL query parameters.

A link such as `?sentence=The+cat+sat&emb_dim=64&n_heads=8&causal=1` puts a whole class on the
same example. Each view reads its own fields on page load (`read_fields`); the "Copy link to this
setup" button (`build_share`) writes the current ones. A query string is untrusted input: a
value that does not parse, is out of range or looks like markup is ignored with a warning that
names the parameter (never the value), and the field keeps its default. Every other value is
applied; a view repairs the ones that conflict with each other (its own rules, e.g. the lab's
`repair_setup`) and names them in the same warning (`clamp_index` for indices beyond a count).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import gradio as gr

from .common import PRIVATE

MAX_TEXT_CHARS = 300
# Markup, script or control characters in a shared text are refused, not escaped: a link that
# carries them was not made by this app's button.
_HOSTILE = re.compile(r"<\s*[a-zA-Z/!?]|javascript:|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Field:
    """One shareable input: its query name, how to parse a query value, how to write one."""

    name: str
    parse: Callable[[str], Any]  # raises ValueError with what is accepted
    write: Callable[[Any], str] = str
    default: Any = None  # left out of links: they stay short and say what differs


def text_field(name: str, default: str | None = None) -> Field:
    def parse(raw: str) -> str:
        if len(raw) > MAX_TEXT_CHARS:
            raise ValueError(f"at most {MAX_TEXT_CHARS} characters")
        if _HOSTILE.search(raw):
            raise ValueError("plain text only (no markup)")
        return raw

    return Field(name, parse, str, default)


def int_field(name: str, lo: int, hi: int, step: int = 1, default: int | None = None) -> Field:
    def parse(raw: str) -> int:
        try:
            f = float(raw)
        except ValueError:
            f = math.nan
        if not math.isfinite(f) or f != int(f) or not lo <= f <= hi or (int(f) - lo) % step:
            raise ValueError(f"a whole number from {lo} to {hi}" + (f" in steps of {step}" if step > 1 else ""))
        return int(f)

    return Field(name, parse, lambda v: str(int(float(v))), default)


def float_field(name: str, lo: float, hi: float, default: float | None = None) -> Field:
    def parse(raw: str) -> float:
        try:
            f = float(raw)
        except ValueError:
            f = math.nan
        if not math.isfinite(f) or not lo <= f <= hi:
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return f

    return Field(name, parse, lambda v: f"{float(v):g}", default)


def bool_field(name: str, default: bool | None = None) -> Field:
    def parse(raw: str) -> bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("1 or 0")

    return Field(name, parse, lambda v: "1" if v else "0", default)


def read_fields(fields: Sequence[Field], query: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Parse the `fields` present in `query` -> ({name: value}, one warning per refused parameter).

    Parameters of other views are not this view's business and are left alone; a warning names
    the parameter and what it accepts, never the value (it may be hostile).
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields:
        raw = query.get(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = f.parse(str(raw))
        except ValueError as exc:
            problems.append(f"'{f.name}' was ignored: it must be {exc}")
    return values, problems


def clamp_index(values: Mapping[str, Any], name: str, count: int, noun: str) -> tuple[dict[str, Any], list[str]]:
    """`values[name]`, a 0-based index into `count` things (a head, a layer), moved into range ->
    (the values, a problem naming it when it moved; none when absent or in range).

    The value it names was parsed into an int by its field, so it cannot carry markup.
    """
    out = dict(values)
    index = out.get(name)
    if index is None or index < count:
        return out, []
    top = max(count - 1, 0)
    out[name] = top
    things = noun if count == 1 else noun + "s"
    return out, [f"'{name}' was {index}, beyond the {count} {things} (numbered from 0): set to {top}"]


def query_string(fields: Sequence[Field], values: Sequence[Any]) -> str:
    """The current values as '?a=1&b=2'; empty values and those equal to the field's default are
    left out ('?' alone: everything is the default)."""
    pairs = []
    for f, v in zip(fields, values):
        if v is None or v == "":
            continue
        try:
            text = f.write(v)
        except (TypeError, ValueError):  # a widget holding something unwritable is not shared
            continue
        if f.default is None or text != f.write(f.default):
            pairs.append((f.name, text))
    return "?" + urlencode(pairs)


def query_of(request: Any) -> Mapping[str, str]:
    """The page's query parameters from a gr.Request (empty without one, e.g. in tests)."""
    params = getattr(request, "query_params", None)
    return dict(params) if params else {}


def warn(problems: Sequence[str]) -> None:
    """One toast for all refused or repaired parameters of a shared link (per view)."""
    if problems:
        gr.Warning("This link's setup was partly changed: " + "; ".join(problems) + ".", title="Shared link")


# Copies the URL the server built from the current values, and shows it in the address bar too.
_COPY_JS = """
(query) => {
  const url = window.location.origin + window.location.pathname + query;
  window.history.replaceState(null, "", query);
  if (navigator.clipboard) { navigator.clipboard.writeText(url).catch(() => {}); }
  return url;
}
"""


def build_share(groups: Sequence[tuple[Sequence[Field], Sequence[gr.components.Component]]],
                row: gr.Row | None = None) -> gr.Textbox:
    """The "Copy link to this setup" button and the link it writes, for the given (fields, widgets),
    in `row` (laid out earlier, e.g. above the views whose widgets it reads) or a new row here.

    Returns the link box. The link holds every field of every group, so opening it restores all.
    """
    fields = [f for fs, _ in groups for f in fs]
    widgets = [w for _, ws in groups for w in ws]
    with row if row is not None else gr.Row(equal_height=True):
        button = gr.Button("Copy link to this setup", size="sm", scale=1, elem_id="share-btn")
        link = gr.Textbox(show_label=False, interactive=False, scale=4, elem_id="share-link",
                          placeholder="A link that opens the app with these sliders and texts",
                          buttons=["copy"])

    def make(*values: Any) -> str:
        return query_string(fields, values)

    button.click(make, widgets, [link], queue=False, show_progress="hidden", **PRIVATE).then(
        None, [link], [link], js=_COPY_JS, queue=False, show_progress="hidden", **PRIVATE)
    return link
