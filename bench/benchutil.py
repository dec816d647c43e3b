"""What every benchmark prints about the machine it ran on (figures mean nothing without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(threads: int | None = None) -> str:
    """One line: CPU, cores, torch threads, GPU, load average, torch and Python versions."""
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu_model()}, {os.cpu_count()} cores (torch threads {threads}), {gpu}, load average {load} at start; "
            f"torch {torch.__version__}, Python {platform.python_version()}")
