"""The resume journal of one export job, under the site's temporary directory.

    <tmp>/export/<contract id>-<job id>/state     the job's parameters and in-flight multipart uploads,
                                    AES-256-GCM under a key derived from the contract key
    <tmp>/export/<contract id>-<job id>/digests   fixed-size records, one per object (by its index in the
                                    deterministic plan): done flag, size, SHA-256, SHA-512
    <tmp>/export/<contract id>-<job id>/lock      flock: one run of a job at a time

Nothing in clear names a file: the job id is a hash of the request, the digest records
hold only sizes and hashes. Temporary data (Art. 8.1) is purged after at most a month by
`purge_temporary`, which the nightly purge job calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from contextlib import ExitStack
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..crypto import ContractKeys, hkdf
from ..errors import IntegrityError
from ..fsutil import file_lock, write_atomic
from ..site import Site

RECORD = struct.Struct(">BQ32s64s")  # done, size, sha256, sha512
MAX_AGE_SECONDS = 30 * 86400


def journal_root(site: Site) -> str:
    return os.path.join(site.tmp_dir(), "export")


def job_id(request: dict) -> str:
    """The same request (contract, destination, format, selection) is the same job."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Digest:
    size: int
    sha256: bytes
    sha512: bytes


class Journal:
    BLOCK = 4096  # records read at once by read()

    def __init__(self, site: Site, job: str, keys: ContractKeys) -> None:
        # the contract id (a random UUID, not client data) lets the contract's purge find its journals
        self.dir = os.path.join(journal_root(site), f"{keys.contract_id.hex()}-{job}")
        self.job = job
        self._aead = AESGCM(hkdf(keys.data_key, b"kiwi-restore/v1/export-journal/" + job.encode()))
        self._stack = ExitStack()
        self._fd = -1
        self._lock_fd = -1
        self._end = 0  # records at or past this index were never written
        self._blocks: dict[int, bytes] = {}  # read() cache, dropped by every mark_done
        self.state: dict = {}

    # -- lifetime ---------------------------------------------------------------
    def open(self) -> bool:
        """Lock and load the journal; True when resuming an earlier run."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._lock_fd = self._stack.enter_context(file_lock(os.path.join(self.dir, "lock"), wait=0,
                                                            what="this export (another run of it is going on)"))
        self._fd = os.open(os.path.join(self.dir, "digests"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._stack.callback(os.close, self._fd)
        self._end = os.fstat(self._fd).st_size // RECORD.size + 1
        path = os.path.join(self.dir, "state")
        if not os.path.exists(path):
            return False
        with open(path, "rb") as f:
            raw = f.read()
        try:
            self.state = json.loads(self._aead.decrypt(raw[:12], raw[12:], self.job.encode()))
        except (InvalidTag, ValueError):
            raise IntegrityError("the export journal does not authenticate (damaged, or another key)") from None
        return True

    def close(self) -> None:
        self._stack.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def forget_lock(self) -> None:
        """In a forked writer process: close this process's copy of the lock's descriptor, so
        that the lock ends with the export's own process."""
        os.close(self._lock_fd)

    def save(self) -> None:
        nonce = os.urandom(12)
        data = nonce + self._aead.encrypt(nonce, json.dumps(self.state).encode(), self.job.encode())
        write_atomic(os.path.join(self.dir, "state"), data)
        os.utime(self.dir)  # the age purge_temporary looks at

    # -- per-object digests -----------------------------------------------------------
    def done(self, index: int) -> Digest | None:
        if index >= self._end:  # a first run asks this of every object: no system call then
            return None
        return self._unpack(os.pread(self._fd, RECORD.size, index * RECORD.size))

    @staticmethod
    def _unpack(raw: bytes) -> Digest | None:
        if len(raw) < RECORD.size:
            return None
        flag, size, s256, s512 = RECORD.unpack(raw)
        return Digest(size, s256, s512) if flag == 1 else None

    def read(self, index: int) -> Digest | None:
        """done(), for the passes over every object that follow the content (manifests,
        counts): records are read BLOCK at a time."""
        block = index // self.BLOCK
        blocks = self._blocks
        raw = blocks.get(block)
        if raw is None:
            raw = os.pread(self._fd, RECORD.size * self.BLOCK, block * self.BLOCK * RECORD.size)
            if len(blocks) >= 4:
                blocks.clear()
            blocks[block] = raw
        at = (index % self.BLOCK) * RECORD.size
        return self._unpack(raw[at:at + RECORD.size])

    def extend(self, end: int) -> None:
        """Records below END may have been written by another process (a forked writer)."""
        self._end = max(self._end, end)

    def mark_done(self, index: int, d: Digest) -> None:
        # one pwrite of the whole record: a killed process leaves it whole or absent
        os.pwrite(self._fd, RECORD.pack(1, d.size, d.sha256, d.sha512.ljust(64, b"\0")), index * RECORD.size)
        if index >= self._end:
            self._end = index + 1
        self._blocks = {}

    def sync(self) -> None:
        os.fsync(self._fd)

    # -- multipart uploads in flight (S3) ----------------------------------------------------
    def upload_state(self, index: int) -> dict | None:
        return self.state.setdefault("uploads", {}).get(str(index))

    def set_upload_state(self, index: int, st: dict | None) -> None:
        ups = self.state.setdefault("uploads", {})
        if st is None:
            ups.pop(str(index), None)
        else:
            ups[str(index)] = st
        self.save()


def purge_temporary(site: Site, older_than: float = MAX_AGE_SECONDS) -> list[str]:
    """Delete export journals untouched for OLDER_THAN seconds (site clock); return their ids.

    A journal in use is locked and left alone.
    """
    root = journal_root(site)
    now = site.clock.now_ns() / 1e9
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        try:
            age = now - os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        if age < older_than:
            continue
        try:
            with file_lock(os.path.join(path, "lock"), wait=0):
                shutil.rmtree(path)
        except Exception:  # locked by a running export, or already gone
            continue
        removed.append(name)
    return removed

