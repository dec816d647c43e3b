"""The teaching endpoints through gradio_client against the real app and model (/model_view, /ablate),
then the teaching handlers in-process where no server or model is needed (still loading, which
reply is read, shared-link fields, a click between thumbnails, the download folder)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from apputil import REPO, assert_same_picture, plot_png
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.timeout(600)

DEFAULT_TEXT_TOKENS = ["The", "cat", "sat", "on", "the", "mat", "because", "it", "was", "tired", "."]


_png = plot_png


# ---------------------------------------------------------------------------------------------
# /model_view


def test_model_view_defaults_give_every_layer_and_head(client, lm4):
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.teaching import DEFAULT_MV_TEXT, TeachingHandlers

    grid, info = client.predict(api_name="/model_view")
    assert info["shape"] == [18, 4, 11, 11]  # <bos> hidden: the 11 tokens of the default text
    assert info["tokens"] == DEFAULT_TEXT_TOKENS
    assert [i for i, k in enumerate(info["layer_kinds"]) if k == "global"] == [5, 11, 17]
    assert info["kv_groups"] == [0, 0, 0, 0] and "<bos>" in info["notice"]
    img = _png(grid)
    assert img.height > 2 * img.width > 500  # 18 rows of 4 thumbnails
    settings = Settings.from_env()
    here, _ = TeachingHandlers(settings, ModelSlot(settings, lm=lm4)).model_view_api(DEFAULT_MV_TEXT)
    assert_same_picture(grid, here)


def test_model_view_options_and_cap(client):
    _, info = client.predict("Paris is big", False, api_name="/model_view")
    assert info["shape"] == [18, 4, 4, 4] and info["tokens"][0] == "<bos>"  # special tokens shown
    _, info = client.predict(" ".join(["word"] * 100), api_name="/model_view")
    assert info["shape"] == [18, 4, 63, 63] and "showing the first 64" in info["notice"]
    _, info = client.predict(" ".join(["word"] * 100), True, 8, api_name="/model_view")
    assert info["shape"] == [18, 4, 7, 7]


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(text=""), "Type a text"),
    (dict(text="   "), "Type a text"),
    (dict(max_tokens=0), "max_tokens must be an integer in [1, 64], got 0"),
    (dict(max_tokens=65), "max_tokens must be an integer in [1, 64], got 65"),
    (dict(max_tokens=2.5), "max_tokens must be a whole number, got 2.5"),
])
def test_model_view_bad_input_is_a_clear_error(client, kwargs, expected):
    with pytest.raises(AppError) as err:
        client.predict(**kwargs, api_name="/model_view")
    assert expected in str(err.value) and "Traceback" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# /ablate


def test_ablate_with_no_heads_is_the_plain_model(client):
    out = client.predict(heads="", api_name="/ablate")
    assert out["heads"] == [] and out["spec"] == "" and out["kl"] == 0.0 and out["top1_changed"] is False
    assert out["plain"] == out["ablated"] and len(out["plain"]) == 10
    assert out["continuation_plain"] == out["continuation_ablated"]
    assert "No head is switched off" in out["notice"]


def test_ablate_default_preset_moves_the_distribution(client):
    out = client.predict(api_name="/ablate")  # "The capital of France is", all heads of layer 5
    assert out["heads"] == [[5, 0], [5, 1], [5, 2], [5, 3]] and out["spec"] == "5:0, 5:1, 5:2, 5:3"
    assert out["kl"] > 0.5
    for side in ("plain", "ablated"):
        rows = out[side]
        assert [r["rank"] for r in rows] == list(range(1, 11))
        assert all(a["p"] >= b["p"] for a, b in zip(rows, rows[1:]))
        assert all(set(r) == {"token", "token_id", "p", "rank"} for r in rows)
    assert out["plain"] != out["ablated"]
    assert out["continuation_plain"] != out["continuation_ablated"]
    assert out["prompt_tokens"] == 6  # <bos> + 5 words


def test_ablate_head_in_every_layer_and_options(client):
    out = client.predict("The capital of France is", "*:0", 3, 5, api_name="/ablate")
    assert out["heads"] == [[layer, 0] for layer in range(18)] and out["kl"] > 0
    assert len(out["plain"]) == 5 and len(out["ablated"]) == 5
    assert "18 of 72 heads" in out["notice"]


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(heads="5:x"), "cannot read '5:x' as a head"),
    (dict(heads="99:*"), "layer 99 does not exist: this model has 18 layers, 0 to 17"),
    (dict(heads="3:4"), "head 4 (in layer 3) does not exist"),
    (dict(prompt=""), "Type a prompt"),
    (dict(new_tokens=0), "new_tokens must be an integer in [1, 64]"),
    (dict(k=0), "k must be an integer in [1, 1000]"),
])
def test_ablate_bad_input_is_a_clear_error(client, kwargs, expected):
    with pytest.raises(AppError) as err:
        client.predict(**kwargs, api_name="/ablate")
    assert expected in str(err.value) and "Traceback" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# In-process: the handlers without a server


def _handlers():
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.teaching import TeachingHandlers

    settings = Settings.from_env()
    return TeachingHandlers(settings, ModelSlot(settings))


def _is_skip(v) -> bool:
    return isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1


def test_handlers_warn_while_the_model_is_not_there():
    h = _handlers()
    with pytest.warns(UserWarning, match="not loaded"):
        out = h.model_view_update("The cat sat", True, "each", 5, 0)
    assert len(out) == 13 and all(_is_skip(v) for v in out)
    with pytest.warns(UserWarning, match="not loaded"):
        out = h.ablate_update("The capital of France is", "5:*", 8)
    assert len(out) == 5 and all(_is_skip(v) for v in out)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.warns(UserWarning, match="not loaded"):
        out = h.writing.read(history, "", 5, -1, "writing", True)
    assert len(out) == 10 and all(_is_skip(v) for v in out)
    import gradio as gr

    with pytest.raises(gr.Error, match="not loaded"):
        h.ablate_api()
    with pytest.raises(gr.Error, match="not loaded"):
        h.model_view_api("The cat")
    # nothing read yet: choosing a token, a layer or a thumbnail does nothing (and says nothing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(_is_skip(v) for v in h.writing.show(None, 0, -1, True))
        assert all(_is_skip(v) for v in h.writing.reread(None, 5, -1, "writing", True))
        assert all(_is_skip(v) for v in h.model_view_pick(None, "each", 5, 0))
        assert all(_is_skip(v) for v in h.writing.follow(True, None, history, "", 5, -1, "writing", True))
        assert all(_is_skip(v) for v in h.fit_sliders())


@pytest.mark.slow
def test_a_new_reply_is_followed_and_the_one_shown_is_left_as_the_user_left_it(lm4):
    """After a chat reply, a user who reads replies gets the new one read at once; the end of the
    reply already shown (it can reach the page after the user has chosen another token) changes
    nothing."""
    from generation.settings import Settings
    from ui.common import ModelSlot
    from ui.teaching import TeachingHandlers

    settings = Settings.from_env()
    h = TeachingHandlers(settings, ModelSlot(settings, lm=lm4)).writing
    history = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}]
    shown, *_, following = h.read(history, "", 5, -1, "writing", True)
    assert following is True and shown.r == 0
    out = h.show(shown, 2, 1, True)  # the user chose the third token, head 1
    assert shown.r == 2
    # A redraw leaves the token list and the Head box as the user left them (they may have moved
    # again while it ran: writing back what it drew would undo that); out of range, it corrects them.
    token_box, head_box = out[1], out[5]
    assert "value" not in token_box.constructor_args and "value" not in head_box.constructor_args
    assert len(token_box.constructor_args["choices"]) == len(shown.ra.reply_tokens)
    out = h.reread(shown, 3, 1, "writing", True)
    assert "value" not in out[1].constructor_args and "value" not in out[5].constructor_args
    out = h.show(shown, 99, 7, True)  # no such token, no such head in this model
    assert out[1].constructor_args["value"] == len(shown.ra.reply_tokens) - 1
    assert out[5].constructor_args["value"] == -1  # the average of all heads
    assert all(_is_skip(v) for v in h.follow(True, shown, history, "", 5, -1, "writing", True))
    assert all(_is_skip(v) for v in h.follow(False, None, history, "", 5, -1, "writing", True))  # never read
    newer = history + [{"role": "user", "content": "And of Italy?"},
                       {"role": "assistant", "content": "The capital of Italy is Rome."}]
    read, *_, following = h.follow(True, shown, newer, "", 5, -1, "writing", True)
    assert read.reply == "The capital of Italy is Rome." and read.r == 0 and following is True


def test_last_reply_is_the_last_answered_turn_with_the_turns_before_it():
    from ui.reply_attention import last_reply

    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
        {"role": "user", "content": "And of Italy?"},  # still being answered
    ]
    user, earlier, reply = last_reply(history)
    assert (user, reply) == ("What is the capital of France?", "Paris.")
    assert earlier == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    stopped = {"role": "assistant", "content": "*(stopped before the first token)*"}
    for bad in ([], [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hi"}, stopped]):
        with pytest.raises(ValueError, match="no chat reply yet|no text the model wrote"):
            last_reply(bad)


def test_presets_write_the_spec():
    h = _handlers()
    assert h.preset_layer(5) == "5:*" and h.preset_head(2.0) == "*:2"
    with pytest.warns(UserWarning, match="whole number"):
        assert _is_skip(h.preset_layer(2.5))


def test_teaching_fields_are_shareable_and_hostile_values_refused():
    from ui.inside import INSIDE_FIELDS
    from ui.share import query_string, read_fields
    from ui.teaching import TEACHING_FIELDS

    assert set(TEACHING_FIELDS) <= set(INSIDE_FIELDS)  # the share button writes them too
    values, problems = read_fields(TEACHING_FIELDS, {"ablate_heads": "5:*, *:0", "ablate_prompt": "Paris is",
                                                     "mv_text": "A bird sang"})
    assert values == {"ablate_heads": "5:*, *:0", "ablate_prompt": "Paris is", "mv_text": "A bird sang"}
    assert not problems
    for raw in ("<script>alert(1)</script>", "5:*; rm -rf", "x" * 400):
        values, problems = read_fields(TEACHING_FIELDS, {"ablate_heads": raw})
        assert values == {} and len(problems) == 1 and raw not in problems[0]
    defaults = [f.default for f in TEACHING_FIELDS]
    assert query_string(TEACHING_FIELDS, defaults) == "?"


def test_a_click_maps_to_its_thumbnail_or_to_nothing_between_them():
    import torch

    from attention.plot import model_view_cells
    from generation.inside import ModelView
    from ui.teaching import grid_figure

    t = 5
    mv = ModelView(tokens=list("abcde"), token_ids=list(range(t)), weights=torch.rand(18, 4, t, t),
                   layer_kinds=["global" if i % 6 == 5 else "sliding" for i in range(18)], window=512,
                   kv_groups=[0] * 4, n_kv_heads=1, capped=False, n_text_tokens=t, hidden_tokens=[],
                   hidden_mass=torch.zeros(18, 4, t), notice="", model_id="m")
    cells = model_view_cells(grid_figure(mv))
    h = _handlers()

    class Click:
        def __init__(self, x, y):
            self.index = [x, y]

    x0, y0, x1, y1 = cells[7, 3]
    out = h.model_view_select(mv, cells, "each", False, Click((x0 + x1) / 2, (y0 + y1) / 2))
    assert len(out) == 12
    grid, big, summary, notes, new_cells, layer, head = out[:7]
    assert layer.value == 7 and head.value == 3 and _is_skip(notes) and new_cells == cells
    assert summary.startswith("Layer 7, head 3 mostly attends to")
    assert os.path.basename(big) == "attention_layer7_head3.png" and grid.endswith("model_view.png")
    assert all(b["value"] and os.path.exists(b["value"]) for b in out[7:])
    assert all(_is_skip(v) for v in h.model_view_select(mv, cells, "each", False, Click(1, 1)))  # the margin
    assert all(_is_skip(v) for v in h.model_view_select(None, None, "each", False, Click(x0, y0)))


def test_download_folders_are_per_call_and_swept():
    from ui.teaching import DownloadDir

    files = DownloadDir(keep_s=0.5)
    a = files.write({"x.png": b"\x89PNG", "x.csv": "a,b\n"})
    b = files.write({"x.png": b"other"})
    assert os.path.dirname(a[0]) != os.path.dirname(b[0]) and open(a[1]).read() == "a,b\n"
    assert os.path.realpath(a[0]).startswith(os.path.realpath(__import__("tempfile").gettempdir()))
    time.sleep(1.0)
    c = files.write({"y.svg": "<svg/>"})
    assert not os.path.exists(a[0]) and not os.path.exists(b[0]) and os.path.exists(c[0])


def test_download_folders_go_when_the_process_ends(tmp_path):
    code = "from ui.common import DownloadDir; print(DownloadDir().write({'x.csv': 'a,b'})[0])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = Path(done.stdout.strip().splitlines()[-1])
    assert written.name == "x.csv" and written.is_relative_to(tmp_path)
    assert not list(tmp_path.glob("attention-lab-downloads-*")), "the download folders outlived the process"


@pytest.mark.torch_threads(2)
def test_views_compute_on_one_thread_beside_the_main_thread_engine(lm4):
    """ModelSlot.require() in a worker thread: one OpenMP thread there when the chat engine owns the
    main thread (views_one_thread, set by `python app.py`), untouched otherwise."""
    import threading

    import torch

    from generation import Settings
    from ui.common import ModelSlot

    if torch.get_num_threads() < 2:
        pytest.skip("needs 2+ torch threads")
    seen = {}

    def view(slot: ModelSlot, key: str) -> None:
        assert slot.require() is lm4
        seen[key] = torch.get_num_threads()

    for flag in (False, True):
        slot = ModelSlot(Settings.from_env(), lm=lm4, views_one_thread=flag)
        t = threading.Thread(target=view, args=(slot, flag))
        t.start()
        t.join()
    assert seen == {False: torch.get_num_threads(), True: 1}
