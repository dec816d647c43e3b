"""Every reply token opens up: the last reply coloured by how sure the model was of each token; a
click shows what else it weighed there (before and after the chat's sampling settings) and can
start a branch of the conversation from another token; the tokens download as CSV; `/reply_tokens`.

The reply is read with one teacher-forced forward of the prompt the chat built (the same
`build_prompt`) and the reply (`generation.inside.reply_token_probs`); a clicked token's table is
the next-token table of what the model had read before writing it, under the sliders
(`next_token_candidates`, the chat's own sampling functions). A branch streams through the chat
engine like any reply (`ChatHandlers.continue_turn`, prefix = the reply up to the token, then the
chosen one); the branches of the last reply are kept per browser session and can be switched.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from attention.plot import csv_cell
from generation import build_prompt
from generation.inside import ReplyTokens, next_token_candidates, reply_token_probs

from .chat import BUSY_MESSAGE, UI_NAMES, ChatHandlers, ChatView, next_token_table, sampling_params
from .common import API_TEXT_CHARS, INSPECT_EVENTS, LAB_EVENTS, PRIVATE, REDRAW, DownloadDir, as_text, content_text
from .common import download_buttons, error_text, message_role, model_history, pct, ready_button, reply_turn
from .common import session_key, typed_api

ALTERNATIVES = 10
# Colour buckets of a token's probability (the legend names them).
BUCKETS = [(0.9, "90 % or more", "#bbf7d0"), (0.5, "50–90 %", "#d9f99d"), (0.1, "10–50 %", "#fde68a"),
           (0.0, "under 10 %", "#fecaca")]
COLOURS = {label: colour for _, label, colour in BUCKETS}
# The same buckets without a red-green contrast: ColorBrewer's purple-orange, sure = purple.
COLOURBLIND_COLOURS = dict(zip(COLOURS, ("#b2abd2", "#d8daeb", "#fee0b6", "#fdb863")))
TOKENS_HELP = """
Colour the last reply by how sure the model was of each token (its own probability, temperature 1,
from one pass over the prompt and the reply). **Click a token** to see what else it weighed there,
before and after the sampling settings on the right, and to continue the reply with another token
instead: a new branch, the original kept (switch between them below).
"""


def bucket(prob: float) -> str:
    return next(label for lo, label, _ in BUCKETS if prob >= lo)


def tokens_csv(rt: ReplyTokens) -> str:
    """The reply read token by token as CSV: position, the token, the model's probability and rank for
    it (1 = its most likely token), its colour's bucket, then the ALTERNATIVES most likely tokens there."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["position", "token", "probability", "rank", "bucket",
                *(f"{name} {i}" for i in range(1, ALTERNATIVES + 1) for name in ("alternative", "p"))])
    for pos, t in enumerate(rt.tokens):
        alts = [x for a in t.alternatives for x in (csv_cell(a.token), f"{a.prob:.6g}")]
        w.writerow([pos, csv_cell(t.token), f"{t.prob:.6g}", t.rank + 1, bucket(t.prob), *alts])
    return buf.getvalue()


def shown(text: str) -> str:
    """A token's text as a coloured span shows it: newlines and an empty piece made visible."""
    return text.replace("\n", "↵") if text else "·"


@dataclass
class Branches:
    """The last reply's branches in this session: texts (0 = the original), which is shown, and the
    chat index of the reply they replace."""

    at: int = -1
    texts: list[str] = field(default_factory=list)
    current: int = 0

    def radio(self) -> Any:
        choices = [f"{i + 1}" + (" (original)" if i == 0 else "") for i in range(len(self.texts))]
        return gr.Radio(choices=choices, value=choices[self.current] if choices else None,
                        visible=len(self.texts) > 1)


def last_exchange_parts(history: list[Any]) -> tuple[str, list[dict[str, str]], str] | None:
    """(user message, the turns before it, the reply) of the chat's last exchange; None without a reply."""
    turns = model_history(history)
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        return None
    return turns[-2]["content"], turns[:-2], turns[-1]["content"]


class TokensHandlers:
    """Handlers of the reply-token view and /reply_tokens (forwards of the shared model, INSPECT group)."""

    def __init__(self, chat: ChatHandlers) -> None:
        self.chat = chat
        self.settings = chat.settings
        self.model = chat.model
        self.files = DownloadDir()

    def _read(self, message: str, turns: list[dict[str, str]], reply: str, system: str | None) -> ReplyTokens:
        lm = self.model.require()
        prompt = build_prompt(lm.tokenizer, message, turns, system=system,
                              max_input_tokens=self.settings.max_input_tokens)
        return reply_token_probs(lm, prompt, reply, k=ALTERNATIVES)

    def reply_tokens_api(self, message: str, reply: str, system: str = "") -> dict:
        """API /reply_tokens: every token of `reply` as the model weighed it after `message` (and the
        optional `system` prompt; texts up to 10,000 characters), in the chat's prompt format:
        {"tokens": [{"token", "prob", "rank", "alternatives": [{"token", "prob"}, ...10]}], "notice"}.
        The tokens' texts spell the reply (with the space the model wrote before it); prob is the
        model's own (temperature 1); rank 0 = the model's most likely token there."""
        message = as_text(message, "message", max_chars=API_TEXT_CHARS)
        reply = as_text(reply, "reply", max_chars=API_TEXT_CHARS)
        system = as_text(system, "system", none_ok=True, max_chars=API_TEXT_CHARS).strip() or None
        if not message.strip():
            raise ValueError("message is empty: type the message the reply answers")
        rt = self._read(message, [], reply, system)
        return {"tokens": [{"token": t.token, "prob": t.prob, "rank": t.rank,
                            "alternatives": [{"token": a.token, "prob": a.prob} for a in t.alternatives]}
                           for t in rt.tokens], "notice": rt.notice}

    def refresh(self, on: bool, history: list[Any], system: str, branches: Branches | None,
                colourblind: bool = False) -> tuple:
        """The last reply's tokens, coloured (or hidden when the toggle is off); the branches are
        forgotten once the last reply is no longer one of them (a new message, Retry, Undo). The
        tokens also fill the CSV download."""
        parts = last_exchange_parts(history)
        branches = branches or Branches()
        # Branches are written back only when forgotten: a refresh still running when the user
        # switches branch must not put its older copy back.
        if parts is None or parts[2] not in branches.texts or branches.at != len(history) - 1:
            forgotten = Branches()
            kept: tuple = (forgotten, forgotten.radio())
        else:
            kept = (gr.skip(), gr.skip())
        hidden = (gr.update(visible=False), None, "", gr.update(value=None, interactive=False), *kept)
        if not on or parts is None:
            return hidden
        message, turns, reply = parts
        try:
            rt = self._read(message, turns, reply, (system or "").strip() or None)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Reply tokens")
            return hidden
        value = [(shown(t.token), bucket(t.prob)) for t in rt.tokens]
        top = sum(t.rank == 0 for t in rt.tokens)
        notes = (f"{len(rt.tokens)} tokens; the model's most likely token at {top} of them. "
                 f"{html.escape(rt.notice)}").strip()
        colours = COLOURBLIND_COLOURS if colourblind is True else COLOURS
        (path,) = self.files.write({"reply_tokens.csv": tokens_csv(rt)})
        return gr.update(value=value, visible=True, color_map=colours), rt, notes, ready_button(path), *kept

    def pick(self, rt: ReplyTokens | None, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any,
             evt: gr.SelectData) -> tuple:
        """A token clicked: what the model weighed there under the sliders, and the alternatives to continue with."""
        skip = (gr.skip(),) * 4
        r = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if rt is None or not isinstance(r, int) or not 0 <= r < len(rt.tokens):
            return skip
        try:
            params = sampling_params(1, temperature, top_p, top_k, repetition_penalty, -1, UI_NAMES)
            lm = self.model.require()
            nt = next_token_candidates(lm, rt.context(r), params, k=ALTERNATIVES,
                                       max_tokens=int(rt.ids.shape[1]))
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Reply tokens")
            return skip
        tok = rt.tokens[r]
        # The table comes from a pass over the text up to this token, the colours from one pass over
        # the whole reply; in bf16 the two differ in the last digits, so this line quotes the table.
        listed = next((c.prob for c in nt.candidates if c.token_id == tok.token_id), tok.prob)
        head = (f"Token {r + 1}, **{html.escape(repr(tok.token))}**: the model gave it {pct(listed)} "
                f"(rank {tok.rank + 1}). Under temperature {nt.temperature:g}, top-p {nt.top_p:g}, "
                f"top-k {nt.top_k or 'off'}: {html.escape(nt.notice)}")
        choices = [(f"{c.token} · {pct(c.prob)}", c.token_id) for c in nt.candidates if c.token_id != tok.token_id]
        return next_token_table(nt), head, gr.Dropdown(choices=choices, value=choices[0][1] if choices else None), r

    def branch_start(self, rt: ReplyTokens | None, r: Any, token_id: Any, history: list[Any],
                     branches: Branches | None, request: gr.Request) -> tuple:
        """Continue with another token: the reply up to the clicked token, then the chosen one,
        becomes the start of a new branch (the original kept), registered for `ChatHandlers.continue_turn`
        to write. Returns (chat, prefix, started, branches)."""
        no = (gr.skip(), gr.skip(), False, gr.skip())
        history = list(history or [])
        if rt is None or not isinstance(r, int) or not 0 <= r < len(rt.tokens) or token_id is None:
            gr.Warning("Click a token of the reply first, then choose the token to continue with.")
            return no
        if not history or message_role(history[-1]) != "assistant":
            return no
        lm = self.model.require()  # before begin(): an error here must not leave the session marked busy
        if self.chat.stops.begin(session_key(request), kind="branch", turn=reply_turn(history)) is None:
            gr.Warning(BUSY_MESSAGE)
            return no
        prefix = ("".join(t.token for t in rt.tokens[:r]) + lm.tokenizer.decode([int(token_id)])).lstrip()
        branches = branches if branches is not None and branches.at == len(history) - 1 else None
        if branches is None or not branches.texts:
            branches = Branches(at=len(history) - 1, texts=[content_text(history[-1].get("content"))])
        history[-1] = {"role": "assistant", "content": prefix}
        return history, prefix, True, branches

    @staticmethod
    def branch_done(started: bool, history: list[Any], branches: Branches | None) -> tuple:
        """A branch's reply is complete: it joins the branches and is the one shown."""
        if not started or branches is None or not history or branches.at != len(history) - 1:
            return gr.skip(), gr.skip()
        text = content_text(history[-1].get("content") if isinstance(history[-1], dict) else history[-1].content)
        branches = Branches(branches.at, [*branches.texts, text], len(branches.texts))
        return branches, branches.radio()

    @staticmethod
    def branch_switch(choice: Any, history: list[Any], branches: Branches | None) -> tuple:
        """Show another branch of the last reply in the chat."""
        history = list(history or [])
        if branches is None or not isinstance(choice, str) or branches.at != len(history) - 1:
            return gr.skip(), gr.skip()
        i = int(choice.split()[0]) - 1
        if not 0 <= i < len(branches.texts):
            return gr.skip(), gr.skip()
        history[-1] = {"role": "assistant", "content": branches.texts[i]}
        return history, Branches(branches.at, branches.texts, i)


def build_tokens(handlers: TokensHandlers, chat: ChatView, colourblind: gr.Checkbox) -> None:
    """The reply-token view under the chat, wired to it; `/reply_tokens`. colourblind: the page's
    colour-blind-safe checkbox."""
    state = handlers
    with gr.Accordion("Open the reply: every token's probability, its alternatives, other branches", open=True):
        gr.Markdown(TOKENS_HELP)
        on = gr.Checkbox(False, label="Colour the last reply's tokens by probability", elem_id="tokens-toggle")
        tokens = gr.HighlightedText(show_legend=True, color_map=COLOURS, combine_adjacent=False, visible=False,
                                    show_label=False, elem_id="reply-tokens")
        notes = gr.Markdown(elem_id="reply-tokens-notes")
        with gr.Row():
            (csv_file,) = download_buttons("reply-tokens", [("Tokens CSV", "csv")], alone=True)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                head = gr.Markdown(elem_id="token-alts-head")
                table = gr.Dataframe(headers=["token", "model p", "after temperature", "chance to be drawn", "status"],
                                     show_label=False, interactive=False, wrap=True, elem_id="token-alts",
                                     column_widths=["18%", "15%", "19%", "18%", "30%"])
            with gr.Column(scale=2):
                choice = gr.Dropdown(label="Continue with this token instead", choices=[], elem_id="branch-token")
                go_branch = gr.Button("Continue with this token instead", elem_id="branch-btn")
                radio = gr.Radio(label="Branches of the last reply", choices=[], visible=False, elem_id="branches")
    rt, picked, branches, prefix = gr.State(None), gr.State(None), gr.State(None), gr.State("")
    started = gr.State(False)  # whether the last Continue started a branch (for branch_done)
    system, chatbot = chat.system, chat.chatbot
    temperature, top_p, top_k, rep = chat.sampling[2], chat.sampling[3], chat.sampling[4], chat.sampling[5]
    refresh = dict(fn=state.refresh, inputs=[on, chatbot, system, branches, colourblind],
                   outputs=[tokens, rt, notes, csv_file, branches, radio],
                   show_progress="minimal", **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    gr.on([on.change, colourblind.input], **refresh)
    for chain in chat.replies:
        chain.then(**refresh)
    tokens.select(state.pick, [rt, temperature, top_p, top_k, rep], [table, head, choice, picked],
                  **INSPECT_EVENTS, **REDRAW, **PRIVATE)
    branched = go_branch.click(state.branch_start, [rt, picked, choice, chatbot, branches],
                               [chatbot, prefix, started, branches], show_progress="hidden",
                               **LAB_EVENTS, **PRIVATE)
    branched = branched.then(**{**chat.bot, "fn": handlers.chat.continue_turn,
                                "inputs": [prefix, *chat.bot["inputs"]]})
    branched.then(state.branch_done, [started, chatbot, branches], [branches, radio], queue=False, **PRIVATE).then(**refresh)
    gr.on([b.click for b in chat.stoppers], None, None, None, queue=False, cancels=[branched], **PRIVATE)
    radio.input(state.branch_switch, [radio, chatbot, branches], [chatbot, branches], queue=False,
                **REDRAW, **PRIVATE).then(**refresh)
    gr.api(typed_api(state.reply_tokens_api), api_name="reply_tokens", **INSPECT_EVENTS)

