"""What did it look at while writing? After a chat reply, how much attention a chosen reply token
paid to every earlier token (prompt and reply), per head or averaged, for one layer.

One of the teaching panels under the inside view (`ui/teaching.py` lays it out in its accordion
and wires it to the chat). `ReplyAttentionHandlers` holds the handlers, plain methods tests call
without a server; the reply read is kept per user in gr.State (`ReadReply`).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.describe import describe_row
from attention.plot import figure_bytes, plot_token_attention, token_text, weights_csv
from generation import Prompt, Settings, build_prompt
from generation.inside import REPLY_MAX_TOKENS, ReplyAttention, reply_attention

from .common import (
    INSPECT_EVENTS,
    PRIVATE,
    REDRAW,
    DownloadDir,
    ModelSlot,
    as_int,
    download_buttons,
    error_text,
    model_history,
    palette_of,
    ready_button,
    written_back,
)

DEFAULT_LAYER = 5  # the default model's first global layer
AVERAGE = -1  # the "head" value of the average over heads
MODES = [("while writing it (the pass that wrote the token)", "writing"),
         ("while reading it (the token's own pass)", "reading")]

WRITING_HELP = f"""
### What did it look at while writing?
After a chat reply (tab *4-bit Chat*), press **Read the last reply**: the model reads the
conversation once more (one forward pass over prompt + reply, at most {REPLY_MAX_TOKENS} tokens), and
for the reply token you choose you see how much attention it paid to every earlier token: the
question, the instruction line, and the words it had already written.
"""

WRITING_READ = """
**How to read it.** The darker a token's background, the more attention it got; the bars list the
most attended tokens with their weights. A token is *written* by the model's pass over the token
before it, so by default that pass is shown; *while reading it* shows the chosen token's own pass.
Underlined: the reply so far; outlined in red: the token being written. `<bos>` is hidden by
default: it collects much of the attention without meaning anything.
"""

_NOTE_REPLY = re.compile(r"^\*\(.*\)\*$")  # the chat's "*(stopped before the first token)*" notes


@dataclass
class ReadReply:
    """A chat reply read by the model (kept in gr.State): its prompt, its text, the layer's rows."""

    prompt: Prompt
    reply: str
    ra: ReplyAttention
    remote: bool  # the reply was written by a remote server's model; the local one re-reads it
    r: int = 0  # the reply token shown


def last_reply(history: list[Any]) -> tuple[str, list[dict[str, str]], str]:
    """(the user message, the turns before it, the reply) of the last answered turn in the chat.

    The turns are those the chat sent to the model (unanswered user turns left out), so the
    rebuilt prompt is the one the reply was written under. ValueError if there is no reply yet.
    """
    turns = model_history(history)
    at = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if at is None or at == 0:
        raise ValueError("There is no chat reply yet: send a message in the 4-bit Chat tab first.")
    reply = turns[at]["content"]
    if not reply.strip() or _NOTE_REPLY.match(reply.strip()):
        raise ValueError("The last reply has no text the model wrote (it was stopped before its first token).")
    return turns[at - 1]["content"], turns[:at - 1], reply



class ReplyAttentionHandlers:
    """The panel's handlers: one forward over prompt + reply of the shared model (INSPECT group)."""

    def __init__(self, settings: Settings, model: ModelSlot, files: DownloadDir) -> None:
        self.settings = settings
        self.model = model
        self.files = files

    def _read(self, prompt: Prompt, reply: str, layer: Any, mode: str) -> ReplyAttention:
        lm = self.model.require()
        if mode not in ("writing", "reading"):
            mode = "writing"
        return reply_attention(lm, prompt, reply, layer=as_int(layer, "layer"), mode=mode)

    def _outputs(self, read: ReadReply, r: Any, head: Any, hide_special: bool, colourblind: Any = False,
                 picked: bool = False) -> tuple:
        """(state, token list, clickable reply, strip, notes, head choices, 3 download buttons).
        `picked`: r is the token list's own value, written back only where out of range."""
        ra = read.ra
        n_rows = len(ra.reply_tokens)
        asked, r = r, min(max(as_int(r, "reply token"), 0), n_rows - 1)
        head = as_int(head, "head")
        kept = head == AVERAGE or 0 <= head < ra.n_heads
        head = None if head < 0 or head >= ra.n_heads else head
        n = ra.context(r)
        tokens = ra.tokens[:n]
        pos = ra.reply_start + r
        target = ra.reply_tokens[r] if ra.mode == "writing" else None
        hidden = ra.special[:n] if hide_special and not all(ra.special[:n]) else None
        kind = ra.layer_kind if ra.window is None or ra.layer_kind == "global" else f"sliding window {ra.window}"
        who = "average of all heads" if head is None else f"head {head}"
        verb = "writing" if ra.mode == "writing" else "reading"
        title = f"layer {ra.layer} ({kind}) · {who} · {verb} '{ra.reply_tokens[r]}' (position {pos})"
        palette = palette_of(colourblind)
        fig = plot_token_attention(ra.row(r, head), tokens, target=target, reply_start=ra.reply_start,
                                   hidden=hidden, title=title, cmap=palette.strip, highlight=palette.highlight)
        name = f"reply_attention_layer{ra.layer}_pos{pos}"
        heads = [f"head {h}" for h in range(ra.n_heads)]
        paths = self.files.write({
            f"{name}.png": figure_bytes(fig, "png"),
            f"{name}.svg": figure_bytes(fig, "svg"),
            f"{name}.csv": weights_csv(ra.rows[r, :, :n], heads, tokens),  # (heads, earlier tokens)
        })
        choices = [(f"{ra.reply_start + i}: {token_text(t)}", i) for i, t in enumerate(ra.reply_tokens)]
        marked = [(t if t != "␣" else " ", "chosen" if i == r else "reply") for i, t in enumerate(ra.reply_tokens)]
        notes = [f"**Prompt: {ra.reply_start} tokens, reply: {ra.n_reply_tokens} tokens** · layer {ra.layer} of "
                 f"0-{ra.n_layers - 1} ({kind}) · {'average of' if head is None else 'one of'} {ra.n_heads} heads."]
        words = describe_row(ra.row(r, head), tokens, hidden)
        notes.append(html.escape(f"In words: '{ra.reply_tokens[r]}' ({verb} it, {who}) attended {words}.", quote=False))
        if read.remote:
            notes.append("The chat is served by a remote server: this is the local model reading its reply.")
        if ra.notice:
            notes.append(html.escape(ra.notice))
        head_choices = [("average of all heads", AVERAGE)] + [(f"head {h}", h) for h in range(ra.n_heads)]
        head_box = written_back(gr.Dropdown, AVERAGE, not kept, choices=head_choices)
        read.r = r
        token_box = written_back(gr.Dropdown, r, not picked or r != asked, choices=choices)
        return (read, token_box, marked, paths[0], " ".join(notes), head_box, *(ready_button(p) for p in paths))

    def _source(self, history: list[Any], system: str) -> tuple[Prompt, str]:
        """The chat's last reply and the prompt it was written under (ValueError if there is none)."""
        user, earlier, reply = last_reply(history)
        prompt = build_prompt(self.model.require().tokenizer, user, earlier, system=(system or "").strip() or None,
                              max_input_tokens=self.settings.max_input_tokens)
        return prompt, reply

    def _read_reply(self, prompt: Prompt, reply: str, layer: Any, head: Any, mode: str, hide_special: bool,
                    colourblind: bool) -> tuple:
        ra = self._read(prompt, reply, layer, mode)
        read = ReadReply(prompt=prompt, reply=reply, ra=ra, remote=self.settings.chat_backend_url is not None)
        return (*self._outputs(read, 0, head, hide_special, colourblind), True)

    def read(self, history: list[Any], system: str, layer: Any, head: Any, mode: str,
             hide_special: bool, colourblind: bool = False) -> tuple:
        """UI: read the chat's last reply (one forward over its prompt + reply) and show its first token.

        Outputs: (state, token list, clickable reply, strip, notes, head choices, 3 downloads, following)."""
        try:
            return self._read_reply(*self._source(history, system), layer, head, mode, hide_special, colourblind)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="What did it look at?")
            return (gr.skip(),) * 10

    def follow(self, following: bool, shown: ReadReply | None, history: list[Any], system: str, layer: Any,
               head: Any, mode: str, hide_special: bool, colourblind: bool = False) -> tuple:
        """After a chat reply: read it at once if this user has read replies before (else nothing).
        A reply already shown stays as the user left it (its token and head): a reply's end can
        reach the page after the user has read it and chosen another token."""
        if not following or not self.model.ready:
            return (gr.skip(),) * 10
        try:
            prompt, reply = self._source(history, system)
        except (ValueError, gr.Error):
            return (gr.skip(),) * 10
        if shown is not None and shown.reply == reply and shown.prompt.text == prompt.text:
            return (gr.skip(),) * 10
        try:
            return self._read_reply(prompt, reply, layer, head, mode, hide_special, colourblind)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="What did it look at?")
            return (gr.skip(),) * 10

    def reread(self, read: ReadReply | None, layer: Any, head: Any, mode: str, hide_special: bool,
               colourblind: bool = False) -> tuple:
        """UI: another layer or mode for the reply already read (one forward again), same token."""
        if read is None:
            return (gr.skip(),) * 9
        try:
            ra = self._read(read.prompt, read.reply, layer, mode)
            new = ReadReply(prompt=read.prompt, reply=read.reply, ra=ra, remote=read.remote)
            return self._outputs(new, read.r, head, hide_special, colourblind, picked=True)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="What did it look at?")
            return (gr.skip(),) * 9

    def show(self, read: ReadReply | None, r: Any, head: Any, hide_special: bool, colourblind: bool = False,
             picked: bool = True) -> tuple:
        """UI: another reply token, head or <bos> setting: redraw from the rows already read (no forward).
        `picked`: r is the token list's own value (else a click on the reply chose it)."""
        if read is None or r is None:
            return (gr.skip(),) * 9
        try:
            return self._outputs(read, r, head, hide_special, colourblind, picked=picked)
        except ValueError as exc:
            gr.Warning(error_text(exc), title="What did it look at?")
            return (gr.skip(),) * 9

    def select(self, read: ReadReply | None, head: Any, hide_special: bool, colourblind: bool,
               evt: gr.SelectData) -> tuple:
        """UI: a click on a token of the reply -> that token's strip."""
        index = getattr(evt, "index", None)
        if read is None or not isinstance(index, int):
            return (gr.skip(),) * 9
        return self.show(read, index, head, hide_special, colourblind, picked=False)


def build_reply_attention(state: ReplyAttentionHandlers, colourblind: gr.Checkbox) -> dict[str, Any]:
    """The panel's widgets in the current Blocks (inside its accordion); returns what the view wires."""
    gr.Markdown(WRITING_HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            read = gr.Button("Read the last reply", variant="primary", elem_id="writing-btn")
            layer = gr.Slider(0, 17, value=DEFAULT_LAYER, step=1, label="Layer", elem_id="writing-layer")
            head = gr.Dropdown([("average of all heads", AVERAGE)] + [(f"head {h}", h) for h in range(4)],
                               value=AVERAGE, label="Head", elem_id="writing-head")
            mode = gr.Radio(MODES, value="writing", label="Attention of the chosen token", elem_id="writing-mode")
            hide = gr.Checkbox(True, label="Hide special tokens such as <bos>", elem_id="writing-hide")
            gr.Markdown(WRITING_READ)
        with gr.Column(scale=5):
            notes = gr.Markdown("Chat first, then press *Read the last reply*.", elem_id="writing-notes")
            marked = gr.HighlightedText(label="The reply, token by token: click one", combine_adjacent=False,
                                        show_legend=False, show_inline_category=False, interactive=False,
                                        color_map={"reply": "#e0e7ff", "chosen": "#f97316"}, elem_id="writing-reply")
            token = gr.Dropdown([], value=None, label="Reply token (position: token)", elem_id="writing-token")
            strip = gr.Image(None, show_label=False, interactive=False, elem_id="writing-strip",
                             buttons=["fullscreen"], alt_text="The chosen token's attention over every earlier token")
            with gr.Row():
                dls = download_buttons("writing", [("PNG", "png"), ("SVG", "svg"), ("Weights CSV", "csv")])
    read_state = gr.State(None)
    outputs = [read_state, token, marked, strip, notes, head, *dls]
    show = [read_state, token, head, hide, colourblind]
    redraw = dict(outputs=outputs, **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    gr.on([token.input, head.input, hide.input, colourblind.input], state.show, show, **redraw)
    marked.select(state.select, [read_state, head, hide, colourblind], **redraw)
    gr.on([layer.release, mode.input], state.reread, [read_state, layer, head, mode, hide, colourblind], **redraw)
    return dict(button=read, inputs=[layer, head, mode, hide, colourblind], outputs=outputs, sliders=[layer])
