"""Lessons that ask before they tell: every step's answer is what the live model does, checked
against the model's own figures by another route; the API asks before it tells."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch

from generation.inside import compare_quantization, head_roles, model_attention, next_token_candidates
from generation.inside.lessons import HEADS_TEXT, LESSONS, PROMPT, SIZE_CHOICES, WRITTEN, _bin, get_lesson, run_step
from generation.sampling import SamplingParams


def test_every_lesson_has_steps_with_choices():
    assert 3 <= len(LESSONS) <= 5 and len({x.key for x in LESSONS}) == len(LESSONS)
    for les in LESSONS:
        assert les.steps and les.title and les.intro
        for step in les.steps:
            assert step.question.strip() and len(step.choices) >= 2 and len(set(step.choices)) == len(step.choices)


@pytest.mark.parametrize(("value", "edges", "expected"), [
    (0.0, (0.0, 0.25, 0.75), 0), (0.1, (0.0, 0.25, 0.75), 1), (0.25, (0.0, 0.25, 0.75), 1),
    (0.5, (0.0, 0.25, 0.75), 2), (0.9, (0.0, 0.25, 0.75), 3), (1, (1, 10, 100), 0), (101, (1, 10, 100), 3),
])
def test_bins(value, edges, expected):
    assert _bin(value, edges) == expected


def test_bad_lesson_or_step_is_a_value_error():
    with pytest.raises(ValueError, match="lesson must be one of"):
        get_lesson("nope")
    with pytest.raises(ValueError, match="step must be an integer in"):
        run_step(None, "heads", 7)
    with pytest.raises(ValueError, match="step must be an integer in"):
        run_step(None, "heads", True)


def _mean_rows(lm) -> tuple[list[str], torch.Tensor]:
    """The last word's row averaged over layers and heads, from the model view's per-layer maps."""
    atts = [model_attention(lm, HEADS_TEXT, layer=layer, hide_special=False) for layer in range(lm.model.config.num_hidden_layers)]
    labels = atts[0].tokens
    q = len(labels) - 2  # 'tired', before the full stop
    return labels, torch.stack([a.weights[:, q, : q + 1] for a in atts]).mean((0, 1))


@pytest.mark.slow
def test_heads_lesson_answers_from_the_models_own_maps(lm4):
    labels, row = _mean_rows(lm4)
    rev = run_step(lm4, "heads", 0)
    step = get_lesson("heads").steps[0]
    top = int(row.argmax())
    q = len(labels) - 2
    expected = {0: 0, q - 1: 1, q: 2, labels.index("cat"): 3}.get(top, 4)
    assert rev.answer == expected, (step.choices[rev.answer], labels[top])
    assert rev.rows[0][0] == labels[top]
    sink = run_step(lm4, "heads", 1)
    assert 0 <= sink.answer < 4 and len(sink.rows) == lm4.model.config.num_hidden_layers


@pytest.mark.slow
def test_temperature_lesson(lm4):
    # A lower temperature raises the favourite's probability for any logits that are not all equal.
    rev = run_step(lm4, "temperature", 0)
    assert rev.answer == 0 and len(rev.rows) == 5 and len(rev.headers) == 4
    kept = next_token_candidates(lm4, PROMPT, SamplingParams(temperature=1.0, top_p=0.9)).kept
    rev = run_step(lm4, "temperature", 1)
    assert rev.answer == _bin(kept, (1, 10, 100)) and f"{kept:,} of" in rev.explanation


@pytest.mark.slow
def test_four_bit_lesson(lm4, lm_full):
    cmp = compare_quantization(lm4, lm_full, PROMPT, decode_tokens=WRITTEN - 1)
    size = run_step(lm4, "four_bit", 0, lambda: lm_full)
    nearest = min(range(len(SIZE_CHOICES)), key=lambda i: abs(math.log(SIZE_CHOICES[i] / cmp.size_ratio)))
    assert size.answer == nearest
    same = run_step(lm4, "four_bit", 1, lambda: lm_full)
    assert same.answer == (0 if cmp.top1_agree else 1)
    # The written tokens: the first is each model's top token (the step before), then the greedy
    # steps; the answer counts the tokens before the first that differs.
    assert cmp.quantized.written[0] == next(r.token_id for r in cmp.rows if r.rank_4bit == 1)
    assert cmp.full.written[0] == next(r.token_id for r in cmp.rows if r.rank_full == 1)
    pairs = list(zip(cmp.quantized.written, cmp.full.written))
    assert len(pairs) == WRITTEN
    agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    written = run_step(lm4, "four_bit", 2, lambda: lm_full)
    assert written.answer == (0 if agree == WRITTEN else 2 if agree == 0 else 1)
    assert f"first **{agree} of {WRITTEN}**" in written.explanation
    assert [row[3] for row in written.rows] == ["same" if a == b else "differs" for a, b in pairs]
    with pytest.raises(ValueError, match="full-precision"):
        run_step(lm4, "four_bit", 1)


@pytest.mark.slow
def test_induction_lesson_finds_the_induction_head(lm4):
    roles = head_roles(lm4, HEADS_TEXT, n_random=24)
    layer, head, score = roles.strongest("induction")
    rev = run_step(lm4, "induction", 0)
    assert f"layer {layer}, head {head}" in rev.explanation
    if score > 0.5:  # a real induction head looks at the token after the earlier copy
        assert rev.answer == 3
    where = run_step(lm4, "induction", 1)
    assert where.answer == min(3 * layer // len(roles.induction), 2)


@pytest.mark.slow
def test_lesson_api_asks_before_it_tells(client):
    q = client.predict("temperature", 0, "", api_name="/lesson")
    assert q["choices"] == ["higher", "lower", "the same"] and "answer" not in q and q["steps"] == 2
    a = client.predict("temperature", 0, "lower", api_name="/lesson")
    assert a["answer"] == "higher" and a["correct"] is False and a["rows"] and a["headers"][0] == "token"
    a = client.predict("induction", 1, "in the first third of the layers", api_name="/lesson")
    assert a["answer"] in get_lesson("induction").steps[1].choices


def test_a_steps_table_downloads_as_csv_with_its_cells_unchanged_but_defused():
    from generation.inside.lessons import Reveal
    from ui.lessons import lesson_csv

    rev = Reveal(answer=0, explanation="", headers=("token", "T = 0.5", "T = 1"),
                 rows=[[" Paris", "62.0 %", "41.5 %"], ["=1+1", "1.0 %", "2.0 %"], ["a,\n\"b\"", "0.5 %", "0.9 %"]])
    rows = list(csv.reader(io.StringIO(lesson_csv(rev))))
    assert rows[0] == list(rev.headers)
    assert rows[1] == rev.rows[0]
    assert rows[2] == ["'=1+1", "1.0 %", "2.0 %"]  # a spreadsheet would run it as a formula
    assert rows[3] == ["a,\\n\"b\"", "0.5 %", "0.9 %"]  # the comma and quotes survive; the newline is escaped
