"""attention.lab and attention.plot: the Attention Lab's maths and figures."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.testing import assert_close

from attention.lab import LabConfig, run_lab, tokenize, toy_embeddings, valid_head_counts
from attention.plot import DPI, FIT_WIDTH, MASKED_COLOUR, plot_head, plot_heads, plot_steps

SENTENCE = "The cat sat on the mat, and the dog barked."


def _texts(fig: Figure) -> list[str]:
    """Every string the figure draws: Text artists, and the batched labels of attention.plot."""
    batched = [s for ax in fig.axes for a in ax.artists if hasattr(a, "get_texts") for s in a.get_texts()]
    return [t.get_text() for ax in fig.axes for t in ax.texts] + batched + [t.get_text() for t in fig.texts]


def _heatmaps(fig: Figure) -> list:
    """The heatmap images, in drawing order (plot_steps' colour bars excluded)."""
    return [im for ax in fig.axes for im in ax.images if not im.get_label().startswith("colour bar")]


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


def _extents(images) -> list[tuple[float, float, float, float]]:
    return [tuple(float(v) for v in im.get_extent()) for im in images]


def _label_boxes(fig: Figure, strings: list[str]) -> list[list]:
    """Display boxes of every batched label artist drawing exactly these strings, after a draw."""
    renderer = fig._get_renderer()
    return [a.get_window_extents(renderer) for ax in fig.axes for a in ax.artists
            if hasattr(a, "get_texts") and a.get_texts() == strings]


@pytest.mark.parametrize("n_heads,grid", [(1, (1, 1)), (4, (1, 4)), (6, (2, 3)), (8, (2, 4)), (16, (4, 4))])
def test_plot_heads_axes_titles_labels(n_heads, grid):
    result = run_lab(LabConfig(SENTENCE, emb_dim=48, n_heads=n_heads, n_kv_heads=1 if n_heads > 1 else None,
                               causal=True))
    fig = plot_heads(result.weights, result.tokens, title="Attention", kv_groups=result.kv_groups)
    assert isinstance(fig, Figure)
    heatmaps = _heatmaps(fig)
    assert [im.get_label() for im in heatmaps] == [f"head {h} · KV head 0" for h in range(n_heads)]
    for h, im in enumerate(heatmaps):
        assert_close(torch.as_tensor(im.get_array().filled(0.0)), result.weights[h])
    # one image per head, all the same size, laid out in a rows x cols grid without overlap
    rows, cols = grid
    boxes = _extents(heatmaps)
    assert len({round(b[0], 6) for b in boxes}) == cols and len({round(b[3], 6) for b in boxes}) == rows
    assert len({(round(b[1] - b[0], 6), round(b[2] - b[3], 6)) for b in boxes}) == 1
    for i, (l1, r1, b1, t1) in enumerate(boxes):
        for l2, r2, b2, t2 in boxes[i + 1:]:
            assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1
    # one shared colour bar, 0..1, in its own Axes
    assert len(fig.axes) == 2 and fig.axes[-1].get_label() == "colour bar"
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == "attention weight" and cbar.get_ylim() == (0.0, 1.0)
    texts = _texts(fig)
    assert "Attention" in texts and "query (attending)" in texts
    assert [f"head {h} · KV head 0" for h in range(n_heads)] == [t for t in texts if t.startswith("head ")]
    # query labels on the left column, key labels under the bottom row: every token on both axes
    assert texts.count("cat") == rows + cols
    assert any("masked" in t for t in texts)  # causal zeros are explained
    fig.savefig(io.BytesIO(), format="png")


def test_plot_heads_labels_sit_on_their_cells():
    result = run_lab(LabConfig(SENTENCE, n_heads=1, multi_head=False))
    fig = plot_heads(result.weights, result.tokens)
    fig.canvas.draw()
    (image,) = _heatmaps(fig)
    box = image.get_window_extent()
    t = len(result.tokens)
    row_h, col_w = box.height / t, box.width / t
    ylabels, xlabels = sorted(_label_boxes(fig, result.tokens), key=lambda boxes: boxes[0].x0)
    for i, lab in enumerate(ylabels):  # right of each query label just left of the image, centred on its row
        assert box.x0 - 8 < lab.x1 <= box.x0
        assert abs((lab.y0 + lab.y1) / 2 - (box.y1 - (i + 0.5) * row_h)) < 0.2 * row_h  # ink, not line, centre
        assert lab.height > 5 or not result.tokens[i].isalnum()  # drawn, and big enough to read ("," is small)
    for j, lab in enumerate(xlabels):  # rotated key labels end under their column
        assert lab.y1 <= box.y0 and abs(lab.x1 - (box.x0 + (j + 0.5) * col_w)) < 0.5 * col_w


def test_plot_heads_annotates_small_inputs_only():
    small = run_lab(LabConfig("The cat sat.", n_heads=2, emb_dim=16))
    fig = plot_heads(small.weights, small.tokens)
    values = [t for t in _texts(fig) if t.startswith(".") and len(t) == 3 or t == "1.00"]
    assert len(values) == 2 * 4 * 4
    big = run_lab(LabConfig(" ".join(["word"] * 12), n_heads=2, emb_dim=16))
    assert not [t for t in _texts(plot_heads(big.weights, big.tokens)) if t.startswith(".")]


def test_plot_heads_32_tokens_8_heads_labels_every_token():
    words = [f"w{i}" for i in range(32)]
    result = run_lab(LabConfig(" ".join(words), n_heads=8))
    fig = plot_heads(result.weights, result.tokens)
    texts = _texts(fig)
    # 32 readable rows make a heatmap ~4 in wide: 2 columns x 4 rows fit the app's plot column, 4 x 2 would not
    assert all(texts.count(w) == 4 + 2 for w in words)  # 4 rows of query labels, 2 columns of key labels
    boxes = _extents(_heatmaps(fig))
    assert len(boxes) == 8 and len({b[0] for b in boxes}) == 2 and len({b[3] for b in boxes}) == 4


def _ink_boxes(fig: Figure) -> list[tuple[str, float, object]]:
    """(string, font size in pt, display box) of every string the figure draws (batched labels and Text)."""
    fig.canvas.draw()
    renderer = fig._get_renderer()
    out = []
    for ax in fig.axes:
        for a in ax.artists:
            if hasattr(a, "get_texts"):
                out += [(s, a._style[0], box) for s, box in zip(a.get_texts(), a.get_window_extents(renderer))]
        lo, hi = ax.get_ylim()
        ticks = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi]  # the ones drawn
        for t in [*ax.texts, *([*ticks, ax.yaxis.label] if ax.axison else [])]:  # the colour bar
            if t.get_visible() and t.get_text():
                out.append((t.get_text(), t.get_fontsize(), t.get_window_extent(renderer)))
    return out


def _overlap(a, b) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


LONG = ("The teacher wrote a short sentence on the board , and every student in the room watched how "
        "internationalization looked back at the WWWWWWWWWWWWWWWW before it while the heads of attention lit up")


@pytest.mark.parametrize("n_tokens", [8, 16, 32])
@pytest.mark.parametrize("n_heads", [1, 4, 8, 16])
def test_labels_readable_unclipped_and_apart(n_tokens, n_heads):
    # A projector or a laptop: every string at least 7 pt, i.e. ~8 px at the figure's dpi, where
    # 5 pt (~5.5 px) used to be unreadable at 32 tokens; inside the figure, not on top of another;
    # and the PNG no wider than the app's plot column, which would shrink it (and its labels) again.
    tokens = LONG.split()[:n_tokens]
    result = run_lab(LabConfig(" ".join(tokens), emb_dim=64, n_heads=n_heads, n_kv_heads=n_heads, causal=True,
                               multi_head=n_heads > 1))
    figures = [plot_heads(result.weights, result.tokens, title=f"{n_heads} heads"),
               plot_heads(result.weights * 0.3, result.tokens, vmax=None),  # the model's maps: longer colour bar label
               plot_head(result.weights[0], tokens)]
    if n_heads == 1:
        figures.append(plot_steps(result.explain(0), tokens))
    for fig in figures:
        width, height = fig.canvas.get_width_height()
        assert width <= FIT_WIDTH * DPI
        boxes = _ink_boxes(fig)
        labels = [(s, box) for s, size, box in boxes if s in tokens or s.endswith("…")]
        assert len(labels) >= 2 * n_tokens
        assert min(size for _, size, _ in boxes) * DPI / 72 >= 7.7  # 7 pt
        # the ink itself: a token with a capital and a descender ("The"/"teacher") is at least 7 px tall
        assert min(box.height for s, box in labels if s in {"The", "teacher"}) >= 7
        for s, _, box in boxes:
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (s, box)
        for i, (s1, box1) in enumerate(labels):
            for s2, box2 in labels[i + 1:]:
                # rotated key labels' boxes overlap as boxes; query labels and their row neighbours must not
                if box1.height < 12 and box2.height < 12:
                    assert not _overlap(box1, box2), (s1, s2)
        if n_tokens == 32:  # long words cut: "internationalization", "WWWWWWWWWWWWWWWW" (the widest glyphs)
            texts = set(_texts(fig))
            assert {"internation…", "WWWWWWWWWWW…"} <= texts and "internationalization" not in texts


def test_plot_steps_two_rows_when_four_panels_would_not_fit():
    result = run_lab(LabConfig(" ".join(LONG.split()[:32]), causal=True))
    fig = plot_steps(result.explain(0), result.tokens)
    boxes = _extents(_heatmaps(fig))  # QKᵀ ÷√d_k on top, mask softmax under them
    assert boxes[0][3] == boxes[1][3] < boxes[2][3] == boxes[3][3]
    assert boxes[0][0] == boxes[2][0] < boxes[1][0] == boxes[3][0]
    assert fig.canvas.get_width_height()[0] <= FIT_WIDTH * DPI
    small = run_lab(LabConfig("The cat sat on the mat .", causal=True))
    assert len({b[3] for b in _extents(_heatmaps(plot_steps(small.explain(0), small.tokens)))}) == 1  # one row


def test_grid_and_steps_share_label_bitmaps():
    # the first update after typing a new sentence draws each token's bitmaps once, for both figures
    from attention.canvas import _bitmap

    result = run_lab(LabConfig("Zyxal qwopper frindle snorb " * 8, n_heads=8))
    _bitmap.cache_clear()
    for fig in (plot_heads(result.weights, result.tokens), plot_steps(result.explain(0), result.tokens)):
        fig.savefig(io.BytesIO(), format="png")
    keys = _bitmap_keys(_bitmap)  # (word, size, rotation) drawn: one size, upright (queries) and slanted (keys)
    assert len(keys) == 8 and {(w, r) for w, _, r in keys} == {(w, r) for w in ("Zyxal", "qwopper", "frindle", "snorb")
                                                              for r in (0.0, 60.0)}


def _bitmap_keys(cached) -> list[tuple]:
    # functools.lru_cache keeps no public key list; probe with the sizes the module may use
    from attention.canvas import label_size as _label_size

    keys = []
    for size in {_label_size(t) for t in range(1, 65)}:
        for text in ("Zyxal", "qwopper", "frindle", "snorb"):
            for style in ((0.0, "right", "center", "default"), (60.0, "right", "top", "anchor")):
                before = cached.cache_info().hits
                cached(text, size, *style, float(DPI))
                if cached.cache_info().hits > before:
                    keys.append((text, size, style[0]))
    return keys


def test_png_is_lossless_and_faster_to_encode():
    # gr.Plot's bare savefig(format="png"): zlib level 3 (FLEVEL 1 in the zlib header), same pixels as level 6
    result = run_lab(LabConfig(SENTENCE, n_heads=4))
    fast, default = io.BytesIO(), io.BytesIO()
    plot_heads(result.weights, result.tokens).savefig(fast, format="png")
    plot_heads(result.weights, result.tokens).savefig(default, format="png", pil_kwargs={"compress_level": 6})

    def flevel(png: bytes) -> int:
        return png[png.index(b"IDAT") + 5] >> 6

    assert (flevel(fast.getvalue()), flevel(default.getvalue())) == (1, 2)
    assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(default)))


def test_plot_head_and_steps():
    result = run_lab(LabConfig("The cat sat on the mat .", causal=True))
    fig = plot_head(result.weights[0], result.tokens, title="head 0")
    assert len(_heatmaps(fig)) == 1 and "head 0" in _texts(fig)
    steps = result.explain(0)
    fig = plot_steps(steps, result.tokens)
    heatmaps = _heatmaps(fig)
    assert [im.get_label() for im in heatmaps] == ["QKᵀ", "÷ √d_k", "mask", "softmax"]
    for im, (_, mat) in zip(heatmaps, steps):
        assert im.get_array().shape == mat.shape
    texts = _texts(fig)
    assert [t for t in texts if t in {"QKᵀ", "÷ √d_k", "mask", "softmax"}] == ["QKᵀ", "÷ √d_k", "mask", "softmax"]
    assert texts.count("−∞") == 21  # 7 tokens: 21 future cells, written only in the "mask" panel
    mask_image = heatmaps[2].get_array()
    assert mask_image.mask.sum() == 21  # masked cells drawn as "bad" (grey)
    assert heatmaps[2].get_cmap().get_bad().tolist() == list(_rgba(MASKED_COLOUR))
    # a colour bar under every panel, on that panel's scale: symmetric around 0 for scores, 0..1 for softmax
    strips = [im for ax in fig.axes for im in ax.images if im.get_label().startswith("colour bar")]
    assert [im.get_label() for im in strips] == [f"colour bar: {label}" for label, _ in steps]
    for strip, im in zip(strips, heatmaps):
        assert (strip.norm.vmin, strip.norm.vmax) == (im.norm.vmin, im.norm.vmax)
    assert strips[0].norm.vmin == -strips[0].norm.vmax and (strips[3].norm.vmin, strips[3].norm.vmax) == (0, 1)
    assert "0" in texts and "1" in texts  # tick labels
    png = io.BytesIO()
    fig.savefig(png, format="png")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    grey = np.all(pixels == np.round(np.array(_rgba(MASKED_COLOUR)[:3]) * 255), axis=-1)
    assert grey.sum() > 21 * 4 * 50  # masked cells of the mask and softmax panels really are grey


@pytest.mark.parametrize("kw", [{"ha": "right", "va": "center"}, {"va": "bottom", "size": 12},
                                {"ha": "right", "va": "top", "rotation": 60, "rotation_mode": "anchor"},
                                {"rotation": 90}])
def test_batched_labels_draw_what_text_draws(kw):
    from attention.canvas import Labels as _Labels

    def render(batched: bool) -> np.ndarray:
        fig = Figure(figsize=(2.0, 1.5), dpi=80)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        style = {"size": 9, **kw}
        if batched:
            ax.add_artist(_Labels([(0.513, 0.47)], ["sentence"], ax.transAxes, **style))
        else:
            ax.text(0.513, 0.47, "sentence", transform=ax.transAxes, fontsize=style.pop("size"), **style)
        png = io.BytesIO()
        fig.savefig(png, format="png")
        return np.asarray(Image.open(png).convert("L"), dtype=float)

    text, batched = render(False), render(True)
    ink_t, ink_b = np.argwhere(text < 160), np.argwhere(batched < 160)
    assert len(ink_t) > 20
    assert np.abs(ink_t.min(0) - ink_b.min(0)).max() <= 1 and np.abs(ink_t.max(0) - ink_b.max(0)).max() <= 1
    assert np.abs(text - batched).mean() < 2.0


def test_plot_vector_output_keeps_the_text():
    result = run_lab(LabConfig("The cat sat on the mat .", causal=True))
    heads = plot_heads(result.weights, result.tokens, title="Attention")
    steps = plot_steps(result.explain(0), result.tokens)
    # Every token labels the axes, and each figure's own words are there as text, not paths.
    wanted = {heads: ["Attention", "query (attending)", "attention weight", *(f"head {h}" for h in range(8))],
              steps: ["QKᵀ", "÷ √d_k", "mask", "softmax", "−∞"]}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for fig, words in wanted.items():
            svg = io.StringIO()
            fig.savefig(svg, format="svg")
            texts = set(re.findall(r">([^<>]+)</text>", svg.getvalue()))
            missing = [w for w in [*result.tokens, *words] if w not in texts]
            assert not missing, missing
    fig = plot_heads(result.weights, result.tokens)
    fig.savefig(io.BytesIO(), format="pdf")


def test_plot_is_safe_for_concurrent_users():
    sentences = [SENTENCE, "Colourless green ideas sleep furiously .", "A B C D", "the the the cat"]

    def draw(text: str) -> bytes:
        result = run_lab(LabConfig(text, n_heads=4, causal=True))
        png = io.BytesIO()
        plot_heads(result.weights, result.tokens, title=text).savefig(png, format="png")
        return png.getvalue()

    alone = [draw(s) for s in sentences]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, sentences * 3))
    assert together == alone * 3


def _rgba(colour: str) -> tuple[float, ...]:
    from matplotlib.colors import to_rgba

    return to_rgba(colour)


def test_plot_heads_auto_scale_follows_the_largest_weight():
    # A real model's rows can give most of their mass to a hidden <bos>: with vmax=None the scale
    # ends at the largest weight shown instead of 1, so the structure stays visible.
    result = run_lab(LabConfig("The cat sat on the mat .", causal=True))
    faint = result.weights * 0.3
    fixed, auto = plot_heads(faint, result.tokens), plot_heads(faint, result.tokens, vmax=None)
    assert fixed.axes[-1].get_ylim() == (0.0, 1.0)
    assert auto.axes[-1].get_ylim()[1] == pytest.approx(float(faint.max()))
    assert "largest shown" in auto.axes[-1].get_ylabel()
    assert plot_head(faint[0], result.tokens, vmax=None).axes[-1].get_ylim()[1] == pytest.approx(float(faint[0].max()))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w, t: plot_heads(w[0], t), r"weights has shape \(7, 7\); expected \(H, T, T\)"),
        (lambda w, t: plot_heads(w, t[:-1]), r"got 6 tokens for a 7 x 7 attention matrix"),
        (lambda w, t: plot_heads(w, "abc"), r"tokens must be a list of strings"),
        (lambda w, t: plot_heads(w, t, kv_groups=[0]), r"kv_groups must list one KV-head index per query head \(8\)"),
        (lambda w, t: plot_heads(w, t, cmap="nope"), r"cmap='nope' is not a matplotlib colormap"),
        (lambda w, t: plot_heads(w, t, vmax=0), r"vmax=0 must be a positive number, or None"),
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
