"""Forked writer processes for a local export of plain files (BagIt, tree).

Writing 100,000 small files costs Python work per file (its safe name, a temporary file and
a rename, two digests, a journal record) that one interpreter does on one core at a time:
with threads, a BagIt export used 1.25 of this machine's 2 cores. Here the walk stays in
the export's process, which sends groups of consecutive files to WORKERS forked processes.
Each child has its own read-ahead (Prefetcher) and reader threads, writes the files through
the same LocalWriter as the threads do (temporary file, then rename), records each digest in
the journal (one pwrite of a whole record) and reports counts back over its pipe.

Forked, not spawned: a child shares the loaded index and the unwrapped keys with its parent
(they never leave memory) and starts in a millisecond. The fork happens before the export's
reader threads start work, so no repository lock is held at that moment. A child dies with
the export's process (PR_SET_PDEATHSIG), and closes its copy of the journal lock, so a
rerun right after a kill -9 finds the lock free.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

from .. import errors, memory
from ..repository import Repository
from ..tree import Node
from .destinations import LocalDestination
from .fetch import Prefetcher
from .journal import Journal

AHEAD = 4  # groups queued per child: it reads the next ones ahead while it writes
PROGRESS_STEP = 16 << 20  # a child reports bytes at least this often
# a child's read-ahead: half a thread-writer's window, so two children hold about as much
CHILD_WINDOW = 16 << 20
CHILD_BATCH = 2 << 20
PR_SET_PDEATHSIG = 1

Group = list[tuple[int, str, Node]]  # (object index, key, node) of consecutive files


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


class _ChildProgress:
    """HashSink's progress in a child: bytes go to the parent in steps of PROGRESS_STEP."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.bytes = 0

    def add(self, files: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bytes >= PROGRESS_STEP:
            self.conn.send(("bytes", self.bytes))
            self.bytes = 0


def _die_with_parent(parent: int) -> None:
    libc = memory.libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _child(conn: Connection, repo: Repository, root: str, journal: Journal, sha512: bool, readers: int,
           stop: mmap.mmap) -> None:
    from .pipeline import ticket_filler, write_local_object

    progress = _ChildProgress(conn)
    pool = ThreadPoolExecutor(readers, thread_name_prefix="kiwi-export-read")
    pf = Prefetcher(repo, pool, window=CHILD_WINDOW, batch_bytes=CHILD_BATCH)
    dest = LocalDestination(root)
    pending: deque[list] = deque()
    eof = False
    try:
        while True:
            while not eof and (not pending or (len(pending) < AHEAD and conn.poll())):
                group = conn.recv()
                if group is None:
                    eof = True
                else:
                    pending.append([(index, key, pf.add(node)) for index, key, node in group])
            if not pending or stop[0]:
                return
            files = nbytes = 0
            for index, key, ticket in pending.popleft():
                if stop[0]:  # another writer failed: nothing more is written
                    return
                d = write_local_object(dest, key, ticket_filler(pf, ticket), sha512, progress)
                journal.mark_done(index, d)
                files += 1
                nbytes += d.size
            conn.send(("done", files, nbytes, progress.bytes))
            progress.bytes = 0
    finally:
        pf.close()
        pool.shutdown(wait=False, cancel_futures=True)


def _run_child(conn: Connection, others: list[Connection], repo: Repository, root: str, journal: Journal,
               sha512: bool, readers: int, stop: mmap.mmap, parent: int) -> None:
    """The forked process: never returns into the parent's stack."""
    code = 0
    try:
        _die_with_parent(parent)
        journal.forget_lock()
        for c in others:
            c.close()
        _child(conn, repo, root, journal, sha512, readers, stop)
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        code = 1
        try:
            conn.send(("error", type(exc).__name__, str(exc), getattr(exc, "errno", None),
                       getattr(exc, "filename", None)))
        except Exception:  # noqa: BLE001 (the parent is gone)
            pass
    finally:
        os._exit(code)


def _rebuild(kind: str, message: str, eno: int | None, filename: str | None) -> BaseException:
    """The child's exception as the parent raises it: same class for ours and for OSError
    (retryable() classifies them), a RuntimeError naming anything else."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.KiwiError):
        try:
            return cls(message)
        except TypeError:
            pass
    if eno is not None:
        return OSError(eno, os.strerror(eno), filename) if filename else OSError(eno, os.strerror(eno))
    if kind in ("OSError", "ConnectionError", "TimeoutError"):
        return OSError(errno.EIO, message)
    return RuntimeError(f"export writer process: {kind}: {message}")


class WriterProcesses:
    """The parent's side: fork N children, hand them groups, collect their counts.

    on_bytes(n) and on_done(files, nbytes) are called from the calling thread, inside send()
    and finish(), as the children report."""

    def __init__(self, n: int, repo: Repository, root: str, journal: Journal, sha512: bool,
                 on_bytes, on_done, readers: int = 2) -> None:  # noqa: ANN001
        self.on_bytes, self.on_done = on_bytes, on_done
        self.stop = mmap.mmap(-1, 1)  # shared with the children: set when one fails
        self.conns: list[Connection] = []
        self.pids: list[int] = []
        self.queued: list[int] = []
        self.error: BaseException | None = None
        me = os.getpid()
        try:
            for _ in range(n):
                parent_end, child_end = Pipe(duplex=True)
                pid = os.fork()
                if pid == 0:
                    parent_end.close()
                    _run_child(child_end, self.conns, repo, root, journal, sha512, readers, self.stop, me)
                child_end.close()
                self.conns.append(parent_end)
                self.pids.append(pid)
                self.queued.append(0)
        except BaseException:
            self.close()
            raise

    # -- replies ------------------------------------------------------------------------------
    def _handle(self, k: int) -> None:
        try:
            msg = self.conns[k].recv()
        except (EOFError, OSError):
            if self.error is None:
                self.error = RuntimeError("an export writer process ended unexpectedly")
            self.stop[0] = 1
            self.queued[k] = 0
            return
        if msg[0] == "bytes":
            self.on_bytes(msg[1])
        elif msg[0] == "done":
            self.queued[k] -= 1
            self.on_bytes(msg[3])
            self.on_done(msg[1], msg[2])
        else:  # error
            if self.error is None:
                self.error = _rebuild(*msg[1:])
            self.stop[0] = 1
            self.queued[k] = 0

    def _drain(self, timeout: float | None) -> None:
        live = [c for c, q in zip(self.conns, self.queued, strict=True) if q > 0 and not c.closed]
        if not live:
            return
        for c in wait(live, timeout):
            self._handle(self.conns.index(c))  # type: ignore[arg-type]

    # -- work ---------------------------------------------------------------------------------
    def send(self, group: Group) -> None:
        """Give GROUP to the least busy child, waiting while all have AHEAD groups queued.
        After a child's failure nothing more is sent (finish() raises it)."""
        while True:
            self._drain(0)
            if self.error is not None:
                return
            k = min(range(len(self.conns)), key=self.queued.__getitem__)
            if self.queued[k] < AHEAD:
                try:
                    self.conns[k].send(group)
                except OSError:  # the child is gone: its error, or its end, is in its pipe
                    self.queued[k] = max(self.queued[k], 1)
                    self._drain(None)
                    continue
                self.queued[k] += 1
                return
            self._drain(None)

    def failed(self) -> bool:
        return self.error is not None

    def finish(self) -> None:
        """Wait for every group sent; raise a child's error."""
        while self.error is None and any(self.queued):
            self._drain(None)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """End the children: normally after finish(); after a failure, once each has
        stopped at a file boundary (the stop flag), killed only if it does not end."""
        if self.error is not None:
            self.stop[0] = 1
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for pid in self.pids:
            _reap(pid)
        for c in self.conns:
            c.close()
        self.pids, self.conns = [], []
        self.stop.close()


def _reap(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)
