"""Byte producers of the open formats: file content, POSIX pax tar, ZIP64, metadata sidecars.

Every producer is deterministic (same snapshot, same bytes), which is what lets an
interrupted export resume and still end identical to an uninterrupted one. They run in
worker threads and write into a Sink (see pipeline.py): nothing is staged on disk.
"""

from __future__ import annotations

import base64
import os
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Protocol

from ..repository import Repository
from ..restore import walk
from ..tree import (
    TYPE_BLOCKDEV,
    TYPE_CHARDEV,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_FILE,
    TYPE_SYMLINK,
    Node,
)
from .fetch import Prefetcher, Ticket, walk_ahead
from .names import encode_path


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


def file_content(repo: Repository, node: Node, sink: Sink, pool: Executor | None) -> None:
    """Write a file's bytes (holes as zeros), reading its chunks ahead in POOL in batches."""
    pf = Prefetcher(repo, pool)
    try:
        t = pf.add(node)
        pf.flush()
        for data in pf.content(t):
            sink.write(data)
    finally:
        pf.close()


def file_wanted() -> Callable[[Node], bool]:
    """For walk_ahead: regular files, a hardlinked file's content only at its first link."""
    seen: set[int] = set()

    def want(node: Node) -> bool:
        if node.type != TYPE_FILE:
            return False
        if node.hardlink:
            if node.hardlink in seen:
                return False
            seen.add(node.hardlink)
        return True
    return want


def snapshot_entries(repo: Repository, tree: bytes) -> Iterator[tuple[bytes, Node]]:
    root = Node(name=b"", type=TYPE_DIR, subtree=tree)
    yield from walk(repo, root)


# -- metadata sidecar (JSON lines) ------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _text(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def metadata_line(path: bytes, node: Node, exported: str | None) -> dict:
    """One entry's metadata as kept in metadata/<machine>/<snapshot>.jsonl (docs/EXPORT.md)."""
    d: dict = {"path": _text(path), "path_b64": _b64(path), "exported": exported, "type": node.type,
               "mode": f"{node.mode:04o}", "uid": node.uid, "gid": node.gid, "user": node.user,
               "group": node.group, "mtime_ns": node.mtime, "atime_ns": node.atime, "ctime_ns": node.ctime}
    if node.type == TYPE_FILE:
        d["size"] = node.size
        d["holes"] = [[off, size] for off, (cid, size) in zip(node.offsets(), node.chunks, strict=True)
                      if cid is None]
    if node.type == TYPE_SYMLINK:
        d["target"] = _text(node.target or b"")
        d["target_b64"] = _b64(node.target or b"")
    if node.type in (TYPE_CHARDEV, TYPE_BLOCKDEV):
        d["rdev_major"], d["rdev_minor"] = os.major(node.rdev), os.minor(node.rdev)
    if node.xattrs:
        d["xattrs_b64"] = {_b64(k): _b64(v) for k, v in sorted(node.xattrs.items())}
    if node.hardlink:
        d["hardlink_group"] = node.hardlink
        d["nlink"] = node.nlink
    return d


# -- POSIX pax tar ------------------------------------------------------------------------------
def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _pax_time(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return f"{sec}.{frac:09d}" if frac else str(sec)


_NUL = b"\0"
_PAX_NAME = b"././@PaxHeader".ljust(100, _NUL)
_NO_DEV = bytes(16)


# the checksum counts the placeholder spaces and the magic; NUL padding adds nothing
_CHKSUM_BASE = sum(b" " * 8) + sum(tarfile.POSIX_MAGIC)


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typ: bytes, linkname: bytes,
           uname: bytes, gname: bytes) -> bytes:
    """One ustar header block, as tarfile's _create_header writes it (pax magic, no devices).
    The checksum sums the fields that are not NUL instead of the whole 512-byte block."""
    name, linkname, uname, gname = name[:100], linkname[:100], uname[:32], gname[:32]
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    chksum = _CHKSUM_BASE + sum(name) + sum(numbers) + typ[0] + sum(linkname) + sum(uname) + sum(gname)
    return b"".join((name.ljust(100, _NUL), numbers, b"%06o\0 " % chksum, typ, linkname.ljust(100, _NUL),
                     tarfile.POSIX_MAGIC, uname.ljust(32, _NUL), gname.ljust(32, _NUL), _NO_DEV, bytes(167)))


def _record(key: bytes, value: bytes) -> bytes:
    """One pax record, "LEN KEY=VALUE\n", LEN counting its own digits."""
    n = len(key) + len(value) + 3
    p = 0
    while True:
        m = n + len(str(p))
        if m == p:
            return b"%d %s=%s\n" % (p, key, value)
        p = m


def _utf8(b: bytes) -> bool:
    if b.isascii():
        return True
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ustar_field(b: bytes) -> bytes:
    # what tarfile puts in the ustar field of a name given in a pax record: '?' per character
    return b if b.isascii() else _s(b).encode("ascii", "replace")


def _pax_extras(node: Node) -> list[tuple[bytes, bytes]]:
    """The pax records every member carries: the time to the nanosecond, then the xattrs."""
    return [(b"mtime", _pax_time(node.mtime).encode())] + [
        (b"SCHILY.xattr." + k, v) for k, v in sorted(node.xattrs.items())]


def pax_member_header(name: bytes, typ: bytes, linkname: bytes, size: int, node: Node) -> bytes | None:
    """The pax extended header and ustar header of one member, straight from the stored bytes:
    byte for byte what tarfile's TarInfo.tobuf(PAX_FORMAT, "utf-8", "surrogateescape") writes
    (tests/test_export_tar_headers.py holds it to that) at a fifth of its cost per file. None for
    a member left to tarfile (devices, numbers out of ustar range)."""
    if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        return None
    if typ == tarfile.DIRTYPE and not name.endswith(b"/"):
        name += b"/"
    uid, gid, mtime = node.uid, node.gid, node.mtime // 1_000_000_000
    if not (0 <= uid < 8 ** 7 and 0 <= gid < 8 ** 7 and 0 <= size < 8 ** 11 and 0 <= mtime < 8 ** 11):
        return None
    uname = (node.user or "").encode("utf-8", "surrogateescape")
    gname = (node.group or "").encode("utf-8", "surrogateescape")
    pax = _pax_extras(node)
    for value, key, length in ((name, b"path", 100), (linkname, b"linkpath", 100), (uname, b"uname", 32),
                               (gname, b"gname", 32)):
        if not value.isascii() or len(value) > length:
            pax.append((key, value))
    records = [_record(k, v) for k, v in pax]
    if not all(_utf8(v) for _, v in pax):
        records.insert(0, b"21 hdrcharset=BINARY\n")
    rec = b"".join(records)
    head = _ustar(_PAX_NAME, 0, 0, 0, len(rec), 0, tarfile.XHDTYPE, b"", b"", b"")
    return b"".join((head, rec, bytes(-len(rec) % tarfile.BLOCKSIZE),
                     _ustar(_ustar_field(name), node.mode & 0o7777, uid, gid, size, mtime, typ,
                            _ustar_field(linkname), _ustar_field(uname), _ustar_field(gname))))


def _tarinfo(name: bytes, typ: bytes, linkname: bytes, size: int, node: Node) -> tarfile.TarInfo:
    """The member as tarfile builds it (devices, and numbers beyond ustar's fields)."""
    ti = tarfile.TarInfo(_s(name))
    ti.type, ti.linkname, ti.size = typ, _s(linkname), size
    ti.mode = node.mode
    ti.uid, ti.gid = node.uid, node.gid
    ti.uname, ti.gname = node.user or "", node.group or ""
    ti.mtime = node.mtime // 1_000_000_000
    if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = os.major(node.rdev), os.minor(node.rdev)
    ti.pax_headers = {_s(k): _s(v) for k, v in _pax_extras(node)}
    return ti


class TarWriter:
    """pax (POSIX.1-2001) members written as the entries come: ns mtimes, owners, xattrs
    (SCHILY.xattr.*, as GNU tar and bsdtar read them), symlinks, hardlinks, fifos, devices.
    Names stay the stored bytes (hdrcharset=BINARY when they are not UTF-8)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.written = 0
        self.warnings: list[str] = []

    def _w(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.written += len(data)

    def add(self, repo: Repository, name: bytes, node: Node, links: dict[int, bytes],
            pool: Executor | None, pf: Prefetcher | None = None, ticket: Ticket | None = None) -> None:
        """One member; its content from TICKET of PF when given (walk_ahead with file_wanted),
        else read now."""
        data = False
        size = 0
        linkname = b""
        if node.type == TYPE_FILE:
            if node.hardlink and node.hardlink in links:
                typ, linkname = tarfile.LNKTYPE, links[node.hardlink]
            else:
                typ, size, data = tarfile.REGTYPE, node.size, True
                if node.hardlink:
                    links[node.hardlink] = name
        elif node.type == TYPE_DIR:
            typ = tarfile.DIRTYPE
        elif node.type == TYPE_SYMLINK:
            typ, linkname = tarfile.SYMTYPE, node.target or b""
        elif node.type == TYPE_FIFO:
            typ = tarfile.FIFOTYPE
        elif node.type in (TYPE_CHARDEV, TYPE_BLOCKDEV):
            typ = tarfile.CHRTYPE if node.type == TYPE_CHARDEV else tarfile.BLKTYPE
        else:  # sockets cannot be archived (GNU tar skips them too)
            self.warnings.append(f"socket skipped: {name!r}")
            return
        head = pax_member_header(name, typ, linkname, size, node)
        self._w(head if head is not None else _tarinfo(name, typ, linkname, size, node).tobuf(
            tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if ticket is not None and not data:
            pf.discard(ticket)  # type: ignore[union-attr]
        if data:
            n = 0
            if ticket is not None:
                write = self.sink.write
                for chunk in pf.content(ticket):  # type: ignore[union-attr]
                    write(chunk)
                    n += len(chunk)
            else:
                counter = _Counting(self.sink)
                file_content(repo, node, counter, pool)
                n = counter.n
            self.written += n
            if n != node.size:
                from ..errors import IntegrityError

                raise IntegrityError(f"{name!r}: {n} bytes of content for a size of {node.size}")
            if n % tarfile.BLOCKSIZE:
                self._w(bytes(tarfile.BLOCKSIZE - n % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._w(bytes(2 * tarfile.BLOCKSIZE))
        rest = self.written % tarfile.RECORDSIZE
        if rest:
            self._w(bytes(tarfile.RECORDSIZE - rest))


class _Counting:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.n = 0

    def write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.n += len(data)


# -- ZIP64 --------------------------------------------------------------------------------------
class _ZipOut:
    """A write-only stream for zipfile (it then writes data descriptors, no seeks)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        pass


def _zip_extra(node: Node) -> bytes:
    extra = b""
    sec = node.mtime // 1_000_000_000
    if 0 <= sec < 2**31:  # extended timestamp (UT): exact UTC seconds for unzip
        extra += struct.pack("<HHBI", 0x5455, 5, 1, sec)
    if 0 <= node.uid < 2**32 and 0 <= node.gid < 2**32:  # Info-ZIP Unix "ux": uid/gid (unzip -X)
        extra += struct.pack("<HHBBIBI", 0x7875, 11, 1, 4, node.uid, 4, node.gid)
    return extra


def _zip_info(name: str, node: Node, st_mode: int) -> zipfile.ZipInfo:
    t = datetime.fromtimestamp(node.mtime / 1e9, UTC)
    dt = (t.year, t.month, t.day, t.hour, t.minute, t.second) if t.year >= 1980 else (1980, 1, 1, 0, 0, 0)
    zi = zipfile.ZipInfo(name, dt)
    zi.create_system = 3  # Unix: external_attr carries st_mode
    zi.external_attr = (st_mode & 0xFFFF) << 16
    zi.compress_type = zipfile.ZIP_STORED
    zi.extra = _zip_extra(node)
    return zi


def write_zip(repo: Repository, tree: bytes, sink: Sink, pool: Executor | None,
              on_file: Callable[[], None] | None = None) -> list[str]:
    """One snapshot as a ZIP64 archive (stored, not deflated: speed and byte-for-byte
    determinism across zlib versions). Names are safe UTF-8 (names.py); fifos, devices and
    sockets are only in the metadata sidecar. Returns warnings."""
    warnings: list[str] = []
    pf = Prefetcher(repo, pool)
    with zipfile.ZipFile(_ZipOut(sink), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path, node, ticket in walk_ahead(pf, snapshot_entries(repo, tree), lambda n: n.type == TYPE_FILE):
            name, _ = encode_path(path)
            if node.type == TYPE_DIR:
                zi = _zip_info(name + "/", node, stat.S_IFDIR | node.mode)
                zi.external_attr |= 0x10  # MS-DOS directory bit
                zf.writestr(zi, b"")
            elif node.type == TYPE_FILE:
                zi = _zip_info(name, node, stat.S_IFREG | node.mode)
                zi.file_size = node.size  # > 4 GiB: zipfile then writes ZIP64 records
                with zf.open(zi, "w", force_zip64=node.size > (1 << 31)) as out:
                    for chunk in pf.content(ticket):
                        out.write(chunk)
                if on_file:
                    on_file()
            elif node.type == TYPE_SYMLINK:
                zf.writestr(_zip_info(name, node, stat.S_IFLNK | 0o777), node.target or b"")
            else:
                warnings.append(f"{node.type} {path!r} kept in the metadata sidecar only")
    return warnings

