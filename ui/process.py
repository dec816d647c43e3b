"""The server process's own settings, made before its threads start.

No gradio here: a probe process (tests/test_memory_bounds.py) imports this alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc gives each new thread its own malloc arena (up to 8 per core) and keeps what a thread frees
# in that thread's arena for its next allocations. The app's many worker threads each allocate
# tensors of ever different sizes (a prompt's activations, a view's attention maps), so the freed
# memory of every arena stays resident and the server's RSS creeps up over a day of classes.
# Two arenas (the main thread's, where the chat engine decodes, and one the workers share) bound
# that; see bench/README.md, "Memory soak". MALLOC_ARENA_MAX in the environment still wins.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (before the server's threads start: arenas are made as threads
    first allocate). True if set; False on another C library, or when MALLOC_ARENA_MAX is set."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas)
        return False
