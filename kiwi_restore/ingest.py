"""Ingest: snapshot a local tree into a contract's repository (stands in for the backup agent).

Symlinks are stored, never followed; sparse files keep their holes (SEEK_DATA/SEEK_HOLE);
hardlinks share a group number; names stay bytes. Files unchanged since the parent
snapshot (same size, mtime, ctime) reuse its chunk list without being read.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

from pyfastcdc import FastCDC

from . import __version__, compression
from .crypto import KIND_CHUNK, KIND_TREE
from .errors import UsageError
from .i18n import _
from .index import BlobLocation
from .repository import PackWriter, Repository, new_id
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
    encode_tree,
    find_child,
)

READ_BLOCK = 8 << 20
INFLIGHT_BYTES = 64 << 20
BATCH_BYTES = 1 << 20  # new chunks handed to a compression worker per task
BATCH_CHUNKS = 64
READERS = 4  # threads that stat, read (small files), hash and list xattrs ahead of the walk
PROBE_GROUP = 16  # directory entries per reader task
PROBE_WINDOW = 8  # reader tasks ahead per directory
PROBE_AHEAD_MAX = 64  # reader tasks ahead in all open directories (deep trees)
HASH_AHEAD = 16  # chunks of a big file hashed by the reader threads ahead of the walker
READAHEAD = 32 << 20  # big files: asked of the kernel ahead of the chunker


@dataclass
class IngestStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    other: int = 0
    bytes: int = 0  # logical file bytes
    unchanged_files: int = 0
    new_chunks: int = 0
    new_chunk_bytes: int = 0  # plaintext bytes of new chunks
    new_trees: int = 0
    stored_bytes: int = 0  # bytes written to the store (packs + index + snapshot)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["errors"] = len(self.errors)
        return d


@lru_cache(maxsize=4096)
def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _group(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _xattrs(path: bytes, follow: bool = False) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return {}
        raise
    out = {}
    for name in sorted(names):
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def _xattrs_fd(fd: int) -> dict[bytes, bytes]:
    """_xattrs of an open regular file."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    if not names:
        return {}
    out = {}
    for name in sorted(names):
        try:
            out[os.fsencode(name)] = os.getxattr(fd, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def _data_segments(fd: int, size: int, st: os.stat_result) -> list[tuple[int, int]]:
    """(start, end) of the regions holding data; holes in between are not read."""
    if size == 0:
        return []
    if st.st_blocks * 512 >= size:
        return [(0, size)]
    segments = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                break
            return [(0, size)]
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end))
        pos = end
    return segments


class _Segment:
    """A file region as a stream for the chunker (readinto, bounded)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end
        # big regions: ask the kernel to read ahead, so the disk overlaps chunking and hashing
        self.ahead = start if end - start > READAHEAD else end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        if self.pos + READAHEAD // 2 >= self.ahead < self.end:
            length = min(READAHEAD, self.end - self.ahead)
            try:
                os.posix_fadvise(self.fd, self.ahead, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            self.ahead += length
        got = os.preadv(self.fd, [buf[:n]], self.pos)
        self.pos += got
        return got


class _Probe:
    __slots__ = ("st", "data", "cid", "xattrs", "error")

    def __init__(self) -> None:
        self.st: os.stat_result | None = None
        self.data: bytes | None = None  # a small file's content, read by the reader thread
        self.cid: bytes | None = None
        self.xattrs: dict[bytes, bytes] | None = None
        self.error: OSError | None = None


class Ingest:
    def __init__(self, repo: Repository, machine: str, progress: Callable[[int, int], None] | None = None,
                 workers: int = 2) -> None:
        self.repo = repo
        self.machine = machine
        self.stats = IngestStats()
        self.progress = progress
        c = repo.config.chunker
        self.chunker = FastCDC(c["avg_size"], min_size=c["min_size"], max_size=c["max_size"],
                               normalized_chunking=c["normalization"], seed=repo.keys.chunker_seed)
        self.min_size = c["min_size"]
        self.index = repo.load_index()
        self.known = self.index.known_ids()
        self.new_entries: list[BlobLocation] = []
        self._entries_lock = threading.Lock()
        # one data pack writer per compression worker: no lock between them, and one
        # worker's pack upload (fsync) does not hold up the others
        self._data_writers: list[PackWriter] = []
        self._local = threading.local()
        self.tree_packs = PackWriter(repo, self._pack_done)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiwi-ingest")
        self.readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kiwi-read")
        self._inflight = threading.BoundedSemaphore(INFLIGHT_BYTES // (1 << 20))
        self._futures: deque[Future] = deque()
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_bytes = 0
        self._probes_ahead = 0
        self._open_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NOATIME if os.geteuid() == 0 else 0)
        self._hardlinks: dict[tuple[int, int], tuple[int, list[tuple[bytes | None, int]]]] = {}
        self._parent_cache: dict[bytes, list[Node]] = {}

    def _pack_done(self, entries: list[BlobLocation]) -> None:
        with self._entries_lock:
            self.new_entries.extend(entries)

    # -- blobs -----------------------------------------------------------------
    def _store_chunk(self, data: bytes) -> bytes:
        return self._add_chunk(self.repo.keys.blob_id(data), data)

    def _add_chunk(self, cid: bytes, data: bytes) -> bytes:
        """Queue a chunk with id CID for compression and packing unless the repository has it."""
        if cid in self.known:
            return cid
        self.known.add(cid)
        self.stats.new_chunks += 1
        self.stats.new_chunk_bytes += len(data)
        self._batch.append((cid, data))
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_CHUNKS:
            self._flush_batch()
        return cid

    def _flush_batch(self) -> None:
        if not self._batch:
            return
        batch, nbytes = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        units = min(max(1, nbytes >> 20), INFLIGHT_BYTES >> 20)
        for _unit in range(units):
            self._inflight.acquire()
        try:
            fut = self.pool.submit(self._pack_batch, batch, units)
        except BaseException:
            for _unit in range(units):
                self._inflight.release()
            raise
        self._futures.append(fut)
        while self._futures and self._futures[0].done():
            self._futures.popleft().result()  # re-raise a worker's failure

    def _pack_batch(self, batch: list[tuple[bytes, bytes]], units: int) -> None:
        try:
            packs = getattr(self._local, "packs", None)
            if packs is None:
                packs = self._local.packs = PackWriter(self.repo, self._pack_done)
                with self._entries_lock:
                    self._data_writers.append(packs)
            compress = compression.compress
            for cid, data in batch:
                packs.add(cid, KIND_CHUNK, compress(data), len(data))
        finally:
            for _unit in range(units):
                self._inflight.release()

    def _store_tree(self, nodes: list[Node]) -> bytes:
        data = encode_tree(nodes)
        tid = self.repo.keys.blob_id(data)
        if tid not in self.known:
            self.known.add(tid)
            self.stats.new_trees += 1
            self.tree_packs.add(tid, KIND_TREE, compression.compress(data), len(data))
        return tid

    # -- files -----------------------------------------------------------------
    def _file_chunks(self, path: bytes, st: os.stat_result) -> list[tuple[bytes | None, int]]:
        fd = os.open(path, self._open_flags)
        try:
            size = os.fstat(fd).st_size
            chunks: list[tuple[bytes | None, int]] = []
            if size <= self.min_size:
                data = os.pread(fd, size, 0) if size else b""
                if data:
                    chunks.append((self._store_chunk(data), len(data)))
                size = len(data)
            else:
                pos = 0
                blob_id = self.repo.keys.blob_id
                hashing: deque[tuple[Future, bytes]] = deque()  # ids computed by the reader threads
                for start, end in _data_segments(fd, size, st):
                    if start > pos:
                        chunks.append((None, start - pos))
                    for ch in self.chunker.cut_stream(_Segment(fd, start, end)):
                        data = bytes(ch.data)
                        hashing.append((self.readers.submit(blob_id, data), data))
                        if len(hashing) > HASH_AHEAD:
                            fut, old = hashing.popleft()
                            chunks.append((self._add_chunk(fut.result(), old), len(old)))
                        if self.progress:
                            self.progress(0, ch.length)
                    while hashing:
                        fut, old = hashing.popleft()
                        chunks.append((self._add_chunk(fut.result(), old), len(old)))
                    pos = end
                if pos < size:
                    chunks.append((None, size - pos))
            return chunks
        finally:
            os.close(fd)

    # -- walking -----------------------------------------------------------------
    def _parent_children(self, parent_tree: bytes | None) -> list[Node]:
        if parent_tree is None:
            return []
        try:
            return self.repo.load_tree(parent_tree)
        except Exception:
            return []  # a damaged parent only costs re-reading the files

    def _node(self, path: bytes, name: bytes, st: os.stat_result, parent_nodes: list[Node],
              probed: _Probe | None = None) -> Node | None:
        """The node of PATH; PROBED holds what a reader thread found (xattrs, a small file's data)."""
        mode = st.st_mode
        node = Node(name=name, type=TYPE_FILE, mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                    user=_user(st.st_uid), group=_group(st.st_gid), mtime=st.st_mtime_ns,
                    atime=st.st_atime_ns, ctime=st.st_ctime_ns)
        if stat.S_ISDIR(mode):
            node.type = TYPE_DIR
            old = find_child(parent_nodes, name) if parent_nodes else None
            node.subtree = self._walk_dir(path, old.subtree if old is not None and old.type == TYPE_DIR else None)
            self.stats.dirs += 1
        elif stat.S_ISREG(mode):
            node.size = st.st_size
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._hardlinks:
                group, chunks = self._hardlinks[key]
                node.chunks = list(chunks)
                node.size = sum(s for _, s in chunks)
            else:
                old = find_child(parent_nodes, name) if parent_nodes else None
                if (old is not None and old.type == TYPE_FILE and old.size == st.st_size
                        and old.mtime == st.st_mtime_ns and old.ctime == st.st_ctime_ns
                        and all(c is None or c in self.known for c, _ in old.chunks)):
                    node.chunks = old.chunks
                    self.stats.unchanged_files += 1
                    if self.progress:
                        self.progress(0, st.st_size)
                elif probed is not None and probed.data is not None:
                    data = probed.data
                    node.chunks = [(self._add_chunk(probed.cid, data), len(data))] if data else []
                    if self.progress:
                        self.progress(0, len(data))
                else:
                    node.chunks = self._file_chunks(path, st)
                node.size = sum(s for _, s in node.chunks)
                if st.st_nlink > 1:
                    group = len(self._hardlinks) + 1
                    self._hardlinks[key] = (group, node.chunks)
            if st.st_nlink > 1:
                node.hardlink = self._hardlinks[key][0]
                node.nlink = st.st_nlink
            self.stats.files += 1
            self.stats.bytes += node.size
            if self.progress:
                self.progress(1, 0)
        elif stat.S_ISLNK(mode):
            node.type = TYPE_SYMLINK
            node.target = os.readlink(path)
            node.size = len(node.target)
            self.stats.symlinks += 1
        elif stat.S_ISFIFO(mode):
            node.type = TYPE_FIFO
            self.stats.other += 1
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            node.type = TYPE_CHARDEV if stat.S_ISCHR(mode) else TYPE_BLOCKDEV
            node.rdev = st.st_rdev
            self.stats.other += 1
        elif stat.S_ISSOCK(mode):
            node.type = TYPE_SOCKET
            self.stats.other += 1
        else:
            return None
        node.xattrs = probed.xattrs if probed is not None else _xattrs(path)
        return node

    def _walk_dir(self, path: bytes, parent_tree: bytes | None) -> bytes:
        parent_nodes = self._parent_children(parent_tree)
        nodes: list[Node] = []
        try:
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            self._warn(path, exc)
            names = []
        # Reader threads lstat the entries, list their xattrs and read (and hash) the small
        # files that changed, a few groups ahead of this loop, which keeps the stored order.
        groups = [names[i:i + PROBE_GROUP] for i in range(0, len(names), PROBE_GROUP)]
        ahead: deque[Future] = deque()
        nxt = 0
        try:
            for group in groups:
                window = PROBE_WINDOW if self._probes_ahead < PROBE_AHEAD_MAX else 1
                while nxt < len(groups) and len(ahead) < window:
                    ahead.append(self.readers.submit(self._probe, path, groups[nxt], parent_nodes))
                    self._probes_ahead += 1
                    nxt += 1
                probes = ahead.popleft().result()
                self._probes_ahead -= 1
                for name, probed in zip(group, probes, strict=True):
                    child = os.path.join(path, name)
                    if probed.error is not None:
                        self._warn(child, probed.error)
                        continue
                    try:
                        node = self._node(child, name, probed.st, parent_nodes, probed)
                    except OSError as exc:
                        self._warn(child, exc)
                        continue
                    if node is not None:
                        nodes.append(node)
        finally:
            for fut in ahead:
                fut.cancel()
            self._probes_ahead -= len(ahead)
        return self._store_tree(nodes)

    def _probe(self, path: bytes, names: list[bytes], parent_nodes: list[Node]) -> list[_Probe]:
        """(reader thread) lstat, xattrs, and the data and id of small changed files."""
        out = []
        for name in names:
            child = os.path.join(path, name)
            p = _Probe()
            try:
                p.st = st = os.lstat(child)
                if stat.S_ISREG(st.st_mode) and st.st_size <= self.min_size and st.st_nlink == 1:
                    old = find_child(parent_nodes, name) if parent_nodes else None
                    if not (old is not None and old.type == TYPE_FILE and old.size == st.st_size
                            and old.mtime == st.st_mtime_ns and old.ctime == st.st_ctime_ns):
                        fd = os.open(child, self._open_flags)
                        try:
                            size = os.fstat(fd).st_size
                            if size <= self.min_size:  # else it grew: the walker chunks it
                                p.data = os.pread(fd, size, 0) if size else b""
                                p.xattrs = _xattrs_fd(fd)
                        finally:
                            os.close(fd)
                        if p.data:
                            p.cid = self.repo.keys.blob_id(p.data)
                if p.xattrs is None:
                    p.xattrs = _xattrs(child)
            except OSError as exc:
                p.error = exc
            out.append(p)
        return out

    def _warn(self, path: bytes, exc: OSError) -> None:
        self.stats.errors.append(f"{os.fsdecode(path)}: {exc.strerror}")

    # -- snapshot ------------------------------------------------------------------
    def run(self, paths: list[bytes], parent: Snapshot | None, tags: list[str], time_ns: int) -> Snapshot:
        paths = sorted({os.path.normpath(os.path.abspath(p)) for p in paths})
        for p in paths:
            if not os.path.lexists(p):
                raise UsageError(_("no such file or directory: {path}").format(path=os.fsdecode(p)))
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a.rstrip(b"/") + b"/"):
                    raise UsageError(_("{inner} is inside {outer}: give each tree once")
                                     .format(inner=os.fsdecode(b), outer=os.fsdecode(a)))
        try:
            root = self._build_root(paths, parent.tree if parent else None)
            self._flush_batch()
            for f in self._futures:
                f.result()
            self._futures.clear()
        finally:
            self.readers.shutdown(wait=True, cancel_futures=True)
            self.pool.shutdown(wait=True)
        for packs in self._data_writers:
            packs.flush()
        self.tree_packs.flush()
        self.stats.stored_bytes = (sum(p.bytes_written for p in self._data_writers)
                                   + self.tree_packs.bytes_written)
        if self.new_entries:
            self.repo.write_index(self.new_entries)
        self.stats.errors = self.stats.errors[:1000]
        snap = Snapshot(id=new_id(), time=time_ns, machine=self.machine, hostname=socket.gethostname(),
                        paths=paths, tree=root, tags=tags, stats=self.stats.to_dict(),
                        program=f"kiwi-restore {__version__}")
        self.repo.save_snapshot(snap)
        return snap

    def _build_root(self, paths: list[bytes], parent_root: bytes | None) -> bytes:
        """Store '/' with the intermediate directories down to each source path."""
        tree: dict = {}
        for p in paths:
            parts = [x for x in p.split(b"/") if x]
            cur = tree
            for part in parts[:-1]:
                cur = cur.setdefault(part, {})
            cur[parts[-1] if parts else b""] = None  # leaf: walk it
        return self._store_level(b"/", tree, parent_root)

    def _store_level(self, path: bytes, level: dict, parent_tree: bytes | None) -> bytes:
        if b"" in level:  # the whole root was asked for
            return self._walk_dir(b"/", parent_tree)
        parent_nodes = self._parent_children(parent_tree)
        nodes = []
        for name, sub in sorted(level.items()):
            child = os.path.join(path, name)
            st = os.lstat(child)
            if sub is None:
                node = self._node(child, name, st, parent_nodes)
                if node is not None:
                    nodes.append(node)
                continue
            old = find_child(parent_nodes, name)
            node = Node(name=name, type=TYPE_DIR, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                        gid=st.st_gid, user=_user(st.st_uid), group=_group(st.st_gid),
                        mtime=st.st_mtime_ns, atime=st.st_atime_ns, ctime=st.st_ctime_ns)
            node.subtree = self._store_level(child, sub, old.subtree if old and old.type == TYPE_DIR else None)
            node.xattrs = _xattrs(child)
            nodes.append(node)
        return self._store_tree(nodes)


def find_parent(snaps: list[Snapshot], machine: str, paths: list[bytes]) -> Snapshot | None:
    paths = sorted({os.path.normpath(os.path.abspath(p)) for p in paths})
    same = [s for s in snaps if s.machine == machine and sorted(s.paths) == paths]
    return max(same, key=lambda s: s.time) if same else None


def backup(repo: Repository, machine: str, paths: list[bytes], tags: list[str] | None = None,
           time_ns: int | None = None, progress: Callable[[int, int], None] | None = None,
           use_parent: bool = True) -> tuple[Snapshot, IngestStats]:
    with repo.lock():
        repo.load_index()
        parent = find_parent(repo.list_snapshots(), machine, paths) if use_parent else None
        ing = Ingest(repo, machine, progress)
        snap = ing.run(paths, parent, tags or [], time_ns or time.time_ns())
        repo.consolidate_index()
    return snap, ing.stats
