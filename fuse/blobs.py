"""Decrypted chunks for the mount: a bounded LRU, single-flight fetches, pack-grouped reads.

Blocking work (backend reads, decryption, decompression) runs in worker threads through
`trio.to_thread.run_sync` under capacity limiters; the trio loop only slices cached bytes.
Several chunks wanted together (the next chunks of a file read sequentially, the small
files that follow the one just opened in a directory) are located in the index, grouped
by pack and read with one ranged read per run of neighbouring blobs: files of a directory
were written together, so they usually sit side by side in one pack.

Plaintext lives only in memory; nothing is written to local disk.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import pyfuse3
import trio

from ..errors import BackendError, IntegrityError, NotFound
from ..index import BlobLocation
from ..repository import Repository

log = logging.getLogger("kiwi_restore.fuse")

MAX_SPAN = 16 << 20  # never read more than this in one request


@dataclass(frozen=True)
class FetchProfile:
    """How much the mount asks of its store at once."""

    merge_gap: int  # read through gaps up to this size rather than issue another request
    prefetchers: int  # prefetch jobs running at once
    job_bytes: int  # plaintext bytes one prefetch job fetches (small files of a directory)
    sequential_job_bytes: int  # ... for a file read in order
    max_readahead: int  # how far ahead of a sequential reader
    sibling_bytes: int  # how far ahead in a directory small files are prefetched
    sibling_files: int
    walk_ahead: bool  # ... and on into subdirectories and past the directory's end
    pack_reads: bool  # a file read in order is fetched a whole pack per request


LOCAL = FetchProfile(merge_gap=256 << 10, prefetchers=2, job_bytes=2 << 20, sequential_job_bytes=2 << 20,
                     max_readahead=16 << 20, sibling_bytes=4 << 20, sibling_files=128, walk_ahead=False,
                     pack_reads=False)
# A remote store (S3) answers in milliseconds: reading through a 1 MiB gap costs less than
# another request, more in flight hides the latency, and a walk's next directories are
# fetched before it gets there. A file read in order is fetched a pack per request: each GET
# costs Ceph RGW about 2.6 ms of CPU and us 1 ms besides its bytes (186 GETs per GiB instead
# of 619 with 3 MiB jobs: 1 GiB in 2.2 + 2.9 CPU seconds, client + server, instead of 3 + 3.7).
REMOTE = FetchProfile(merge_gap=1 << 20, prefetchers=4, job_bytes=4 << 20, sequential_job_bytes=16 << 20,
                      max_readahead=48 << 20, sibling_bytes=16 << 20, sibling_files=512, walk_ahead=True,
                      pack_reads=True)


def fetch_profile(repo: Repository) -> FetchProfile:
    return REMOTE if repo.backend.remote else LOCAL


class ChunkCache:
    """Decrypted chunks, least recently used dropped first, bounded by their total size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # worker threads read it too

    def get(self, key: bytes) -> bytes | memoryview | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._d[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._d.popitem(last=False)[1])

    def discard(self, key: bytes) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= len(old)


class ChunkError(Exception):
    """A chunk could not be read or failed authentication (the read gets EIO)."""

    def __init__(self, chunk_id: bytes, error: Exception) -> None:
        super().__init__(str(error))
        self.chunk_id = chunk_id
        self.error = error


class _Pending:
    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: bytes | None = None
        self.error: Exception | None = None


@dataclass
class BlobStats:
    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    prefetched: int = 0
    pushed: int = 0
    errors: int = 0


class ChunkStore:
    def __init__(self, repo: Repository, cache_bytes: int, profile: FetchProfile, workers: int = 8) -> None:
        self.repo = repo
        self.cache = ChunkCache(cache_bytes)
        self.cache_bytes = cache_bytes
        self.profile = profile
        self.limiter = trio.CapacityLimiter(workers)
        # prefetch has its own, smaller limiter so it never starves reads that are waited on
        self.prefetch_limiter = trio.CapacityLimiter(profile.prefetchers)
        self._pending: dict[bytes, _Pending] = {}
        self.stats = BlobStats()

    # -- trio side -------------------------------------------------------------------
    def cached(self, chunk_id: bytes) -> bytes | None:
        return self.cache.get(chunk_id)

    def wanted(self, chunk_id: bytes) -> bool:
        """True if the chunk is neither cached nor on its way."""
        return chunk_id not in self._pending and self.cache.get(chunk_id) is None

    async def get(self, chunk_id: bytes, size: int) -> bytes:
        data = self.cache.get(chunk_id)
        if data is not None:
            self.stats.hits += 1
            return data
        p = self._pending.get(chunk_id)
        if p is None:
            self.stats.misses += 1
            p = self._pending[chunk_id] = _Pending()
            try:
                results = await trio.to_thread.run_sync(self._load, [(chunk_id, size)], limiter=self.limiter)
                self._settle(results)
            finally:
                self._abandon([chunk_id])
        else:
            await p.event.wait()
        if p.error is not None:
            raise ChunkError(chunk_id, p.error)
        assert p.value is not None
        return p.value

    def prefetch(self, nursery: trio.Nursery, chunks: Iterable[tuple[bytes, int]],
                 pushes: Iterable[tuple[int, int, bytes, bool]] = (), urgent: bool = False,
                 sequential: bool = False, packs: dict[bytes, bytes | None] | None = None) -> int:
        """Start fetching CHUNKS (id, size) not cached nor in flight; returns how many.

        PUSHES (inode, offset, chunk id, whole file) are then written into the kernel's
        page cache (FUSE notify_store), so the reads that follow need no request at all.
        A chunk that is a whole file and was pushed leaves this cache: the kernel has it.
        URGENT: a read waits for these, so they go through the readers' limiter.
        SEQUENTIAL: chunks of a file read in order (larger jobs from a remote store).
        PACKS (chunk id -> pack id): one job per pack, however the chunks alternate."""
        todo = []
        for cid, size in chunks:
            if cid is not None and self.wanted(cid):
                self._pending[cid] = _Pending()
                todo.append((cid, size))
        where: dict[bytes, list[tuple[int, int, bool]]] = {}
        ready: list[tuple[int, int, bytes, bytes, bool]] = []
        for ino, off, cid, whole in pushes:
            data = self.cache.get(cid)
            if data is not None:
                ready.append((ino, off, cid, data, False))  # cached for a reason: leave it there
            else:
                where.setdefault(cid, []).append((ino, off, whole))
        if ready:
            nursery.start_soon(self._push, ready)
        # several modest jobs rather than one big one: they run side by side, and each
        # hands its chunks over as soon as it is done
        job_bytes = self.profile.sequential_job_bytes if sequential else self.profile.job_bytes
        job_bytes = min(job_bytes, max(1 << 20, self.cache_bytes // 4))  # a small cache keeps its jobs small
        groups: list[list[tuple[bytes, int]]] = [todo]
        if packs is not None:
            by_pack: dict[bytes | None, list[tuple[bytes, int]]] = {}
            for item in todo:
                by_pack.setdefault(packs.get(item[0]), []).append(item)
            groups = list(by_pack.values())
        for group in groups:
            job: list[tuple[bytes, int]] = []
            size = 0
            for item in group:
                job.append(item)
                size += item[1]
                if size >= job_bytes:
                    nursery.start_soon(self._prefetch, job, where, urgent)
                    job, size = [], 0
            if job:
                nursery.start_soon(self._prefetch, job, where, urgent)
        self.stats.prefetched += len(todo)
        return len(todo)

    def pack_of(self, chunk_id: bytes) -> bytes | None:
        """The chunk's pack, if the index loaded so far says (called on the trio loop, which
        must not wait for the index: the first read loads it in a worker)."""
        loc = self.repo.locate_loaded(chunk_id)
        return loc.pack_id if loc is not None else None

    async def _prefetch(self, todo: list[tuple[bytes, int]],
                        where: dict[bytes, list[tuple[int, int, bool]]], urgent: bool = False) -> None:
        # a failure here must never reach the nursery (it would end the mount): the
        # waiters get the error, and a later read retries
        results: list[tuple[bytes, bytes | None, Exception | None]] = []
        try:
            limiter = self.limiter if urgent else self.prefetch_limiter
            results = await trio.to_thread.run_sync(self._load, todo, limiter=limiter)
            self._settle(results)
        except Exception as exc:
            self._settle([(cid, None, exc) for cid, _ in todo])
        finally:
            self._abandon([cid for cid, _ in todo])
        # pushed only once settled: a push may wait on a page that a READ request holds,
        # and that request may be waiting for one of these very chunks
        pushes = []
        for cid, data, _ in results:
            if data is not None and cid in where:
                targets = where[cid]
                whole = all(w for _, _, w in targets)
                pushes.extend((ino, off, cid, data, whole) for ino, off, _ in targets)
        if pushes:
            await self._push(pushes)

    async def _push(self, pushes: list[tuple[int, int, bytes, bytes, bool]]) -> None:
        try:
            done = await trio.to_thread.run_sync(self._notify_store, pushes, limiter=self.prefetch_limiter)
        except Exception as exc:  # only an optimisation: the kernel will ask instead
            log.debug("page cache push failed: %s", exc)
            return
        for cid in done:
            self.cache.discard(cid)

    def _notify_store(self, pushes: list[tuple[int, int, bytes, bytes, bool]]) -> list[bytes]:
        """(worker thread) the pushes; returns the ids of whole-file chunks the kernel took."""
        taken = []
        for ino, off, cid, data, whole in pushes:
            try:
                pyfuse3.notify_store(ino, off, data)
            except OSError as exc:  # the kernel forgot the inode, or cannot take it
                if exc.errno == errno.ENOSYS:
                    break
                log.debug("notify_store(%d, %d): %s", ino, off, exc)
                continue
            self.stats.pushed += len(data)
            if whole:
                taken.append(cid)
        return taken

    def _settle(self, results: list[tuple[bytes, bytes | None, Exception | None]]) -> None:
        for cid, data, err in results:
            p = self._pending.pop(cid, None)
            if data is not None:
                self.cache.put(cid, data)
                self.stats.fetched_bytes += len(data)
            else:
                self.stats.errors += 1
            if p is not None:
                p.value, p.error = data, err
                p.event.set()

    def _abandon(self, ids: list[bytes]) -> None:
        """Wake waiters of fetches that ended without a result (cancelled at unmount)."""
        for cid in ids:
            p = self._pending.pop(cid, None)
            if p is not None:
                p.error = BackendError("fetch interrupted")
                p.event.set()

    # -- worker threads ----------------------------------------------------------------
    def _load(self, chunks: list[tuple[bytes, int]]) -> list[tuple[bytes, bytes | None, Exception | None]]:
        """Read, decrypt and check CHUNKS; one ranged read per run of neighbours in a pack."""
        out: list[tuple[bytes, bytes | None, Exception | None]] = []
        located: list[tuple[BlobLocation, int]] = []
        for cid, size in chunks:
            try:
                located.append((self.repo.locate(cid), size))
            except Exception as exc:  # reported per chunk, as EIO
                out.append((cid, None, exc))
        located.sort(key=lambda x: (x[0].pack_id, x[0].offset))
        i = 0
        while i < len(located):
            j = i + 1
            first = located[i][0]
            end = first.offset + first.length
            while j < len(located):
                loc = located[j][0]
                if (loc.pack_id != first.pack_id or loc.offset - end > self.profile.merge_gap
                        or loc.offset + loc.length - first.offset > MAX_SPAN):
                    break
                end = max(end, loc.offset + loc.length)
                j += 1
            group = located[i:j]
            try:
                span = self._read_span(first.pack_id, first.offset, end - first.offset)
            except Exception as exc:  # reported per chunk, as EIO
                out.extend((loc.blob_id, None, exc) for loc, _ in group)
            else:
                view = memoryview(span)
                for loc, size in group:
                    out.append(self._open(loc, size, view[loc.offset - first.offset:loc.offset - first.offset + loc.length]))
            i = j
        return out

    def _read_span(self, pack_id: bytes, offset: int, length: int) -> bytes:
        try:
            data = self.repo.backend.get_range(self.repo.pack_key(pack_id), offset, length)
        except NotFound:
            raise IntegrityError(f"pack {pack_id.hex()} is missing") from None
        except BackendError as exc:
            raise BackendError(f"pack {pack_id.hex()}: {exc}") from None
        if len(data) != length:
            raise IntegrityError(f"pack {pack_id.hex()}: truncated (wanted {length} bytes at {offset}, got {len(data)})")
        return data

    def _open(self, loc: BlobLocation, size: int, sealed: memoryview) -> tuple[bytes, bytes | None, Exception | None]:
        try:
            data = self.repo.open_blob(loc, sealed, view=True)
            if len(data) != size:
                raise IntegrityError(f"chunk {loc.blob_id.hex()}: {len(data)} bytes, the tree says {size}")
            return loc.blob_id, data, None
        except Exception as exc:  # reported per chunk, as EIO
            return loc.blob_id, None, exc
