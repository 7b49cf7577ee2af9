"""Process memory tuning shared by the long-running commands (mount, export).

Worker threads allocate and free chunk-sized buffers; glibc gives each thread its own malloc
arena and keeps what was freed in it, so resident memory grows with the thread count, not
with the work. One arena keeps it flat (measured: a mount serving a tar of 100,000 files
peaked at 214 MiB with the default arenas, 133 MiB with one).
"""

from __future__ import annotations

import ctypes
import functools

M_ARENA_MAX = -8


@functools.cache
def libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def limit_malloc_arenas() -> None:
    """One malloc arena for the whole process; call it before the worker threads start."""
    c = libc()
    if c is not None and hasattr(c, "mallopt"):
        c.mallopt(M_ARENA_MAX, 1)


def trim() -> None:
    """Give freed heap pages back to the system."""
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)
