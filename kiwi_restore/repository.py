"""One contract's encrypted repository on a storage backend (layout in docs/FORMAT.md).

    <prefix>/config                 repository settings (encrypted)
    <prefix>/data/<2 hex>/<id hex>  packs of chunk and tree blobs
    <prefix>/index/<id hex>         blob index files
    <prefix>/treeindex/<id hex>     copies of the index's tree records (what browsing needs)
    <prefix>/snapshots/<id hex>     snapshot manifests
    <prefix>/locks/<id hex>         writer locks
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from . import compression
from .crypto import (
    ID_SIZE,
    KIND_CONFIG,
    KIND_INDEX,
    KIND_LOCK,
    KIND_NAMES,
    KIND_PACK,
    KIND_PACK_TRAILER,
    KIND_SNAPSHOT,
    KIND_TREE,
    PREAMBLE,
    ContractKeys,
    associated_data,
    check_preamble,
    open_sealed,
    preamble,
    seal,
)
from .errors import AuthError, BackendError, IntegrityError, KiwiError, LockedError, NotFound
from .i18n import _
from .index import BlobLocation, IndexFile, MasterIndex, encode_index
from .snapshot import Snapshot
from .storage.base import Backend
from .tree import Node, decode_tree

log = logging.getLogger("kiwi_restore.repository")

CONFIG_ID = bytes(ID_SIZE)
PACK_TARGET = 8 << 20
LOCK_STALE_SECONDS = 30 * 60
LOCK_REFRESH_SECONDS = 5 * 60
DEFAULT_CHUNKER = {"algorithm": "fastcdc2020", "min_size": 64 << 10, "avg_size": 256 << 10,
                   "max_size": 1 << 20, "normalization": 1}
INDEX_CONSOLIDATE_AT = 16
# the index's tree records, copied apart: a mount starts from the directories' index alone
# (one record per directory, not per file), whatever the number of files
TREE_INDEX = "treeindex"
INDEX_RETRY_SECONDS = 10.0  # a damaged index fails the reads that follow alike, meanwhile


class _ConfigNotOpened(IntegrityError):
    """The config did not decrypt: a wrong key, or this copy is corrupt (another may open)."""


def new_id() -> bytes:
    return os.urandom(ID_SIZE)


@dataclass(frozen=True)
class RepoConfig:
    contract_id: bytes
    created: int
    chunker: dict


TREE_MEMORY_FACTOR = 3  # decoded nodes take about 2.5x their tree's stored (sealed) size


class LRU:
    """A thread-safe LRU bounded by total size in bytes."""

    def __init__(self, max_bytes: int, size_of: Callable[[object], int] = len) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of
        # keep_when_full: once full, new entries are not kept (nothing is evicted). For a
        # reader that walks the same trees again and again, in the same order (an export's
        # manifests): LRU would evict each tree just before it is needed again.
        self.keep_when_full = False
        self._d: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if self.keep_when_full and key not in self._d and self._bytes + size > self.max_bytes:
                return
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= self.size_of(old)
            self._d[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._d:
                _, v = self._d.popitem(last=False)
                self._bytes -= self.size_of(v)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0


class Repository:
    def __init__(self, backend: Backend, prefix: str, keys: ContractKeys, config: RepoConfig,
                 tree_cache_bytes: int = 32 << 20) -> None:
        self.backend = backend
        self.prefix = prefix.rstrip("/") + "/"
        self.keys = keys
        self.config = config
        self.index = MasterIndex()
        self._index_loaded = False
        self._index_read: list[bytes] = []  # ids of the index files read, superseded ones included
        self._index_failed: tuple[float, Exception] | None = None
        self.tree_index: MasterIndex | None = None  # treeindex/, while the index is not loaded
        self._index_lock = threading.Lock()
        self.tree_cache = LRU(tree_cache_bytes, size_of=lambda v: v[1])

    # -- create / open -----------------------------------------------------
    @classmethod
    def create(cls, backend: Backend, prefix: str, keys: ContractKeys,
               chunker: dict | None = None) -> Repository:
        config = RepoConfig(keys.contract_id, time.time_ns(), dict(chunker or DEFAULT_CHUNKER))
        repo = cls(backend, prefix, keys, config)
        payload = msgpack.packb({"version": 1, "contract_id": config.contract_id,
                                 "created": config.created, "chunker": config.chunker}, use_bin_type=True)
        repo._put_object("config", KIND_CONFIG, CONFIG_ID, payload)
        return repo

    @classmethod
    def open(cls, backend: Backend, prefix: str, keys: ContractKeys, **kw) -> Repository:
        key = prefix.rstrip("/") + "/config"

        def open_config(raw: bytes) -> bytes:
            check_preamble(raw, KIND_CONFIG, "config")
            try:
                return open_sealed(keys.file_cipher(CONFIG_ID), memoryview(raw)[PREAMBLE.size:],
                                   associated_data(keys.contract_id, KIND_CONFIG, CONFIG_ID), "config")
            except IntegrityError as exc:
                raise _ConfigNotOpened(str(exc)) from None

        try:
            # read_verified: a replicated backend retries another location if this copy fails
            plain = backend.read_verified(key, lambda b: b.get(key), open_config)
        except NotFound:
            raise NotFound(_("no repository at {where}").format(where=f"{backend.url}/{prefix}")) from None
        except _ConfigNotOpened:
            raise AuthError(_("the key does not open this repository (wrong key, or its config is corrupt)")) from None
        doc = msgpack.unpackb(compression.decompress(plain, None, "config"), raw=False)
        if doc.get("version") != 1:
            raise IntegrityError(f"config: unsupported repository config version {doc.get('version')}")
        if doc.get("chunker", {}).get("algorithm") != "fastcdc2020":
            raise IntegrityError(f"config: unsupported chunker {doc.get('chunker', {}).get('algorithm')!r}")
        if doc.get("contract_id") != keys.contract_id:
            raise IntegrityError("config: belongs to another contract")
        return cls(backend, prefix, keys, RepoConfig(doc["contract_id"], doc["created"], doc["chunker"]), **kw)

    # -- whole-file objects --------------------------------------------------
    def _put_object(self, key: str, kind: int, object_id: bytes, payload: bytes) -> int:
        body = seal(self.keys.file_cipher(object_id), compression.compress(payload),
                    associated_data(self.keys.contract_id, kind, object_id))
        data = preamble(kind) + body
        self.backend.put(self.prefix + key, data)
        return len(data)

    def _get_object(self, key: str, kind: int, object_id: bytes) -> bytes:
        what = f"{KIND_NAMES[kind]} {key}"

        def verify(raw: bytes) -> bytes:
            check_preamble(raw, kind, what)
            plain = open_sealed(self.keys.file_cipher(object_id), memoryview(raw)[PREAMBLE.size:],
                                associated_data(self.keys.contract_id, kind, object_id), what)
            return compression.decompress(plain, None, what)

        full = self.prefix + key
        try:
            return self.backend.read_verified(full, lambda b: b.get(full), verify)
        except NotFound:
            raise IntegrityError(f"{what}: missing from {self.backend.url}") from None

    def _ids(self, folder: str) -> Iterator[tuple[bytes, int]]:
        for info in self.backend.list(self.prefix + folder + "/"):
            name = info.key.rsplit("/", 1)[-1]
            try:
                oid = bytes.fromhex(name)
            except ValueError:
                continue
            if len(oid) == ID_SIZE:
                yield oid, info.size

    # -- index -----------------------------------------------------------------
    def load_index(self) -> MasterIndex:
        """The index: every file of index/, superseded files left out."""
        with self._index_lock:
            if not self._index_loaded:
                failed = self._index_failed
                if failed is not None and time.monotonic() - failed[0] < INDEX_RETRY_SECONDS:
                    # not read again for each blob a mount's workers look up meanwhile
                    raise type(failed[1])(*failed[1].args)
                try:
                    files = self._read_index_files("index")
                except KiwiError as exc:
                    self._index_failed = (time.monotonic(), exc)
                    raise
                for f in files:
                    self.index.add_file(f)
                self.index.drop_superseded()
                self._index_read = [f.file_id for f in files]
                self._index_loaded = True
                self.tree_index = None  # the index holds every tree record too
        return self.index

    def load_tree_index(self) -> None:
        """The copy of the index's tree records (treeindex/) alone: what a mount needs to
        start. `locate` loads the index when asked for a blob the copy does not hold (a
        file's content; a tree the copy lacks, in a repository written before it existed)."""
        with self._index_lock:
            if self._index_loaded or self.tree_index is not None:
                return
            trees = MasterIndex()
            try:
                for f in self._read_index_files(TREE_INDEX):
                    trees.add_file(f)
            except KiwiError as exc:  # only a copy: the index itself will answer
                log.warning("%s; the directories are looked up in the whole index", exc)
                return
            trees.drop_superseded()
            self.tree_index = trees

    def list_tree_index(self) -> list[bytes]:
        """The ids of the treeindex/ files (list them before loading the index, so that
        every copy listed has its index file among those the index load reads)."""
        return [iid for iid, _size in self._ids(TREE_INDEX)]

    def tree_index_problems(self, listed: list[bytes]) -> list[str]:
        """What is wrong with the treeindex/ files LISTED (before the index was loaded):
        unreadable files, records that the index does not hold as trees."""
        index = self.load_index()
        problems = []
        for iid in listed:
            try:
                f = self._read_index_file(TREE_INDEX, iid)
            except IntegrityError as exc:
                if "missing" not in str(exc):  # else merged meanwhile: its records are in another copy
                    problems.append(str(exc))
                continue
            stray = []
            for loc in f:
                held = index.find(loc.blob_id)
                if loc.kind != KIND_TREE or held is None or held.kind != KIND_TREE:
                    stray.append(loc.blob_id)
            if stray:
                problems.append(f"{TREE_INDEX}/{iid.hex()}: {len(stray)} records the index does not hold as "
                                f"trees (first {stray[0].hex()})")
        return problems

    def _read_index_file(self, folder: str, iid: bytes) -> IndexFile:
        return IndexFile.decode(iid, self._get_object(f"{folder}/{iid.hex()}", KIND_INDEX, iid), folder)

    def _read_index_files(self, folder: str) -> list[IndexFile]:
        for attempt in range(3):
            try:
                return [self._read_index_file(folder, iid) for iid, _size in self._ids(folder)]
            except IntegrityError as exc:
                # a writer merging the index deletes old files after writing the new one:
                # list again before calling a missing index file damage
                if "missing" not in str(exc) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _reset_index(self) -> None:
        with self._index_lock:
            self._index_loaded = False  # first: a locate meanwhile loads rather than miss
            self.index = MasterIndex()
            self._index_read = []
            self._index_failed = None
            self.tree_index = None

    def _write_index_file(self, folder: str, entries: list[BlobLocation], supersedes: list[bytes]) -> bytes:
        iid = new_id()
        self._put_object(f"{folder}/{iid.hex()}", KIND_INDEX, iid, encode_index(entries, supersedes))
        return iid

    def write_index(self, entries: list[BlobLocation]) -> bytes:
        """Index ENTRIES (blobs whose packs are all stored) in a new index/ file, then copy
        their tree records into a treeindex/ file: after, so the copy never names a blob that
        the index does not."""
        iid = self._write_index_file("index", entries, [])
        trees = [e for e in entries if e.kind == KIND_TREE]
        if trees:
            self._write_index_file(TREE_INDEX, trees, [])
        return iid

    def consolidate_index(self) -> bool:
        """Merge the index files into one when there are many (writers hold the lock), and
        their tree records' copies into one."""
        self._reset_index()  # reload: the index file this session just wrote is merged too
        # the copies first: each one listed has its index file among those read next
        old_trees = self.list_tree_index()
        self.load_index()
        if len(self.index.files) < INDEX_CONSOLIDATE_AT:
            return False
        # only the files read (superseded ones a stopped merge left behind included: their
        # records are in the files that superseded them); never one written since, by a
        # writer whose lock was judged stale: its records would be lost
        old = list(self._index_read)
        locations = list(self.index.all_locations())
        self._write_index_file("index", locations, old)
        # the copy whole again (a repository from before treeindex/ gets it here)
        self._write_index_file(TREE_INDEX, [e for e in locations if e.kind == KIND_TREE], old_trees)
        for folder, ids in (("index", old), (TREE_INDEX, old_trees)):
            for iid in ids:
                try:
                    self.backend.delete(f"{self.prefix}{folder}/{iid.hex()}")
                except NotFound:
                    pass
        self._reset_index()
        self.load_index()
        return True

    # -- blobs ---------------------------------------------------------------
    def pack_key(self, pack_id: bytes) -> str:
        h = pack_id.hex()
        return f"{self.prefix}data/{h[:2]}/{h}"

    def locate(self, blob_id: bytes) -> BlobLocation:
        if self._index_loaded:
            loc = self.index.find(blob_id)
        else:
            trees = self.tree_index
            loc = trees.find(blob_id) if trees is not None else None
            if loc is None or loc.kind != KIND_TREE:  # the copy answers for trees only
                loc = self.load_index().find(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()} is not in the index")
        return loc

    def locate_loaded(self, blob_id: bytes) -> BlobLocation | None:
        """The blob's location if the index is loaded; never loads or waits."""
        return self.index.find(blob_id) if self._index_loaded else None

    def read_sealed(self, loc: BlobLocation) -> bytes:
        try:
            return self.backend.get_range(self.pack_key(loc.pack_id), loc.offset, loc.length)
        except NotFound:
            raise IntegrityError(f"pack {loc.pack_id.hex()} (holding {KIND_NAMES[loc.kind]} {loc.blob_id.hex()}) is missing") from None
        except BackendError as exc:
            raise IntegrityError(f"pack {loc.pack_id.hex()}: {exc}") from None

    def open_blob(self, loc: BlobLocation, sealed: bytes | memoryview, view: bool = False) -> bytes | memoryview:
        """Decrypt, authenticate and decompress the blob at LOC from its SEALED bytes (VIEW:
        see compression.decompress)."""
        what = f"{KIND_NAMES[loc.kind]} {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"

        def verify(data: bytes) -> bytes | memoryview:
            plain = open_sealed(self.keys.file_cipher(loc.pack_id), data,
                                associated_data(self.keys.contract_id, loc.kind, loc.blob_id), what)
            return compression.decompress(plain, loc.raw_length, what, view)

        # On an authentication failure a replicated backend re-reads the blob from another location.
        key = self.pack_key(loc.pack_id)
        return self.backend.read_verified(key, lambda b: b.get_range(key, loc.offset, loc.length), verify, sealed)

    def read_blob(self, blob_id: bytes, kind: int | None = None) -> bytes:
        loc = self.locate(blob_id)
        if kind is not None and loc.kind != kind:
            raise IntegrityError(f"blob {blob_id.hex()} is a {KIND_NAMES[loc.kind]}, expected a {KIND_NAMES[kind]}")
        return self.open_blob(loc, self.read_sealed(loc))

    def load_tree(self, tree_id: bytes) -> list[Node]:
        hit = self.tree_cache.get(tree_id)
        if hit is not None:
            return hit[0]
        data = self.read_blob(tree_id, KIND_TREE)
        nodes = decode_tree(data, f"tree {tree_id.hex()}")
        self.tree_cache.put(tree_id, (nodes, len(data) * TREE_MEMORY_FACTOR))
        return nodes

    # -- snapshots -------------------------------------------------------------
    def list_snapshots(self) -> list[Snapshot]:
        snaps = [self.load_snapshot(sid) for sid, _ in self._ids("snapshots")]
        snaps.sort(key=lambda s: (s.time, s.id))
        return snaps

    def load_snapshot(self, sid: bytes) -> Snapshot:
        return Snapshot.decode(sid, self._get_object(f"snapshots/{sid.hex()}", KIND_SNAPSHOT, sid))

    def save_snapshot(self, snap: Snapshot) -> None:
        self._put_object(f"snapshots/{snap.id.hex()}", KIND_SNAPSHOT, snap.id, snap.encode())

    # -- pack trailers (check, repair) -------------------------------------------
    def read_pack_trailer(self, pack_id: bytes, size: int) -> list[BlobLocation]:
        key = self.pack_key(pack_id)
        what = f"pack {pack_id.hex()}"
        if size < PREAMBLE.size + 4:
            raise IntegrityError(f"{what}: truncated")
        head = self.backend.get_range(key, 0, PREAMBLE.size)
        check_preamble(head, KIND_PACK, what)
        (tlen,) = struct.unpack(">I", self.backend.get_range(key, size - 4, 4))
        if tlen > size - PREAMBLE.size - 4:
            raise IntegrityError(f"{what}: truncated (trailer length {tlen} beyond the file)")
        sealed = self.backend.get_range(key, size - 4 - tlen, tlen)
        plain = open_sealed(self.keys.file_cipher(pack_id), sealed,
                            associated_data(self.keys.contract_id, KIND_PACK_TRAILER, pack_id), what + " trailer")
        rows = msgpack.unpackb(compression.decompress(plain, None, what), raw=False)
        return [BlobLocation(r[0], pack_id, r[2], r[3], r[4], r[1]) for r in rows]

    def list_packs(self) -> Iterator[tuple[bytes, int]]:
        for info in self.backend.list(self.prefix + "data/"):
            name = info.key.rsplit("/", 1)[-1]
            try:
                pid = bytes.fromhex(name)
            except ValueError:
                continue
            yield pid, info.size

    # -- writer lock -------------------------------------------------------------
    def lock(self, wait: float = 600.0) -> WriterLock:
        return WriterLock(self, wait)


class PackWriter:
    """Collects sealed blobs of one kind family into packs of about PACK_TARGET bytes."""

    def __init__(self, repo: Repository, on_pack: Callable[[list[BlobLocation]], None] | None = None) -> None:
        self.repo = repo
        self.on_pack = on_pack
        self._lock = threading.Lock()
        self._reset()
        self.packs_written = 0
        self.bytes_written = 0

    def _reset(self) -> None:
        self.pack_id = new_id()
        self.cipher = self.repo.keys.file_cipher(self.pack_id)
        self.parts: list[bytes] = [preamble(KIND_PACK)]
        self.size = PREAMBLE.size
        self.entries: list[BlobLocation] = []

    def add(self, blob_id: bytes, kind: int, payload: bytes, raw_length: int) -> None:
        """PAYLOAD is the compressed form (type byte + data) of a blob of RAW_LENGTH bytes."""
        with self._lock:
            sealed = seal(self.cipher, payload, associated_data(self.repo.keys.contract_id, kind, blob_id))
            loc = BlobLocation(blob_id, self.pack_id, self.size, len(sealed), raw_length, kind)
            self.parts.append(sealed)
            self.size += len(sealed)
            self.entries.append(loc)
            self.repo.index.add_pending(loc)
            if self.size >= PACK_TARGET:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            if self.entries:
                self._flush_locked()

    def _flush_locked(self) -> None:
        rows = [[e.blob_id, e.kind, e.offset, e.length, e.raw_length] for e in self.entries]
        trailer = seal(self.cipher, compression.compress(msgpack.packb(rows, use_bin_type=True)),
                       associated_data(self.repo.keys.contract_id, KIND_PACK_TRAILER, self.pack_id))
        self.parts.append(trailer)
        self.parts.append(struct.pack(">I", len(trailer)))
        data = b"".join(self.parts)
        self.repo.backend.put(self.repo.pack_key(self.pack_id), data)
        self.packs_written += 1
        self.bytes_written += len(data)
        entries = self.entries
        self._reset()
        if self.on_pack:
            self.on_pack(entries)


class WriterLock:
    """An exclusive lock object in the store; stale after LOCK_STALE_SECONDS without refresh
    or when its holder (same host) is dead. Waits for a live holder up to `wait` seconds."""

    def __init__(self, repo: Repository, wait: float) -> None:
        self.repo = repo
        self.wait = wait
        self.lock_id: bytes | None = None
        self.refreshed = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _read(self, lid: bytes) -> dict | None:
        try:
            return msgpack.unpackb(self.repo._get_object(f"locks/{lid.hex()}", KIND_LOCK, lid), raw=False)
        except IntegrityError:
            return None

    def _stale(self, info: dict | None) -> bool:
        if info is None:
            return True
        if time.time() - info["time"] > LOCK_STALE_SECONDS:
            return True
        if info["host"] == socket.gethostname():
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def _write(self) -> bytes:
        lid = new_id()
        payload = msgpack.packb({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        self.repo._put_object(f"locks/{lid.hex()}", KIND_LOCK, lid, payload)
        self.refreshed = time.monotonic()
        return lid

    def __enter__(self) -> WriterLock:
        deadline = time.monotonic() + self.wait
        while True:
            others = [lid for lid, _ in self.repo._ids("locks") if lid != self.lock_id]
            live = []
            for lid in others:
                if self._stale(self._read(lid)):
                    self.repo.backend.delete(f"{self.repo.prefix}locks/{lid.hex()}")
                else:
                    live.append(lid)
            if not live:
                if self.lock_id is None:
                    self.lock_id = self._write()
                    continue  # re-list: another writer may have written at the same moment
                self._refresher = threading.Thread(target=self._keep_fresh, name="kiwi-lock", daemon=True)
                self._refresher.start()
                return self
            if self.lock_id is not None:  # someone else is there: step back, retry later
                self.repo.backend.delete(f"{self.repo.prefix}locks/{self.lock_id.hex()}")
                self.lock_id = None
            if time.monotonic() >= deadline:
                raise LockedError(_("the repository is locked by another writer; try again later"))
            time.sleep(0.2 + random.random())

    def _keep_fresh(self) -> None:
        # a backup longer than LOCK_STALE_SECONDS must not look abandoned to another writer
        while not self._stop.wait(LOCK_REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception:  # the store may be briefly unavailable: retry at the next period
                continue

    def refresh(self) -> None:
        if self.lock_id is not None:
            old = self.lock_id
            self.lock_id = self._write()
            self.repo.backend.delete(f"{self.repo.prefix}locks/{old.hex()}")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self.lock_id is not None:
            self.repo.backend.delete(f"{self.repo.prefix}locks/{self.lock_id.hex()}")
            self.lock_id = None

