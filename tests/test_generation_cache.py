"""The converted-snapshot cache: reused without reconverting, published atomically, never half-trusted."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import save_tiny_qwen
from generation import DEFAULT_MODEL_ID, Settings, load_model
from generation import model as model_mod
from generation.model import COMPLETE_MARKER, ensure_snapshot, is_complete


class ConversionCalled(Exception):
    pass


def _forbid_conversion(monkeypatch):
    def boom(*args, **kwargs):
        raise ConversionCalled("the GGUF was converted again")

    monkeypatch.setattr(model_mod, "convert_gguf", boom)


def test_second_load_reuses_the_snapshot(lm4, monkeypatch):
    _forbid_conversion(monkeypatch)
    settings = Settings.from_env()
    folder, built = model_mod.default_snapshot(settings)
    assert not built and is_complete(folder) and folder.parent == settings.cache_dir
    assert {"model.safetensors", "config.json", "tokenizer.json", COMPLETE_MARKER} <= {p.name for p in folder.iterdir()}
    assert f"-v{model_mod.CACHE_FORMAT}" in folder.name  # a new format never reads this folder
    lm = load_model(DEFAULT_MODEL_ID, settings=settings)
    assert lm.n_4bit_layers == lm4.n_4bit_layers and lm.weight_bytes == lm4.weight_bytes


def test_half_written_snapshot_is_not_trusted(monkeypatch, tmp_path):
    half = tmp_path / model_mod.snapshot_name()
    half.mkdir()
    (half / "config.json").write_text("{}")  # an interrupted copy: files but no completeness marker
    _forbid_conversion(monkeypatch)
    with pytest.raises(ConversionCalled):
        model_mod.default_snapshot(Settings(cache_dir=tmp_path))
    assert not half.exists()  # moved aside, not left to be mistaken for a good one later
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_build_leaves_nothing_and_is_retried(tmp_path):
    def failing(out):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ensure_snapshot(tmp_path, "snap", failing)
    assert [p.name for p in tmp_path.iterdir()] == [".snap.lock"]
    folder, built = ensure_snapshot(tmp_path, "snap", save_tiny_qwen)
    assert built and is_complete(folder)


def test_the_marker_keeps_the_builds_facts(tmp_path):
    import json

    def build(out):
        (out / "config.json").write_text("{}")
        return {"build_seconds": 1.5}

    folder, built = ensure_snapshot(tmp_path, "snap", build, info={"source": "here"})
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert built and marker["source"] == "here" and marker["build_seconds"] == 1.5


def test_concurrent_first_runs_build_once(tmp_path):
    calls = []

    def slow_build(out):
        calls.append(out)
        time.sleep(0.5)  # both callers are inside ensure_snapshot while this runs
        save_tiny_qwen(out)

    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_snapshot(tmp_path, "snap", slow_build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False, True]
    assert {folder for folder, _ in results} == {tmp_path / "snap"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snap.lock", "snap"]
    lm = load_model(str(tmp_path / "snap"))  # what was published is a loadable model
    assert lm.n_4bit_layers == 14


def test_losing_the_rename_race_uses_the_winners_copy(tmp_path):
    """Without a lock (e.g. no fcntl), another writer can publish first: then use theirs."""
    def build_while_other_publishes(out):
        other = tmp_path / "snap"
        save_tiny_qwen(other)
        (other / COMPLETE_MARKER).write_text("{}")
        (out / "config.json").write_text("{}")

    folder, built = ensure_snapshot(tmp_path, "snap", build_while_other_publishes)
    assert folder == tmp_path / "snap" and not built
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snap.lock", "snap"]
    assert (folder / "model.safetensors").exists()


def test_load_progress_names_the_stages_a_load_goes_through(tiny_qwen_dir, lm4):
    """What the status line shows while a model loads. A model folder: only the loading. The
    default model, as this session's first load of it went (conftest's LM4_STAGES): where it built
    the cached snapshots (a fresh machine, as in CI), the conversion, then the rounding and each
    of its decoder layers in order, then the loading; where they were there, the loading alone
    (and where another test worker built one of them meanwhile, the other one only)."""
    from conftest import LM4_STAGES

    heard: list[str] = []
    model_mod.load_model(str(tiny_qwen_dir), load_4bit=False, progress=heard.append)
    assert heard == [model_mod.LOADING]
    assert LM4_STAGES[-1] == model_mod.LOADING
    rounding = LM4_STAGES[:-1]
    if rounding[:1] == [model_mod.CONVERTING]:
        rounding = rounding[1:]
    if rounding:
        layers = [s.removeprefix(f"{model_mod.ROUNDING} · ").split(" (")[0] for s in rounding[1:]]
        assert rounding[0] == model_mod.ROUNDING, LM4_STAGES
        assert layers == [f"layer {i}/18 rounded" for i in range(1, 19)], LM4_STAGES
