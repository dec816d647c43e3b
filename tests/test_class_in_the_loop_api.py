"""The chat opened up, through gradio_client against the real app: /engine_state (the engine
serving the class, counts only), /reply_tokens (every token of a reply, as the model weighed it)
and /continue (a reply that begins with a chosen prefix, through the same engine as /chat)."""

from __future__ import annotations

import pytest
from apputil import wait_until
from gradio_client import Client
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.timeout(600)

QUESTION = "What is the capital of France?"
STATE_KEYS = {"running", "waiting", "rows", "kv_cache_bytes", "tok_s", "step_ms", "max_batch",
              "kv_cache_allocated_bytes", "served_elsewhere"}


def _state(client) -> dict:
    return client.predict(api_name="/engine_state")


@pytest.fixture(scope="module")
def greedy_reply(client) -> str:
    return client.predict(QUESTION, max_new_tokens=24, temperature=0.0, api_name="/chat")


def test_engine_state_when_idle(client):
    state = wait_until(lambda: _state(client), lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert STATE_KEYS <= set(state)
    assert state["rows"] == [] and state["kv_cache_bytes"] == 0 and state["served_elsewhere"] is False
    assert state["max_batch"] >= 1 and state["backend"].startswith("local engine")


def test_engine_state_shows_the_chats_being_batched_and_none_of_their_text(app_server, client):  # noqa: F811
    from ui.chat import MAX_NEW_TOKENS

    wait_until(lambda: _state(client), lambda s: s["running"] == 0)
    secret = "Tell me a long story about a purple dragon called Zorblax."
    jobs = [Client(app_server.url, verbose=False).submit(secret, max_new_tokens=MAX_NEW_TOKENS,
                                                         min_new_tokens=MAX_NEW_TOKENS, api_name="/chat")
            for _ in range(3)]
    try:
        state = wait_until(lambda: _state(client),
                       lambda s: s["running"] == 3 and all(r["phase"] == "decode" and r["generated"] >= 2
                                                           for r in s["rows"]))
        assert len(state["rows"]) == 3 and len({r["prompt_tokens"] for r in state["rows"]}) == 1
        assert all(r["max_new_tokens"] == MAX_NEW_TOKENS for r in state["rows"])
        assert state["kv_cache_bytes"] > 0 and state["kv_cache_allocated_bytes"] >= state["kv_cache_bytes"]
        state = wait_until(lambda: _state(client), lambda s: s["tok_s"] > 0 and s["step_ms"] > 0)
        assert "Zorblax" not in repr(state) and "dragon" not in repr(state)
    finally:
        for job in jobs:
            job.cancel()
    wait_until(lambda: _state(client), lambda s: s["running"] == 0)


def test_reply_tokens_spell_a_greedy_reply_and_mostly_are_the_top_token(client, greedy_reply):
    out = client.predict(QUESTION, greedy_reply, "", api_name="/reply_tokens")
    tokens = out["tokens"]
    assert "".join(t["token"] for t in tokens).strip() == greedy_reply.strip()
    for t in tokens:
        assert 0.0 <= t["prob"] <= 1.0 and len(t["alternatives"]) == 10
        probs = [a["prob"] for a in t["alternatives"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert t["prob"] <= probs[0] + 1e-6
    # A greedy reply writes the most likely token almost everywhere (re-read in one pass, a near
    # tie may fall the other way).
    top = sum(t["rank"] == 0 for t in tokens)
    assert top >= 0.8 * len(tokens), [(t["token"], t["rank"]) for t in tokens]


def test_reply_tokens_read_the_prompt_the_chat_builds(client, greedy_reply):
    from generation.prompt import DEFAULT_SYSTEM

    plain = client.predict(QUESTION, greedy_reply, "", api_name="/reply_tokens")
    same = client.predict(QUESTION, greedy_reply, DEFAULT_SYSTEM, api_name="/reply_tokens")
    other = client.predict(QUESTION, greedy_reply, "You answer only in riddles.", api_name="/reply_tokens")
    # "" is the chat's default system prompt, so the probabilities are those of DEFAULT_SYSTEM's prompt
    assert [t["token"] for t in plain["tokens"]] == [t["token"] for t in same["tokens"]]
    assert [t["prob"] for t in plain["tokens"]] == pytest.approx([t["prob"] for t in same["tokens"]], abs=1e-6)
    assert [t["prob"] for t in plain["tokens"]] != pytest.approx([t["prob"] for t in other["tokens"]], abs=1e-6)


@pytest.mark.parametrize("args, expected", [
    ((QUESTION, "", ""), "reply is empty"),
    (("", "Paris.", ""), "message is empty"),
    ((QUESTION, "x" * 10_001, ""), "at most 10,000"),
])
def test_reply_tokens_bad_input_is_a_clear_error(client, args, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(*args, api_name="/reply_tokens")


def test_continue_begins_with_the_prefix_and_takes_another_branch(client, greedy_reply):
    tokens = client.predict(QUESTION, greedy_reply, "", api_name="/reply_tokens")["tokens"]
    # Branch at the first token where the model had a real second choice.
    r = next(i for i, t in enumerate(tokens) if t["alternatives"][1]["token"].strip())
    prefix = ("".join(t["token"] for t in tokens[:r]) + tokens[r]["alternatives"][1]["token"]).lstrip()
    reply = client.predict(QUESTION, prefix, "", 16, 0.0, 1.0, 0, 1.0, -1, api_name="/continue")
    assert reply.startswith(prefix.rstrip()), (prefix, reply)
    again = client.predict(QUESTION, prefix, "", 16, 0.0, 1.0, 0, 1.0, -1, api_name="/continue")
    assert again == reply  # greedy: the same branch every time


def test_continue_streams_from_the_prefix_on(app_server):  # noqa: F811
    job = Client(app_server.url, verbose=False).submit(QUESTION, "The capital of France is", "", 12, 0.0, 1.0, 0,
                                                      1.0, -1, api_name="/continue")
    final = job.result(timeout=300)
    outputs = job.outputs()
    assert outputs and all(o.startswith("The capital of France is") for o in outputs)
    assert final == outputs[-1] and len(final) > len("The capital of France is")


def test_continue_bad_input_is_a_clear_error(client):
    with pytest.raises(AppError, match="reply_prefix"):
        client.predict(QUESTION, 5, "", 8, 0.0, 1.0, 0, 1.0, -1, api_name="/continue")
    with pytest.raises(AppError, match="max_new_tokens"):
        client.predict(QUESTION, "Paris", "", 0, 0.0, 1.0, 0, 1.0, -1, api_name="/continue")
