"""ChatEngine.snapshot (what "Inside the server" shows) and replies that continue an assistant
prefix, on the real 4-bit default model's engine."""

from __future__ import annotations

import time

import pytest

from generation import ReplyStats, SamplingParams, build_prompt
from generation.backends import ChatEngine, EngineState

LONG = SamplingParams(temperature=0.0, max_new_tokens=400)


@pytest.fixture(scope="module")
def engine(lm4):
    with ChatEngine(lm4, max_batch=2) as eng:
        eng.start()
        yield eng


def _until(cond, timeout_s: float = 120.0):
    """Poll cond() until it returns something truthy (an end signal: a count reached); that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout_s} s")


def _idle(engine: ChatEngine) -> EngineState:
    return _until(lambda: (s := engine.snapshot()).running == 0 and s.waiting == 0 and s)


def test_snapshot_counts_rows_and_the_waiting_line(lm4, engine):
    messages = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello."]
    prompts = [build_prompt(lm4.tokenizer, m).input_ids for m in messages]
    reqs = [engine.submit(p, LONG, ignore_eos=True) for p in prompts]
    try:
        # Two rows decode (max_batch 2) once both have written a token; the other two wait.
        _until(lambda: all(r.token_ids for r in reqs[:2]) and engine.snapshot().running == 2
               and all(row.phase == "decode" for row in engine.snapshot().rows))
        state = engine.snapshot()
        assert state.running == 2 and state.waiting == 2
        assert state.max_batch == 2 and state.prefill_tokens == engine.prefill_tokens
        assert sorted(row.prompt_tokens for row in state.rows) == sorted(int(p.shape[1]) for p in prompts[:2])
        assert all(1 <= row.generated < LONG.max_new_tokens for row in state.rows)
        assert all(row.temperature == 0.0 and row.max_new_tokens == LONG.max_new_tokens for row in state.rows)
        # The cache holds each row's prompt and written tokens (bar the one fed next): bytes per position x positions.
        held = sum(row.prompt_tokens + row.generated - 1 for row in state.rows)
        cfg = lm4.model.config
        per_position, rest = divmod(state.kv_cache_bytes, held)
        kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
        assert rest == 0 and per_position in (2 * kv, 4 * kv)  # bf16 or float32 keys and values
        assert state.kv_cache_allocated_bytes >= state.kv_cache_bytes
        assert state.prefix_cache_bytes > 0  # the warm-up prompt's prefix, reused by every chat
        _until(lambda: engine.snapshot().tok_s > 0 and engine.snapshot().step_ms > 0)
        # Only counts: no text of any prompt is in it.
        shown = repr(state.as_dict())
        assert not any(m in shown for m in messages) and "France" not in shown
    finally:
        for r in reqs:
            r.cancel()
        for r in reqs:
            assert r.wait(60)
    state = _idle(engine)
    assert state.rows == () and state.kv_cache_bytes == 0


def test_snapshot_is_safe_from_many_threads_while_the_loop_runs(lm4, engine):
    import threading

    req = engine.submit(build_prompt(lm4.tokenizer, "Tell me a story.").input_ids, LONG, ignore_eos=True)
    errors: list[BaseException] = []

    def poll():
        try:
            for _ in range(200):
                s = engine.snapshot()
                assert s.running == len(s.rows) and s.running <= engine.max_batch
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    req.cancel()
    assert req.wait(60)
    assert errors == []


def test_rate_falls_to_zero_when_idle(engine):
    state = _idle(engine)
    assert state.running == 0
    _until(lambda: engine.snapshot().tok_s == 0.0, timeout_s=30)


@pytest.mark.parametrize("prefix", ["The capital of France is", "Paris, of course"])
def test_reply_continues_an_assistant_prefix(engine, prefix):
    stats = ReplyStats()
    params = SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=3)
    texts = list(engine.stream_reply("What is the capital of France?", reply_prefix=prefix, params=params,
                                     stats=stats, max_input_tokens=1024))
    assert texts[0] == prefix  # shown at once, before any new token
    assert all(t.startswith(prefix) for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert len(texts[-1]) > len(prefix) and stats.new_tokens >= 3


def test_prefixed_prompt_is_the_prompt_then_the_prefix_tokens(lm4, engine):
    from generation.tokens import reply_text_ids

    prompt = build_prompt(lm4.tokenizer, "Name a colour.")
    ids = reply_text_ids(lm4.tokenizer, prompt.text, "Blue")
    assert lm4.tokenizer.decode(ids).strip() == "Blue"
    req_ids = []
    orig = engine.submit

    def spy(prompt_ids, *args, **kw):
        req = orig(prompt_ids, *args, **kw)
        req_ids.append(req.prompt_ids.tolist())
        return req

    engine.submit = spy
    try:
        list(engine.stream_reply("Name a colour.", reply_prefix="Blue",
                                 params=SamplingParams(temperature=0.0, max_new_tokens=2), max_input_tokens=1024))
    finally:
        del engine.submit
    assert req_ids == [prompt.input_ids[0].tolist() + ids]


def test_reply_prefix_is_checked(engine):
    with pytest.raises(ValueError, match="reply_prefix"):
        list(engine.stream_reply("Hi", reply_prefix=3))  # type: ignore[arg-type]
