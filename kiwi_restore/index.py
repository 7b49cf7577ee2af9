"""The blob index: blob id -> (pack, offset, length, raw length, kind).

Each index file holds fixed-width records sorted by blob id; a reader keeps them as one
bytes object per file and binary-searches it, so memory is ~49 bytes per blob and opening
a repository costs one decryption per index file, not one Python object per blob.
"""

from __future__ import annotations

import bisect
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack

from .errors import IntegrityError

RECORD = struct.Struct(">32sIIIIB")  # blob id, pack number, offset, length, raw length, kind


@dataclass(frozen=True, slots=True)
class BlobLocation:
    blob_id: bytes
    pack_id: bytes
    offset: int
    length: int
    raw_length: int
    kind: int


class IndexFile:
    """One decoded index file: its pack table and its sorted records."""

    __slots__ = ("file_id", "packs", "records", "count", "_fanout", "supersedes", "folder")

    def __init__(self, file_id: bytes, packs: list[bytes], records: bytes, supersedes: list[bytes],
                 folder: str = "index") -> None:
        if len(records) % RECORD.size:
            raise IntegrityError(f"{folder} {file_id.hex()}: record table has a bad length")
        self.file_id = file_id
        self.folder = folder  # "index", or "treeindex" for a copy of tree records
        self.packs = packs
        self.records = records
        self.count = len(records) // RECORD.size
        self.supersedes = supersedes
        # fanout[b] = first record whose id starts with a byte >= b
        fan = [0] * 257
        ids = self._key
        for b in range(1, 256):
            fan[b] = bisect.bisect_left(range(self.count), bytes([b]), key=lambda i: ids(i)[:1])
        fan[256] = self.count
        self._fanout = fan

    def _key(self, i: int) -> bytes:
        off = i * RECORD.size
        return self.records[off:off + 32]

    def find(self, blob_id: bytes) -> BlobLocation | None:
        b = blob_id[0]
        lo, hi = self._fanout[b], self._fanout[b + 1]
        i = bisect.bisect_left(range(lo, hi), blob_id, key=self._key)
        i += lo
        if i < hi and self._key(i) == blob_id:
            return self._location(i)
        return None

    def _location(self, i: int) -> BlobLocation:
        blob_id, pack_no, offset, length, raw, kind = RECORD.unpack_from(self.records, i * RECORD.size)
        if pack_no >= len(self.packs):
            raise IntegrityError(f"{self.folder} {self.file_id.hex()}: record points to pack #{pack_no} beyond its table")
        return BlobLocation(blob_id, self.packs[pack_no], offset, length, raw, kind)

    def __iter__(self) -> Iterator[BlobLocation]:
        for i in range(self.count):
            yield self._location(i)

    @classmethod
    def decode(cls, file_id: bytes, payload: bytes, folder: str = "index") -> IndexFile:
        try:
            doc = msgpack.unpackb(payload, raw=False)
            return cls(file_id, list(doc["packs"]), doc["records"], list(doc.get("supersedes", [])), folder)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"{folder} {file_id.hex()}: malformed ({exc})") from None


def encode_index(entries: Iterable[BlobLocation], supersedes: Iterable[bytes] = ()) -> bytes:
    packs: dict[bytes, int] = {}
    rows = []
    for e in entries:
        pack_no = packs.setdefault(e.pack_id, len(packs))
        rows.append(RECORD.pack(e.blob_id, pack_no, e.offset, e.length, e.raw_length, e.kind))
    rows.sort()
    # Two records for one id (two writers after a lock judged stale stored the same blob) are
    # fine: the search returns the first, and both locations hold valid copies.
    return msgpack.packb(
        {"packs": list(packs), "records": b"".join(rows), "supersedes": list(supersedes)},
        use_bin_type=True,
    )


class MasterIndex:
    """All index files of a repository plus the blobs written by the running session."""

    def __init__(self) -> None:
        self.files: list[IndexFile] = []
        self.pending: dict[bytes, BlobLocation] = {}
        self._lock = threading.Lock()

    def add_file(self, f: IndexFile) -> None:
        self.files.append(f)

    def drop_superseded(self) -> None:
        gone = {s for f in self.files for s in f.supersedes}
        self.files = [f for f in self.files if f.file_id not in gone]

    def find(self, blob_id: bytes) -> BlobLocation | None:
        loc = self.pending.get(blob_id)
        if loc is not None:
            return loc
        for f in self.files:
            loc = f.find(blob_id)
            if loc is not None:
                return loc
        return None

    def __contains__(self, blob_id: bytes) -> bool:
        return self.find(blob_id) is not None

    def add_pending(self, loc: BlobLocation) -> None:
        with self._lock:
            self.pending[loc.blob_id] = loc

    def all_locations(self) -> Iterator[BlobLocation]:
        for f in self.files:
            yield from f
        yield from self.pending.values()

    def known_ids(self) -> set[bytes]:
        """A set of every blob id (ingest's fast dedup test)."""
        ids: set[bytes] = set()
        size = RECORD.size
        for f in self.files:
            recs = f.records
            ids.update(recs[o:o + 32] for o in range(0, len(recs), size))
        ids.update(self.pending)
        return ids

