"""Prompt building: a chat template when the tokenizer has one, else a plain dialogue format.

The default model (Gemma 3 270m) is a *base* model without a chat template. For it we write the
conversation as plain text that such models have seen countless times::

    <system line>

    User: <question>
    Assistant: <answer>
    ...
    User: <message>
    Assistant:

and stop when the model starts the next "User:" line itself (`PLAIN_STOP_STRINGS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# A base model continues text; it answers best when the text already shows answers (few-shot
# prompting, as in the GPT-3 paper). So the plain format opens with an instruction and a few example
# exchanges of different kinds (a short poem, an explanation, a sum, two facts): they show the length
# and tone of a good reply. The one just before the learner's message is what the model imitates
# most, so the text ends on a short factual answer, not on the poem. None of them is a question
# bench/chat_quality.py asks. The whole text is what the chat's System prompt box shows, and the
# engine keeps its keys/values in the prefix cache, so it costs nothing per message. README.md
# ("Does the chat answer?") has what it does to the share of right answers.
DEFAULT_SYSTEM = """The following is a conversation with a helpful assistant that answers questions accurately and concisely.

User: Write a short poem about the sea.
Assistant: Waves roll in beneath the moon,
silver, restless, gone too soon.
User: Why do leaves change color in autumn?
Assistant: As days get shorter, trees stop making green chlorophyll, so the yellow and orange pigments in the leaves show.
User: What is 8 plus 9?
Assistant: 8 plus 9 is 17.
User: Which planet is the largest in our solar system?
Assistant: Jupiter is the largest planet in our solar system.
User: What is the capital of Peru?
Assistant: The capital of Peru is Lima."""

# Stop strings for the plain format: the model inventing the next turn of either speaker.
PLAIN_STOP_STRINGS: tuple[str, ...] = ("\nUser:", "\nAssistant:")

_ROLE_LABEL = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt. input_ids (1, T); stop_strings end the reply (plain format only)."""

    input_ids: torch.Tensor
    text: str
    stop_strings: tuple[str, ...]
    trimmed_turns: int


def check_history(history: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    out = []
    for i, turn in enumerate(history):
        if not isinstance(turn, Mapping) or turn.get("role") not in _ROLE_LABEL or not isinstance(
            turn.get("content"), str
        ):
            raise ValueError(
                f"history[{i}] must be {{'role': 'user'|'assistant', 'content': str}}, got {turn!r}"
            )
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def plain_dialogue(message: str, history: Sequence[Mapping[str, str]], system: str | None) -> str:
    """The built-in text format for models without a chat template (ends with "Assistant:")."""
    head = (system if system is not None else DEFAULT_SYSTEM).strip()
    # A system text that already holds example exchanges is continued as one transcript; a blank
    # line after the examples would read as the start of another conversation.
    lines = [head] if any(line.startswith("User:") for line in head.splitlines()) else [head, ""]
    for turn in history:
        lines.append(f"{_ROLE_LABEL[turn['role']]}: {turn['content'].strip()}")
    lines.append(f"User: {message.strip()}")
    lines.append("Assistant:")
    text = "\n".join(lines)
    return text.lstrip("\n")  # an empty system line leaves no blank first line


def shown_system(settings) -> str:
    """The system text a chat box should start with for `settings`: DEFAULT_SYSTEM where the plain
    format is used (the default base model, or a remote server spoken to through /completions),
    "" where a chat template applies (it brings its own conventions)."""
    from .settings import DEFAULT_MODEL_ID

    if settings.chat_backend_url is not None:
        return DEFAULT_SYSTEM if settings.chat_backend_api == "completions" else ""
    return DEFAULT_SYSTEM if settings.model_id == DEFAULT_MODEL_ID else ""


def _template_supports_system(tokenizer) -> bool:
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": "\x1esys\x1e"}, {"role": "user", "content": "u"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # templates reject a system role by raising (e.g. Gemma-it's)
        return False
    return "\x1esys\x1e" in rendered


def chat_template_text(tokenizer, message: str, history: Sequence[Mapping[str, str]], system: str | None) -> str:
    """Role/content messages through the tokenizer's chat template, with the generation prompt.

    A system prompt goes in as a "system" message when the template renders one; otherwise it is
    prefixed to the first user message so it is not silently lost.
    """
    messages = [dict(t) for t in history] + [{"role": "user", "content": message}]
    if system:
        if _template_supports_system(tokenizer):
            messages.insert(0, {"role": "system", "content": system})
        else:
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = f"{system}\n\n{first['content']}"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str, templated: bool) -> torch.Tensor:
    # A rendered chat template already contains BOS etc.; plain text gets the tokenizer's usual ones.
    enc = tokenizer(text, add_special_tokens=not templated, return_tensors="pt")
    return enc["input_ids"]  # (1, T)


def build_prompt(
    tokenizer,
    message: str,
    history: Sequence[Mapping[str, str]] = (),
    *,
    system: str | None = None,
    max_input_tokens: int = 1024,
) -> Prompt:
    """Render and tokenise `message` after `history`; input_ids (1, T) with T <= max_input_tokens.

    History is dropped from the oldest message on until the prompt fits (a reply left at the front
    without its question goes too); `trimmed_turns` counts the dropped history messages.
    system=None uses DEFAULT_SYSTEM in the plain format and none with a chat template; "" means none.
    Raises ValueError for an empty message, malformed history, or a message that alone exceeds the budget.
    """
    if not isinstance(message, str) or not message.strip():
        raise ValueError("message must be a non-empty string")
    if isinstance(max_input_tokens, bool) or not isinstance(max_input_tokens, int) or max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be a positive integer, got {max_input_tokens!r}")
    turns = check_history(history)
    templated = bool(getattr(tokenizer, "chat_template", None))

    def render(h: list[dict[str, str]]) -> str:
        if templated:
            return chat_template_text(tokenizer, message, h, system)
        return plain_dialogue(message, h, system)

    dropped = 0
    while True:
        text = render(turns)
        ids = _encode(tokenizer, text, templated)
        if ids.shape[1] <= max_input_tokens:
            break
        if not turns:
            raise ValueError(
                f"the message is too long: the prompt needs {ids.shape[1]} tokens but the input budget is "
                f"{max_input_tokens} (MAX_INPUT_TOKENS); shorten the message or the system prompt"
            )
        turns.pop(0)
        dropped += 1
        while turns and turns[0]["role"] != "user":
            turns.pop(0)
            dropped += 1
    stops = () if templated else PLAIN_STOP_STRINGS
    return Prompt(input_ids=ids, text=text, stop_strings=stops, trimmed_turns=dropped)
