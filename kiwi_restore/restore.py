"""Restore a snapshot (or one path of it) into a target directory, metadata included.

Every file system call is relative to an open directory descriptor with O_NOFOLLOW, so a
symlink planted in the target (or restored from the snapshot) can never redirect a write
outside it. Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .crypto import KIND_CHUNK
from .errors import KiwiError, NotFound, UsageError
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

PREFETCH = 16


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


class Restorer:
    def __init__(self, repo: Repository, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None, jobs: int = 4) -> None:
        self.repo = repo
        self.overwrite = overwrite
        self.progress = progress
        self.stats = RestoreStats()
        self.is_root = os.geteuid() == 0
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="kiwi-restore")
        self.hardlinks: dict[int, bytes] = {}  # group -> absolute path of the first restored link
        self.target = b""

    def run(self, snap: Snapshot, path: str | bytes | None, target: str) -> RestoreStats:
        node = lookup(self.repo, snap, path)
        os.makedirs(target, exist_ok=True)
        self.target = os.path.realpath(os.fsencode(target))
        top = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if node.type == TYPE_DIR and not split_path(path or "/"):
                children = self.repo.load_tree(node.subtree)
                self._preflight(top, children)
                self._restore_children(top, self.target, children)
            else:
                self._preflight(top, [node])
                self._restore_node(top, self.target, node)
        finally:
            os.close(top)
            self.pool.shutdown(wait=True)
        return self.stats

    def _preflight(self, dfd: int, nodes: list[Node]) -> None:
        if self.overwrite:
            return
        clash = [n.name for n in nodes if _lexists(dfd, n.name)]
        if clash:
            names = ", ".join(os.fsdecode(n) for n in clash[:5])
            raise KiwiError(_("the target already holds {names}; nothing was restored (use --overwrite to replace)")
                            .format(names=names))

    def _restore_children(self, dfd: int, dpath: bytes, children: list[Node]) -> None:
        for child in children:
            self._restore_node(dfd, dpath, child)

    def _restore_node(self, dfd: int, dpath: bytes, node: Node) -> None:
        name = node.name
        if not name or b"/" in name or name in (b".", b".."):
            raise KiwiError(f"unsafe name {name!r} in the snapshot")
        try:
            if node.type == TYPE_DIR:
                self._restore_dir(dfd, dpath, node)
                return
            self._make_room(dfd, name)
            if node.type == TYPE_FILE:
                if node.hardlink and node.hardlink in self.hardlinks:
                    os.link(self.hardlinks[node.hardlink], name, dst_dir_fd=dfd, follow_symlinks=False)
                    self.stats.files += 1
                    return
                self._restore_file(dfd, node)
                if node.hardlink:
                    self.hardlinks[node.hardlink] = dpath + b"/" + name
                self.stats.files += 1
            elif node.type == TYPE_SYMLINK:
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
                    self.stats.warnings.append(f"{os.fsdecode(dpath + b'/' + name)}: device not created (needs root)")
                    return
                self.stats.other += 1
            elif node.type == TYPE_SOCKET:
                self.stats.warnings.append(f"{os.fsdecode(dpath + b'/' + name)}: socket not restored")
                return
            self._set_meta(dfd, name, node)
        except OSError as exc:
            raise KiwiError(f"{os.fsdecode(dpath + b'/' + name)}: {exc.strerror}") from None

    def _make_room(self, dfd: int, name: bytes) -> None:
        if not _lexists(dfd, name):
            return
        if not self.overwrite:
            raise KiwiError(_("{name} exists (use --overwrite)").format(name=os.fsdecode(name)))
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise KiwiError(_("{name} is a directory; not replaced by a file").format(name=os.fsdecode(name)))
        os.unlink(name, dir_fd=dfd)

    def _restore_dir(self, dfd: int, dpath: bytes, node: Node) -> None:
        name = node.name
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                if not self.overwrite:
                    raise KiwiError(_("{name} exists (use --overwrite)").format(name=os.fsdecode(name))) from None
                os.unlink(name, dir_fd=dfd)
                os.mkdir(name, 0o700, dir_fd=dfd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            self._restore_children(sub, dpath + b"/" + name, self.repo.load_tree(node.subtree))
        finally:
            os.close(sub)
        self.stats.dirs += 1
        self._set_meta(dfd, name, node)

    def _restore_file(self, dfd: int, node: Node) -> None:
        tmp = b".kiwi-restore-" + os.urandom(6).hex().encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            pos = 0
            futures = []
            chunks = node.chunks

            def fetch(cid: bytes) -> bytes:
                return self.repo.read_blob(cid, KIND_CHUNK)

            pending = iter(range(len(chunks)))
            queue: list = []

            def fill() -> None:
                while len(queue) < PREFETCH:
                    i = next(pending, None)
                    if i is None:
                        return
                    cid = chunks[i][0]
                    queue.append((i, self.pool.submit(fetch, cid) if cid is not None else None))

            fill()
            while queue:
                i, fut = queue.pop(0)
                fill()
                size = chunks[i][1]
                if fut is not None:
                    data = fut.result()
                    view = memoryview(data)
                    off = pos
                    while view:
                        n = os.pwrite(fd, view, off)
                        view = view[n:]
                        off += n
                pos += size
                self.stats.bytes += size
                if self.progress:
                    self.progress(0, size)
            del futures
            os.ftruncate(fd, node.size)  # trailing hole, or an empty file
            if self.progress:
                self.progress(1, 0)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        os.rename(tmp, node.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        self._set_meta(dfd, node.name, node)

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


def _lexists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
