"""`python -m generation` as a user runs it (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "generation", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_cli_streams_the_answer_with_info(lm4):  # lm4: the cache exists, so this is a cached load
    r = run_cli("What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24", "--info")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "model:          google/gemma-3-270m"
    assert any(line.startswith("quantization:   nf4 (126 bitsandbytes Linear4bit layers, calibrated rounding)")
               for line in lines)
    assert "Paris" in lines[-1] and "User:" not in r.stdout and "What is the capital" not in r.stdout


def run_main(args: list[str], monkeypatch, capsys, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """main(args) in this process: (exit status, stdout, stderr). For the cases that need no fresh
    interpreter; a new one per case would spend its seconds importing torch."""
    from transformers.utils import logging as hf_logging

    from generation.__main__ import main

    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's errors exit
        rc = exc.code
    finally:  # main() quiets transformers for the CLI's process; leave this one as it was
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_local_folder_full_precision(tiny_qwen_dir, monkeypatch, capsys):
    rc, out, err = run_main(["hello", "--model", str(tiny_qwen_dir), "--no-4bit", "--info", "--max-new-tokens", "4",
                             "--seed", "1"], monkeypatch, capsys)
    assert rc == 0, err
    assert "quantization:   none" in out and "dtype:          bfloat16" in out
    assert "prompt format:  chat template" in out


CLI_ERRORS = [
    (["hi", "--top-p", "2"], {}, "top_p must be in (0, 1]"),
    (["hi", "--model", "/no/such/folder"], {}, "no such model folder"),
    (["   "], {}, "message must be a non-empty string"),
    ([], {}, "give a message to answer, or --info"),
    (["hi"], {"MAX_INPUT_TOKENS": "lots"}, "MAX_INPUT_TOKENS must be an integer"),
    (["hi", "--temperature", "warm"], {}, "argument --temperature: invalid float value: 'warm'"),
    (["hi", "--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
]


def assert_one_clear_line(rc: int, stdout: str, stderr: str, msg: str) -> None:
    assert rc == 2
    assert stdout == ""
    assert stderr.strip().splitlines() == [f"error: {stderr.strip().removeprefix('error: ')}"]
    assert msg in stderr


@pytest.mark.parametrize("args, env, msg", CLI_ERRORS)
def test_cli_errors_are_one_clear_line(args, env, msg, monkeypatch, capsys):
    # Each of these fails before a model loads; the test below runs two through the real command line.
    assert_one_clear_line(*run_main(args, monkeypatch, capsys, env), msg)


@pytest.mark.parametrize("args, env, msg", [CLI_ERRORS[1], CLI_ERRORS[-1]])
def test_cli_errors_from_the_command_line(args, env, msg):
    r = run_cli(*args, env=env, timeout=60)
    assert_one_clear_line(r.returncode, r.stdout, r.stderr, msg)


def test_a_first_start_says_where_it_is_on_stderr_and_a_later_one_nothing(capsys):
    from generation.__main__ import say_first_start
    from generation.model import CONVERTING, LOADING, ROUNDING

    for stage in (CONVERTING, ROUNDING, f"{ROUNDING} · layer 1/18 rounded (4 s)", LOADING):
        say_first_start(stage)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [CONVERTING, ROUNDING, f"{ROUNDING} · layer 1/18 rounded (4 s)"]
