"""The asyncio engine: objects produced in worker threads, uploaded with bounded queues.

A producer thread reads the repository through the (synchronous) core and writes an
object's bytes into a HashSink, which hashes them and hands chunks of about 1 MiB to a
Pipe: an asyncio.Queue of a few chunks, so a slow destination stops the producer
(back-pressure) and memory stays bounded whatever the contract's size. Up to --jobs objects
are in flight; an S3 object also has a few parts in flight. Local destinations are written
straight from the producer thread (no hop through the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from itertools import islice

from ..errors import BackendError, KiwiError
from .destinations import Destination, UploadState
from .fetch import Prefetcher, Ticket
from .journal import Digest, Journal
from .plan import Item

BUF = 1 << 20
PIPE_DEPTH = 4
ITEM_RETRY_DELAYS = (1, 3, 8, 20)
GROUP_BYTES = 2 << 20  # a local writer task takes consecutive files up to this many bytes
GROUP_FILES = 64  # ... or this many files
LOCAL_WRITERS = 1


class Progress:
    """Counters fed from any thread; a ticker draws a bar on a terminal, JSON lines otherwise."""

    def __init__(self, total_files: int, total_bytes: int, mode: str = "auto", label: str = "export") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "json"
        self.mode = mode
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = 0
        self.label = label
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes or None, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, leave=False)

    def add(self, files: int, nbytes: int) -> None:
        with self._lock:
            self.files += files
            self.bytes += nbytes

    def phase(self, label: str) -> None:
        self.label = label
        if self._bar is not None:
            self._bar.set_description_str(label, refresh=False)

    def draw(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = self.bytes / elapsed
        if self._bar is not None:
            self._bar.n = min(self.bytes, self._bar.total or self.bytes)
            self._bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)
            self._bar.refresh()
        elif self.mode == "json":
            eta = (self.total_bytes - self.bytes) / rate if rate and self.total_bytes > self.bytes else 0
            print(json.dumps({"event": "progress", "phase": self.label, "files": self.files,
                              "total_files": self.total_files, "bytes": self.bytes, "total_bytes": self.total_bytes,
                              "rate_bytes_per_s": int(rate), "eta_s": int(eta), "final": final}),
                  file=sys.stderr, flush=True)

    async def ticker(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every if self.mode == "json" else 0.2)
            self.draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class HashSink:
    """Thread side: hash (SHA-256, and SHA-512 for BagIt), count, forward in ~1 MiB blocks.

    Small writes (tar headers, small files) are gathered first, so hashing and output work
    on whole blocks. With HASHER (an executor), SHA-512 of a large block runs there while
    this thread computes SHA-256 and writes it out (hashlib releases the GIL on large
    buffers: two cores hash at once). COPY=False hands the block's own buffer to OUT (a
    synchronous writer that does not keep it)."""

    PARALLEL_MIN = 256 << 10

    def __init__(self, out, sha512: bool, progress: Progress, copy: bool = True,  # noqa: ANN001
                 hasher: Executor | None = None) -> None:
        self.out = out
        self.h256 = hashlib.sha256()
        self.h512 = hashlib.sha512() if sha512 else None
        self.size = 0
        self.reported = 0  # bytes counted in the progress
        self.buf = bytearray()
        self.progress = progress
        self.copy = copy
        self.hasher = hasher if sha512 else None
        self._h512_fut: concurrent.futures.Future | None = None

    def _emit(self, block: bytes | bytearray) -> None:
        n = len(block)
        if self.h512 is not None:
            if self._h512_fut is not None:
                self._h512_fut.result()
                self._h512_fut = None
            if self.hasher is not None and n >= self.PARALLEL_MIN:
                self._h512_fut = self.hasher.submit(self.h512.update, block)
            else:
                self.h512.update(block)
        self.h256.update(block)
        self.out(bytes(block) if self.copy and not isinstance(block, bytes) else block)
        self.reported += n
        self.progress.add(0, n)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.size += n
        if n >= BUF and not self.buf:
            self._emit(data if isinstance(data, bytes) else bytes(data))
            return
        self.buf += data
        if len(self.buf) >= BUF:
            block, self.buf = self.buf, bytearray()  # a new buffer: SHA-512 may still read the old one
            self._emit(block)

    def close(self) -> Digest:
        if self.buf:
            block, self.buf = self.buf, bytearray()
            self._emit(block)
        if self._h512_fut is not None:
            self._h512_fut.result()
            self._h512_fut = None
        return Digest(self.size, self.h256.digest(), self.h512.digest() if self.h512 else b"")

    def abandon(self) -> None:
        """Wait for a SHA-512 still running (before the object is thrown away)."""
        if self._h512_fut is not None:
            try:
                self._h512_fut.result()
            except BaseException:  # noqa: BLE001
                pass
            self._h512_fut = None


def write_local_object(dest: Destination, key: str, fill: Callable[[HashSink], None], sha512: bool,
                       progress: Progress, hasher: Executor | None = None) -> Digest:
    """One object to a local destination, as FILL writes it into a HashSink: a temporary file
    renamed into place, so a failure leaves nothing under KEY (and takes back the bytes it had
    counted in PROGRESS). Used by the writer thread and by the forked writers."""
    w = dest.sync_writer(key)
    sink = HashSink(w.write, sha512, progress, copy=False, hasher=hasher)
    try:
        fill(sink)
        d = sink.close()
        w.commit()
    except BaseException:
        sink.abandon()
        w.abort()
        progress.add(0, -sink.reported)
        raise
    return d


def ticket_filler(pf: Prefetcher, ticket: Ticket) -> Callable[[HashSink], None]:
    """A write_local_object FILL that copies a file's content from the read-ahead."""
    def fill(sink: HashSink) -> None:
        for data in pf.content(ticket):
            sink.write(data)
    return fill


class _Aborted(Exception):
    pass


class _End:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc


class Pipe:
    """A bounded channel of chunks from a producer thread to a coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.q: asyncio.Queue = asyncio.Queue(PIPE_DEPTH)
        self.aborted = False

    def _put(self, x: object) -> None:
        if self.aborted:
            raise _Aborted()
        fut = asyncio.run_coroutine_threadsafe(self.q.put(x), self.loop)
        while True:
            try:
                fut.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                if self.aborted:
                    fut.cancel()
                    raise _Aborted() from None

    def put(self, data: bytes) -> None:
        self._put(data)

    def finish(self, exc: BaseException | None) -> None:
        try:
            self._put(_End(exc))
        except _Aborted:
            pass

    async def chunks(self):  # noqa: ANN201 (an async iterator of bytes)
        while True:
            x = await self.q.get()
            if isinstance(x, _End):
                if x.exc is not None:
                    raise x.exc
                return
            yield x

    def abort(self) -> None:
        self.aborted = True
        while not self.q.empty():
            self.q.get_nowait()


def retryable(exc: BaseException) -> bool:
    """Network and destination trouble is retried; a bad repository or a bug is not."""
    if isinstance(exc, BackendError):
        return True
    if isinstance(exc, KiwiError):
        return False
    try:
        import asyncssh

        if isinstance(exc, asyncssh.Error):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from aiohttp import ClientError
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError as BotoClientError

        if isinstance(exc, BotoClientError):
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500 or \
                exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "SlowDown", "RequestTimeout")
        if isinstance(exc, (BotoCoreError, ClientError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (OSError, asyncio.TimeoutError, ConnectionError))


class Engine:
    def __init__(self, dest: Destination, journal: Journal, jobs: int, progress: Progress, sha512: bool,
                 producers: ThreadPoolExecutor, prefetcher: Callable[[], Prefetcher] | None = None,
                 processes: int = 0) -> None:
        self.dest = dest
        self.journal = journal
        self.jobs = jobs
        self.progress = progress
        self.sha512 = sha512
        self.producers = producers
        self.prefetcher = prefetcher
        self.processes = processes  # > 1: a local export of plain files is written by forked processes
        self.walker = ThreadPoolExecutor(1, thread_name_prefix="kiwi-export-plan")
        self.hasher = ThreadPoolExecutor(2, thread_name_prefix="kiwi-export-hash") if sha512 else None
        self.sent = self.skipped = self.retries = 0
        self.sent_bytes = 0
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self.walker.shutdown(wait=False, cancel_futures=True)
        if self.hasher is not None:
            self.hasher.shutdown(wait=False, cancel_futures=True)

    async def run_all(self, items: Callable[[], Iterable[Item]], start: int = 0) -> int:
        """Every item of ITEMS() (a lazy, deterministic sequence), JOBS at a time; returns the
        count. A retry after a transient error goes over a fresh ITEMS() from its start."""
        if self.dest.kind == "local" and self.prefetcher is not None:
            sent, skipped = self.sent, self.skipped
            stream = self._stream_processes if self.processes > 1 else self._stream_local
            try:
                return await asyncio.get_running_loop().run_in_executor(self.walker, stream, items(), start)
            except Exception as exc:  # noqa: BLE001 (classified just below)
                if not retryable(exc):
                    raise
                # a transient local error: go over the items again the careful way (retries,
                # backoff); those already written are in the journal and are skipped
                self.retries += 1
                fast_sent, self.skipped = self.sent - sent, skipped
                count = await self._run_all(items(), start)
                self.skipped -= fast_sent
                return count
        return await self._run_all(items(), start)

    def _stream_local(self, items: Iterable[Item], start: int) -> int:
        """Local destination: this thread walks the items in order and queues their chunks in a
        Prefetcher (batched, pack-grouped reads ahead across files); writer threads hash and
        write whole files, a group of consecutive small files per task: one thread hand-off
        (and GIL transfer) per file cost more than writing a small file itself. No asyncio hop."""
        pf = self.prefetcher()
        # one writer thread: with more, the threads spend their time handing the GIL to each
        # other around every system call (measured: 100,000 files, 1 writer 44 s, 4 writers 54 s)
        writer = ThreadPoolExecutor(LOCAL_WRITERS, thread_name_prefix="kiwi-export-write")
        slots = threading.BoundedSemaphore(max(4, self.jobs * 2))
        failed: list[BaseException] = []
        pending: set[concurrent.futures.Future] = set()
        room = threading.Condition()
        count = 0
        group: list[tuple[int, Item, Ticket | None]] = []
        group_bytes = 0

        def done(fut: concurrent.futures.Future) -> None:
            exc = fut.exception()
            if exc is not None:
                failed.append(exc)
            slots.release()
            with room:
                pending.discard(fut)
                room.notify_all()

        def send() -> None:
            nonlocal group, group_bytes
            if not group:
                return
            slots.acquire()
            fut = writer.submit(self._write_group, group, pf)
            group, group_bytes = [], 0
            with room:
                pending.add(fut)
            fut.add_done_callback(done)

        try:
            for item in items:
                if failed:
                    break
                index = start + count
                count += 1
                if self._already_done(index, item) is not None:
                    continue
                node = item.node
                if node is not None:
                    if not pf.hungry():
                        send()  # the writers must drain the window before more is queued
                    with room:  # bounded read-ahead: wait while the window is full
                        while pending and not pf.hungry() and not failed:
                            room.wait(0.05)
                ticket = pf.add(node) if node is not None else None
                group.append((index, item, ticket))
                group_bytes += node.size if node is not None else 0
                if group_bytes >= GROUP_BYTES or len(group) >= GROUP_FILES:
                    send()
            if failed:
                group = []  # nothing more is written after a failure (pf.close() drops its chunks)
            send()
            pf.flush()
            while True:
                with room:
                    if not pending:
                        break
                    room.wait(0.05)
                pf.flush()
        finally:
            pf.close()
            writer.shutdown(wait=True)
        if failed:
            raise failed[0]
        return count

    def _stream_processes(self, items: Iterable[Item], start: int) -> int:
        """Local export of plain files: this thread walks the items and sends groups of
        consecutive files to forked writer processes (exporter/processes.py), which use both
        cores where threads could not; the few other objects (metadata sidecars) are written
        by a thread of this process meanwhile."""
        from .processes import WriterProcesses

        pf = self.prefetcher()
        repo, root = pf.repo, self.dest.display

        def on_done(files: int, nbytes: int) -> None:
            self.progress.add(files, 0)
            self.sent += files
            self.sent_bytes += nbytes

        procs = WriterProcesses(self.processes, repo, root, self.journal, self.sha512,
                                lambda n: self.progress.add(0, n), on_done)
        others = ThreadPoolExecutor(1, thread_name_prefix="kiwi-export-write")
        other_futs: list[concurrent.futures.Future] = []
        other_failed: list[BaseException] = []

        def other_done(fut: concurrent.futures.Future) -> None:
            if fut.exception() is not None:
                other_failed.append(fut.exception())
        count = 0
        group: list = []
        group_bytes = 0
        try:
            for item in items:
                if procs.failed() or other_failed:
                    break
                index = start + count
                count += 1
                if self._already_done(index, item) is not None:
                    continue
                if item.node is None:
                    other_futs.append(others.submit(self._write_local, index, item, pf, None))
                    other_futs[-1].add_done_callback(other_done)
                    continue
                group.append((index, item.key, item.node))
                group_bytes += item.node.size
                if group_bytes >= GROUP_BYTES or len(group) >= GROUP_FILES:
                    procs.send(group)
                    group, group_bytes = [], 0
            if group and not procs.failed():
                procs.send(group)
            procs.finish()
            for f in other_futs:
                f.result()
        finally:
            procs.close()
            others.shutdown(wait=True)
            pf.close()
            self.journal.extend(start + count)  # what the children recorded, for a retry
        return count

    def _write_group(self, group: list[tuple[int, Item, Ticket | None]], pf: Prefetcher) -> None:
        for k, (index, item, ticket) in enumerate(group):
            try:
                self._write_local(index, item, pf, ticket)
            except BaseException:
                for _i, _item, t in group[k + 1:]:  # release their share of the read-ahead window
                    if t is not None:
                        try:
                            pf.discard(t)
                        except Exception:  # noqa: BLE001 (the first error is the one reported)
                            pass
                raise

    def _write_local(self, index: int, item: Item, pf: Prefetcher, ticket: Ticket | None) -> None:
        fill = ticket_filler(pf, ticket) if ticket is not None else item.produce
        d = write_local_object(self.dest, item.key, fill, self.sha512, self.progress, self.hasher)
        self.journal.mark_done(index, d)
        self.progress.add(item.files, 0)
        with self._count_lock:
            self.sent += 1
            self.sent_bytes += d.size

    async def _run_all(self, items: Iterable[Item], start: int = 0) -> int:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(self.jobs * 2)
        count = 0
        it = iter(items)

        async def feeder() -> None:
            nonlocal count
            while True:
                batch = await loop.run_in_executor(self.walker, lambda: list(islice(it, 128)))
                if not batch:
                    break
                for item in batch:
                    await q.put((start + count, item))
                    count += 1
            for _ in range(self.jobs):
                await q.put(None)

        async def worker() -> None:
            while (x := await q.get()) is not None:
                await self.run_item(*x)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feeder())
            for _ in range(self.jobs):
                tg.create_task(worker())
        return count

    def _already_done(self, index: int, item: Item) -> Digest | None:
        """The object's digest if an earlier run wrote it (counted as skipped), else None."""
        d = self.journal.done(index)
        if d is not None:
            self.progress.add(item.files, d.size)
            self.skipped += 1
        return d

    async def run_item(self, index: int, item: Item) -> Digest:
        d = self._already_done(index, item)
        if d is not None:
            return d
        delays = iter(ITEM_RETRY_DELAYS)
        while True:
            try:
                d = await self._transfer(index, item)
                break
            except Exception as exc:  # noqa: BLE001 (classified just below)
                delay = next(delays, None)
                if delay is None or not retryable(exc):
                    raise
                self.retries += 1
                await asyncio.sleep(delay)
        self.journal.mark_done(index, d)
        self.progress.add(item.files, 0)
        self.sent += 1
        self.sent_bytes += d.size
        return d

    async def _transfer(self, index: int, item: Item) -> Digest:
        loop = asyncio.get_running_loop()
        w = await loop.run_in_executor(self.producers, self.dest.sync_writer, item.key)
        if w is not None:
            def direct() -> Digest:
                sink = HashSink(w.write, self.sha512, self.progress)
                try:
                    item.produce(sink)
                    d = sink.close()
                    w.commit()
                    return d
                except BaseException:
                    w.abort()
                    self.progress.add(0, -sink.reported)
                    raise
            return await loop.run_in_executor(self.producers, direct)

        pipe = Pipe(loop)
        sink = HashSink(pipe.put, self.sha512, self.progress)

        def produce() -> Digest:
            try:
                item.produce(sink)
                d = sink.close()
            except BaseException as exc:
                pipe.finish(exc)
                raise
            pipe.finish(None)
            return d

        fut = loop.run_in_executor(self.producers, produce)
        state = UploadState(lambda: self.journal.upload_state(index),
                            lambda st: self.journal.set_upload_state(index, st))
        try:
            await self.dest.put(item.key, pipe.chunks(), state, item.size_hint)
        except BaseException:
            pipe.abort()
            try:
                await fut
            except BaseException:  # noqa: BLE001 (the consumer's error is the one reported)
                pass
            self.progress.add(0, -sink.reported)
            raise
        return await fut
