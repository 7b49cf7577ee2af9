"""Chunk read-ahead across files: batched, pack-grouped, bounded, in order.

An export reads every chunk of every file in the order of the snapshot's walk. Reading each
chunk on its own (one thread round trip, one pread, one decryption call per blob) costs
more than the bytes themselves for the many small files of a medical office's disk. Here:

* ``Prefetcher.add(node)`` queues a file's chunks (in walk order) and returns a ticket;
* queued chunks are read by worker threads in batches of about BATCH_BYTES: the batch's
  blobs are sorted by (pack, offset), neighbours in one pack are fetched with a single
  ranged read, and a blob present twice in a batch (dedup) is decrypted once;
* at most WINDOW bytes of decrypted chunks are queued or held, whatever the contract size;
* ``Prefetcher.content(ticket)`` yields a file's bytes in order (holes as zeros); tickets are
  consumed in the order they were added, from one thread or several (thread-safe).

Every blob is still authenticated by ``Repository.open_blob`` (a replicated backend re-reads
a blob that fails from another location).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future

from ..crypto import KIND_CHUNK, KIND_NAMES
from ..errors import BackendError, IntegrityError, NotFound
from ..repository import Repository
from ..tree import Node

WINDOW = 32 << 20  # decrypted bytes queued, in flight or ready, per Prefetcher
BATCH_BYTES = 4 << 20  # one worker call reads about this much
BATCH_BLOBS = 512
GAP = 256 << 10  # blobs of one pack closer than this are fetched by one ranged read
REGION_MAX = 16 << 20  # largest single ranged read
ZERO_BLOCK = 1 << 20
MAX_LOOKAHEAD = 8192  # entries walked ahead of the consumer (many empty files or directories)


def read_batch(repo: Repository, cids: list[bytes]) -> list[bytes]:
    """Decrypted chunks CIDS (in that order), reading neighbours in a pack at once."""
    locs = {}
    for cid in cids:
        if cid not in locs:
            loc = repo.locate(cid)
            if loc.kind != KIND_CHUNK:
                raise IntegrityError(f"blob {cid.hex()} is a {KIND_NAMES[loc.kind]}, expected a chunk")
            locs[cid] = loc
    order = sorted(locs.values(), key=lambda x: (x.pack_id, x.offset))
    plain: dict[bytes, bytes] = {}
    i = 0
    while i < len(order):
        first = order[i]
        start, end = first.offset, first.offset + first.length
        j = i + 1
        while j < len(order):
            nxt = order[j]
            if (nxt.pack_id != first.pack_id or nxt.offset - end > GAP
                    or nxt.offset + nxt.length - start > REGION_MAX):
                break
            end = max(end, nxt.offset + nxt.length)
            j += 1
        key = repo.pack_key(first.pack_id)
        try:
            region = memoryview(repo.backend.get_range(key, start, end - start))
        except NotFound:
            raise IntegrityError(f"pack {first.pack_id.hex()} (holding chunk {first.blob_id.hex()}) "
                                 f"is missing") from None
        except BackendError as exc:
            raise IntegrityError(f"pack {first.pack_id.hex()}: {exc}") from None
        for loc in order[i:j]:
            plain[loc.blob_id] = repo.open_blob(loc, region[loc.offset - start:loc.offset - start + loc.length])
        i = j
    return [plain[c] for c in cids]


class _Batch:
    __slots__ = ("fut", "left")

    def __init__(self, fut: Future, left: int) -> None:
        self.fut = fut
        self.left = left  # slots not yet consumed: the result list is dropped at 0


class Ticket:
    """One file's chunks: [cid or None, size, batch, index in batch] each."""

    __slots__ = ("slots", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.slots = [[cid, size, None, 0] for cid, size in node.chunks]


class Prefetcher:
    def __init__(self, repo: Repository, pool: Executor | None, window: int = WINDOW,
                 batch_bytes: int = BATCH_BYTES) -> None:
        self.repo = repo
        self.pool = pool
        self.window = window
        self.batch_bytes = batch_bytes
        self.todo: deque[list] = deque()  # slots queued, not yet given to a worker
        self.todo_bytes = 0
        self.held = 0  # bytes given to workers and not yet consumed
        self.batches: list[_Batch] = []
        self.lock = threading.Lock()
        self.closed = False

    # -- producer side ------------------------------------------------------------------------
    def add(self, node: Node) -> Ticket:
        t = Ticket(node)
        with self.lock:
            for s in t.slots:
                if s[0] is not None:
                    self.todo.append(s)
                    self.todo_bytes += s[1]
            self._pump(False)
        return t

    def hungry(self) -> bool:
        """Room for more: the caller should queue further files before handing this one on."""
        return self.held + self.todo_bytes < self.window

    def _pump(self, force: bool) -> None:
        """Give queued slots to workers in batches while the window allows (lock held)."""
        while self.todo and (force or self.todo_bytes >= self.batch_bytes or len(self.todo) >= BATCH_BLOBS):
            if self.held >= self.window and not force:
                return
            slots = []
            nbytes = 0
            while self.todo and nbytes < self.batch_bytes and len(slots) < BATCH_BLOBS:
                s = self.todo.popleft()
                slots.append(s)
                nbytes += s[1]
            self.todo_bytes -= nbytes
            self.held += nbytes
            cids = [s[0] for s in slots]
            if self.pool is None:
                fut: Future = Future()
                try:
                    fut.set_result(read_batch(self.repo, cids))
                except BaseException as exc:  # noqa: BLE001 (re-raised by the consumer)
                    fut.set_exception(exc)
            else:
                fut = self.pool.submit(read_batch, self.repo, cids)
            b = _Batch(fut, len(slots))
            for k, s in enumerate(slots):
                s[2], s[3] = b, k
            force = False  # one forced batch is enough: the consumer waits for it

    def flush(self) -> None:
        """No more files coming soon: send what is queued (the window permitting)."""
        with self.lock:
            while self.todo and self.held < self.window:
                self._pump(True)

    # -- consumer side ------------------------------------------------------------------------
    def content(self, t: Ticket) -> Iterator[bytes]:
        """T's bytes in order, holes as zeros (a hole is yielded in pieces of ZERO_BLOCK)."""
        for s in t.slots:
            cid, size = s[0], s[1]
            if cid is None:
                while size:
                    n = min(size, ZERO_BLOCK)
                    yield bytes(n)
                    size -= n
                continue
            if s[2] is None:
                with self.lock:
                    while s[2] is None:  # the consumer caught up with the queue: send it now
                        if not self.todo:
                            raise RuntimeError("prefetch: chunk neither queued nor read (closed?)")
                        self._pump(True)
            b: _Batch = s[2]
            res = b.fut.result()
            data = res[s[3]]
            res[s[3]] = None  # type: ignore[call-overload]  (consumed: free it)
            s[2] = None
            with self.lock:
                self.held -= size
                b.left -= 1
                self._pump(False)
            if len(data) != size:
                raise IntegrityError(f"chunk of {size} bytes decoded to {len(data)}")
            yield data

    def discard(self, t: Ticket) -> None:
        """T will not be read: release its share of the window."""
        for _ in self.content(t):
            pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for s in self.todo:
                s[2] = None
            self.todo.clear()


def walk_ahead(pf: Prefetcher, entries: Iterable[tuple[bytes, Node]], want) -> Iterator:  # noqa: ANN001
    """(path, node, ticket or None) for ENTRIES, queueing the chunks of those WANT(node)
    accepts ahead of the consumer, up to the prefetcher's window."""
    look: deque = deque()
    for path, node in entries:
        look.append((path, node, pf.add(node) if want(node) else None))
        while look and (not pf.hungry() or len(look) > MAX_LOOKAHEAD):
            yield look.popleft()
    pf.flush()
    while look:
        yield look.popleft()
