"""attention.lab and attention.plot: the Attention Lab's maths and figures."""

from __future__ import annotations

import io

import pytest
import torch
from matplotlib.figure import Figure
from torch.testing import assert_close

from attention.lab import LabConfig, run_lab, tokenize, toy_embeddings, valid_head_counts
from attention.plot import MASKED_COLOUR, plot_head, plot_heads, plot_steps

SENTENCE = "The cat sat on the mat, and the dog barked."


def _texts(fig: Figure) -> list[str]:
    """Every string the figure draws: Text artists, and the batched labels of attention.plot."""
    batched = [s for ax in fig.axes for a in ax.artists if hasattr(a, "get_texts") for s in a.get_texts()]
    return [t.get_text() for ax in fig.axes for t in ax.texts] + batched + [t.get_text() for t in fig.texts]


def _heatmap_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_valid_head_counts():
    assert valid_head_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert valid_head_counts(12) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ValueError, match="emb_dim=0 must be a positive int"):
        valid_head_counts(0)


def test_tokenize_words_and_punctuation_with_cap():
    assert tokenize(SENTENCE) == (["The", "cat", "sat", "on", "the", "mat", ",", "and", "the", "dog", "barked", "."],
                                  False)
    assert tokenize(SENTENCE, max_tokens=3) == (["The", "cat", "sat"], True)


def test_toy_embeddings_same_word_same_vector_plus_position():
    tokens = ["the", "cat", "The"]
    x = toy_embeddings(tokens, 16, seed=3)
    assert x.shape == (3, 16)
    assert_close(toy_embeddings(tokens, 16, seed=3), x)
    pos = toy_embeddings(["a", "a", "a"], 16) - toy_embeddings(["a"], 16)[0]
    assert_close(x[2] - pos[2], x[0] - pos[0])  # "The" and "the": the same word vector
    assert not torch.allclose(x[1] - pos[1], x[0] - pos[0])
    assert not torch.allclose(toy_embeddings(tokens, 16, seed=4), x)


@pytest.mark.parametrize("multi_head,n_heads,n_kv_heads", [(True, 8, 8), (True, 8, 2), (False, 6, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_run_lab_shapes_and_invariants(multi_head, n_heads, n_kv_heads, causal):
    cfg = LabConfig(SENTENCE, emb_dim=48 if not multi_head else 64, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    seed=1, causal=causal, multi_head=multi_head)
    result = run_lab(cfg)
    heads = n_heads if multi_head else 1
    t = len(result.tokens)
    assert t == 12 and not result.capped
    assert result.weights.shape == (heads, t, t)
    assert result.out.shape == (t, cfg.emb_dim)
    assert_close(result.weights.sum(-1), torch.ones(heads, t))
    assert_close(result.weights, result.probs)
    if causal:
        assert torch.all(result.weights[:, torch.ones(t, t, dtype=torch.bool).triu(1)] == 0)
    assert result.kv_groups == ([h // (n_heads // n_kv_heads) for h in range(n_heads)] if multi_head else [0])
    assert "concat" in result.trace.names() if multi_head else "concat" not in result.trace.names()
    steps = result.explain(heads - 1)
    assert [label for label, _ in steps] == ["QKᵀ", "÷ √d_k", "mask", "softmax"]
    assert_close(steps[-1][1], result.weights[heads - 1])
    # the weights are not uniform: the toy setup gives something to look at
    assert float(result.weights.max()) > 1.5 / t


def test_run_lab_is_deterministic_and_seeded_without_touching_global_rng():
    state = torch.get_rng_state()
    a = run_lab(LabConfig(SENTENCE, seed=5, dropout=0.2))
    b = run_lab(LabConfig(SENTENCE, seed=5, dropout=0.2))
    c = run_lab(LabConfig(SENTENCE, seed=6, dropout=0.2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.out, b.out)
    assert not torch.equal(a.weights, c.weights)


def test_run_lab_dropout_shows_in_weights_but_not_in_probs():
    result = run_lab(LabConfig(SENTENCE, dropout=0.5, seed=2))
    assert (result.weights == 0).any()
    assert_close(result.probs.sum(-1), torch.ones(8, 12))
    kept = result.weights != 0
    assert_close(result.weights[kept], result.probs[kept] * 2)


def test_run_lab_caps_tokens():
    result = run_lab(LabConfig(" ".join(["word"] * 40), max_tokens=32))
    assert result.capped and len(result.tokens) == 32 and result.weights.shape == (8, 32, 32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_heads": 6}, r"n_heads=6 does not divide emb_dim=64; choose one of 1, 2, 4, 8, 16, 32, 64"),
        ({"n_heads": 8, "n_kv_heads": 3}, r"n_kv_heads=3 does not divide n_heads=8; choose one of 1, 2, 4, 8"),
        ({"emb_dim": 0}, r"emb_dim=0 must be an int in 1..1024"),
        ({"emb_dim": 4096}, r"emb_dim=4096 must be an int in 1..1024"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"seed": -1}, r"seed=-1 must be an int in 0..4294967295"),
        ({"max_tokens": 0}, r"max_tokens=0 must be an int in 1..256"),
        ({"causal": "no"}, r"causal='no' must be True or False"),
        ({"multi_head": 1}, r"multi_head=1 must be True or False"),
        ({"text": "   "}, r"text has no words or punctuation"),
        ({"text": None}, r"text must be a string, got NoneType"),
    ],
)
def test_lab_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabConfig(**{"text": SENTENCE, **kwargs})


def test_single_head_ignores_head_sliders():
    cfg = LabConfig(SENTENCE, emb_dim=64, n_heads=6, multi_head=False)  # 6 heads would not divide 64
    assert cfg.heads == 1 and run_lab(cfg).weights.shape == (1, 12, 12)


@pytest.mark.parametrize("n_heads,grid", [(1, (1, 1)), (4, (1, 4)), (6, (2, 3)), (8, (2, 4)), (16, (4, 4))])
def test_plot_heads_axes_titles_labels(n_heads, grid):
    result = run_lab(LabConfig(SENTENCE, emb_dim=48, n_heads=n_heads, n_kv_heads=1 if n_heads > 1 else None,
                               causal=True))
    fig = plot_heads(result.weights, result.tokens, title="Attention", kv_groups=result.kv_groups)
    assert isinstance(fig, Figure)
    heatmaps = _heatmap_axes(fig)
    assert len(heatmaps) == n_heads
    assert len(fig.axes) == n_heads + 1  # plus the one shared colour bar
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == "attention weight" and cbar.get_ylim() == (0.0, 1.0)
    texts = _texts(fig)
    assert "Attention" in texts
    assert [f"head {h} · KV head 0" for h in range(n_heads)] == [t for t in texts if t.startswith("head ")]
    rows, cols = grid
    # query labels on the left column, key labels under the bottom row: every token on both axes
    assert texts.count("cat") == rows + cols
    assert any("masked" in t for t in texts)  # causal zeros are explained
    fig.savefig(io.BytesIO(), format="png")


def test_plot_heads_annotates_small_inputs_only():
    small = run_lab(LabConfig("The cat sat.", n_heads=2, emb_dim=16))
    fig = plot_heads(small.weights, small.tokens)
    values = [t for t in _texts(fig) if t.startswith(".") and len(t) == 3 or t == "1.00"]
    assert len(values) == 2 * 4 * 4
    big = run_lab(LabConfig(" ".join(["word"] * 12), n_heads=2, emb_dim=16))
    assert not [t for t in _texts(plot_heads(big.weights, big.tokens)) if t.startswith(".")]


def test_plot_head_and_steps():
    result = run_lab(LabConfig("The cat sat on the mat .", causal=True))
    fig = plot_head(result.weights[0], result.tokens, title="head 0")
    assert len(_heatmap_axes(fig)) == 1 and "head 0" in _texts(fig)
    steps = result.explain(0)
    fig = plot_steps(steps, result.tokens)
    heatmaps = _heatmap_axes(fig)
    assert len(heatmaps) == 4
    assert [t for t in _texts(fig) if t in {"QKᵀ", "÷ √d_k", "mask", "softmax"}] == ["QKᵀ", "÷ √d_k", "mask", "softmax"]
    texts = _texts(fig)
    assert texts.count("−∞") == 21  # 7 tokens: 21 future cells, written only in the "mask" panel
    mask_image = heatmaps[2].images[0].get_array()
    assert mask_image.mask.sum() == 21  # masked cells drawn as "bad" (grey)
    assert heatmaps[2].images[0].get_cmap().get_bad().tolist() == list(_rgba(MASKED_COLOUR))
    fig.savefig(io.BytesIO(), format="png")


def _rgba(colour: str) -> tuple[float, ...]:
    from matplotlib.colors import to_rgba

    return to_rgba(colour)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w, t: plot_heads(w[0], t), r"weights has shape \(7, 7\); expected \(H, T, T\)"),
        (lambda w, t: plot_heads(w, t[:-1]), r"got 6 tokens for a 7 x 7 attention matrix"),
        (lambda w, t: plot_heads(w, "abc"), r"tokens must be a list of strings"),
        (lambda w, t: plot_heads(w, t, kv_groups=[0]), r"kv_groups must list one KV-head index per query head \(8\)"),
        (lambda w, t: plot_heads(w, t, cmap="nope"), r"cmap='nope' is not a matplotlib colormap"),
        (lambda w, t: plot_heads(w.numpy(), t), r"weights must be a torch.Tensor"),
        (lambda w, t: plot_head(w, t), r"weights has shape \(8, 7, 7\); expected \(T, T\)"),
        (lambda w, t: plot_steps([], t), r"steps must be a non-empty list"),
        (lambda w, t: plot_steps([("a", w[0]), ("b", w[0, :3])], t), r"step 'b' has shape \(3, 7\)"),
        (lambda w, t: plot_steps([w[0]], t), r"each step must be a \(label, tensor\) pair"),
    ],
)
def test_plot_errors(call, match):
    result = run_lab(LabConfig("The cat sat on the mat ."))
    with pytest.raises(ValueError, match=match):
        call(result.weights, result.tokens)
