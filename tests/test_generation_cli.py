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


def test_cli_local_folder_full_precision(tiny_qwen_dir):
    r = run_cli("hello", "--model", str(tiny_qwen_dir), "--no-4bit", "--info", "--max-new-tokens", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "quantization:   none" in r.stdout and "dtype:          bfloat16" in r.stdout
    assert "prompt format:  chat template" in r.stdout


@pytest.mark.parametrize("args, env, msg", [
    (["hi", "--top-p", "2"], {}, "top_p must be in (0, 1]"),
    (["hi", "--model", "/no/such/folder"], {}, "no such model folder"),
    (["   "], {}, "message must be a non-empty string"),
    ([], {}, "give a message to answer, or --info"),
    (["hi"], {"MAX_INPUT_TOKENS": "lots"}, "MAX_INPUT_TOKENS must be an integer"),
    (["hi", "--temperature", "warm"], {}, "argument --temperature: invalid float value: 'warm'"),
    (["hi", "--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
])
def test_cli_errors_are_one_clear_line(args, env, msg):
    r = run_cli(*args, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {r.stderr.strip().removeprefix('error: ')}"]
    assert msg in r.stderr
