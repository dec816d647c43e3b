"""The lens endpoints through gradio_client against the real app and model (/logit_lens,
/quant_lens, /head_roles), then their handlers in-process where no server is needed (shared-link
fields, a click on the lens grid, the CSV files, the colour-blind-safe palette)."""

from __future__ import annotations

import re

import pytest
from apputil import plot_png
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.timeout(900)

TEXT = "The cat sat on the mat because it was tired."


# ---------------------------------------------------------------------------------------------
# /logit_lens


def test_logit_lens_gives_every_layer_and_ends_with_the_next_token(client):
    fig, info = client.predict(api_name="/logit_lens")
    assert len(info["layers"]) == 18 and [e["layer"] for e in info["layers"]] == list(range(18))
    assert all(len(e["top"]) >= 5 for e in info["layers"])
    assert all(0.0 <= t["prob"] <= 1.0 for e in info["layers"] for t in e["top"])
    assert info["tokens"][0] == "<bos>" and len(info["grid"]) == 18 and len(info["grid"][0]) == len(info["tokens"])
    # The last layer's guess is the model's own: /next_token's top at temperature 1.
    nxt = client.predict(TEXT, temperature=1.0, top_p=1.0, k=5, api_name="/next_token")
    assert info["layers"][-1]["top"][0]["token"] == nxt[0]["token"]
    assert abs(info["layers"][-1]["top"][0]["prob"] - nxt[0]["prob"]) < 1e-6
    assert info["grid"][-1][-1] == nxt[0]["token"]
    img = plot_png(fig)
    assert img.width > 500 and img.height > 300


def test_logit_lens_caps_at_its_last_tokens(client):
    _, info = client.predict(" ".join(["word"] * 80), 8, api_name="/logit_lens")
    assert len(info["tokens"]) == 8 and "last 8" in info["notice"]


@pytest.mark.parametrize(("args", "expected"), [
    (("   ",), "Type a text"),
    (("hello", 0), "max_tokens must be an integer in [1, 64]"),
    (("hello", 2.5), "max_tokens must be a whole number"),
])
def test_logit_lens_bad_input_is_a_clear_error(client, args, expected):
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict(*args, api_name="/logit_lens")


# ---------------------------------------------------------------------------------------------
# /quant_lens and /head_roles


def test_quant_lens_compares_the_two_models_layer_by_layer(client):
    fig, info = client.predict("The capital of France is", api_name="/quant_lens")
    assert len(info["layers"]) == 18
    for e in info["layers"]:
        assert set(e) == {"layer", "kl", "top1_4bit", "top1_full"} and e["kl"] >= 0.0
    nxt = client.predict("The capital of France is", temperature=1.0, top_p=1.0, k=1, api_name="/next_token")
    assert info["layers"][-1]["top1_4bit"] == nxt[0]["token"]  # the chat model's own guess
    flip = info["first_flip"]
    assert flip is None or info["layers"][flip]["top1_4bit"] != info["layers"][flip]["top1_full"]
    assert plot_png(fig).width > 400


def test_head_roles_scores_every_head(client):
    fig, info = client.predict(TEXT, api_name="/head_roles")
    for role in ("previous_token", "first_token", "induction"):
        grid = info[role]
        assert len(grid) == 18 and all(len(row) == 4 for row in grid)
        assert all(0.0 <= s <= 1.0 for row in grid for s in row)
    best = info["strongest"]["induction"]
    baseline = max(s for row in info["induction_baseline"] for s in row)
    assert best["score"] > 5 * baseline and info["roles"][best["layer"]][best["head"]] == "induction"
    assert "Clearest heads" in info["summary"]
    assert plot_png(fig).height > 300


def test_lens_endpoints_refuse_bad_text(client):
    for name in ("/quant_lens", "/head_roles"):
        with pytest.raises(AppError, match="text must be text"):
            client.predict(5, api_name=name)
    with pytest.raises(AppError, match="too short"):
        client.predict("a", api_name="/head_roles")


# ---------------------------------------------------------------------------------------------
# The handlers in-process


@pytest.fixture(scope="module")
def lens(lm4):
    from generation.inside import FullPrecisionCache
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.lens import LensHandlers

    settings = Settings.from_env()
    return LensHandlers(settings, ModelSlot(settings, lm=lm4), FullPrecisionCache())


def test_a_click_on_a_lens_cell_lists_its_top_10(lens):
    import gradio as gr

    out = lens.lens_update(TEXT, False)
    state, layout = out[0], out[3]
    x = layout.left + 2.5 * layout.cell_w
    y = layout.top + (layout.rows - 1 - 4 + 0.5) * layout.cell_h  # layer 4 (the last layer is the top row)
    picked = lens.lens_select(state, layout, False, gr.SelectData(None, {"index": [x, y], "value": None}))
    heading, rows = picked[2], picked[3]
    assert "After layer 4" in heading and "position 2" in heading
    assert len(rows) == 10 and rows[0][1] == state.top[4][2][0].token
    assert lens.lens_select(state, layout, False, gr.SelectData(None, {"index": [1, 1], "value": None})) == \
        (gr.skip(),) * 9


def test_lens_files_and_the_colour_blind_palette(lens):
    from PIL import Image

    plain = lens.lens_update(TEXT, False)
    safe = lens.lens_update(TEXT, True)
    png, svg, csv_file = (b["value"] for b in plain[-3:])
    assert png.endswith("logit_lens.png") and svg.endswith("logit_lens.svg") and csv_file.endswith("logit_lens.csv")
    lines = open(csv_file, encoding="utf-8").read().splitlines()
    assert lines[0] == "layer,position,token read,rank,next token,probability"
    assert len(lines) == 1 + 18 * len(plain[0].tokens) * 10
    a, b = Image.open(png).convert("RGB"), Image.open(safe[-3]["value"]).convert("RGB")
    assert a.size == b.size and a.tobytes() != b.tobytes()  # same grid, other colours


def test_roles_title_the_model_views_heads(lens):
    layer, head, _ = lens._roles(TEXT).strongest("induction")
    assert lens.role_title(layer, head).startswith("induction head ")
    assert lens.role_title(99, 0) == ""


def test_a_shared_link_sets_the_lens_text_and_palette():
    from types import SimpleNamespace

    from generation.inside import FullPrecisionCache
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.lens import LensHandlers

    settings = Settings.from_env()
    handlers = LensHandlers(settings, ModelSlot(settings), FullPrecisionCache())
    request = SimpleNamespace(query_params={"lens_text": "Paris is big", "colourblind": "1"})
    text, colourblind, accordion, shared = handlers.apply_setup(request)
    assert (text, colourblind, shared) == ("Paris is big", True, True)
    assert handlers.show_shared(True, text, colourblind) == (handlers.show_shared(False, "", False))  # not loaded yet
