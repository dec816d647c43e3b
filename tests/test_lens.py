"""The lenses (generation/inside/lens.py) on the real default model, and their figures
(attention/lens_plot.py): what every layer predicts, where 4-bit differs from full precision, and
what each head is for."""

from __future__ import annotations

import math

import pytest
import torch

from attention.lens_plot import COLOURBLIND_PALETTE, lens_cell, plot_head_roles, plot_logit_lens, plot_quant_lens
from generation.inside import (
    LENS_TOP,
    head_roles,
    induction_tokens,
    logit_lens,
    model_attention,
    next_token_candidates,
    quant_lens,
    token_label,
)
from generation.sampling import SamplingParams

TEXT = "The cat sat on the mat because it was tired."
PROMPT = "The capital of France is"


def model_top(lm, text: str) -> int:
    """The model's own most likely next token at temperature 1, through its own forward."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, -1]
    return int(logits.float().argmax())


# ---------------------------------------------------------------------------------------------
# Logit lens


@pytest.mark.parametrize("text", [PROMPT, TEXT])
def test_logit_lens_last_layer_is_the_models_own_guess(lm4, text):
    lens = logit_lens(lm4, text)
    assert lens.n_layers == 18  # Gemma 3 270m
    assert lens.tokens[0] == "<bos>" and len(lens.top[0]) == len(lens.tokens)
    final = lens.last(17)[0]
    assert final.token_id == model_top(lm4, text)
    nt = next_token_candidates(lm4, text, SamplingParams(temperature=1.0, top_p=1.0), k=5)
    assert final.token_id == nt.candidates[0].token_id  # what /next_token shows at temperature 1
    assert math.isclose(final.prob, nt.candidates[0].prob, rel_tol=1e-6)


def test_logit_lens_lists_top_tokens_per_layer_and_position(lm4):
    lens = logit_lens(lm4, TEXT)
    for layer in lens.top:
        for cell in layer:
            assert len(cell) == LENS_TOP
            probs = [c.prob for c in cell]
            assert all(0.0 <= p <= 1.0 for p in probs) and probs == sorted(probs, reverse=True)
            assert sum(probs) <= 1.0 + 1e-9
    assert 0 <= lens.settles_at() <= 17
    assert repr(lens.last(17)[0].token) in lens.summary()


def test_logit_lens_keeps_the_last_tokens_of_a_long_text(lm4):
    lens = logit_lens(lm4, " ".join(["word"] * 40) + " end", max_tokens=8)
    assert lens.capped and lens.n_text_tokens > 8 and len(lens.tokens) == 8
    assert lens.tokens[-1] == "end" and "last 8" in lens.notice


@pytest.mark.parametrize("kwargs, match", [
    (dict(text=""), "empty"),
    (dict(text="hi", max_tokens=0), "max_tokens"),
    (dict(text="hi", max_tokens=65), "max_tokens"),
    (dict(text="hi", k=0), "k must"),
])
def test_logit_lens_bad_input_is_a_value_error(lm4, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logit_lens(lm4, **kwargs)


# ---------------------------------------------------------------------------------------------
# Quantization lens


def test_quant_lens_is_zero_for_a_model_against_itself(lm4):
    q = quant_lens(lm4, lm4, PROMPT)
    assert len(q.layers) == 18 and [r.layer for r in q.layers] == list(range(18))
    assert all(r.kl < 1e-9 and r.agree for r in q.layers)
    assert q.first_flip() is None and "agree after every layer" in q.summary()


def test_quant_lens_4bit_against_full_precision(lm4, lm_full):
    q = quant_lens(lm4, lm_full, PROMPT)
    assert len(q.layers) == 18 and q.label_4bit == "NF4 4-bit"
    assert all(math.isfinite(r.kl) and r.kl >= 0.0 for r in q.layers)
    assert any(r.kl > 0.0 for r in q.layers)  # 4-bit weights do change the distributions
    last = q.layers[-1]
    assert last.top1_4bit == token_label(lm4.tokenizer, model_top(lm4, PROMPT))
    assert last.top1_full == token_label(lm_full.tokenizer, model_top(lm_full, PROMPT))
    flip = q.first_flip()
    assert flip is None or not q.layers[flip].agree


def test_quant_lens_refuses_models_that_do_not_match(lm4):
    with pytest.raises(ValueError, match="empty"):
        quant_lens(lm4, lm4, "   ")


# ---------------------------------------------------------------------------------------------
# Head roles


def test_head_roles_are_scores_in_0_1_for_every_layer_and_head(lm4):
    roles = head_roles(lm4, TEXT)
    assert roles.shape == (18, 4)
    for name in ("previous_token", "first_token", "induction", "induction_baseline"):
        grid = getattr(roles, name)
        assert len(grid) == 18 and all(len(row) == 4 for row in grid)
        assert all(0.0 <= s <= 1.0 for row in grid for s in row)


def test_head_roles_match_the_models_attention_maps(lm4):
    roles = head_roles(lm4, TEXT)
    layer, head = 2, 3
    att = model_attention(lm4, TEXT, layer=layer, hide_special=False).weights[head]  # (T, T) with <bos>
    t = att.shape[0]
    prev = float(torch.stack([att[i, i - 1] for i in range(2, t)]).mean())
    first = float(att[1:, 0].mean())
    assert math.isclose(roles.previous_token[layer][head], prev, abs_tol=1e-6)
    assert math.isclose(roles.first_token[layer][head], first, abs_tol=1e-6)


@pytest.mark.parametrize("n_random", [16, 24])
def test_an_induction_head_stands_far_above_the_random_baseline(lm4, n_random):
    roles = head_roles(lm4, TEXT, n_random=n_random)
    layer, head, score = roles.strongest("induction")
    baseline = max(s for row in roles.induction_baseline for s in row)
    # A repeat makes some head attend to the token after the earlier occurrence; with no repeat no head does.
    assert score > 0.5 and score > 5 * baseline, (layer, head, score, baseline)
    assert roles.role_of(layer, head)[0] == "induction"
    assert "after the previous occurrence" in roles.describe(layer, head)


def test_previous_token_and_sink_heads_exist(lm4):
    roles = head_roles(lm4, TEXT)
    _, _, prev = roles.strongest("previous_token")
    mean_prev = sum(s for row in roles.previous_token for s in row) / 72
    assert prev > 0.3 and prev > 3 * mean_prev  # one head's job, not every head's
    assert roles.strongest("first_token")[2] > 0.8  # the attention sink
    assert "Clearest heads" in roles.summary()


def test_induction_tokens_are_fixed_ordinary_and_distinct(lm4):
    tok = lm4.tokenizer
    a, b = induction_tokens(tok, 24), induction_tokens(tok, 24)
    assert a == b and len(set(a)) == 24
    assert not set(a) & set(tok.all_special_ids)


def test_head_roles_bad_input_is_a_value_error(lm4):
    with pytest.raises(ValueError, match="too short"):
        head_roles(lm4, "a")
    with pytest.raises(ValueError, match="n_random"):
        head_roles(lm4, TEXT, n_random=2)


# ---------------------------------------------------------------------------------------------
# Figures (no model)


def test_lens_figure_maps_every_cell_back_from_its_pixels():
    layers, t = 18, 7
    tops = [[f"t{layer}.{c}" for c in range(t)] for layer in range(layers)]
    probs = [[(layer * t + c) / (layers * t) for c in range(t)] for layer in range(layers)]
    fig, layout = plot_logit_lens(tops, probs, [f"p{c}" for c in range(t)], title="lens", selected=(3, 2))
    w, h = fig.get_size_inches() * fig.dpi
    assert layout.left + t * layout.cell_w < w and layout.top + layers * layout.cell_h < h
    for layer in (0, 5, 17):
        for c in (0, 6):
            r = layers - 1 - layer  # the last layer is the top row
            x = layout.left + (c + 0.5) * layout.cell_w
            y = layout.top + (r + 0.5) * layout.cell_h
            assert lens_cell(layout, x, y) == (layer, c)
    assert lens_cell(layout, 1, 1) is None


@pytest.mark.parametrize("token", ["的", "ภาษา", "【", "a\x07b"])
def test_a_token_the_font_cannot_draw_is_written_as_its_code_point(token):
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from attention.canvas import _drawable_code_points, drawable

    if all(c.isprintable() and ord(c) in _drawable_code_points() for c in token):
        pytest.skip("this machine's figure font draws it")  # matplotlib's own DejaVu Sans does not
    fig, _ = plot_logit_lens([[token, "ok"]], [[0.9, 0.1]], [token, "x"])
    fig2 = plot_quant_lens([0.1], [token], ["ok"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of every glyph a font lacks
        for f in (fig, fig2):
            FigureCanvasAgg(f).draw()
    texts = [t.get_text() for f in (fig, fig2) for ax in f.axes for t in ax.texts + ax.get_xticklabels()]
    assert any(t.startswith(drawable(token)[:5]) for t in texts)  # labels are cut at a few characters
    assert not any(token in t for t in texts)
    assert drawable(token) == token.encode("unicode_escape").decode()
    kept = "".join(c for c in "The cat ↵ … ␣" if ord(c) in _drawable_code_points())
    assert drawable(kept) == kept  # what the font has stays as it is


def test_lens_figures_take_a_palette_and_check_their_shapes():
    fig = plot_head_roles({"induction": [[0.1, 0.9]] * 3}, palette=COLOURBLIND_PALETTE)
    assert fig.axes[0].images[0].get_cmap().name == "cividis"
    fig = plot_quant_lens([0.0, 0.1], ["a", "b"], ["a", "c"], palette=COLOURBLIND_PALETTE)
    assert [p.get_facecolor()[:3] for p in fig.axes[0].patches][0] != fig.axes[0].patches[1].get_facecolor()[:3]
    with pytest.raises(ValueError, match="one entry per layer"):
        plot_quant_lens([0.1], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="one label per position"):
        plot_logit_lens([["a"]], [[0.5]], ["x", "y"])


def test_a_maps_one_line_summary_names_where_its_attention_goes():
    from attention.describe import describe_map

    prev = torch.zeros(4, 4)
    prev[0, 0] = 1.0
    prev[torch.arange(1, 4), torch.arange(0, 3)] = 1.0  # every row on the token before it
    assert describe_map(prev).startswith("mostly attends to the token just before it")
    assert "hidden special tokens" in describe_map(prev * 0.1, torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="square"):
        describe_map(torch.zeros(2, 3))
