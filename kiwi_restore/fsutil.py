"""Small filesystem helpers shared by the keystore, registry and audit trail."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from .errors import LockedError


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush the filesystem holding PATH to disk (syncfs(2)): only that filesystem, unlike
    sync(1), so a neighbour's dirty pages do not delay us."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that a crash leaves either the old or the new content."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def shred(path: str) -> bool:
    """Overwrite a small secret file with random bytes, fsync, unlink. False if absent.

    Overwriting in place cannot reach copies a journaling filesystem or an SSD's flash
    translation layer may keep; docs/SECURITY.md says so and names the KMS/HSM remedy.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        os.write(fd, os.urandom(max(size, 64)))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


@contextlib.contextmanager
def file_lock(path: str, wait: float = 0.0, what: str = "lock") -> Iterator[int]:
    """An exclusive flock on PATH; waits up to WAIT seconds, else LockedError. Yields the
    descriptor holding it (a forked child closes its copy, see exporter/processes.py).

    A flock dies with its process, so a killed holder never leaves a stale lock.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"{what} is held by another process ({path})") from None
                time.sleep(0.1)
        yield fd
    finally:
        os.close(fd)
