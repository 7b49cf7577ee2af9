"""The pyfuse3 Operations of the browse view (shape of pyfuse3's examples/tmpfs.py).

Snapshots never change, so the kernel may keep everything it is told: entry and attribute
timeouts are long, negative lookups are cached, and files open with keep_cache. A
directory's tree is read on its first lookup or readdir; nothing else is read at mount.

pyfuse3 ends the whole mount when a handler raises anything but FUSEError, so every
handler goes through `guarded`: a failed chunk or tree becomes EIO for that request, is
logged with the object id and the path, and is written to the audit trail as an
alert.integrity record, while the mount keeps serving.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FUSEError

from ..crypto import KIND_TREE
from ..repository import LRU, Repository
from ..tree import chunk_at
from .audit import AuditWriter
from .blobs import ChunkError, ChunkStore, fetch_profile
from .dirs import DirTable
from .inodes import ROOT_INODE, InodeTable
from .layout import Layout

log = logging.getLogger("kiwi_restore.fuse")

TIMEOUT = 24 * 3600.0  # entry and attribute cache lifetime: a snapshot never changes
BLKSIZE = 128 << 10  # st_blksize: tools size their reads from it (cp, cat use max(128 KiB, it))
NAME_MAX = 255

SMALL_FILE = 1 << 20  # files up to this size are prefetched with their neighbours
DIR_PATHS = 50_000  # directory paths remembered for the audit records
# a read spanning chunks answers with their slices in turn (pyfuse3 patch 04), not a joined copy
READ_REPLY_PARTS = getattr(pyfuse3, "READ_REPLY_PARTS", False)
# patch 05: a listing is answered from the table's columns in one call (no per-entry Python)
readdir_reply_columns = getattr(pyfuse3, "readdir_reply_columns", None)
# patch 07: the empty request after a complete listing is answered in C (listings never change)
readdir_end = getattr(pyfuse3, "readdir_end", None)
PACK_TAIL = 8 << 20  # at most this much (and half the window) past the window to finish a pack
RECENT_TABLES = 8  # directories whose table is kept at hand (on top of the LRU)
TREE_PREFETCH = 64  # subdirectory trees loaded ahead when a directory is listed
TREE_PREFETCH_DEPTH = 1  # ... and so many levels below it (each level multiplies the work)
TREE_BATCH = 16  # trees loaded per worker job (fewer thread hand-overs than 4: -8 % CPU on a cold walk)


class TreeError(Exception):
    """A directory's tree could not be read (the request gets EIO)."""

    def __init__(self, tree_id: bytes, slot: int, error: Exception) -> None:
        super().__init__(str(error))
        self.tree_id = tree_id
        self.slot = slot
        self.error = error


class _TreeLoad:
    __slots__ = ("event", "table", "error", "claimed")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.table: DirTable | None = None
        self.error: Exception | None = None
        self.claimed = False  # a thread is reading it (a queued prefetch is not)


class Synth:
    """A directory or link made up by the mount: the root, machines, snapshots, `latest`."""

    __slots__ = ("ino", "name", "mode", "mtime", "parent", "children", "target", "slot", "nlink")

    def __init__(self, ino: int, name: bytes, mode: int, mtime: int, parent: int) -> None:
        self.ino = ino
        self.name = name
        self.mode = mode
        self.mtime = mtime
        self.parent = parent
        self.children: list[Synth] = []
        self.target: bytes | None = None
        self.slot: int | None = None  # snapshot directories: the slot of the snapshot's root tree
        self.nlink = 1


class FileHandle:
    __slots__ = ("ino", "size", "chunks", "slot", "snap", "offsets", "next_off", "window", "ra_index")

    def __init__(self, ino: int, size: int, chunks: list[tuple[bytes | None, int]], slot: int, snap: int) -> None:
        self.ino = ino
        self.size = size
        self.chunks = chunks
        self.slot = slot
        self.snap = snap
        self.offsets: list[int] | None = None
        self.next_off = 0  # where a sequential reader reads next
        self.window = 0  # readahead distance, doubled on each sequential read
        self.ra_index = 0  # chunks before this index were already prefetched


def guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map every failure of a handler to an errno, so one bad request never ends the mount."""

    @functools.wraps(fn)
    async def wrapper(self: KiwiFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except TreeError as exc:
            try:
                await self._tree_failed(exc)
            except Exception:  # reporting must not be what ends the mount
                log.exception("while reporting %s", exc)
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            log.exception("%s%r failed: %s", fn.__name__, args[:1], exc)
            self.errors += 1
            raise FUSEError(errno.EIO) from None

    return wrapper


class KiwiFS(pyfuse3.Operations):
    # A directory's handle is its inode, so nothing is kept per open. pyfuse3 as built by
    # scripts/setup.sh (scripts/patches/) then skips opendir and releasedir altogether, and
    # the kernel keeps each listing in its cache: a second walk never reaches us. Stock
    # pyfuse3 ignores this flag and still calls opendir.
    skip_opendir = True

    def __init__(self, repo: Repository, layout: Layout, cache_bytes: int, audit: AuditWriter) -> None:
        super().__init__()
        self.repo = repo
        self.layout = layout
        self.snaps = layout.snapshots
        self.audit = audit
        self.cache_bytes = cache_bytes
        self.uid, self.gid = os.getuid(), os.getgid()
        self.synth: dict[int, Synth] = {}
        self._build_synthetic()
        self.inodes = InodeTable(max(self.synth) + 1)
        for s in self.synth.values():
            if s.slot is not None:  # set to the snapshot number by _build_synthetic
                s.slot = self.inodes.add_dir(s.ino, s.parent, s.slot, self.snaps[s.slot].tree)
        self.handles: dict[int, FileHandle] = {}
        self._next_fh = 1
        # directory tables get a third of the cache budget, decrypted chunks the rest
        self.tables = LRU(cache_bytes // 3, size_of=lambda t: t.nbytes)
        self.chunk_bytes = cache_bytes - cache_bytes // 3
        self.profile = fetch_profile(repo)
        self.sequential_readers = 0  # open files being read in order (their window is open)
        self._tree_loads: dict[bytes, _TreeLoad] = {}
        self._horizon: dict[int, tuple[int, int]] = {}  # dir slot -> files prefetched [start, end)
        self._dir_paths: dict[int, bytes] = {}
        self._listed: set[int] = set()  # directory slots listed (readdirplus) at least once
        self._recent: dict[int, DirTable] = {}  # slot -> table of the last directories used
        self._audited = bytearray()  # bit per inode: opened (and recorded) in this session
        self._alerted: set[bytes] = set()
        self.opens = 0
        self.listings = 0  # readdir requests: those the kernel answers from its cache never come
        self.bytes_read = 0
        self.reads = 0
        self.errors = 0
        # set by start(), inside trio
        self.chunks: ChunkStore | None = None
        self.nursery: trio.Nursery | None = None
        self.tree_limiter: trio.CapacityLimiter | None = None
        self.tree_prefetch_limiter: trio.CapacityLimiter | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Bind to the running trio loop (limiters and background prefetch tasks)."""
        self.nursery = nursery
        self.chunks = ChunkStore(self.repo, self.chunk_bytes, self.profile)
        self.tree_limiter = trio.CapacityLimiter(4)
        self.tree_prefetch_limiter = trio.CapacityLimiter(2)

    # -- the synthetic top ---------------------------------------------------------------
    def _build_synthetic(self) -> None:
        newest = self.layout.newest_time
        root = Synth(ROOT_INODE, b"", stat.S_IFDIR | 0o555, newest, ROOT_INODE)
        self.synth[ROOT_INODE] = root
        ino = ROOT_INODE + 1
        for m in self.layout.machines:
            latest = m.latest
            md = Synth(ino, m.name, stat.S_IFDIR | 0o555, latest.snap.time, ROOT_INODE)
            self.synth[ino] = md
            root.children.append(md)
            ino += 1
            for sd in m.snapshots:
                s = Synth(ino, sd.name, stat.S_IFDIR | 0o555, sd.snap.time, md.ino)
                s.slot = sd.no  # replaced by the inode table's slot in __init__
                self.synth[ino] = s
                md.children.append(s)
                ino += 1
            link = Synth(ino, b"latest", stat.S_IFLNK | 0o777, latest.snap.time, md.ino)
            link.target = latest.name
            self.synth[ino] = link
            md.children.append(link)
            ino += 1
            md.children.sort(key=lambda c: c.name)
            md.nlink = 2 + len(m.snapshots)
        root.children.sort(key=lambda c: c.name)
        root.nlink = 2 + len(self.layout.machines)

    def _synth_attr(self, s: Synth) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = s.ino
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = s.mode
        a.st_nlink = s.nlink
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_size = len(s.target) if s.target is not None else 0
        a.st_blksize = BLKSIZE
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = s.mtime
        return a

    # -- trees -------------------------------------------------------------------------------
    def _attr(self, ino: int, t: DirTable, i: int, snap_no: int) -> EntryAttributes:
        link = t.hardlink[i]
        if link:  # every link of the group reports the inode of the first one seen
            ino = self.inodes.hardlink(snap_no, link, ino)
        return t.fill(self._new_attr(), i, ino)

    @staticmethod
    def _new_attr() -> EntryAttributes:
        a = EntryAttributes()
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_blksize = BLKSIZE
        return a

    async def _table(self, slot: int) -> DirTable:
        """The entries of the directory in SLOT, from the cache or the store."""
        t = self._recent.get(slot)
        if t is not None:
            return t
        tid = self.inodes.tree(slot)
        t = self.tables.get(tid)
        if t is None:
            load = self._tree_loads.get(tid)
            if load is None or not load.claimed:
                # not loading yet, or only queued for prefetch (perhaps behind many others):
                # a request waits on it now, so it is read now
                if load is None:
                    load = self._tree_loads[tid] = _TreeLoad()
                load.claimed = True
                try:
                    load.table = await trio.to_thread.run_sync(self._read_table, tid, limiter=self.tree_limiter)
                except Exception as exc:
                    load.error = exc
                finally:
                    self._tree_loads.pop(tid, None)
                    load.event.set()
            else:
                await load.event.wait()
            if load.table is None:
                raise TreeError(tid, slot, load.error or RuntimeError("tree load interrupted"))
            t = load.table
        self.inodes.first_child(slot, len(t))
        if len(self._recent) >= RECENT_TABLES:
            del self._recent[next(iter(self._recent))]
        self._recent[slot] = t
        return t

    def _read_table(self, tid: bytes) -> DirTable:
        """(worker thread) read, decrypt and decode one tree, keep it as columns."""
        t = DirTable.decode(self.repo.read_blob(tid, KIND_TREE), f"tree {tid.hex()}")
        self.tables.put(tid, t)
        return t

    def _prefetch_trees(self, t: DirTable, depth: int = TREE_PREFETCH_DEPTH) -> None:
        """Load the subdirectories' trees (and theirs, DEPTH levels down) ahead of the walk
        that usually follows a listing: find, tar, rsync and cp go depth first."""
        want = []
        for tid in t.subtrees.values():
            if tid not in self._tree_loads and self.tables.get(tid) is None:
                self._tree_loads[tid] = _TreeLoad()
                want.append(tid)
                if len(want) >= TREE_PREFETCH:
                    break
        for i in range(0, len(want), TREE_BATCH):
            self.nursery.start_soon(self._load_trees, want[i:i + TREE_BATCH], depth - 1)

    async def _load_trees(self, tids: list[bytes], depth: int) -> None:
        loads = {tid: self._tree_loads.get(tid) for tid in tids}

        def work() -> list[tuple[DirTable | None, Exception | None]]:
            out: list[tuple[DirTable | None, Exception | None]] = []
            for tid in tids:
                load = loads[tid]
                if load is None or load.claimed:  # a request took it over meanwhile
                    out.append((None, None))
                    continue
                load.claimed = True
                try:
                    out.append((self._read_table(tid), None))
                except Exception as exc:  # the lookup that needs it gets the error
                    out.append((None, exc))
            return out

        results: list[tuple[DirTable | None, Exception | None]] = []
        try:
            results = await trio.to_thread.run_sync(work, limiter=self.tree_prefetch_limiter)
        except Exception as exc:
            log.debug("tree prefetch failed: %s", exc)
        finally:
            for i, tid in enumerate(tids):
                load = loads[tid]
                if load is None or (i < len(results) and results[i] == (None, None)):
                    continue  # settled by the request that took it over
                if self._tree_loads.get(tid) is load:
                    del self._tree_loads[tid]
                if i < len(results):
                    load.table, load.error = results[i]
                load.event.set()
        if depth > 0:
            for table, _err in results:
                if table is not None and table.subtrees:
                    self._prefetch_trees(table, depth)

    async def _locate(self, ino: int) -> tuple[int, int, DirTable]:
        """(directory slot, index, directory table) of an entry inode."""
        loc = self.inodes.locate(ino)
        if loc is None:
            raise FUSEError(errno.ENOENT)
        slot, index = loc
        return slot, index, await self._table(slot)

    async def _dir_slot(self, ino: int) -> int:
        slot = self.inodes.slot(ino)
        if slot is not None:
            return slot
        pslot, index, t = await self._locate(ino)
        if not t.is_dir(index):
            raise FUSEError(errno.ENOTDIR)
        return self.inodes.add_dir(ino, self.inodes.dir_inode(pslot), self.inodes.snap(pslot), t.subtrees[index])

    async def _path(self, ino: int) -> bytes:
        """The entry's original absolute path in its snapshot."""
        loc = self.inodes.locate(ino)
        if loc is None:
            return b"/"
        slot, index = loc
        name = (await self._table(slot)).names[index]
        return await self._dir_path(slot) + b"/" + name

    async def _dir_path(self, slot: int) -> bytes:
        """The path of the directory in SLOT ('' for a snapshot's root), remembered."""
        path = self._dir_paths.get(slot)
        if path is None:
            ino = self.inodes.dir_inode(slot)
            loc = self.inodes.locate(ino)
            if loc is None:
                path = b""
            else:
                pslot, index = loc
                path = await self._dir_path(pslot) + b"/" + (await self._table(pslot)).names[index]
            if len(self._dir_paths) >= DIR_PATHS:
                self._dir_paths.clear()
            self._dir_paths[slot] = path
        return path

    def _path_cached(self, slot: int) -> bytes:
        """A directory's path from cached trees only (for error reports; '?' if evicted)."""
        parts = []
        ino = self.inodes.dir_inode(slot)
        while True:
            loc = self.inodes.locate(ino)
            if loc is None:
                break
            pslot, index = loc
            t = self.tables.get(self.inodes.tree(pslot))
            parts.append(t.names[index] if t is not None else b"?")
            ino = self.inodes.dir_inode(pslot)
        return b"/" + b"/".join(reversed(parts))

    # -- integrity failures ----------------------------------------------------------------
    def _report(self, snap_no: int, obj: bytes, error: Exception, path: bytes) -> None:
        self.errors += 1
        snap = self.snaps[snap_no]
        # the path goes only into the audit record, sealed: a daemon's log is a file on local
        # disk, and file names of health data must not land there in clear
        log.error("EIO in snapshot %s (%s): object %s: %s (path sealed in the audit trail: "
                  "kiwi-restore audit show --unseal)", snap.short, snap.machine, obj.hex(), error)
        if obj not in self._alerted:  # one alert per object and session, however often it is read
            self._alerted.add(obj)
            self.audit.integrity(snap.hex, obj.hex(), str(error), path)

    async def _tree_failed(self, exc: TreeError) -> None:
        self._report(self.inodes.snap(exc.slot), exc.tree_id, exc.error, self._path_cached(exc.slot))

    async def _chunk_failed(self, h: FileHandle, exc: ChunkError) -> None:
        try:
            path = await self._path(h.ino)
        except Exception:
            path = b"?"
        self._report(h.snap, exc.chunk_id, exc.error, path)

    # -- lookups -------------------------------------------------------------------------------
    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext = None) -> EntryAttributes:
        s = self.synth.get(parent_inode)
        if s is not None and s.slot is None:
            for c in s.children:
                if c.name == name:
                    return self._synth_attr(c)
            return self._negative()
        slot = await self._dir_slot(parent_inode)
        t = await self._table(slot)
        i = t.find(name)
        if i < 0:
            return self._negative()
        return self._attr(self.inodes.first_child(slot, len(t)) + i, t, i, self.inodes.snap(slot))

    @staticmethod
    def _negative() -> EntryAttributes:
        a = EntryAttributes()  # st_ino 0: "no such entry", cached for entry_timeout
        a.entry_timeout = TIMEOUT
        return a

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext = None) -> EntryAttributes:
        s = self.synth.get(inode)
        if s is not None:
            return self._synth_attr(s)
        slot, index, t = await self._locate(inode)
        return self._attr(inode, t, index, self.inodes.snap(slot))

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        s = self.synth.get(inode)
        if s is not None:
            if s.target is None:
                raise FUSEError(errno.EINVAL)
            return s.target
        _slot, index, t = await self._locate(inode)
        target = t.targets.get(index)
        if target is None:
            raise FUSEError(errno.EINVAL)
        return target

    # -- directories ---------------------------------------------------------------------------
    def _new_handle(self, h: FileHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._listable(inode)
        return inode

    async def _listable(self, inode: int) -> Synth | int:
        """The made-up directory INODE is, or the slot of the stored one (ENOTDIR if neither)."""
        s = self.synth.get(inode)
        if s is not None and s.slot is None:
            if s.target is not None:
                raise FUSEError(errno.ENOTDIR)
            return s
        return await self._dir_slot(inode)

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = fh  # see skip_opendir
        self.listings += 1
        reply = pyfuse3.readdir_reply
        where = await self._listable(ino)
        # positions: 0 is ".", 1 is "..", entry i is i + 2; next_id is the position after
        if isinstance(where, Synth):
            s = where
            if start_id == 0 and not reply(token, b".", self._synth_attr(s), 1):
                return
            if start_id <= 1 and not reply(token, b"..", self._synth_attr(self.synth[s.parent]), 2):
                return
            for i in range(max(0, start_id - 2), len(s.children)):
                if not reply(token, s.children[i].name, self._synth_attr(s.children[i]), i + 3):
                    return
            self._listed_to_end(ino, len(s.children))
            return
        slot = where
        t = await self._table(slot)
        if start_id == 0 or slot not in self._listed:
            self._prefetch_trees(t)
            self._listed.add(slot)  # the kernel now knows these entries' inodes
        if start_id == 0 and not reply(token, b".", await self.getattr(ino), 1):
            return
        if start_id <= 1 and not reply(token, b"..", await self.getattr(self.inodes.parent(slot)), 2):
            return
        first = self.inodes.first_child(slot, len(t))
        snap = self.inodes.snap(slot)
        names, links, fill = t.names, t.hardlink, t.fill
        hardlink = self.inodes.hardlink
        a = self._new_attr()  # one object for the whole listing: readdir_reply copies it
        start = max(0, start_id - 2)
        if readdir_reply_columns is not None:
            def resolve(i: int) -> int:  # the files of a hardlink group share one inode
                return hardlink(snap, links[i], first + i)

            sent = readdir_reply_columns(token, a, names, start, first, links, resolve, 3, t.mode, t.nlink,
                                         t.uid, t.gid, t.size, t.alloc, t.rdev, t.atime, t.mtime, t.ctime)
            if sent == len(names):
                self._listed_to_end(ino, len(names))
            return
        for i in range(start, len(names)):
            entry = first + i if not links[i] else hardlink(snap, links[i], first + i)
            if not reply(token, names[i], fill(a, i, entry), i + 3):
                return
        self._listed_to_end(ino, len(names))

    @staticmethod
    def _listed_to_end(ino: int, count: int) -> None:
        """The listing of directory INO (COUNT entries) was sent to its end: pyfuse3 answers
        the request past it, at position COUNT + 2 (after "." and ".."), without us."""
        if readdir_end is not None:
            readdir_end(ino, count + 2)

    async def releasedir(self, fh: int) -> None:
        pass  # a directory handle holds nothing (see skip_opendir)

    # -- files ---------------------------------------------------------------------------------
    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EROFS)
        if self.audit.failed is not None:
            raise FUSEError(errno.EACCES)  # fail closed: no access that the trail would miss
        if inode in self.synth:
            raise FUSEError(errno.EISDIR)
        slot, index, t = await self._locate(inode)
        if not t.is_file(index):
            raise FUSEError(errno.EISDIR if t.is_dir(index) else errno.EINVAL)
        snap = self.inodes.snap(slot)
        size = t.size[index]
        h = FileHandle(inode, size, t.chunks(index), slot, snap)
        fh = self._new_handle(h)
        self.opens += 1
        byte, bit = inode >> 3, 1 << (inode & 7)
        if byte >= len(self._audited):
            self._audited.extend(bytes(byte + 1 - len(self._audited) + 4096))
        if not self._audited[byte] & bit:
            self._audited[byte] |= bit
            self.audit.opened(self.snaps[snap].hex, await self._path(inode))
        if size <= SMALL_FILE:
            self._prefetch_siblings(slot, index, t)
        else:
            self._readahead(h, 0)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _prefetch_siblings(self, slot: int, index: int, t: DirTable) -> None:
        """Fetch this small file and the small files after it in the directory, grouped by
        pack: tar, cp and rsync read a directory's files in its order. When the kernel
        knows them (the directory was listed), their data goes into its page cache.

        From a remote store, where each fetch waits a round trip, the walk is followed
        further: into the subdirectories met on the way and, past the directory's end,
        on to what follows it in its parents, so that a walk does not stop for a round
        trip at every directory it enters or leaves."""
        start, horizon = self._horizon.get(slot, (0, 0))
        if start <= index < horizon - self.profile.sibling_files // 2:
            return  # well inside what was fetched last time
        if not start <= index < horizon:
            horizon = index  # another pass, or a jump: start over from here
        want: list[tuple[bytes, int]] = []
        pushes: list[tuple[int, int, bytes, bool]] = []
        here = slot if slot in self._listed else None
        budget = self.profile.sibling_bytes
        walk = self.profile.walk_ahead
        total = 0
        j = first = max(index, horizon)
        end = min(len(t), j + self.profile.sibling_files)
        while j < end and total < budget:
            if t.is_file(j) and t.size[j] <= SMALL_FILE:
                total += self._want_file(t, j, here, want, pushes)
            elif walk and t.is_dir(j):
                total += self._want_subtree(self.tables.get(t.subtrees[j]), 0, budget - total, want, depth=2)
            j += 1
        if walk and first < len(t) <= j and total < budget:  # reached the end just now
            self._want_after(slot, budget - total, want, pushes)
        self._horizon[slot] = (index, j)
        self.chunks.prefetch(self.nursery, want, pushes)

    def _want_file(self, t: DirTable, i: int, slot: int | None, want: list[tuple[bytes, int]],
                   pushes: list[tuple[int, int, bytes, bool]]) -> int:
        """Queue the chunks of file I of T (pushed to the page cache too when SLOT, the
        directory's, was listed: the kernel knows the file's inode). Returns their bytes."""
        ino = 0
        if slot is not None:
            ino = self.inodes.first_child(slot, len(t)) + i
            if t.hardlink[i]:
                ino = self.inodes.hardlink(self.inodes.snap(slot), t.hardlink[i], ino)
        chunks = t.chunks(i)
        whole = len(chunks) == 1  # the chunk is the whole file: pushed, it leaves our cache
        off = total = 0
        for cid, size in chunks:
            if cid is not None:
                want.append((cid, size))
                if ino:
                    pushes.append((ino, off, cid, whole))
                total += size
            off += size
        return total

    def _want_subtree(self, t: DirTable | None, start: int, budget: int, want: list[tuple[bytes, int]],
                      depth: int) -> int:
        """Queue the small files a depth-first walk meets in T from entry START (and in the
        subdirectories whose tree is loaded, DEPTH levels down), up to BUDGET bytes. Fetched
        into our cache only: the kernel has not seen these files yet."""
        total = 0
        if t is None:
            return 0
        no_pushes: list[tuple[int, int, bytes, bool]] = []
        for i in range(start, len(t)):
            if total >= budget:
                break
            if t.is_file(i) and t.size[i] <= SMALL_FILE:
                total += self._want_file(t, i, None, want, no_pushes)
            elif depth and t.is_dir(i):
                total += self._want_subtree(self.tables.get(t.subtrees[i]), 0, budget - total, want, depth - 1)
        return total

    def _want_after(self, slot: int, budget: int, want: list[tuple[bytes, int]],
                    pushes: list[tuple[int, int, bytes, bool]]) -> None:
        """Queue what a walk meets once done with the directory in SLOT: the entries after
        it in its parent (pushed: the parent was listed), then in the grandparent."""
        for _level in range(2):
            loc = self.inodes.locate(self.inodes.dir_inode(slot))
            if loc is None:
                return  # a snapshot's root
            pslot, pindex = loc
            pt = self._recent.get(pslot) or self.tables.get(self.inodes.tree(pslot))
            if pt is None:
                return
            listed = pslot if pslot in self._listed else None
            # the parent's own prefetch may have got past this directory already (its
            # files were pushed and left our cache): go on from where it stopped
            pstart, phorizon = self._horizon.get(pslot, (pindex, pindex + 1))
            i = max(pindex + 1, phorizon)
            while i < len(pt) and budget > 0:
                if pt.is_file(i) and pt.size[i] <= SMALL_FILE:
                    budget -= self._want_file(pt, i, listed, want, pushes)
                elif pt.is_dir(i):
                    budget -= self._want_subtree(self.tables.get(pt.subtrees[i]), 0, budget, want, depth=1)
                i += 1
            self._horizon[pslot] = (min(pstart, pindex), i)
            if i < len(pt):
                return
            slot = pslot

    def _max_window(self) -> int:
        """A sequential reader's readahead window: the readers at once share half the chunk
        cache, so what one prefetches is still there when it gets to it."""
        share = self.chunk_bytes // (2 * max(1, self.sequential_readers))
        return max(1 << 20, min(self.profile.max_readahead, share))

    def _readahead(self, h: FileHandle, pos: int) -> None:
        """Prefetch the chunks of a sequentially read file up to its window past POS."""
        chunks = h.chunks
        if h.offsets is None:
            h.offsets = _offsets(chunks)
        offsets = h.offsets
        target = pos + max(h.window, 1)
        j = max(h.ra_index, chunk_at(offsets, pos))
        if j >= len(chunks) or offsets[j] >= target:
            return
        if offsets[j] - pos >= h.window // 2:
            # at least half the window is still on its way: refill later, in one batch.
            # Topping up a chunk per read made one request per chunk (a GET each on S3)
            return
        want = []
        while j < len(chunks) and offsets[j] < target:
            if chunks[j][0] is not None:
                want.append(chunks[j])
            j += 1
        packs = None
        if self.profile.pack_reads and want:
            # the backup spreads a file's chunks over the packs it fills side by side, and a
            # GET costs the server and us more than its bytes: the batch is fetched a pack per
            # request, and goes on past the window while the chunks stay in those packs
            packs = {cid: self.chunks.pack_of(cid) for cid, _ in want}
            asked = set(packs.values())
            extra = 0
            tail = min(PACK_TAIL, h.window // 2)  # within what the readers' share of the cache holds
            while j < len(chunks) and extra < tail:
                cid = chunks[j][0]
                pack = self.chunks.pack_of(cid) if cid is not None else None
                if pack is None or pack not in asked:
                    break
                packs[cid] = pack
                want.append(chunks[j])
                extra += chunks[j][1]
                j += 1
        h.ra_index = j
        # no page cache push here: chunk edges rarely fall on page boundaries, so the
        # kernel would still ask for those pages; large READs cost little per byte anyway
        self.chunks.prefetch(self.nursery, want, sequential=True, packs=packs)

    async def _chunk(self, h: FileHandle, cid: bytes, size: int) -> bytes | memoryview:
        data = self.chunks.cached(cid)
        if data is not None:
            return data
        try:
            return await self.chunks.get(cid, size)
        except ChunkError as exc:
            await self._chunk_failed(h, exc)
            raise FUSEError(errno.EIO) from None

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | tuple[bytes | memoryview, ...]:
        h = self.handles.get(fh)
        if not isinstance(h, FileHandle):
            raise FUSEError(errno.EBADF)
        end = min(off + size, h.size)
        if off >= end:
            return b""
        self.bytes_read += end - off
        self.reads += 1
        chunks = h.chunks
        if len(chunks) == 1:  # most files: one chunk, no search
            cid, csize = chunks[0]
            if cid is None:
                return bytes(end - off)
            data = await self._chunk(h, cid, csize)
            return data if off == 0 and end == len(data) else memoryview(data)[off:end]
        if h.offsets is None:
            h.offsets = _offsets(chunks)
        offsets = h.offsets
        # sequential reads widen the readahead window; a seek closes it
        if off == h.next_off:
            if not h.window:
                self.sequential_readers += 1
            h.window = min(max(2 * h.window, 1 << 20), self._max_window())
        else:
            if h.window:
                self.sequential_readers -= 1
            h.window = 0
            h.ra_index = 0
        h.next_off = end
        if h.window and h.ra_index < len(chunks):
            self._readahead(h, end)
        i = chunk_at(offsets, off)  # binary search
        k = chunk_at(offsets, end - 1) + 1
        if k - i > 1:  # several chunks: whatever is missing is fetched together, not in turn
            missing = [c for c in chunks[i:k] if c[0] is not None and self.chunks.wanted(c[0])]
            if len(missing) > 1:
                self.chunks.prefetch(self.nursery, missing, urgent=True)
        parts: list[bytes | memoryview] = []
        pos = off
        while pos < end:
            cid, csize = chunks[i]
            start = offsets[i]
            lo = pos - start
            hi = min(end - start, csize)
            if cid is None:
                parts.append(bytes(hi - lo))
            else:
                data = await self._chunk(h, cid, csize)
                parts.append(data if lo == 0 and hi == csize else memoryview(data)[lo:hi])
            pos = start + hi
            i += 1
        if len(parts) == 1:
            return parts[0]
        return tuple(parts) if READ_REPLY_PARTS and len(parts) <= 64 else b"".join(parts)

    @guarded
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if isinstance(h, FileHandle) and h.window:
            self.sequential_readers -= 1

    # -- extended attributes, statfs ---------------------------------------------------------
    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode in self.synth:
            raise FUSEError(pyfuse3.ENOATTR)
        _slot, index, t = await self._locate(inode)
        value = t.xattrs.get(index, {}).get(name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode in self.synth:
            return []
        _slot, index, t = await self._locate(inode)
        return list(t.xattrs.get(index, ()))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        total = sum(int(sn.stats.get("bytes", 0)) for sn in self.snaps)
        entries = sum(int(sn.stats.get(k, 0)) for sn in self.snaps for k in ("files", "dirs", "symlinks", "other"))
        s.f_bsize = BLKSIZE
        s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = entries + len(self.synth)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    # -- everything that would write: read-only file system --------------------------------
    async def setattr(self, *args: Any) -> EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> EntryAttributes:
        raise FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, EntryAttributes]:
        raise FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise FUSEError(errno.EROFS)

    # -- statistics ------------------------------------------------------------------------------
    def summary(self) -> dict:
        st = self.chunks.stats if self.chunks else None
        return {"opens": self.opens, "listings": self.listings, "reads": self.reads,
                "bytes_read": self.bytes_read, "errors": self.errors,
                "inodes": self.inodes.allocated,
                "chunk_hits": st.hits if st else 0, "chunk_misses": st.misses if st else 0,
                "chunks_prefetched": st.prefetched if st else 0, "pushed_bytes": st.pushed if st else 0}


def _offsets(chunks: list[tuple[bytes | None, int]]) -> list[int]:
    """Start offset of each chunk, for the binary search of a read's offset (tree.chunk_at)."""
    out = [0] * len(chunks)
    pos = 0
    for i, (_cid, size) in enumerate(chunks):
        out[i] = pos
        pos += size
    return out
