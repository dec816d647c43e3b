"""Streaming replies from the real default model in 4-bit (short generations) and the tiny model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from generation import ReplyStats, SamplingParams, load_model, stream_reply
from generation.model import LoadedModel
from generation.prompt import PLAIN_STOP_STRINGS
from generation.backends import throttled
from generation.stream import WORKER_THREAD_NAME

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
QUESTION = "What is the capital of France?"


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WORKER_THREAD_NAME and t.is_alive()]


def _collect(lm, message, **kw) -> tuple[list[str], ReplyStats]:
    stats = ReplyStats()
    return list(stream_reply(lm, message, stats=stats, **kw)), stats


def test_paris_greedy(lm4):
    pieces, stats = _collect(lm4, QUESTION, params=GREEDY)
    reply = pieces[-1]
    assert "Paris" in reply
    assert QUESTION not in reply and "User:" not in reply and "Assistant:" not in reply
    assert "<eos>" not in reply and "<bos>" not in reply
    assert reply == reply.strip()
    assert stats.stopped_by in {"stop_string", "eos"}
    assert 0 < stats.new_tokens <= GREEDY.max_new_tokens
    assert stats.prompt_tokens > 10 and stats.trimmed_turns == 0
    assert 0 < stats.first_token_s <= stats.total_s and stats.tokens_per_s > 0


def test_streamed_pieces_join_to_final_reply(lm4):
    pieces, stats = _collect(lm4, "Tell me about the Moon.", params=SamplingParams(max_new_tokens=24, seed=3))
    assert len(pieces) > 1
    deltas = [pieces[0]] + [b[len(a):] for a, b in zip(pieces, pieces[1:])]
    for a, b in zip(pieces, pieces[1:]):
        assert b.startswith(a) and len(b) > len(a)
    assert "".join(deltas) == pieces[-1]
    assert not any(pieces[-1].endswith(s[:n]) for s in PLAIN_STOP_STRINGS for n in range(1, len(s) + 1))


def test_seed_reproducible_and_global_rng_untouched(lm4):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1234)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = _collect(lm4, "Tell me a story.", params=params)[0][-1]
    assert torch.equal(torch.get_rng_state(), before)  # sampling used its own generator
    b = _collect(lm4, "Tell me a story.", params=params)[0][-1]
    others = {_collect(lm4, "Tell me a story.", params=SamplingParams(temperature=1.0, max_new_tokens=16, seed=s))[0][-1]
              for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_closing_the_stream_stops_the_worker(lm4):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    stats = ReplyStats()
    gen = stream_reply(lm4, "Write a long story about a dragon and a knight.", params=params, stats=stats)
    first = next(gen)
    assert first and _workers()
    t0 = time.perf_counter()
    gen.close()
    assert time.perf_counter() - t0 < 30  # within a token or two, not the 24-token reply: not a hang
    assert not _workers()
    assert stats.stopped_by == "stopped"
    assert stats.new_tokens < params.max_new_tokens


def test_stop_event_stops_generation(lm4):
    stop = threading.Event()
    stats = ReplyStats()
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    pieces = []
    for text in stream_reply(lm4, "Write a long story about a dragon and a knight.", params=params,
                             stats=stats, stop_event=stop):
        pieces.append(text)
        stop.set()
    assert stats.stopped_by == "stopped" and stats.new_tokens < params.max_new_tokens
    assert not _workers()


def test_two_callers_at_once_match_sequential_results(lm4):
    jobs = [(QUESTION, GREEDY), ("Tell me about cats.", SamplingParams(temperature=0.9, max_new_tokens=16, seed=7))]
    sequential = [_collect(lm4, m, params=p)[0][-1] for m, p in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = _collect(lm4, jobs[i][0], params=jobs[i][1])[0][-1]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert [results[0], results[1]] == sequential
    assert not _workers()


def test_trimmed_turns_reported(lm4):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Question number {i}: tell me something about the number {i}."},
                    {"role": "assistant", "content": f"The number {i} is a fine number with many properties."}]
    stats = ReplyStats()
    reply = list(stream_reply(lm4, QUESTION, history, params=SamplingParams(temperature=0, max_new_tokens=8),
                              max_input_tokens=120, stats=stats))
    assert reply
    assert stats.trimmed_turns > 0 and stats.trimmed_turns % 2 == 0
    assert stats.prompt_tokens <= 120


def test_worker_crash_surfaces_as_error(lm4, tiny_qwen_dir, tmp_path):
    """A real failure inside generate(): Gemma's token ids (up to 262k) index the tiny model's 300-row embedding."""
    tiny = load_model(str(tiny_qwen_dir))
    broken = LoadedModel(**{**tiny.__dict__, "tokenizer": lm4.tokenizer, "has_chat_template": False})
    stats = ReplyStats()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="generation failed: IndexError"):
        list(stream_reply(broken, QUESTION, params=GREEDY, stats=stats))
    assert time.perf_counter() - t0 < 60  # an error, not a hang
    assert stats.stopped_by == "error" and not _workers()


def test_chat_template_model_streams_without_special_tokens(tiny_qwen_dir):
    tiny = load_model(str(tiny_qwen_dir))
    pieces, stats = _collect(tiny, "hello", system="be brief", params=SamplingParams(max_new_tokens=12, seed=0),
                             max_input_tokens=256)
    assert stats.new_tokens > 0 and stats.stopped_by in {"eos", "max_new_tokens"}
    for text in pieces:
        assert "<|im_end|>" not in text and "<|im_start|>" not in text and "be brief" not in text


@pytest.mark.parametrize("bad", [dict(params="fast"), dict(message=""), dict(history=[{"role": "bot", "content": "x"}])])
def test_bad_input_raises_before_any_thread(lm4, bad):
    kw = {"message": QUESTION, **bad}
    message = kw.pop("message")
    with pytest.raises(ValueError):
        next(stream_reply(lm4, message, **kw))
    assert not _workers()


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
