"""Streaming replies through the chat engine (the app's and the CLI's one path): the real default
model in 4-bit (short generations) and the tiny chat-template model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from generation import ReplyStats, SamplingParams, build_prompt, load_model
from generation.backends import ChatEngine, throttled
from generation.model import LoadedModel
from generation.prompt import PLAIN_STOP_STRINGS

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine4(lm4):
    with ChatEngine(lm4, max_batch=4) as engine:
        yield engine


def _collect(engine, message, **kw) -> tuple[list[str], ReplyStats]:
    stats = ReplyStats()
    return list(engine.stream_reply(message, stats=stats, **kw)), stats


def test_paris_greedy(engine4):
    pieces, stats = _collect(engine4, QUESTION, params=GREEDY)
    reply = pieces[-1]
    assert "Paris" in reply
    assert QUESTION not in reply and "User:" not in reply and "Assistant:" not in reply
    assert "<eos>" not in reply and "<bos>" not in reply
    assert reply == reply.strip()
    assert stats.stopped_by in {"stop_string", "eos"}
    assert 0 < stats.new_tokens <= GREEDY.max_new_tokens
    assert stats.prompt_tokens > 10 and stats.trimmed_turns == 0
    assert 0 < stats.first_token_s <= stats.total_s and stats.tokens_per_s > 0


def test_streamed_pieces_join_to_final_reply(engine4):
    pieces, stats = _collect(engine4, "Tell me about the Moon.", params=SamplingParams(max_new_tokens=24, seed=3))
    assert len(pieces) > 1
    deltas = [pieces[0]] + [b[len(a):] for a, b in zip(pieces, pieces[1:])]
    for a, b in zip(pieces, pieces[1:]):
        assert b.startswith(a) and len(b) > len(a)
    assert "".join(deltas) == pieces[-1]
    assert not any(pieces[-1].endswith(s[:n]) for s in PLAIN_STOP_STRINGS for n in range(1, len(s) + 1))


def test_seed_reproducible_and_global_rng_untouched(engine4):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1234)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = _collect(engine4, "Tell me a story.", params=params)[0][-1]
    assert torch.equal(torch.get_rng_state(), before)  # sampling used its own generator
    b = _collect(engine4, "Tell me a story.", params=params)[0][-1]
    others = {_collect(engine4, "Tell me a story.", params=SamplingParams(temperature=1.0, max_new_tokens=16, seed=s))[0][-1]
              for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_closing_the_stream_stops_the_request(engine4):
    """Closing the generator takes the request out of the batch (the loop writes no more of it)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=64, min_new_tokens=64)  # cannot end early
    stats = ReplyStats()
    gen = engine4.stream_reply("Write a long story about a dragon and a knight.", params=params, stats=stats)
    first = next(gen)
    assert first and engine4.active() == 1
    gen.close()
    assert engine4.active() == 0  # its row is free once close() returns
    assert stats.stopped_by == "stopped"
    assert stats.new_tokens < params.max_new_tokens


def test_stop_event_stops_generation(engine4):
    stop = threading.Event()
    stats = ReplyStats()
    params = SamplingParams(temperature=0.0, max_new_tokens=64, min_new_tokens=64)  # cannot end early
    pieces = []
    for text in engine4.stream_reply("Write a long story about a dragon and a knight.", params=params,
                                     stats=stats, stop_event=stop):
        pieces.append(text)
        stop.set()
    assert stats.stopped_by == "stopped" and stats.new_tokens < params.max_new_tokens
    assert pieces and engine4.active() == 0


def test_two_callers_at_once_match_sequential_results(engine4):
    jobs = [(QUESTION, GREEDY), ("Tell me about cats.", SamplingParams(temperature=0.9, max_new_tokens=16, seed=7))]
    sequential = [_collect(engine4, m, params=p)[0][-1] for m, p in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = _collect(engine4, jobs[i][0], params=jobs[i][1])[0][-1]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert [results[0], results[1]] == sequential
    assert engine4.active() == 0


def test_trimmed_turns_reported(engine4):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Question number {i}: tell me something about the number {i}."},
                    {"role": "assistant", "content": f"The number {i} is a fine number with many properties."}]
    stats = ReplyStats()
    budget = build_prompt(engine4.tokenizer, QUESTION).input_ids.shape[1] + 60  # room for some of the history
    reply = list(engine4.stream_reply(QUESTION, history, params=SamplingParams(temperature=0, max_new_tokens=8),
                                      max_input_tokens=budget, stats=stats))
    assert reply
    assert stats.trimmed_turns > 0 and stats.trimmed_turns % 2 == 0
    assert stats.prompt_tokens <= budget


def test_a_crash_in_the_model_surfaces_as_error(lm4, tiny_qwen_dir):
    """A real failure inside the model's forward: Gemma's token ids (up to 262k) index the tiny
    model's 300-row embedding. The reply ends with the error; the engine's loop goes on."""
    tiny = load_model(str(tiny_qwen_dir))
    broken = LoadedModel(**{**tiny.__dict__, "tokenizer": lm4.tokenizer, "has_chat_template": False})
    stats = ReplyStats()
    with ChatEngine(broken, warmup=False) as engine:
        with pytest.raises(RuntimeError, match="generation failed: IndexError"):
            list(engine.stream_reply(QUESTION, params=GREEDY, stats=stats))
        assert stats.stopped_by == "error" and engine.active() == 0 and engine._alive()


def test_chat_template_model_streams_without_special_tokens(tiny_qwen_dir):
    tiny = load_model(str(tiny_qwen_dir))
    with ChatEngine(tiny, warmup=False) as engine:
        pieces, stats = _collect(engine, "hello", system="be brief", params=SamplingParams(max_new_tokens=12, seed=0),
                                 max_input_tokens=256)
    assert stats.new_tokens > 0 and stats.stopped_by in {"eos", "max_new_tokens"}
    for text in pieces:
        assert "<|im_end|>" not in text and "<|im_start|>" not in text and "be brief" not in text


@pytest.mark.parametrize("bad", [dict(params="fast"), dict(message=""), dict(history=[{"role": "bot", "content": "x"}])])
def test_bad_input_raises_before_anything_is_queued(engine4, bad):
    kw = {"message": QUESTION, **bad}
    message = kw.pop("message")
    with pytest.raises(ValueError):
        next(engine4.stream_reply(message, **kw))
    assert engine4.active() == 0 and engine4.waiting() == 0


def _paced(texts: list[str], gap_s: float):
    for t in texts:
        time.sleep(gap_s)
        yield t


@pytest.mark.parametrize("gap_s, interval_s", [(0.0, 0.05), (0.01, 0.05), (0.03, 0.0)])
def test_throttled_keeps_order_and_the_last_reply(gap_s, interval_s):
    """At most one update per interval (the newest each time), never one out of order, always the last."""
    texts = [f"reply {'x' * i}" for i in range(1, 21)]
    stamps, got = [], []
    for t in throttled(_paced(texts, gap_s), interval_s):
        stamps.append(time.monotonic())
        got.append(t)
    assert got[-1] == texts[-1]
    assert [texts.index(t) for t in got] == sorted(texts.index(t) for t in got)  # a subsequence
    if interval_s == 0:
        assert got == texts
    else:
        # every update but the closing one at least an interval after the previous (small slack for the clock)
        assert all(b - a >= interval_s * 0.9 for a, b in zip(stamps[:-2], stamps[1:-1]))
        assert len(got) < len(texts)


def test_throttled_passes_on_nothing_for_an_empty_stream():
    assert list(throttled(iter(()), 0.1)) == []
