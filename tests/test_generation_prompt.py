"""Prompt building, stop-string handling, sampling/settings validation and the token preview."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_tokenizer
from generation import SamplingParams, Settings, build_prompt, preview_tokens
from generation.prompt import DEFAULT_SYSTEM, PLAIN_STOP_STRINGS, plain_dialogue
from generation.sampling import SeededSampler
from generation.backends import visible_text

HISTORY = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is attention?"},
    {"role": "assistant", "content": "A weighted average of values, weighted by query-key similarity."},
]


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tiny_tokenizer()


# --- plain dialogue format (the default base model) -----------------------------------------


def test_plain_format_with_history(lm4):
    p = build_prompt(lm4.tokenizer, "And softmax?", HISTORY)
    assert p.text == (
        f"{DEFAULT_SYSTEM}\nUser: Hi there!\nAssistant: Hello! How can I help?\nUser: What is attention?\n"
        "Assistant: A weighted average of values, weighted by query-key similarity.\nUser: And softmax?\nAssistant:"
    )
    assert p.stop_strings == PLAIN_STOP_STRINGS and p.trimmed_turns == 0
    assert p.input_ids.shape[0] == 1 and p.input_ids[0, 0].item() == lm4.tokenizer.bos_token_id
    assert lm4.tokenizer.decode(p.input_ids[0], skip_special_tokens=True) == p.text


def test_example_exchanges_in_the_system_text_continue_as_one_transcript(tiny_tok):
    # the default text ends with an example exchange: the conversation follows on the next line
    assert DEFAULT_SYSTEM.count("\nUser:") >= 3 and DEFAULT_SYSTEM.rstrip().splitlines()[-1].strip()
    text = plain_dialogue("Hi", [], None)
    assert text == f"{DEFAULT_SYSTEM}\nUser: Hi\nAssistant:"
    # a one-line instruction keeps its blank line
    assert plain_dialogue("Hi", [], "Be brief.") == "Be brief.\n\nUser: Hi\nAssistant:"


def test_the_example_exchanges_are_not_questions_the_quality_bench_asks():
    # the examples teach the form of an answer; one that is also an evaluated question would flatter it
    from conftest import bench_questions

    asked = set(bench_questions())
    examples = [line.removeprefix("User:").strip().lower() for line in DEFAULT_SYSTEM.splitlines() if line.startswith("User:")]
    assert len(asked) >= 170 and len(examples) >= 3
    assert not asked & set(examples)
    # the last example is a short factual answer: the form the model imitates first
    assert DEFAULT_SYSTEM.splitlines()[-1].startswith("Assistant:") and len(DEFAULT_SYSTEM.splitlines()[-1]) < 80


def test_the_box_shows_the_default_text_where_the_plain_format_is_used():
    from generation import DEFAULT_MODEL_ID, Settings, shown_system

    assert shown_system(Settings(model_id=DEFAULT_MODEL_ID)) == DEFAULT_SYSTEM
    assert shown_system(Settings(model_id="Qwen/Qwen2.5-3B-Instruct")) == ""
    remote = dict(chat_backend_url="http://vllm:8000")
    assert shown_system(Settings(**remote, chat_backend_api="completions")) == DEFAULT_SYSTEM
    assert shown_system(Settings(**remote, chat_backend_api="chat")) == ""


def test_plain_format_custom_and_empty_system(lm4):
    assert build_prompt(lm4.tokenizer, "hi", system="You are terse.").text == "You are terse.\n\nUser: hi\nAssistant:"
    assert build_prompt(lm4.tokenizer, "hi", system="").text == "User: hi\nAssistant:"


@pytest.mark.parametrize("extra", [0, 10, 20])
def test_trimming_drops_oldest_turns_first(lm4, extra):
    alone = build_prompt(lm4.tokenizer, "And softmax?").input_ids.shape[1]  # the system text and the message
    budget = alone + 5 + extra  # room for part of the history only
    full = build_prompt(lm4.tokenizer, "And softmax?", HISTORY)
    assert full.input_ids.shape[1] > budget  # the budget really forces trimming
    p = build_prompt(lm4.tokenizer, "And softmax?", HISTORY, max_input_tokens=budget)
    assert 0 < p.trimmed_turns <= len(HISTORY)
    assert p.input_ids.shape[1] <= budget
    kept = HISTORY[p.trimmed_turns:]
    assert not kept or kept[0]["role"] == "user"  # never starts with an orphaned reply
    assert p.text == build_prompt(lm4.tokenizer, "And softmax?", kept).text
    assert p.text.endswith("User: And softmax?\nAssistant:")


def test_message_over_budget_raises(lm4):
    with pytest.raises(ValueError, match="input budget is 16"):
        build_prompt(lm4.tokenizer, "word " * 50, max_input_tokens=16)


@pytest.mark.parametrize("bad", [
    [{"role": "system", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}], ["hello"],
])
def test_bad_history_raises(lm4, bad):
    with pytest.raises(ValueError, match="history\\[0\\]"):
        build_prompt(lm4.tokenizer, "hi", bad)


# --- chat template path ----------------------------------------------------------------------


def test_chat_template_with_system(tiny_tok):
    p = build_prompt(tiny_tok, "And softmax?", HISTORY, system="Be brief.", max_input_tokens=4096)
    messages = [{"role": "system", "content": "Be brief."}, *HISTORY, {"role": "user", "content": "And softmax?"}]
    expected = tiny_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert p.text == expected and p.text.endswith("<|im_start|>assistant\n")
    assert p.stop_strings == ()
    torch.testing.assert_close(p.input_ids, tiny_tok(expected, add_special_tokens=False, return_tensors="pt").input_ids)


def test_chat_template_without_system_support(tiny_tok):
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tiny_tok.chat_template
    )
    p = build_prompt(tok, "And softmax?", HISTORY, system="Be brief.", max_input_tokens=4096)
    assert "<|im_start|>system" not in p.text
    assert "<|im_start|>user\nBe brief.\n\nHi there!<|im_end|>" in p.text


def test_chat_template_trimming(tiny_tok):
    full = build_prompt(tiny_tok, "And softmax?", HISTORY, max_input_tokens=4096).input_ids.shape[1]
    p = build_prompt(tiny_tok, "And softmax?", HISTORY, max_input_tokens=full - 1)
    assert p.trimmed_turns == 2 and "Hi there!" not in p.text and "What is attention?" in p.text


# --- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown, hit", [
    (" Paris.", "Paris.", False),
    (" Paris.\n", "Paris.", False),
    (" Paris.\nUs", "Paris.", False),
    (" Paris.\nUser: and", "Paris.", True),
    (" Paris.\n\nUser:", "Paris.", True),
    (" Paris.\nUsually", "Paris.\nUsually", False),
    ("A\nAssistant: B", "A", True),
    # a reply that opens a new turn straight away shows nothing of it
    (" \nUser: hi", "", True),
    ("\nUser:", "", True),
    ("\nUs", "", False),
    ("\n\nAssistant: x", "", True),
])
def test_visible_text(raw, shown, hit):
    assert visible_text(raw, PLAIN_STOP_STRINGS) == (shown, hit)


def test_visible_text_only_grows():
    rng = random.Random(0)
    alphabet = ["\n", " ", "U", "User", ":", "A", "Assistant", "x", "s"]
    for _ in range(300):
        raw, last = "", ""
        for _ in range(20):
            raw += rng.choice(alphabet)
            text, hit = visible_text(raw, PLAIN_STOP_STRINGS)
            assert text.startswith(last)
            assert not any(s in text for s in PLAIN_STOP_STRINGS)
            last = text
            if hit:
                break


# --- sampling --------------------------------------------------------------------------------

BAD_PARAMS = [
    ("max_new_tokens", 0, r"\[1, 4096\]"), ("max_new_tokens", 5000, r"\[1, 4096\]"), ("max_new_tokens", 1.5, "integer"),
    ("temperature", -0.1, r"\[0, 2.0\]"), ("temperature", 2.5, r"\[0, 2.0\]"), ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, r"\(0, 1\]"), ("top_p", 1.01, r"\(0, 1\]"),
    ("top_k", -1, ">= 0"), ("top_k", 2.0, "integer"),
    ("repetition_penalty", 0.9, r"\[1, 2.0\]"), ("repetition_penalty", 2.5, r"\[1, 2.0\]"),
    ("seed", -1, "seed"), ("seed", "7", "seed"), ("max_new_tokens", True, "integer"),
]


@pytest.mark.parametrize("field, value, msg", BAD_PARAMS)
def test_bad_sampling_params_raise(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**{field: value})


def test_sampling_defaults_are_the_notebooks():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (128, 0.7, 0.95, 0, 1.0)
    kw = p.generate_kwargs()
    assert kw["do_sample"] is False and kw["max_new_tokens"] == 128  # sampling happens in SeededSampler
    assert isinstance(kw["logits_processor"][-1], SeededSampler)
    assert "logits_processor" not in SamplingParams(temperature=0).generate_kwargs()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (3, 0.5)])
def test_sampler_respects_filters_and_seed(top_k, top_p):
    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))  # (B, V)
    procs = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=5).generate_kwargs()["logits_processor"]
    ids = torch.zeros(2, 1, dtype=torch.long)
    out = procs(ids, scores.clone())
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 1]  # exactly one token survives per row
    picked = out.argmax(-1)
    if top_k:
        assert all(picked[b] in scores[b].topk(top_k).indices for b in range(2))
    again = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=5).generate_kwargs()["logits_processor"]
    torch.testing.assert_close(again(ids, scores.clone()), out)


def test_sampler_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    sampler = SeededSampler(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler(None, probs.log()).argmax()] += 1
    torch.testing.assert_close(counts / counts.sum(), probs[0], atol=0.03, rtol=0)


# --- settings --------------------------------------------------------------------------------


def test_settings_defaults_and_parsing(tmp_path):
    s = Settings.from_env({})
    assert (s.model_id, s.load_4bit, s.trust_remote_code, s.max_input_tokens) == ("google/gemma-3-270m", True, False, 1024)
    assert (s.server_name, s.server_port, s.queue_size) == ("127.0.0.1", 7860, 64)
    assert s.chat_concurrency == (64 if torch.cuda.is_available() else 32)
    assert s.cache_dir.name == "attention-lab"
    assert s.torch_threads == len(os.sched_getaffinity(0))
    s = Settings.from_env({
        "MODEL_ID": "Qwen/Qwen2.5-3B-Instruct", "ATTN_LAB_CACHE": str(tmp_path), "LOAD_IN_4BIT": "false",
        "TRUST_REMOTE_CODE": "1", "MAX_INPUT_TOKENS": "2048", "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "8080", "QUEUE_SIZE": "8", "CHAT_CONCURRENCY": "3",
        "TORCH_NUM_THREADS": "4", "FAST_DECODE": "off", "ATTN_LAB_NATIVE": "0",
    })
    assert s == Settings("Qwen/Qwen2.5-3B-Instruct", tmp_path, False, True, 2048, "0.0.0.0", 8080, 8, 3, 4,
                         fast_decode=False, native_kernels=False)
    assert Settings.from_env({}).fast_decode and Settings.from_env({}).native_kernels
    assert Settings.from_env({"MAX_INPUT_TOKENS": "  "}).max_input_tokens == 1024  # blank = default


@pytest.mark.parametrize("var, value", [
    ("LOAD_IN_4BIT", "maybe"), ("TRUST_REMOTE_CODE", "2"), ("MAX_INPUT_TOKENS", "many"), ("MAX_INPUT_TOKENS", "8"),
    ("GRADIO_SERVER_PORT", "0"), ("GRADIO_SERVER_PORT", "70000"), ("QUEUE_SIZE", "-1"), ("CHAT_CONCURRENCY", "0"),
    ("CHAT_CONCURRENCY", "1.5"), ("TORCH_NUM_THREADS", "0"), ("TORCH_NUM_THREADS", "all"), ("FAST_DECODE", "fast"),
    ("ATTN_LAB_NATIVE", "2"),
])
def test_settings_bad_env_raises_naming_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        Settings.from_env({var: value})


def test_settings_is_frozen():
    with pytest.raises(AttributeError):
        Settings().model_id = "x"  # type: ignore[misc]
    assert isinstance(Settings(cache_dir="~/x").cache_dir, Path)


# --- token preview ---------------------------------------------------------------------------


def test_preview_tokens_round_trip(lm4):
    p = preview_tokens(lm4.tokenizer, "Attention is all you need.")
    assert p.ids[0] == lm4.tokenizer.bos_token_id and len(p.ids) == len(p.pieces)
    assert p.round_trip == "<bos>Attention is all you need." and not p.truncated
    assert p.pieces[1:] == lm4.tokenizer.convert_ids_to_tokens(p.ids[1:])
    short = preview_tokens(lm4.tokenizer, "Attention is all you need.", limit=3)
    assert short.ids == p.ids[:3] and short.truncated
    with pytest.raises(ValueError, match="limit"):
        preview_tokens(lm4.tokenizer, "x", limit=0)
