"""Restore a snapshot (or one path of it) into a target directory, metadata included.

Every file system call is relative to an open directory descriptor with O_NOFOLLOW, so a
symlink planted in the target (or restored from the snapshot) can never redirect a write
outside it. Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .crypto import KIND_CHUNK
from .errors import IntegrityError, KiwiError, NotFound, UsageError
from .i18n import _
from .repository import Repository
from .snapshot import Snapshot
from .tree import (
    TYPE_BLOCKDEV,
    TYPE_CHARDEV,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_FILE,
    TYPE_SOCKET,
    TYPE_SYMLINK,
    Node,
    find_child,
)

PREFETCH = 16  # chunks fetched ahead for a big file
BIG_FILE_CHUNKS = 4  # a file with more chunks gets its own task and prefetching
BATCH_FILES = 64  # small files per worker task
BATCH_BYTES = 4 << 20
INFLIGHT_BATCHES = 4  # per worker


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    other: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def split_path(path: str | bytes) -> list[bytes]:
    p = os.fsencode(path)
    parts = [x for x in p.split(b"/") if x and x != b"."]
    if b".." in parts:
        raise UsageError(_("'..' is not allowed in a snapshot path"))
    return parts


def lookup(repo: Repository, snap: Snapshot, path: str | bytes | None) -> Node:
    """The node at PATH in the snapshot ('/' or None: the root directory)."""
    node = Node(name=b"", type=TYPE_DIR, mode=0o755, subtree=snap.tree, mtime=snap.time)
    for part in split_path(path or "/"):
        if node.type != TYPE_DIR:
            raise NotFound(_("{path}: not found in snapshot {snap}").format(path=os.fsdecode(path), snap=snap.short))
        child = find_child(repo.load_tree(node.subtree), part)
        if child is None:
            raise NotFound(_("{path}: not found in snapshot {snap}").format(path=os.fsdecode(path), snap=snap.short))
        node = child
    return node


def walk(repo: Repository, node: Node, path: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Depth-first (path, node) below a directory node, in stored (byte) order."""
    for child in repo.load_tree(node.subtree):
        p = path + b"/" + child.name
        yield p, child
        if child.type == TYPE_DIR:
            yield from walk(repo, child, p)


class _Dir:
    """An open directory of the target. Its metadata is set, and its descriptor closed, when the
    last reference goes: the walker's, one per pending batch of files, one per open subdirectory."""

    __slots__ = ("fd", "path", "node", "parent", "fresh", "refs")

    def __init__(self, fd: int, path: bytes, node: Node | None, parent: _Dir | None, fresh: bool) -> None:
        self.fd = fd
        self.path = path
        self.node = node  # None: the target itself (no metadata, its descriptor belongs to run())
        self.parent = parent
        self.fresh = fresh  # created by this restore: nothing in it can clash
        self.refs = 1


class Restorer:
    """Walks the snapshot in the calling thread (directories, symlinks, special files) and hands
    regular files to a thread pool in batches; a big file's chunks are fetched ahead by a second pool."""

    def __init__(self, repo: Repository, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None, jobs: int = 4) -> None:
        self.repo = repo
        self.overwrite = overwrite
        self.progress = progress
        self.stats = RestoreStats()
        self.is_root = os.geteuid() == 0
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="kiwi-restore")
        self.chunk_pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="kiwi-restore-chunk")
        self.hardlinks: dict[int, tuple[bytes, Future]] = {}  # group -> (first link's path, its task)
        self.target = b""
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(INFLIGHT_BATCHES * jobs)
        self._futures: list[Future] = []
        self._open_dirs: set[_Dir] = set()
        self._failed: BaseException | None = None
        self._tmp_prefix = b".kiwi-restore-" + os.urandom(4).hex().encode() + b"-"
        self._tmp_counter = itertools.count()

    def run(self, snap: Snapshot, path: str | bytes | None, target: str) -> RestoreStats:
        node = lookup(self.repo, snap, path)
        os.makedirs(target, exist_ok=True)
        self.target = os.path.realpath(os.fsencode(target))
        top_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        top = _Dir(top_fd, self.target, None, None, fresh=False)
        try:
            if node.type == TYPE_DIR and not split_path(path or "/"):
                children = self.repo.load_tree(node.subtree)
                self._preflight(top_fd, children)
                self._restore_children(top, children)
            else:
                self._preflight(top_fd, [node])
                self._restore_children(top, [node])
            self._release(top)
            self._wait_all()
        except BaseException:
            self._failed = self._failed or KiwiError("interrupted")
            raise
        finally:
            self.pool.shutdown(wait=True)
            self.chunk_pool.shutdown(wait=True)
            for d in list(self._open_dirs):  # only after a failure
                os.close(d.fd)
            self._open_dirs.clear()
            os.close(top_fd)
        return self.stats

    def _wait_all(self) -> None:
        for f in self._futures:
            f.result()
        self._futures.clear()

    def _reap(self) -> None:
        keep = []
        for f in self._futures:
            if not f.done():
                keep.append(f)
            elif f.exception() is not None:
                f.result()
        self._futures = keep

    def _preflight(self, dfd: int, nodes: list[Node]) -> None:
        if self.overwrite:
            return
        clash = [n.name for n in nodes if _lexists(dfd, n.name)]
        if clash:
            names = ", ".join(os.fsdecode(n) for n in clash[:5])
            raise KiwiError(_("the target already holds {names}; nothing was restored (use --overwrite to replace)")
                            .format(names=names))

    # -- walking (calling thread) ----------------------------------------------------
    def _restore_children(self, d: _Dir, children: list[Node]) -> None:
        batch: list[Node] = []
        batch_bytes = 0
        for child in children:
            if self._failed is not None:
                self._reap()  # re-raises the worker's error
            self._restore_node(d, child, batch)
            if batch and (len(batch) >= BATCH_FILES or batch_bytes + batch[-1].size >= BATCH_BYTES):
                self._submit(d, batch)
                batch = []
                batch_bytes = 0
            elif batch:
                batch_bytes += batch[-1].size
        if batch:
            self._submit(d, batch)

    def _restore_node(self, d: _Dir, node: Node, batch: list[Node]) -> None:
        """Restore NODE into D now, or (a regular file) append it to BATCH for a worker."""
        name = node.name
        if not name or b"/" in name or name in (b".", b".."):
            raise KiwiError(f"unsafe name {name!r} in the snapshot")
        dfd = d.fd
        try:
            if node.type == TYPE_DIR:
                self._restore_dir(d, node)
                return
            if not d.fresh:
                self._make_room(dfd, name)
            if node.type == TYPE_FILE:
                if node.hardlink and node.hardlink in self.hardlinks:
                    first, task = self.hardlinks[node.hardlink]
                    task.result()  # the first link is written
                    os.link(first, name, dst_dir_fd=dfd, follow_symlinks=False)
                    self.stats.files += 1
                    return
                if node.hardlink or len(node.chunks) > BIG_FILE_CHUNKS:
                    # a task of its own: big files prefetch their chunks, and the other links
                    # of a hardlink group wait for the first one's task
                    self._submit(d, batch)  # keeps the order of the pack reads
                    batch.clear()
                    task = self._submit(d, [node])
                    if node.hardlink:
                        self.hardlinks[node.hardlink] = (d.path + b"/" + name, task)
                else:
                    batch.append(node)
                self.stats.files += 1
                self.stats.bytes += node.size
                return
            if node.type == TYPE_SYMLINK:
                os.symlink(node.target, name, dir_fd=dfd)
                self.stats.symlinks += 1
            elif node.type == TYPE_FIFO:
                os.mkfifo(name, node.mode, dir_fd=dfd)
                self.stats.other += 1
            elif node.type in (TYPE_CHARDEV, TYPE_BLOCKDEV):
                kind = stat.S_IFCHR if node.type == TYPE_CHARDEV else stat.S_IFBLK
                try:
                    os.mknod(name, kind | node.mode, node.rdev, dir_fd=dfd)
                except PermissionError:
                    self.stats.warnings.append(f"{os.fsdecode(d.path + b'/' + name)}: device not created (needs root)")
                    return
                self.stats.other += 1
            elif node.type == TYPE_SOCKET:
                self.stats.warnings.append(f"{os.fsdecode(d.path + b'/' + name)}: socket not restored")
                return
            self._set_meta(dfd, name, node)
        except OSError as exc:
            raise KiwiError(f"{os.fsdecode(d.path + b'/' + name)}: {exc.strerror}") from None

    def _make_room(self, dfd: int, name: bytes) -> None:
        if not _lexists(dfd, name):
            return
        if not self.overwrite:
            raise KiwiError(_("{name} exists (use --overwrite)").format(name=os.fsdecode(name)))
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise KiwiError(_("{name} is a directory; not replaced by a file").format(name=os.fsdecode(name)))
        os.unlink(name, dir_fd=dfd)

    def _restore_dir(self, parent: _Dir, node: Node) -> None:
        name = node.name
        dfd = parent.fd
        fresh = True
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            fresh = False
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                if not self.overwrite:
                    raise KiwiError(_("{name} exists (use --overwrite)").format(name=os.fsdecode(name))) from None
                os.unlink(name, dir_fd=dfd)
                os.mkdir(name, 0o700, dir_fd=dfd)
                fresh = True
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        d = _Dir(sub, parent.path + b"/" + name, node, parent, fresh)
        with self._lock:
            parent.refs += 1
            self._open_dirs.add(d)
        self.stats.dirs += 1
        try:
            self._restore_children(d, self.repo.load_tree(node.subtree))
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        self._release(d)

    def _release(self, d: _Dir | None) -> None:
        """Drop one reference to D; the last one sets its metadata and closes it (then its parent's)."""
        while d is not None:
            with self._lock:
                d.refs -= 1
                if d.refs or self._failed is not None:
                    return
                self._open_dirs.discard(d)
            if d.node is None:
                return
            try:
                self._set_meta_fd(d.fd, d.node)
            except OSError as exc:
                raise KiwiError(f"{os.fsdecode(d.path)}: {exc.strerror}") from None
            finally:
                os.close(d.fd)
            d = d.parent

    # -- files (worker threads) --------------------------------------------------------
    def _submit(self, d: _Dir, batch: list[Node]) -> Future | None:
        if not batch:
            return None
        batch = list(batch)
        self._slots.acquire()
        with self._lock:
            d.refs += 1
        try:
            fut = self.pool.submit(self._write_batch, d, batch)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(fut)
        if len(self._futures) >= 1024:
            self._reap()
        return fut

    def _write_batch(self, d: _Dir, batch: list[Node]) -> None:
        try:
            for node in batch:
                if self._failed is not None:
                    return
                try:
                    self._restore_file(d.fd, node)
                except OSError as exc:
                    raise KiwiError(f"{os.fsdecode(d.path + b'/' + node.name)}: {exc.strerror}") from None
            self._release(d)
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        finally:
            self._slots.release()

    def _restore_file(self, dfd: int, node: Node) -> None:
        tmp = self._tmp_prefix + str(next(self._tmp_counter)).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            end = self._write_chunks(fd, node)
            if end != node.size:
                os.ftruncate(fd, node.size)  # trailing hole
            self._set_meta_fd(fd, node)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        os.rename(tmp, node.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        if self.progress:
            with self._lock:
                self.progress(1, 0)

    def _write_chunks(self, fd: int, node: Node) -> int:
        """Write the file's data (holes are skipped); returns the end of the last data written."""
        chunks = node.chunks
        read_blob = self.repo.read_blob
        pos = end = 0
        if len(chunks) <= BIG_FILE_CHUNKS:
            fetched = ((read_blob(cid, KIND_CHUNK) if cid is not None else None, size) for cid, size in chunks)
        else:
            fetched = self._prefetched(chunks)
        for data, size in fetched:
            if data is not None:
                if len(data) != size:  # the tree and the index disagree: never write a shifted file
                    raise IntegrityError(f"{os.fsdecode(node.name)}: a chunk of {len(data)} bytes where its "
                                         f"directory tree records {size}")
                _pwrite_all(fd, data, pos)
                end = pos + size
            pos += size
            if self.progress:
                with self._lock:
                    self.progress(0, size)
        return end

    def _prefetched(self, chunks: list[tuple[bytes | None, int]]) -> Iterator[tuple[bytes | None, int]]:
        queue: deque = deque()
        pending = iter(chunks)
        fetch = self.repo.read_blob

        def fill() -> None:
            while len(queue) < PREFETCH:
                item = next(pending, None)
                if item is None:
                    return
                cid, size = item
                queue.append((self.chunk_pool.submit(fetch, cid, KIND_CHUNK) if cid is not None else None, size))

        fill()
        try:
            while queue:
                fut, size = queue.popleft()
                fill()
                yield (fut.result() if fut is not None else None), size
        finally:
            for fut, _size in queue:
                if fut is not None:
                    fut.cancel()

    def _set_meta_fd(self, fd: int, node: Node) -> None:
        """Owner, xattrs, mode and times through an open descriptor (file or directory)."""
        if self.is_root:
            try:
                os.fchown(fd, node.uid, node.gid)
            except OSError as exc:
                self.stats.warnings.append(f"{os.fsdecode(node.name)}: owner not restored ({exc.strerror})")
        if node.xattrs:
            for k, v in node.xattrs.items():
                try:
                    os.setxattr(fd, k, v)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                        raise
                    self.stats.warnings.append(f"{os.fsdecode(node.name)}: xattr {os.fsdecode(k)} not restored ({exc.strerror})")
        os.fchmod(fd, node.mode)
        os.utime(fd, ns=(node.atime, node.mtime))

    def _set_meta(self, dfd: int, name: bytes, node: Node) -> None:
        symlink = node.type == TYPE_SYMLINK
        if self.is_root:
            try:
                os.chown(name, node.uid, node.gid, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                self.stats.warnings.append(f"{os.fsdecode(name)}: owner not restored ({exc.strerror})")
        if node.xattrs:
            proc = f"/proc/self/fd/{dfd}/".encode() + name
            for k, v in node.xattrs.items():
                try:
                    os.setxattr(proc, k, v, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                        raise
                    self.stats.warnings.append(f"{os.fsdecode(name)}: xattr {os.fsdecode(k)} not restored ({exc.strerror})")
        if not symlink:
            os.chmod(name, node.mode, dir_fd=dfd)
        os.utime(name, ns=(node.atime, node.mtime), dir_fd=dfd, follow_symlinks=False)


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    n = os.pwrite(fd, data, off)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    off += n
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def _lexists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
