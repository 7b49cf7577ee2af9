"""A directory's entries in flat columns: what the mount keeps of a tree between requests.

A decoded tree is one Python object per entry and per chunk (close to 800 bytes for a
small file); a listing of 100,000 files would not fit a modest cache. The mount converts
each tree once into a handful of arrays (about 200 bytes per small file), keeps those in
its LRU, and builds attributes from them without creating objects per entry.
"""

from __future__ import annotations

import operator
import stat
import sys
from array import array
from bisect import bisect_left
from itertools import islice

import msgpack
from pyfuse3 import EntryAttributes

try:  # the C decoder (fuse/_treecols.c), built by setup.py when a compiler is there
    from . import _treecols
except ImportError:
    _treecols = None

from ..crypto import ID_SIZE
from ..errors import IntegrityError
from ..tree import (
    TREE_VERSION,
    TYPE_BLOCKDEV,
    TYPE_CHARDEV,
    TYPE_DIR,
    TYPE_FILE,
    TYPE_SYMLINK,
    TYPE_TO_IFMT,
    Node,
)

_HOLE = bytes(ID_SIZE)  # a hole keeps its slot in chunk_ids, so slot k is chunk k
_IFMT = {t.encode(): m for t, m in TYPE_TO_IFMT.items()}
_FILE, _SYMLINK, _DIR = TYPE_FILE.encode(), TYPE_SYMLINK.encode(), TYPE_DIR.encode()
_DEVICES = (TYPE_CHARDEV.encode(), TYPE_BLOCKDEV.encode())
# the numeric columns _treecols.decode returns, in its order, and their array types
_C_COLUMNS = ("mode", "nlink", "uid", "gid", "size", "alloc", "rdev", "atime", "mtime", "ctime",
              "hardlink", "cstart", "ccount", "chunk_sizes")
_C_TYPES = "IIIIqqQqqqIIIq"
if _treecols is not None and (array("I").itemsize, array("q").itemsize, array("Q").itemsize) != (4, 8, 8):
    _treecols = None  # the C decoder writes 32- and 64-bit columns


class DirTable:
    __slots__ = ("names", "mode", "nlink", "uid", "gid", "size", "alloc", "rdev", "atime", "mtime",
                 "ctime", "hardlink", "cstart", "ccount", "chunk_ids", "chunk_sizes", "targets",
                 "subtrees", "xattrs", "nbytes")

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.mode, self.nlink, self.uid, self.gid = array("I"), array("I"), array("I"), array("I")
        self.size, self.alloc, self.rdev = array("q"), array("q"), array("Q")
        self.atime, self.mtime, self.ctime = array("q"), array("q"), array("q")
        self.hardlink, self.cstart, self.ccount = array("I"), array("I"), array("I")
        self.chunk_ids = b""
        self.chunk_sizes = array("q")  # a hole of n bytes is stored as -n - 1
        self.targets: dict[int, bytes] = {}
        self.subtrees: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.nbytes = 0

    @classmethod
    def decode(cls, data: bytes, what: str) -> DirTable:
        """Decode a tree object (docs/FORMAT.md "Tree") straight into columns.

        Same checks as kiwi_restore.tree.decode_tree (tests compare all three), without a
        Node per entry: this is what makes a cold walk of a large snapshot fast. The C
        decoder writes the columns without an object per field (8-10 times faster than
        decode_python, which stands in where it was not built)."""
        if _treecols is None:
            return cls.decode_python(data, what)
        try:
            cols = _treecols.decode(data)
        except ValueError as exc:
            msg = str(exc)
            if msg.startswith("unsupported tree version"):
                raise IntegrityError(f"{what}: {msg}") from None
            raise IntegrityError(f"{what}: malformed tree ({msg})") from None
        t = cls()
        t.names, *numeric, t.chunk_ids, chunk_sizes, t.targets, t.subtrees, t.xattrs = cols
        for column, code, raw in zip(_C_COLUMNS, _C_TYPES, [*numeric, chunk_sizes], strict=True):
            a = array(code)
            a.frombytes(raw)
            setattr(t, column, a)
        t._check_names(what)
        t._measure()
        return t

    @classmethod
    def decode_python(cls, data: bytes, what: str) -> DirTable:
        """DirTable.decode in Python (msgpack.unpackb, then one comprehension per column)."""
        t = cls()
        try:
            doc = msgpack.unpackb(data, raw=True, use_list=False)
            if doc.get(b"version") != TREE_VERSION:
                raise IntegrityError(f"{what}: unsupported tree version {doc.get(b'version')}")
            entries = doc[b"entries"]
            if type(entries) is not tuple:
                raise ValueError("entries is not an array")
            # one comprehension per column: far cheaper than one append per field per entry
            t.names = names = [e[b"name"] for e in entries]
            types = [e[b"type"] for e in entries]
            bad = [x for x in types if x not in _IFMT]
            if bad:
                raise ValueError(f"unknown entry type {bad[0]!r}")
            if not all(type(n) is bytes for n in names):
                raise ValueError("entry name is not bytes")
            t.mode = array("I", [_IFMT[x] | e[b"mode"] for x, e in zip(types, entries, strict=True)])
            t.uid = array("I", [e[b"uid"] for e in entries])
            t.gid = array("I", [e[b"gid"] for e in entries])
            mtimes = [e[b"mtime"] for e in entries]
            t.mtime = array("q", mtimes)
            t.atime = array("q", [e.get(b"atime", m) for e, m in zip(entries, mtimes, strict=True)])
            t.ctime = array("q", [e.get(b"ctime", m) for e, m in zip(entries, mtimes, strict=True)])
            t.hardlink = array("I", [e.get(b"hardlink", 0) for e in entries])
            t.nlink = array("I", [e.get(b"nlink", 1) for e in entries])
            n = len(entries)
            size, alloc, rdev = [0] * n, [0] * n, [0] * n
            cstart, ccount = [0] * n, [0] * n
            sizes: list[int] = []
            ids = bytearray()
            for i, (x, e) in enumerate(zip(types, entries, strict=True)):
                if x == _FILE:
                    cstart[i] = len(sizes)
                    total = used = 0
                    chunks = e[b"chunks"]
                    for cid, csize in chunks:
                        if cid is None:
                            if csize < 0:
                                raise ValueError("bad chunk size")
                            ids += _HOLE
                            sizes.append(-csize - 1)
                        else:
                            if type(cid) is not bytes or len(cid) != ID_SIZE or csize < 0:
                                raise ValueError("bad chunk")
                            ids += cid
                            sizes.append(csize)
                            used += csize
                        total += csize
                    if total != e[b"size"]:
                        raise ValueError("chunk sizes do not add up to the file size")
                    ccount[i] = len(chunks)
                    size[i] = total
                    alloc[i] = used
                elif x == _SYMLINK:
                    target = t.targets[i] = e[b"target"]
                    size[i] = len(target)
                elif x == _DIR:
                    t.subtrees[i] = e[b"subtree"]
                elif x in _DEVICES:
                    rdev[i] = e.get(b"rdev", 0)
            for i, e in enumerate(entries):
                xa = e.get(b"xattrs")
                if xa:
                    t.xattrs[i] = xa = dict(xa)
                    if not all(type(k) is bytes and type(v) is bytes for k, v in xa.items()):
                        raise ValueError("xattr name or value is not bin")
            t.size, t.alloc, t.rdev = array("q", size), array("q", alloc), array("Q", rdev)
            t.cstart, t.ccount = array("I", cstart), array("I", ccount)
            t.chunk_sizes = array("q", sizes)
            t.chunk_ids = bytes(ids)
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"{what}: malformed tree ({exc})") from None
        t._check_names(what)
        t._measure()
        return t

    def _check_names(self, what: str) -> None:
        """The checks of decode_tree that need the whole listing, in C-level loops (they run
        on every entry)."""
        names = self.names
        if not all(map(operator.lt, names, islice(names, 1, None))):
            raise IntegrityError(f"{what}: entries not sorted or duplicated")
        joined = b"/".join(names)
        if (joined.count(b"/") != max(len(names) - 1, 0) or b"\0" in joined
                or any(self.find(bad) >= 0 for bad in (b"", b".", b".."))):
            bad = next(n for n in names if not n or b"/" in n or b"\0" in n or n in (b".", b".."))
            raise IntegrityError(f"{what}: unsafe entry name {bad!r}")

    @classmethod
    def from_nodes(cls, nodes: list[Node]) -> DirTable:
        """The same table from decoded Nodes (the reference the fast decoder is tested against)."""
        t = cls()
        ids = bytearray()
        for i, x in enumerate(nodes):
            t.names.append(x.name)
            t.mode.append(TYPE_TO_IFMT[x.type] | x.mode)
            t.nlink.append(x.nlink)
            t.uid.append(x.uid)
            t.gid.append(x.gid)
            t.size.append(x.size)
            t.rdev.append(x.rdev)
            t.atime.append(x.atime)
            t.mtime.append(x.mtime)
            t.ctime.append(x.ctime)
            t.hardlink.append(x.hardlink)
            t.cstart.append(len(t.chunk_sizes) if x.type == TYPE_FILE else 0)
            t.ccount.append(len(x.chunks))
            used = 0
            for cid, csize in x.chunks:
                if cid is None:
                    ids += _HOLE
                    t.chunk_sizes.append(-csize - 1)
                else:
                    ids += cid
                    t.chunk_sizes.append(csize)
                    used += csize
            t.alloc.append(used)
            if x.type == TYPE_SYMLINK:
                t.targets[i] = x.target or b""
            elif x.type == TYPE_DIR:
                t.subtrees[i] = x.subtree
            if x.xattrs:
                t.xattrs[i] = dict(x.xattrs)
        t.chunk_ids = bytes(ids)
        t._measure()
        return t

    def _measure(self) -> None:
        n = len(self.names)
        self.nbytes = (sum(map(len, self.names)) + 57 * n + 76 * n + len(self.chunk_ids) + 8 * len(self.chunk_sizes)
                       + 120 * (len(self.targets) + len(self.subtrees)) + sum(map(len, self.targets.values()))
                       + sum(sys.getsizeof(v) + sum(len(a) + len(b) + 80 for a, b in v.items())
                             for v in self.xattrs.values()) + 1000)

    def columns(self) -> tuple:
        """Everything the table holds (for tests comparing two tables)."""
        return tuple(getattr(self, k) for k in self.__slots__ if k != "nbytes")

    def __len__(self) -> int:
        return len(self.names)

    def find(self, name: bytes) -> int:
        """Index of NAME (entries are sorted by byte name), or -1."""
        i = bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def is_dir(self, i: int) -> bool:
        return stat.S_ISDIR(self.mode[i])

    def is_file(self, i: int) -> bool:
        return stat.S_ISREG(self.mode[i])

    def chunks(self, i: int) -> list[tuple[bytes | None, int]]:
        """The file's chunk list: (id, size), id None for a hole."""
        start = self.cstart[i]
        ids, sizes = self.chunk_ids, self.chunk_sizes
        out: list[tuple[bytes | None, int]] = []
        for k in range(start, start + self.ccount[i]):
            s = sizes[k]
            out.append((ids[k * ID_SIZE:(k + 1) * ID_SIZE], s) if s >= 0 else (None, -s - 1))
        return out

    def fill(self, a: EntryAttributes, i: int, ino: int) -> EntryAttributes:
        """Set entry I's attributes on A (reused across a listing: readdir_reply copies it)."""
        a.st_ino = ino
        a.st_mode = self.mode[i]
        a.st_nlink = self.nlink[i]
        a.st_uid = self.uid[i]
        a.st_gid = self.gid[i]
        a.st_size = self.size[i]
        a.st_blocks = (self.alloc[i] + 511) >> 9
        a.st_rdev = self.rdev[i]
        a.st_atime_ns = self.atime[i]
        a.st_mtime_ns = self.mtime[i]
        a.st_ctime_ns = self.ctime[i]
        return a
