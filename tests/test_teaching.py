"""Teaching depth: every layer at once, heads switched off, what a reply looked at, downloads.

The model tests use the real default model in NF4 (the `lm4` fixture). References are
independent of the code under test where possible: transformers' eager attention for the maps,
a forward pre-hook on o_proj for the ablation, `model.generate` for greedy continuations.
"""

from __future__ import annotations

import csv
import io
import threading
import time

import pytest
import torch
from matplotlib.figure import Figure
from torch.testing import assert_close

from attention.plot import (
    FIT_WIDTH,
    figure_bytes,
    model_view_cell,
    model_view_cells,
    plot_model_view,
    plot_token_attention,
    weights_csv,
)
from generation import build_prompt
from generation.sampling import SamplingParams
from generation.backends import ChatEngine
from generation.inside import (
    REPLY_MAX_TOKENS,
    capture,
    model_attention,
    ablate_heads,
    check_heads,
    format_heads,
    head_in_every_layer,
    heads_of_layer,
    model_view,
    parse_heads,
    reply_attention,
)

TEXT = "The quick brown fox jumps over the lazy dog. It was five o'clock."
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def ids_of(lm, text: str) -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt").input_ids  # (1, T)


def plain_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()  # (V,)


def greedy_tokens(lm, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def eager_layer(lm, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """transformers' own eager attention weights of one layer (H, T, T), float32 (reference only)."""
    model = lm.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    return out.attentions[layer][0].float()


class ForwardCounter:
    """Counts top-level forward calls of a model (a hook on the model itself, not its layers)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ---------------------------------------------------------------------------------------------
# 1. Model view


def test_model_view_is_one_forward_and_equals_model_attention(lm4):
    with ForwardCounter(lm4.model) as counter:
        mv = model_view(lm4, TEXT)
    assert counter.calls == 1  # every layer from one forward pass, not one per layer
    t = len(ids_of(lm4, TEXT)[0]) - 1  # <bos> hidden
    assert mv.shape == (18, 4, t, t) and mv.n_layers == 18 and mv.n_heads == 4
    assert mv.hidden_tokens == ["<bos>"] and mv.hidden_mass.shape == (18, 4, t)
    for layer in range(18):
        ma = model_attention(lm4, TEXT, layer=layer)
        assert ma.tokens == mv.tokens and ma.token_ids == mv.token_ids
        assert_close(mv.weights[layer], ma.weights, atol=0, rtol=0, msg=f"layer {layer}")
        assert_close(mv.hidden_mass[layer], ma.hidden_mass, atol=0, rtol=0)
        assert torch.equal(mv.head(layer, 2), ma.weights[2])


def test_model_view_equals_transformers_eager_attention(lm4):
    mv = model_view(lm4, TEXT, hide_special=False)
    ids = ids_of(lm4, TEXT)
    for layer in (0, 5, 17):
        assert_close(mv.weights[layer], eager_layer(lm4, ids, layer), atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_tokens", [2, 9, 64])
def test_model_view_rows_sum_to_one_or_hidden_share(lm4, max_tokens):
    text = " ".join(["word"] * 80)
    full = model_view(lm4, text, max_tokens=max_tokens, hide_special=False)
    t = min(max_tokens, len(ids_of(lm4, text)[0]))
    assert full.shape == (18, 4, t, t) and full.capped and f"first {max_tokens}" in full.notice
    # bf16 probabilities (the 4-bit model computes in bf16): each rounded to 8 significant bits
    assert_close(full.weights.sum(-1), torch.ones(18, 4, t), atol=2e-2, rtol=0)
    assert (torch.triu(full.weights, diagonal=1) == 0).all()  # causal: nothing from the future
    shown = model_view(lm4, text, max_tokens=max_tokens)
    assert shown.shape == (18, 4, t - 1, t - 1)
    assert_close(shown.weights.sum(-1) + shown.hidden_mass, torch.ones(18, 4, t - 1), atol=2e-2, rtol=0)
    assert_close(shown.hidden_mass, full.weights[:, :, 1:, 0])


def test_model_view_labels_and_layer_kinds(lm4):
    mv = model_view(lm4, "The cat sat on the mat.")
    assert [i for i, k in enumerate(mv.layer_kinds) if k == "global"] == [5, 11, 17]
    labels = mv.layer_labels()
    assert labels[0] == "L0 (sliding)" and labels[5] == "L5 (global)" and len(labels) == 18
    assert mv.head_labels() == [f"head {h} · KV 0" for h in range(4)] and mv.kv_groups == [0, 0, 0, 0]
    assert mv.window == 512 and "512" in mv.notice and "<bos>" in mv.notice
    assert mv.describe(5, 2) == "layer 5 (global) · head 2 · reads KV head 0"
    assert "sliding window 512" in mv.describe(0, 0)
    assert not mv.capped and mv.tokens[0] == "The"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "empty"),
        ({"text": None}, "string"),
        ({"text": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text": "hi", "max_tokens": 65}, "max_tokens"),
    ],
)
def test_model_view_bad_input(lm4, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_view(lm4, **kwargs)


def test_model_view_head_lookup_is_checked(lm4):
    mv = model_view(lm4, "Hello there")
    with pytest.raises(ValueError, match="layer"):
        mv.head(18, 0)
    with pytest.raises(ValueError, match="head"):
        mv.head(0, 4)


def _random_maps(n_layers: int, n_heads: int, t: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layers, n_heads, t, t, generator=gen)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)  # (L, H, T, T), causal rows summing to 1


@pytest.mark.parametrize(("n_layers", "n_heads", "t"), [(1, 1, 1), (3, 2, 8), (18, 4, 64), (36, 16, 8)])
@pytest.mark.parametrize("scale", ["each", "shared"])
def test_plot_model_view_grid_and_click_mapping(n_layers, n_heads, t, scale):
    weights = _random_maps(n_layers, n_heads, t)
    kinds = ["global" if i % 6 == 5 else "sliding" for i in range(n_layers)]
    fig = plot_model_view(weights, layer_kinds=kinds, title="every layer", scale=scale, selected=(0, 0))
    assert isinstance(fig, Figure)
    width, height = fig.get_size_inches()
    assert width <= FIT_WIDTH
    cells = model_view_cells(fig)
    assert sorted(cells) == [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    png = figure_bytes(fig, "png")
    from PIL import Image

    w_px, h_px = Image.open(io.BytesIO(png)).size
    assert abs(w_px - width * fig.dpi) <= 1 and abs(h_px - height * fig.dpi) <= 1  # Agg truncates to whole pixels
    for (layer, head), (x0, y0, x1, y1) in cells.items():
        assert 0 <= x0 < x1 <= w_px and 0 <= y0 < y1 <= h_px
        assert model_view_cell(fig, (x0 + x1) / 2, (y0 + y1) / 2) == (layer, head)
    assert model_view_cell(fig, 1, 1) is None  # the corner is a label margin, not a thumbnail
    x0, y0, x1, y1 = cells[n_layers - 1, 0]
    assert model_view_cell(cells, x0 + 1, y1 - 1) == (n_layers - 1, 0)  # the plain dict a UI keeps works too
    doubled = model_view_cells(fig, dpi=2 * fig.dpi)  # an image saved at twice the dpi
    assert model_view_cell(fig, 2 * x0 + 2, 2 * y1 - 2, dpi=2 * fig.dpi) == (n_layers - 1, 0)
    assert doubled[n_layers - 1, 0] == pytest.approx((2 * x0, 2 * y0, 2 * x1, 2 * y1))
    # Thumbnails do not overlap: layers go down, heads go right.
    if n_layers > 1:
        assert cells[1, 0][1] > cells[0, 0][3]
    if n_heads > 1:
        assert cells[0, 1][0] > cells[0, 0][2]
    # The image of each thumbnail is that (layer, head)'s map (scaled per thumbnail for "each").
    images = {im.get_gid(): im for im in fig.axes[0].get_images() if im.get_gid()}
    data = images[f"model-view-cell:{n_layers - 1}:{n_heads - 1}"].get_array()
    expected = weights[-1, -1].numpy()
    if scale == "each":
        expected = expected / expected.max()
    assert abs(data.filled(0.0) - expected).max() < 1e-6
    assert (data.mask == (weights[-1, -1] == 0).numpy()).all()  # masked (future) cells are grey


def test_plot_model_view_default_size_is_readable():
    fig = plot_model_view(_random_maps(18, 4, 64), layer_kinds=["sliding"] * 18)
    x0, y0, x1, y1 = model_view_cells(fig)[0, 0]
    assert x1 - x0 >= 60  # ~one pixel per token at 64 tokens
    w, h = fig.get_size_inches() * fig.dpi
    assert w <= 500 and h <= 1500
    labels = [t for a in fig.axes[0].artists for t in getattr(a, "get_texts", list)()]
    assert "L5 (sliding)" in labels and "head 3" in labels


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.rand(4, 3, 3),), {}, r"\(L, H, T, S\)"),
        ((torch.rand(2, 1, 4, 3),), {}, "queries"),
        ((torch.rand(2, 1, 3, 3),), {"layer_kinds": ["global"]}, "one kind per layer"),
        ((torch.rand(2, 1, 3, 3),), {"head_labels": "h"}, "one label per head"),
        ((torch.rand(2, 1, 3, 3),), {"scale": "log"}, "scale"),
        ((torch.rand(2, 1, 3, 3),), {"thumb": 0}, "thumb"),
        ((torch.rand(2, 1, 3, 3),), {"selected": (2, 0)}, "selected"),
        ((torch.rand(2, 1, 3, 3),), {"cmap": "nope"}, "colormap"),
    ],
)
def test_plot_model_view_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_model_view(*args, **kwargs)


def test_model_view_cells_needs_a_model_view_figure():
    from attention.plot import plot_head

    with pytest.raises(ValueError, match="plot_model_view"):
        model_view_cells(plot_head(torch.eye(3), ["a", "b", "c"]))
    with pytest.raises(ValueError, match="Figure"):
        model_view_cell("not a figure", 0, 0)


# ---------------------------------------------------------------------------------------------
# 2. Switching heads off: the pure parts


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("3:1", ((3, 1),)),
        ("3:1, 5:0", ((3, 1), (5, 0))),
        ("5:0;3:1 3:1", ((3, 1), (5, 0))),  # any separator, duplicates merged, sorted
        ("3 : 1 ,5/0", ((3, 1), (5, 0))),
        ("2:*", ((2, 0), (2, 1), (2, 2))),
        ("*:1", tuple((lay, 1) for lay in range(6))),
        ("*:*", tuple((lay, h) for lay in range(6) for h in range(3))),
    ],
)
def test_parse_heads(spec, expected):
    assert parse_heads(spec, 6, 3) == expected  # 6 layers of 3 heads
    assert parse_heads(format_heads(expected), 6, 3) == expected  # format_heads round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3", "cannot read '3'"),
        ("3:1:2", "cannot read"),
        ("a:b", "cannot read"),
        ("-1:0", "cannot read"),
        ("4:0", "layer 4 does not exist: this model has 4 layers, 0 to 3"),
        ("0:3", r"head 3 \(in layer 0\) does not exist: each layer has 3 heads, 0 to 2"),
        (None, "must be text"),
    ],
)
def test_parse_heads_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_heads(spec, 4, 3)


@pytest.mark.parametrize(("n_layers", "n_heads"), [(1, 1), (4, 3), (18, 4)])
def test_presets(n_layers, n_heads):
    last = n_layers - 1
    assert heads_of_layer(last, n_layers, n_heads) == tuple((last, h) for h in range(n_heads))
    assert head_in_every_layer(n_heads - 1, n_layers, n_heads) == tuple((lay, n_heads - 1) for lay in range(n_layers))
    assert heads_of_layer(0, n_layers, n_heads) == parse_heads("0:*", n_layers, n_heads)
    with pytest.raises(ValueError, match=f"{n_layers} layers"):
        heads_of_layer(n_layers, n_layers, n_heads)
    with pytest.raises(ValueError, match=f"{n_heads} heads"):
        head_in_every_layer(n_heads, n_layers, n_heads)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ("3:1", "parse_heads"),
        ([(1,)], "pair"),
        ([(1.0, 0)], "integers"),
        ([(True, 0)], "integers"),
        ([(0, -1)], "head -1"),
    ],
)
def test_check_heads_errors(heads, message):
    with pytest.raises(ValueError, match=message):
        check_heads(heads, 4, 3)


def test_ablate_block_is_per_thread_validated_and_reset():
    with pytest.raises(ValueError, match="non-negative"):
        with capture.ablate([(0, -1)]):
            pass
    with pytest.raises(ValueError, match="pairs"):
        with capture.ablate("0:1"):
            pass
    seen = {}
    with capture.ablate({2: [1, 0], 3: (2,)}) as ablation:
        assert ablation == {2: (0, 1), 3: (2,)}
        with pytest.raises(RuntimeError, match="nested"):
            with capture.ablate([(0, 0)]):
                pass
        other = threading.Thread(target=lambda: seen.setdefault("other", capture.ablated_heads(2)))
        other.start()
        other.join()
        assert capture.ablated_heads(2) == (0, 1)
    assert seen["other"] == ()  # another thread never sees this thread's ablation
    assert capture.ablated_heads(2) == ()
    with pytest.raises(KeyError):
        with capture.ablate([(1, 1)]):
            raise KeyError("boom")
    assert capture.ablated_heads(1) == ()  # reset even when the block raised


# ---------------------------------------------------------------------------------------------
# 2. Switching heads off in the real model


def test_no_head_switched_off_is_the_plain_model(lm4):
    ab = ablate_heads(lm4, PROMPT, [], k=5, new_tokens=6)
    assert ab.heads == () and ab.spec == "" and "No head" in ab.notice
    assert ab.kl_plain_to_ablated == 0.0 and not ab.top1_changed
    assert ab.continuation_plain_ids == ab.continuation_ablated_ids
    assert all(r.p_plain == r.p_ablated and r.rank_plain == r.rank_ablated for r in ab.rows)
    # ... and both equal a forward with no ablation machinery at all, as does an empty ablate block
    logits = plain_logits(lm4, ids_of(lm4, PROMPT))
    with capture.ablate([]):
        assert torch.equal(plain_logits(lm4, ids_of(lm4, PROMPT)), logits)
    probs = logits.double().softmax(-1)
    for r in ab.rows:
        assert r.p_plain == pytest.approx(float(probs[r.token_id]), abs=1e-7)
    assert [r.rank_plain for r in ab.rows] == [1, 2, 3, 4, 5]
    # the greedy continuation is what generate() writes
    assert ab.continuation_plain_ids == greedy_tokens(lm4, ids_of(lm4, PROMPT), 6)
    assert ab.continuation_plain == lm4.tokenizer.decode(ab.continuation_plain_ids, skip_special_tokens=True)


def _reference_ablated_logits(lm, ids, pairs) -> torch.Tensor:
    """Independent of the dispatcher: forward pre-hooks on o_proj zero the heads' input columns."""
    modules = capture.attention_modules(lm.model)
    d = modules[0].head_dim
    handles = []
    by_layer: dict[int, list[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    for layer, heads in by_layer.items():
        def zero(_module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d:(h + 1) * d] = 0
            return (x,)

        handles.append(modules[layer].o_proj.register_forward_pre_hook(zero))
    try:
        return plain_logits(lm, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("spec", ["3:1", "0:*, 5:2", "*:0"])
def test_switching_heads_off_equals_zeroing_o_proj_input(lm4, spec):
    pairs = parse_heads(spec, 18, 4)
    ab = ablate_heads(lm4, PROMPT, pairs, k=10, new_tokens=4)
    assert ab.heads == pairs and ab.spec == format_heads(pairs)
    ref = _reference_ablated_logits(lm4, ids_of(lm4, PROMPT), pairs).double().softmax(-1)
    for r in ab.rows:
        assert r.p_ablated == pytest.approx(float(ref[r.token_id]), abs=1e-6)
    assert ab.kl_plain_to_ablated > 1e-4  # switching heads off changes the distribution
    assert any(abs(r.p_plain - r.p_ablated) > 1e-3 for r in ab.rows)
    assert ab.top1_changed == (min(ab.rows, key=lambda r: r.rank_ablated).rank_plain != 1)
    top_ablated = min(ab.rows, key=lambda r: r.rank_ablated)
    assert ab.continuation_ablated_ids[0] == top_ablated.token_id  # greedy takes the top-ranked token
    assert len(ab.continuation_ablated_ids) == 4 or ab.continuation_ablated_ids[-1] == lm4.tokenizer.eos_token_id


def test_o_proj_input_of_switched_off_heads_is_zero(lm4):
    modules = capture.attention_modules(lm4.model)
    d = modules[0].head_dim
    pairs = ((3, 1), (5, 0), (5, 2))
    seen: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def recorder(layer):
        def hook(_module, args):
            ablating = capture.active_ablation() is not None  # this thread, now
            seen.setdefault((layer, ablating), []).append(args[0].detach().clone())
        return hook

    handles = [modules[layer].o_proj.register_forward_pre_hook(recorder(layer)) for layer in (3, 5, 6)]
    try:
        ablate_heads(lm4, PROMPT, pairs, new_tokens=3)
    finally:
        for handle in handles:
            handle.remove()
    for (layer, ablating), inputs in seen.items():
        off = [h for lay, h in pairs if lay == layer] if ablating else []
        assert len(inputs) == 3  # prefill + 2 decode steps, each way
        for x in inputs:  # (1, T, H * d)
            for h in range(4):
                cols = x[..., h * d:(h + 1) * d]
                if h in off:
                    assert (cols == 0).all(), (layer, h)
                else:
                    assert cols.abs().sum() > 0, (layer, h)
    assert {key for key in seen} == {(3, False), (3, True), (5, False), (5, True), (6, False), (6, True)}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("inside_capture", [False, True], ids=["delegate", "captured"])
def test_ablation_on_every_attention_path(tiny_qwen_dir, impl, inside_capture):
    """Both ways the dispatcher computes attention (delegating to sdpa/eager, or the project's own code
    inside a capture block) zero the same o_proj input, on a grouped-query model (4 heads, 2 KV heads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation.model import LoadedModel

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, attn_implementation=impl).eval()
    assert capture.install(model)
    lm = LoadedModel(model, AutoTokenizer.from_pretrained(tiny_qwen_dir), "tiny", "cpu", "float32", "none", 0, 0, 0.0,
                     True)
    ids = ids_of(lm, "The capital of France is Paris.")
    pairs = ((0, 1), (1, 0), (1, 3))
    ref = _reference_ablated_logits(lm, ids, pairs)
    with capture.ablate(pairs):
        if inside_capture:
            with capture.capture() as captured:
                ours = plain_logits(lm, ids)
            assert sorted(captured) == [0, 1]  # the maps are still recorded while heads are off
        else:
            ours = plain_logits(lm, ids)
    assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - plain_logits(lm, ids)).abs().max() > 1e-4


def test_ablation_in_one_thread_leaves_another_threads_reply_identical(lm4, request):
    """A real chat (the chat engine, greedy, its own loop thread) while this thread switches heads off."""
    params = SamplingParams(temperature=0, max_new_tokens=20)
    engine = ChatEngine(lm4, max_batch=2, fast=False)  # the model's own forward, as the ablation's
    request.addfinalizer(engine.close)

    def chat_reply_text() -> str:
        return list(engine.stream_reply("Explain self-attention in one paragraph.", params=params))[-1]

    reference = chat_reply_text()
    solo = ablate_heads(lm4, PROMPT, heads_of_layer(0, 18, 4), new_tokens=3)
    assert solo.kl_plain_to_ablated > 1e-3  # this ablation matters a lot: a leak would show

    out: dict[str, object] = {}
    started, done = threading.Event(), threading.Event()

    def chat():
        try:
            started.set()
            out["reply"] = chat_reply_text()
        finally:
            out["chat_end"] = time.perf_counter()
            done.set()

    results = []
    thread = threading.Thread(target=chat)
    thread.start()
    started.wait(10)
    first_start = time.perf_counter()
    while not done.is_set() or not results:
        results.append(ablate_heads(lm4, PROMPT, heads_of_layer(0, 18, 4), new_tokens=3))
    thread.join(120)
    assert not thread.is_alive()
    assert first_start < out["chat_end"]  # the first ablation started while the chat was generating
    assert out["reply"] == reference  # the chat's greedy reply: as if nobody switched anything off
    for r in results:  # and the ablation itself is unaffected by the chat
        assert r.continuation_ablated_ids == solo.continuation_ablated_ids
        assert r.kl_plain_to_ablated == pytest.approx(solo.kl_plain_to_ablated, abs=1e-9)
    # nothing is left switched off afterwards, in this thread either
    assert chat_reply_text() == reference


def test_ablation_accepts_a_chat_prompt_and_caps(lm4):
    prompt = build_prompt(lm4.tokenizer, QUESTION)
    ab = ablate_heads(lm4, prompt, [(1, 1)], new_tokens=2)
    assert ab.prompt_tokens == prompt.input_ids.shape[1] and not ab.capped
    capped = ablate_heads(lm4, prompt.input_ids, [(1, 1)], new_tokens=1, max_tokens=8)
    assert capped.capped and capped.prompt_tokens == 8 and "last 8" in capped.notice
    assert len(capped.continuation_plain_ids) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": [(18, 0)]}, "layer 18 does not exist: this model has 18 layers, 0 to 17"),
        ({"heads": [(0, 4)]}, "each layer has 4 heads, 0 to 3"),
        ({"heads": "3:1"}, "parse_heads"),
        ({"heads": [], "k": 0}, "k must be"),
        ({"heads": [], "new_tokens": 0}, "new_tokens"),
        ({"heads": [], "new_tokens": 65}, "new_tokens"),
        ({"heads": [], "prompt": " "}, "empty"),
    ],
)
def test_ablation_bad_input(lm4, kwargs, message):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=message):
        ablate_heads(lm4, **kwargs)


# ---------------------------------------------------------------------------------------------
# 3. What did it look at while writing?


@pytest.fixture(scope="module")
def chat_reply(lm4):
    """A real greedy chat reply: (Prompt, the reply as the chat shows it, the ids the model generated)."""
    prompt = build_prompt(lm4.tokenizer, QUESTION)
    with ChatEngine(lm4, max_batch=1) as engine:
        reply = list(engine.stream_reply(QUESTION, params=SamplingParams(temperature=0)))[-1]
    generated = greedy_tokens(lm4, prompt.input_ids, 24)
    return prompt, reply, generated


def test_reply_tokens_are_the_ones_the_model_wrote(lm4, chat_reply):
    prompt, reply, generated = chat_reply
    assert reply and not reply[0].isspace()  # the chat strips the leading space the model wrote
    ra = reply_attention(lm4, prompt, reply, layer=0)
    n = len(ra.reply_tokens)
    assert ra.reply_start == prompt.input_ids.shape[1]
    assert ra.token_ids[: ra.reply_start] == prompt.input_ids[0].tolist()
    assert ra.token_ids[ra.reply_start:] == generated[:n]  # same tokens, same positions as while writing
    assert "".join(lm4.tokenizer.decode(ra.token_ids[ra.reply_start:])).strip() == reply


@pytest.mark.parametrize("layer", [0, 5, 17])
def test_writing_rows_equal_the_full_maps_rows(lm4, chat_reply, layer):
    prompt, reply, _ = chat_reply
    ra = reply_attention(lm4, prompt, reply, layer=layer)
    ids = torch.tensor([ra.token_ids])
    t = ids.shape[1]
    # model_attention on the same text reads the same tokens (checked), so its map is the reference
    text = lm4.tokenizer.decode(ra.token_ids[1:])
    ma = model_attention(lm4, text, layer=layer, max_tokens=256, hide_special=False)
    assert ma.token_ids == ra.token_ids
    assert_close(ra.weights, ma.weights, atol=0, rtol=0)
    eager = eager_layer(lm4, ids, layer)
    for r in range(len(ra.reply_tokens)):
        p = ra.reply_start + r
        assert_close(ra.rows[r], ma.weights[:, p - 1, :], atol=0, rtol=0)  # the pass that wrote token p
        assert_close(ra.rows[r], eager[:, p - 1, :], atol=1e-6, rtol=0)
        assert (ra.rows[r, :, p:] == 0).all()  # nothing at or after the token being written
        assert ra.context(r) == p
        assert_close(ra.row(r), ma.weights[:, p - 1, :p].mean(0))
        assert_close(ra.row(r, head=3), ma.weights[3, p - 1, :p])
    assert_close(ra.rows.sum(-1), torch.ones(len(ra.reply_tokens), 4), atol=2e-2, rtol=0)
    assert ra.mean.shape == (len(ra.reply_tokens), t)
    assert ra.layer_kind == ("global" if layer in (5, 17) else "sliding")


def test_reading_mode_rows_are_the_reply_tokens_own(lm4, chat_reply):
    prompt, reply, _ = chat_reply
    ra = reply_attention(lm4, prompt, reply, layer=3, mode="reading")
    for r in range(len(ra.reply_tokens)):
        p = ra.reply_start + r
        assert_close(ra.rows[r], ra.weights[:, p, :], atol=0, rtol=0)
        assert ra.context(r) == p + 1 and ra.row(r).shape == (p + 1,)


@pytest.mark.parametrize("reply_form", ["ids", "tensor", "text with space"])
def test_reply_as_ids_or_text(lm4, chat_reply, reply_form):
    prompt, reply, generated = chat_reply
    ref = reply_attention(lm4, prompt, reply, layer=2)
    n = len(ref.reply_tokens)
    given = {"ids": generated[:n], "tensor": torch.tensor([generated[:n]]), "text with space": " " + reply}[reply_form]
    ra = reply_attention(lm4, prompt.input_ids, given, layer=2)
    assert ra.token_ids == ref.token_ids
    assert_close(ra.rows, ref.rows, atol=0, rtol=0)


def test_long_replies_are_capped_with_a_note(lm4, chat_reply):
    prompt, _, _ = chat_reply
    n_prompt = prompt.input_ids.shape[1]
    long_reply = " ".join(["word"] * 400)
    ra = reply_attention(lm4, prompt, long_reply, layer=1)
    assert ra.capped and len(ra.token_ids) == REPLY_MAX_TOKENS == 384
    assert len(ra.reply_tokens) == REPLY_MAX_TOKENS - n_prompt and ra.n_reply_tokens > REPLY_MAX_TOKENS
    assert f"first {REPLY_MAX_TOKENS}" in ra.notice and f"first {REPLY_MAX_TOKENS - n_prompt} of the reply's" in ra.notice
    small = reply_attention(lm4, prompt, long_reply, layer=1, max_tokens=n_prompt + 3)
    assert len(small.reply_tokens) == 3
    # the kept rows are exact: the cap keeps the start, and attention is causal
    assert_close(small.rows, ra.rows[:3, :, : n_prompt + 3], atol=0, rtol=0)
    assert (ra.rows[:3, :, n_prompt + 3:] == 0).all()
    with pytest.raises(ValueError, match=f"prompt alone has {n_prompt} tokens"):
        reply_attention(lm4, prompt, long_reply, layer=1, max_tokens=n_prompt)


def test_128_token_reply_in_one_forward(lm4, chat_reply):
    prompt, _, _ = chat_reply
    reply_ids = torch.randint(1000, 20000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    with ForwardCounter(lm4.model) as counter:
        ra = reply_attention(lm4, prompt, reply_ids, layer=11, max_tokens=512)  # the prompt has ~150 tokens
    assert counter.calls == 1 and len(ra.reply_tokens) == 128 and not ra.capped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reply": " "}, "reply is empty"),
        ({"reply": []}, "reply is empty"),
        ({"reply": 3}, "text or token ids"),
        ({"reply": torch.zeros(2, 2, dtype=torch.long)}, "shape"),
        ({"layer": 18}, "valid 0 to 17"),
        ({"mode": "after"}, "mode"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"prompt": ""}, "empty"),
    ],
)
def test_reply_attention_bad_input(lm4, kwargs, message):
    kwargs = {"prompt": "User: hi\nAssistant:", "reply": "Hello.", "layer": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        reply_attention(lm4, **kwargs)


# ---------------------------------------------------------------------------------------------
# The "while writing" figure


@pytest.mark.parametrize("k", [1, 7, 255])
@pytest.mark.parametrize("with_target", [True, False])
def test_plot_token_attention_sizes(k, with_target):
    gen = torch.Generator().manual_seed(k)
    row = torch.rand(k, generator=gen).softmax(-1)
    tokens = [f"tok{i}" for i in range(k)]
    hidden = [i == 0 for i in range(k)] if k > 1 else None
    fig = plot_token_attention(row, tokens, target="next" if with_target else None, reply_start=k // 2,
                               hidden=hidden, title="writing 'next'", top=10)
    assert isinstance(fig, Figure)
    width, height = fig.get_size_inches()
    assert width == pytest.approx(FIT_WIDTH) and height < 12
    bars = [p for p in fig.axes[0].patches if p.get_edgecolor()[:3] == pytest.approx((0x44 / 255,) * 3)]
    assert len(bars) == min(10, k - (1 if hidden else 0))
    texts = [t for a in fig.axes[0].artists for t in getattr(a, "get_texts", list)()]
    for i in range(k):
        assert f"tok{i}" in texts
    assert ("next" in texts) == with_target
    if hidden:
        assert any("hidden tok0" in t for t in texts)
    figure_bytes(fig, "png")  # draws


def test_plot_token_attention_bars_are_the_largest_weights():
    row = torch.tensor([0.5, 0.1, 0.05, 0.3, 0.05])
    fig = plot_token_attention(row, ["<bos>", "a", "b", "c", "d"], hidden=[True, False, False, False, False], top=2)
    texts = [t for a in fig.axes[0].artists for t in getattr(a, "get_texts", list)()]
    assert "c  #3" in texts and "a  #1" in texts and "<bos>  #0" not in texts
    assert "0.300" in texts and "0.100" in texts and "hidden <bos>: 50% of the attention" in texts[-1]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.rand(2, 3), ["a", "b", "c"]), {}, r"one row \(K,\)"),
        ((torch.rand(3), ["a", "b"]), {}, "3 strings"),
        ((torch.rand(3), "abc"), {}, "3 strings"),
        ((torch.rand(3), ["a", "b", "c"]), {"reply_start": 4}, "reply_start"),
        ((torch.rand(3), ["a", "b", "c"]), {"hidden": [True]}, "hidden"),
        ((torch.rand(3), ["a", "b", "c"]), {"hidden": [True] * 3}, "every token is hidden"),
        ((torch.rand(3), ["a", "b", "c"]), {"top": 0}, "top"),
        ((torch.rand(3), ["a", "b", "c"]), {"target": 3}, "target"),
    ],
)
def test_plot_token_attention_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_token_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Downloads


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_figure_bytes(fmt):
    tokens = ["The", "cat", "sat", "$5"]
    fig = plot_model_view(_random_maps(2, 2, 4), layer_kinds=["sliding", "global"], title="grid")
    data = figure_bytes(fig, fmt)
    if fmt == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        text = data.decode()
        assert text.startswith("<?xml") and "<svg" in text and "L1 (global)" in text  # text stays text
        assert data == figure_bytes(fig, fmt)  # no timestamp: same figure, same bytes
    row_fig = plot_token_attention(torch.tensor([0.1, 0.2, 0.3, 0.4]), tokens, target="on")
    assert len(figure_bytes(row_fig, fmt)) > 1000


def test_figure_bytes_bad_input():
    with pytest.raises(ValueError, match="png' or 'svg"):
        figure_bytes(plot_model_view(_random_maps(1, 1, 2)), "jpg")
    with pytest.raises(ValueError, match="Figure"):
        figure_bytes(b"png", "png")


def _read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


@pytest.mark.parametrize(("t_q", "t_k"), [(1, 1), (3, 5), (8, 8)])
def test_weights_csv_matrix_round_trips(t_q, t_k):
    weights = torch.rand(t_q, t_k, generator=torch.Generator().manual_seed(t_k))
    tokens_k = [f"k{j}" for j in range(t_k)]
    tokens_k[0] = 'say "hi", then'  # a comma and quotes survive
    tokens_q = [f"q{i}" for i in range(t_q)]
    rows = _read_csv(weights_csv(weights, tokens_q, tokens_k))
    assert rows[0] == ["query \\ key", *tokens_k]
    assert [r[0] for r in rows[1:]] == tokens_q
    back = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    assert_close(back, weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 3), (2, 2, 2, 3)])
def test_weights_csv_long_format(shape):
    weights = torch.rand(*shape)
    t_q, t_k = shape[-2:]
    rows = _read_csv(weights_csv(weights, [f"q{i}" for i in range(t_q)], [f"k{j}" for j in range(t_k)]))
    names = ["head"] if len(shape) == 3 else ["layer", "head"]
    assert rows[0] == [*names, "query_pos", "query", "key_pos", "key", "weight"]
    assert len(rows) == 1 + weights.numel()
    for r in rows[1:]:
        index = tuple(int(v) for v in r[: len(names)])
        i, j = int(r[len(names)]), int(r[len(names) + 2])
        assert r[len(names) + 1] == f"q{i}" and r[len(names) + 3] == f"k{j}"
        assert float(r[-1]) == pytest.approx(float(weights[index][i, j]), rel=1e-5)


def test_weights_csv_defuses_spreadsheet_formulas():
    rows = _read_csv(weights_csv(torch.eye(3), ["=SUM(A1)", "-", "ok"], ["+1", "@x", "ok"]))
    assert rows[0] == ["query \\ key", "'+1", "'@x", "ok"]
    assert [r[0] for r in rows[1:]] == ["'=SUM(A1)", "'-", "ok"]
    assert rows[1][1:] == ["1", "0", "0"]  # numbers are written as numbers


def test_weights_csv_writes_control_characters_as_escapes():
    # "\t=1" would start a formula once a spreadsheet trims the tab; escaped, it is text
    rows = _read_csv(weights_csv(torch.eye(3), ["\n", "\t=1", " x"], ["\r", "a\x00b", "ok"]))
    assert rows[0] == ["query \\ key", "\\r", "a\\x00b", "ok"]
    assert [r[0] for r in rows[1:]] == ["\\n", "\\t=1", " x"]


@pytest.mark.parametrize(
    ("weights", "tokens_q", "tokens_k", "message"),
    [
        (torch.rand(3), ["a"] * 3, ["a"] * 3, r"\(T, S\)"),
        ([[1.0]], ["a"], ["a"], "tensor"),
        (torch.rand(2, 3), ["a"], ["a"] * 3, "tokens_q must be 2 strings"),
        (torch.rand(2, 3), ["a"] * 2, ["a"] * 2, "tokens_k must be 3 strings"),
        (torch.rand(2, 2), "ab", ["a"] * 2, "tokens_q"),
    ],
)
def test_weights_csv_bad_input(weights, tokens_q, tokens_k, message):
    with pytest.raises(ValueError, match=message):
        weights_csv(weights, tokens_q, tokens_k)
