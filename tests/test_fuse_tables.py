"""The mount's pieces that need no kernel: its tree decoder against the core's, the inode
table, the snapshot layout."""

from __future__ import annotations

import msgpack
import pytest
from kiwi_restore.fuse.dirs import DirTable
from kiwi_restore.fuse.inodes import InodeTable
from kiwi_restore.fuse.layout import build, select
from treegen import make_hostile_tree

from kiwi_restore.crypto import KIND_TREE
from kiwi_restore.errors import IntegrityError, NotFound, UsageError
from kiwi_restore.snapshot import Snapshot, parse_time
from kiwi_restore.tree import TYPE_DIR, Node, decode_tree, encode_tree


def _all_trees(repo, root: bytes) -> dict[bytes, bytes]:
    out, stack = {}, [root]
    while stack:
        tid = stack.pop()
        out[tid] = data = repo.read_blob(tid, KIND_TREE)
        stack.extend(n.subtree for n in decode_tree(data, "t") if n.type == TYPE_DIR)
    return out


def test_fast_decoder_matches_the_core_decoder(kiwi, contract, site, tmp_path) -> None:
    src = tmp_path / "src"
    make_hostile_tree(src)
    kiwi("backup", contract, str(src), "-m", "pc1")
    repo = site.open_repository(site.contract(contract))
    trees = _all_trees(repo, repo.list_snapshots()[0].tree)
    assert len(trees) > 3
    for tid, data in trees.items():
        fast = DirTable.decode(data, tid.hex())
        ref = DirTable.from_nodes(decode_tree(data, tid.hex()))
        assert fast.columns() == ref.columns()
        for i in range(len(fast)):
            nodes = decode_tree(data, "t")
            assert fast.chunks(i) == nodes[i].chunks
            assert fast.find(nodes[i].name) == i


def _tree(entries: list[dict]) -> bytes:
    return msgpack.packb({"version": 1, "entries": entries}, use_bin_type=True)


def _file(name: bytes, chunks: list, size: int | None = None) -> dict:
    return {"name": name, "type": "f", "mode": 0o644, "uid": 0, "gid": 0, "mtime": 1,
            "size": sum(s for _, s in chunks) if size is None else size, "chunks": chunks}


@pytest.mark.parametrize("data", [
    _tree([_file(b"b", []), _file(b"a", [])]),  # not sorted
    _tree([_file(b"a", []), _file(b"a", [])]),  # duplicated
    _tree([_file(b"a/b", [])]),  # unsafe name
    _tree([_file(b"..", [])]),
    _tree([_file(b"", [])]),
    _tree([_file(b"a\0b", [])]),
    _tree([_file(b"a", [[b"\1" * 32, 10]], size=11)]),  # sizes do not add up
    _tree([{**_file(b"a", []), "type": "z"}]),  # unknown type
    _tree([{"name": b"a", "type": "f"}]),  # fields missing
    msgpack.packb({"version": 99, "entries": []}),
    b"\xc1 not msgpack",
], ids=["unsorted", "duplicate", "slash", "dotdot", "empty", "nul", "sizes", "type", "missing", "version", "garbage"])
def test_fast_decoder_refuses_what_the_core_refuses(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(data, "t")
    with pytest.raises(IntegrityError):
        DirTable.decode(data, "t")


def test_holes_and_sizes_survive_the_columns() -> None:
    nodes = [Node(name=b"sparse", type="f", mode=0o600, size=30,
                  chunks=[(None, 10), (b"\2" * 32, 5), (None, 0), (b"\3" * 32, 15)]),
             Node(name=b"sub", type=TYPE_DIR, mode=0o755, subtree=b"\4" * 32, xattrs={b"user.a": b"1"})]
    t = DirTable.decode(encode_tree(nodes), "t")
    assert t.chunks(0) == nodes[0].chunks
    assert t.alloc[0] == 20 and t.size[0] == 30
    assert t.subtrees == {1: b"\4" * 32} and t.xattrs == {1: {b"user.a": b"1"}}
    assert t.is_dir(1) and t.is_file(0) and t.find(b"nope") == -1


def test_inode_table_blocks() -> None:
    it = InodeTable(first_free=10)
    root = it.add_dir(5, 1, 0, b"\1" * 32)
    assert it.add_dir(5, 1, 0, b"\1" * 32) == root
    first = it.first_child(root, 3)
    assert first == 10 and it.first_child(root, 3) == 10  # allocated once
    sub = it.add_dir(11, 5, 0, b"\2" * 32)
    assert it.first_child(sub, 1000) == 13
    assert it.locate(12) == (root, 2)
    assert it.locate(13 + 999) == (sub, 999)
    assert it.locate(13 + 1000) is None and it.locate(9) is None and it.locate(5) is None
    assert it.tree(sub) == b"\2" * 32 and it.parent(sub) == 5 and it.dir_inode(sub) == 11
    assert it.hardlink(0, 7, 20) == 20 and it.hardlink(0, 7, 30) == 20 and it.hardlink(1, 7, 30) == 30


def _snap(n: int, machine: str, when: str) -> Snapshot:
    return Snapshot(id=bytes([n]) * 32, time=parse_time(when), machine=machine, hostname="h", paths=[], tree=b"")


def test_layout_selection_and_names() -> None:
    snaps = [_snap(1, "pc1", "2025-01-01T10:00"), _snap(2, "pc1", "2025-02-01T10:00"),
             _snap(3, "pc1", "2025-02-01T10:00"), _snap(4, "pc2", "2025-01-15T10:00")]
    lay = build(select(snaps))
    pc1 = lay.machines[0]
    assert [m.name for m in lay.machines] == [b"pc1", b"pc2"]
    assert [s.name for s in pc1.snapshots] == [b"2025-01-01T100000.000000Z", b"2025-02-01T100000.000000Z",
                                               b"2025-02-01T100000.000000Z-03030303"]
    assert pc1.latest.snap.id == bytes([3]) * 32
    assert [s.snap for s in lay.machines[1].snapshots] == [snaps[3]]
    assert [s.id[0] for s in select(snaps, at="2025-01-20")] == [1, 4]
    assert [s.id[0] for s in select(snaps, snapshot="latest")] == [3, 4]
    assert [s.id[0] for s in select(snaps, machine="pc2", snapshot="latest")] == [4]
    assert [s.id[0] for s in select(snaps, snapshot="0202")] == [2]
    with pytest.raises(NotFound):
        select(snaps, at="2024-12-31")
    with pytest.raises(NotFound):
        select(snaps, machine="pc9")
    with pytest.raises(UsageError):
        select(snaps, snapshot="0202", at="2025-03-01")
