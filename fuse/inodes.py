"""Inode numbers for one mount session: a few integers per directory, none per file.

When a directory's tree is first read, its N entries get one block of N consecutive inode
numbers, in the tree's (sorted, content-addressed) order; the block is never reused. So:

    child inode  = block start + index in the tree
    inode -> (directory, index) by binary search over the sorted block starts

Only directories that were looked into get a slot (tree id, snapshot, parent, block), kept
in flat arrays. Nothing is hashed (restic's way can collide) and no snapshot is loaded
whole (borg's way costs memory per item). Hardlinks of one group in one snapshot all
report the inode of the first link seen, so the kernel sees one file.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

from ..crypto import ID_SIZE

ROOT_INODE = 1


class InodeTable:
    def __init__(self, first_free: int) -> None:
        self._next = first_free
        self._starts = array("Q")  # sorted: first inode of each block
        self._block_slot = array("I")  # directory slot owning each block
        self._slot_of: dict[int, int] = {}  # directory inode -> slot
        self._ino = array("Q")
        self._parent = array("Q")
        self._snap = array("I")
        self._first = array("Q")  # 0 until the directory's tree was read
        self._count = array("I")
        self._trees = bytearray()  # ID_SIZE bytes per slot
        self._hardlinks: dict[tuple[int, int], int] = {}

    # -- directories ---------------------------------------------------------------
    def add_dir(self, ino: int, parent: int, snap_no: int, tree_id: bytes) -> int:
        """The slot of directory INO, created on first use."""
        slot = self._slot_of.get(ino)
        if slot is not None:
            return slot
        slot = len(self._ino)
        self._ino.append(ino)
        self._parent.append(parent)
        self._snap.append(snap_no)
        self._first.append(0)
        self._count.append(0)
        self._trees += tree_id
        self._slot_of[ino] = slot
        return slot

    def slot(self, ino: int) -> int | None:
        return self._slot_of.get(ino)

    def dir_inode(self, slot: int) -> int:
        return self._ino[slot]

    def parent(self, slot: int) -> int:
        return self._parent[slot]

    def snap(self, slot: int) -> int:
        return self._snap[slot]

    def tree(self, slot: int) -> bytes:
        return bytes(self._trees[slot * ID_SIZE:(slot + 1) * ID_SIZE])

    def first_child(self, slot: int, count: int) -> int:
        """First inode of the directory's block of COUNT entries, allocated on first call."""
        first = self._first[slot]
        if first:
            return first
        first = self._next
        self._next += max(count, 1)
        self._starts.append(first)
        self._block_slot.append(slot)
        self._first[slot] = first
        self._count[slot] = count
        return first

    # -- entries ---------------------------------------------------------------------
    def locate(self, ino: int) -> tuple[int, int] | None:
        """(directory slot, index in its tree) of an entry inode, or None."""
        i = bisect_right(self._starts, ino) - 1
        if i < 0:
            return None
        slot = self._block_slot[i]
        index = ino - self._starts[i]
        if index >= self._count[slot]:
            return None
        return slot, index

    def hardlink(self, snap_no: int, group: int, ino: int) -> int:
        """The inode all links of GROUP in snapshot SNAP_NO report (the first one seen)."""
        return self._hardlinks.setdefault((snap_no, group), ino)

    @property
    def allocated(self) -> int:
        return self._next

    def memory(self) -> int:
        """Approximate bytes held (for the session's statistics)."""
        arrays = (self._starts, self._block_slot, self._ino, self._parent, self._snap, self._first, self._count)
        return sum(a.itemsize * len(a) for a in arrays) + len(self._trees) + 100 * (
            len(self._slot_of) + len(self._hardlinks))
