"""Tree objects: one msgpack document per directory, entries sorted by byte name.

Schema in docs/FORMAT.md ("Tree"). A file's chunk list carries each chunk's size, so
`offsets` gives cumulative starts and an offset maps to its chunk by binary search.
"""

from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass, field
from itertools import accumulate

import msgpack

from .crypto import ID_SIZE
from .errors import IntegrityError

TREE_VERSION = 1

TYPE_FILE = "f"
TYPE_DIR = "d"
TYPE_SYMLINK = "l"
TYPE_FIFO = "p"
TYPE_CHARDEV = "c"
TYPE_BLOCKDEV = "b"
TYPE_SOCKET = "s"

TYPE_TO_IFMT = {
    TYPE_FILE: stat.S_IFREG,
    TYPE_DIR: stat.S_IFDIR,
    TYPE_SYMLINK: stat.S_IFLNK,
    TYPE_FIFO: stat.S_IFIFO,
    TYPE_CHARDEV: stat.S_IFCHR,
    TYPE_BLOCKDEV: stat.S_IFBLK,
    TYPE_SOCKET: stat.S_IFSOCK,
}


@dataclass(slots=True)
class Node:
    name: bytes
    type: str
    mode: int = 0  # permission and special bits (st_mode & 0o7777)
    uid: int = 0
    gid: int = 0
    user: str | None = None
    group: str | None = None
    mtime: int = 0  # ns since the epoch, UTC
    atime: int = 0
    ctime: int = 0
    size: int = 0
    chunks: list[tuple[bytes | None, int]] = field(default_factory=list)  # (id or None = hole, size)
    target: bytes | None = None
    subtree: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    hardlink: int = 0  # >0: group number shared by the hardlinks of one file in a snapshot
    nlink: int = 1
    rdev: int = 0

    @property
    def st_mode(self) -> int:
        return TYPE_TO_IFMT[self.type] | self.mode

    def offsets(self) -> list[int]:
        """Start offset of each chunk (for binary search of an offset)."""
        return [0, *accumulate(size for _, size in self.chunks)][:-1]

    def allocated(self) -> int:
        """Bytes that hold data (holes excluded): what st_blocks reports."""
        return sum(size for cid, size in self.chunks if cid is not None)

    def to_doc(self) -> dict:
        d: dict = {"name": self.name, "type": self.type, "mode": self.mode, "uid": self.uid,
                   "gid": self.gid, "mtime": self.mtime, "atime": self.atime, "ctime": self.ctime}
        # owner names from a system database that are not UTF-8 are left out (the ids stay)
        if self.user is not None and _utf8(self.user):
            d["user"] = self.user
        if self.group is not None and _utf8(self.group):
            d["group"] = self.group
        if self.type == TYPE_FILE:
            d["size"] = self.size
            d["chunks"] = [[cid, size] for cid, size in self.chunks]
        elif self.type == TYPE_SYMLINK:
            d["target"] = self.target
        elif self.type == TYPE_DIR:
            d["subtree"] = self.subtree
        elif self.type in (TYPE_CHARDEV, TYPE_BLOCKDEV):
            d["rdev"] = self.rdev
        if self.xattrs:
            d["xattrs"] = self.xattrs
        if self.hardlink:
            d["hardlink"] = self.hardlink
            d["nlink"] = self.nlink
        return d

    @classmethod
    def from_doc(cls, d: dict) -> Node:
        """A node from its msgpack map, checked against the schema (FORMAT.md 13.1)."""
        t = d["type"]
        if t not in TYPE_TO_IFMT:
            raise ValueError(f"unknown entry type {t!r}")
        mtime = _int(d["mtime"], _I64, "mtime")
        n = cls(name=_bin(d["name"], "name"), type=t, mode=_int(d["mode"], _U32, "mode"),
                uid=_int(d["uid"], _U32, "uid"), gid=_int(d["gid"], _U32, "gid"),
                user=d.get("user"), group=d.get("group"), mtime=mtime,
                atime=_int(d.get("atime", mtime), _I64, "atime"), ctime=_int(d.get("ctime", mtime), _I64, "ctime"))
        if t == TYPE_FILE:
            n.size = _int(d["size"], _I64, "size")
            n.chunks = [_chunk(c) for c in d["chunks"]]
            if sum(s for _, s in n.chunks) != n.size:
                raise ValueError("chunk sizes do not add up to the file size")
        elif t == TYPE_SYMLINK:
            n.target = _bin(d["target"], "symlink target")
            n.size = len(n.target)
        elif t == TYPE_DIR:
            n.subtree = _bin(d["subtree"], "subtree", ID_SIZE)
        elif t in (TYPE_CHARDEV, TYPE_BLOCKDEV):
            n.rdev = _int(d.get("rdev", 0), _U64, "rdev")
        xattrs = d.get("xattrs") or {}
        if type(xattrs) is not dict:
            raise ValueError("xattrs is not a map")
        n.xattrs = {_bin(k, "xattr name"): _bin(v, "xattr value") for k, v in xattrs.items()}
        n.hardlink = _int(d.get("hardlink", 0), _U32, "hardlink")
        n.nlink = _int(d.get("nlink", 1), _U32, "nlink")
        return n


_U32, _U64, _I64 = (0, 1 << 32), (0, 1 << 64), (-(1 << 63), 1 << 63)


def _int(v: object, bounds: tuple[int, int], what: str) -> int:
    if type(v) is not int or not bounds[0] <= v < bounds[1]:
        raise ValueError(f"bad {what}")
    return v


def _bin(v: object, what: str, length: int | None = None) -> bytes:
    if type(v) is not bytes or (length is not None and len(v) != length):
        raise ValueError(f"bad {what}")
    return v


def _chunk(c: object) -> tuple[bytes | None, int]:
    """One [id or nil, size] pair of a chunk list."""
    if type(c) is not list or len(c) != 2:
        raise ValueError("a chunk is not an [id, size] pair")
    cid = c[0] if c[0] is None else _bin(c[0], "chunk id", ID_SIZE)
    return cid, _int(c[1], (0, 1 << 63), "chunk size")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def chunk_at(offsets: list[int], offset: int) -> int:
    """Index of the chunk containing OFFSET (offsets from Node.offsets())."""
    return bisect.bisect_right(offsets, offset) - 1


def encode_tree(nodes: list[Node]) -> bytes:
    nodes = sorted(nodes, key=lambda n: n.name)
    return msgpack.packb({"version": TREE_VERSION, "entries": [n.to_doc() for n in nodes]},
                         use_bin_type=True)


def decode_tree(data: bytes, what: str) -> list[Node]:
    try:
        doc = msgpack.unpackb(data, raw=False)
        if doc.get("version") != TREE_VERSION:
            raise IntegrityError(f"{what}: unsupported tree version {doc.get('version')}")
        if type(doc["entries"]) is not list:
            raise ValueError("entries is not an array")
        nodes = [Node.from_doc(e) for e in doc["entries"]]
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{what}: malformed tree ({exc})") from None
    for a, b in zip(nodes, nodes[1:], strict=False):
        if not a.name < b.name:
            raise IntegrityError(f"{what}: entries not sorted or duplicated")
    for n in nodes:
        if not n.name or b"/" in n.name or b"\0" in n.name or n.name in (b".", b".."):
            raise IntegrityError(f"{what}: unsafe entry name {n.name!r}")
    return nodes


def find_child(nodes: list[Node], name: bytes) -> Node | None:
    i = bisect.bisect_left(nodes, name, key=lambda n: n.name)
    if i < len(nodes) and nodes[i].name == name:
        return nodes[i]
    return None
