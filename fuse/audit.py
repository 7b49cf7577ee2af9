"""The mount session in the audit trail, written by one thread so the trio loop never
waits on a file lock or an fsync.

    mount.start        actor, contract, machines, snapshots, options (mount point sealed)
    mount.files        the files opened, in batches (paths sealed under the contract's key)
    alert.integrity    a chunk or tree that failed to read (object id; path sealed)
    mount.end          duration, files opened, bytes read, errors, why it ended

Each file is recorded the first time it is opened in a session; later opens are counted
in mount.end. If the trail cannot be written, the session fails closed: files no longer
open (EACCES) until the writer recovers, since every access must be traceable.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable

from ..site import ContractRecord, Site

log = logging.getLogger("kiwi_restore.fuse")

BATCH_FILES = 500  # paths per mount.files record
BATCH_SECONDS = 0.5  # longest a file open waits before its record is written


def path_text(path: bytes) -> str:
    """A stored byte path as JSON text: UTF-8, invalid bytes as \\xNN escapes."""
    return path.decode("utf-8", "backslashreplace")


class AuditWriter:
    def __init__(self, site: Site, rec: ContractRecord, cipher, session: str) -> None:
        self.site = site
        self.rec = rec
        self.cipher = cipher
        self.session = session
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._opened: collections.deque[tuple[str, bytes]] = collections.deque()
        self._retry: list[list[str]] | None = None
        self._thread: threading.Thread | None = None
        self.failed: str | None = None
        self.files = 0

    def _append(self, action: str, outcome: str, details: dict, sealed: dict | None = None) -> None:
        details = {"session": self.session, **details}
        self.site.audit.append(action, outcome, self.rec.id, details, sealed, self.cipher if sealed else None)

    # -- called before and after serving (blocking is fine there) ----------------------
    def start(self, details: dict, sealed: dict) -> None:
        self._append("mount.start", "ok", details, sealed)
        self._thread = threading.Thread(target=self._run, name="kiwi-audit", daemon=True)
        self._thread.start()

    def refused(self, details: dict, sealed: dict) -> None:
        self._append("mount.start", "failed", details, sealed)
        self.site.checkpoint_audit()

    def close(self, details: dict) -> None:
        """Write what is queued, then mount.end, then sign the chain's head."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        self._drain()
        self._append("mount.end", "ok", {"files_opened": self.files, **details})
        self.site.checkpoint_audit()

    # -- called from the trio loop (never blocks, never wakes the writer per file) ----------
    def opened(self, snapshot: str, path: bytes) -> None:
        self.files += 1
        self._opened.append((snapshot, path))  # deque: appends are atomic across threads

    def integrity(self, snapshot: str | None, obj: str | None, error: str, path: bytes | None) -> None:
        self._q.put(("alert", snapshot, obj, error, path))

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=BATCH_SECONDS)
            except queue.Empty:
                item = "tick"
            self._drain()  # files opened so far go before anything that follows them
            if item is None:
                return
            if item != "tick":
                _, snapshot, obj, error, path = item
                details = {"snapshot": snapshot, "object": obj, "error": error[:300]}
                sealed = {"path": path_text(path)} if path is not None else None
                self._guard(self._append, "alert.integrity", "detected", details, sealed)

    def _drain(self) -> None:
        # only the files opened so far: chasing the ones that arrive while a record is being
        # fsynced wrote a record per dozen files when a reader is fast (tar, rsync)
        pending = len(self._opened)
        while self._retry or pending:
            batch = self._retry or []
            while pending and len(batch) < BATCH_FILES:
                pending -= 1
                snapshot, path = self._opened.popleft()
                entry = [snapshot, path_text(path)]
                if "\\x" in entry[1]:
                    entry.append(path.hex())  # exact bytes when the name is not UTF-8
                batch.append(entry)
            if not self._guard(self._flush, batch):
                self._retry = batch  # kept, tried again at the next tick
                return
            self._retry = None

    def _flush(self, batch: list[list[str]]) -> None:
        if batch:
            self._append("mount.files", "ok", {"count": len(batch)}, {"files": batch})

    def _guard(self, fn: Callable, *args) -> bool:
        try:
            fn(*args)
        except Exception as exc:
            if self.failed is None:
                log.error("audit trail not writable, file opens are refused until it is: %s", exc)
            self.failed = str(exc) or type(exc).__name__
            return False
        if self.failed is not None:
            log.warning("audit trail writable again")
            self.failed = None
        return True
