"""Build, cache and load the small C kernels (ctypes), and say what runs instead where they cannot.

A kernel is compiled once per machine with the system's C compiler (CC, else cc or gcc on PATH:
the same dependency torch.compile has on CPU) into the app's cache, folder kernels/
(ATTN_LAB_CACHE/kernels), keyed by the source text, the compiler flags, the compiler's version and
this CPU's flags (-march=native code is only valid on the CPU it was built for). The library is
written under a temporary name and renamed into place, so concurrent builders (two app processes,
a test run beside the app) never load a half-written file. ATTN_LAB_NATIVE=0 turns every native
kernel off (read through `generation.settings.Settings`).

Every kernel reports a `KernelStatus`: what runs (the native kernel or its fallback), whether it
is native, and why; callers read its fields, never parse text.
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..settings import Settings

__all__ = ["BASE_FLAGS", "OFF_REASON", "KernelBuildError", "KernelStatus", "build_library", "cpu_flags",
           "kernel_cache_dir", "load_checked", "load_library", "native_enabled", "read_source"]

log = logging.getLogger(__name__)

# Every kernel: optimised for this CPU, OpenMP where a kernel asks for it, every warning shown
# (they go to the log; a warning never stops a build).
BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-Wall", "-Wextra", "-shared", "-fPIC")
OFF_REASON = "native kernels off: ATTN_LAB_NATIVE=0"

T = TypeVar("T")


def _as_is(lib: Any) -> Any:
    return lib


@dataclass(frozen=True)
class KernelStatus:
    """What computes a kernel's part here and why: `kernel` names what runs (the native kernel or
    its fallback), `native` says which of the two, `detail` why (the library, or the reason the
    native kernel is not used)."""

    kernel: str
    native: bool
    detail: str = ""

    @property
    def short(self) -> str:
        """The name alone, for a one-line status such as the chat engine's."""
        return self.kernel

    def __str__(self) -> str:
        return f"{self.kernel} ({self.detail})" if self.detail else self.kernel


class KernelBuildError(RuntimeError):
    """A kernel cannot be built here; the message says why (it becomes a KernelStatus' detail)."""


def native_enabled() -> bool:
    """False where ATTN_LAB_NATIVE turns the native kernels off."""
    try:
        return Settings.from_env().native_kernels
    except ValueError:  # a malformed variable: the app reports it where it reads its settings
        return True


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: the app's cache (ATTN_LAB_CACHE), folder kernels/."""
    try:
        root = Settings.from_env().cache_dir
    except ValueError:  # as above: the default cache folder
        root = Settings().cache_dir
    return Path(root) / "kernels"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def read_source(name: str) -> str:
    """The text of the C file `name` beside this module (generation/kernels/)."""
    return (Path(__file__).with_name(name)).read_text()


def _compiler() -> list[str]:
    """The C compiler's command (CC may carry arguments, as `ccache gcc`); KernelBuildError if none."""
    cc = os.environ.get("CC")
    if cc:
        cmd = shlex.split(cc)
        if not cmd or shutil.which(cmd[0]) is None:
            raise KernelBuildError(f"the C compiler CC={cc!r} is not found")
        return cmd
    found = shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise KernelBuildError("no C compiler (cc/gcc) on PATH")
    return [found]


def _compiler_version(cc: Sequence[str]) -> str:
    try:
        res = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"the C compiler {' '.join(cc)!r} does not run: {exc}") from exc
    if res.returncode != 0:
        raise KernelBuildError(f"the C compiler {' '.join(cc)!r} does not run: {res.stderr.strip()[-300:]}")
    return res.stdout


def build_library(name: str, source: str, extra_flags: Sequence[str] = (), needs: Sequence[str] = ()) -> Path:
    """The shared library of C `source`, compiled here once per machine (see the module docstring).

    KernelBuildError where it cannot be built here: this CPU lacks one of the flags `needs`, no C
    compiler, or the compiler fails.
    """
    flags = cpu_flags()
    missing = [f for f in needs if f not in flags]
    if missing:
        raise KernelBuildError(f"this CPU lacks {', '.join(missing)}")
    cc = _compiler()
    cflags = [*BASE_FLAGS, *extra_flags]
    key_text = "\0".join([source, *cflags, _compiler_version(cc), " ".join(sorted(flags))])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    so = folder / f"{name}-{key}.so"
    if so.is_file():
        return so
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            out = Path(tmp) / so.name
            res = subprocess.run([*cc, *cflags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise KernelBuildError(f"compiling failed: {res.stderr.strip()[-300:]}")
            if res.stderr.strip():
                log.warning("compiler warnings for the %s kernel:\n%s", name, res.stderr.strip())
            os.replace(out, so)  # atomic; a concurrent builder writes the identical file
    except (OSError, subprocess.TimeoutExpired) as exc:  # an unwritable cache, a compiler that hangs
        raise KernelBuildError(f"building failed: {exc}") from exc
    return so


def load_library(name: str, source: str, *, native: str, fallback: str, extra_flags: Sequence[str] = (),
                 needs: Sequence[str] = (), bind: Callable[[ct.CDLL], T] = _as_is) -> tuple[T | None, KernelStatus]:
    """Build (or find in the cache) and load `source`, then `bind(library)` (its ctypes signatures);
    (what bind returned, the status `native`), or (None, the status `fallback` with the reason)
    where ATTN_LAB_NATIVE=0 or it cannot be built, loaded or bound here."""
    if not native_enabled():
        return None, KernelStatus(fallback, False, OFF_REASON)
    try:
        so = build_library(name, source, extra_flags, needs)
        bound = bind(ct.CDLL(str(so)))
    except Exception as exc:  # no compiler, a failed build, load or bind: the fallback runs, and says why
        return None, KernelStatus(fallback, False, f"native kernel unavailable: {exc}")
    return bound, KernelStatus(native, True, str(so))


def load_checked(state: dict, lock: threading.Lock, name: str, *, native: str, fallback: str, bind: Callable[[ct.CDLL], T],
                 check: Callable[[T], str | None], agrees: str, differs: str,
                 extra_flags: Sequence[str] = ()) -> tuple[T | None, KernelStatus]:
    """`load_library` for the C file `name`.c once per process (kept in `state`, under `lock`), then
    `check(kernel)`: None where it agrees with torch (the status says `agrees`), else what differed
    (the kernel is not used; the status says "the native `differs` from torch in the ..."). (None,
    the fallback's status) where ATTN_LAB_NATIVE=0 (read at every call) or it cannot be built."""
    if not native_enabled():
        return None, KernelStatus(fallback, False, OFF_REASON)
    with lock:
        if "kernel" not in state:
            kernel, status = load_library(name, read_source(f"{name}.c"), native=native, fallback=fallback,
                                          extra_flags=extra_flags, bind=bind)
            if kernel is not None and (diff := check(kernel)) is not None:
                kernel, status = None, KernelStatus(fallback, False, f"the native {differs} differs from torch in the {diff}")
            elif kernel is not None:
                status = KernelStatus(native, True, agrees)
            state["kernel"], state["status"] = kernel, status
        return state["kernel"], state["status"]  # type: ignore[return-value]
