"""Local directory backend: temp file, fsync, link into place (never overwrites), fsync dir."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from ..errors import BackendError, NotFound, ObjectExists
from .base import Backend, ObjectInfo


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ValueError(f"invalid storage key {key!r}")


class LocalBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = "file://" + self.root
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        # Readers hold a reference while they pread; an evicted or deleted descriptor is
        # closed only by its last reader, so a recycled descriptor number can never be
        # read by a thread that still thinks it belongs to another pack.
        self._fd_users: dict[int, int] = {}
        self._fd_doomed: set[int] = set()

    def _path(self, key: str) -> str:
        _check_key(key)
        return os.path.join(self.root, key)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"object {key} is missing from {self.url}") from None
        except OSError as exc:
            raise BackendError(f"cannot read {key} from {self.url}: {exc.strerror}") from None

    def _acquire(self, key: str) -> int:
        # Packs are immutable: keep a few descriptors open for ranged reads (mount hot path).
        with self._fd_lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fd_users[fd] = self._fd_users.get(fd, 0) + 1
                return fd
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"object {key} is missing from {self.url}") from None
        except OSError as exc:
            raise BackendError(f"cannot open {key} in {self.url}: {exc.strerror}") from None
        with self._fd_lock:
            prev = self._fds.get(key)
            if prev is not None:
                os.close(fd)
                fd = prev
            else:
                if len(self._fds) >= 64:
                    _, old = self._fds.popitem()
                    self._retire_locked(old)
                self._fds[key] = fd
            self._fd_users[fd] = self._fd_users.get(fd, 0) + 1
        return fd

    def _release(self, fd: int) -> None:
        with self._fd_lock:
            n = self._fd_users[fd] - 1
            if n:
                self._fd_users[fd] = n
                return
            del self._fd_users[fd]
            if fd in self._fd_doomed:
                self._fd_doomed.discard(fd)
                os.close(fd)

    def _retire_locked(self, fd: int) -> None:
        """Close FD (no longer in the cache) now, or when its last reader releases it."""
        if self._fd_users.get(fd):
            self._fd_doomed.add(fd)
        else:
            os.close(fd)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fd = self._acquire(key)
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise BackendError(f"cannot read {key} in {self.url}: {exc.strerror}") from None
        finally:
            self._release(fd)
        if len(data) != length:
            raise BackendError(f"short read of {key} at {offset}: {len(data)} of {length} bytes")
        return data

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if the key exists: never overwrite
            except FileExistsError:
                raise ObjectExists(f"object {key} already exists in {self.url}") from None
        except OSError as exc:
            raise BackendError(f"cannot write {key} to {self.url}: {exc.strerror}") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = os.path.join(self.root, prefix) if prefix else self.root
        if not os.path.isdir(base):
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if ".tmp-" in name:
                    continue
                full = os.path.join(dirpath, name)
                try:
                    size = os.lstat(full).st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(os.path.relpath(full, self.root).replace(os.sep, "/"), size)

    def list_temporaries(self, prefix: str) -> Iterator[str]:
        """Leftover temp files of puts a crash interrupted: not objects, but the purge removes them."""
        base = os.path.join(self.root, prefix)
        for dirpath, _dirs, filenames in os.walk(base):
            for name in filenames:
                if ".tmp-" in name:
                    yield os.path.join(dirpath, name)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._fd_lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                self._retire_locked(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"cannot delete {key} from {self.url}: {exc.strerror}") from None

    def remove_empty_dirs(self, prefix: str) -> None:
        base = os.path.join(self.root, prefix)
        for dirpath, _dirs, _files in os.walk(base, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def close(self) -> None:
        with self._fd_lock:
            fds, self._fds = self._fds, {}
            for fd in fds.values():
                self._retire_locked(fd)
