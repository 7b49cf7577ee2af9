"""Progress bars on a terminal (stderr), silence otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def bytes_bar(desc: str, total: int | None = None, enabled: bool | None = None
              ) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a callback (files_delta, bytes_delta) that drives a bar, or None when not a tty."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    files = [0]
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(nfiles: int, nbytes: int) -> None:
        if nfiles:
            files[0] += nfiles
            bar.set_postfix_str(f"{files[0]} files", refresh=False)
        if nbytes:
            bar.update(nbytes)

    try:
        yield update
    finally:
        bar.close()
