"""The mount's pieces that need no kernel: its tree decoder against the core's, the inode
table, the snapshot layout."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kiwi_restore.fuse import dirs
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


# the mount's two decoders: the C one (fuse/_treecols.c) and the Python one it stands in for
DECODERS = [pytest.param(DirTable.decode, id="c"), pytest.param(DirTable.decode_python, id="python")]


def test_the_c_decoder_is_built() -> None:
    # setup.sh builds it; without it the mount still works, with a slower cold walk
    assert dirs._treecols is not None


@pytest.mark.parametrize("decode", DECODERS)
def test_fast_decoder_matches_the_core_decoder(decode, kiwi, contract, site, tmp_path) -> None:
    src = tmp_path / "src"
    make_hostile_tree(src)
    kiwi("backup", contract, str(src), "-m", "pc1")
    repo = site.open_repository(site.contract(contract))
    trees = _all_trees(repo, repo.list_snapshots()[0].tree)
    assert len(trees) > 3
    for tid, data in trees.items():
        fast = decode(data, tid.hex())
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
    _tree([_file(b"a", [[b"\1" * 31, 10]])]),  # chunk id of the wrong length
    _tree([_file(b"a", [[b"\1" * 32, 10, 5]], size=10)]),  # chunk is not a pair
    _tree([_file(b"a", [[b"\1" * 32, -1], [b"\1" * 32, 2]], size=1)]),  # negative chunk size
    _tree([{**_file(b"a", []), "mode": -1}]),
    _tree([{**_file(b"a", []), "uid": 1 << 32}]),
    _tree([{**_file(b"a", []), "mtime": 1 << 63}]),
    _tree([{**_file(b"a", []), "mtime": "1"}]),
    _tree([{**_file(b"a", []), "type": "ff"}]),
    _tree([{"name": b"d", "type": "d", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1}]),  # no subtree
    _tree([{"name": b"l", "type": "l", "mode": 0o777, "uid": 0, "gid": 0, "mtime": 1}]),  # no target
    _tree([{**_file(b"a", []), "xattrs": {b"user.a": 1}}]),
    _tree([_file(b"a", [])]) + b"\x00",  # trailing bytes
    _tree([_file(b"a", [])])[:-3],  # truncated
    msgpack.packb({"version": 1}),
    msgpack.packb({"version": 1, "entries": {}}),
    msgpack.packb([1, []]),
    msgpack.packb({"version": 99, "entries": []}),
    msgpack.packb({"entries": [], "version": 2}),
    b"\xc1 not msgpack",
    b"",
], ids=["unsorted", "duplicate", "slash", "dotdot", "empty", "nul", "sizes", "type", "missing", "short-id",
        "triple", "negative-size", "negative-mode", "big-uid", "big-mtime", "str-mtime",
        "long-type", "no-subtree", "no-target", "xattr-value", "trailing", "truncated", "no-entries",
        "entries-map", "not-a-map", "version", "version-last", "garbage", "nothing"])
def test_fast_decoders_refuse_what_the_core_refuses(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(data, "t")
    with pytest.raises(IntegrityError):
        DirTable.decode(data, "t")
    with pytest.raises(IntegrityError):
        DirTable.decode_python(data, "t")


def test_the_c_decoder_refuses_a_second_version_and_ext_values() -> None:
    entry = msgpack.packb([_file(b"a", [])], use_bin_type=True)
    twice = b"\x83\xa7version\x02\xa7entries" + entry + b"\xa7version\x01"
    ext = _tree([{**_file(b"a", []), "user": msgpack.ExtType(5, b"x")}])
    for data in (twice, ext):
        with pytest.raises(IntegrityError):
            DirTable.decode(data, "t")


def test_a_name_must_be_bin() -> None:
    # (the Python decoder reads str and bin alike as bytes, and so takes it: it is harmless)
    data = _tree([{**_file(b"a", []), "name": "a"}])
    for decode in (decode_tree, DirTable.decode):
        with pytest.raises(IntegrityError):
            decode(data, "t")


def test_an_unknown_version_is_named_whatever_the_key_order() -> None:
    for doc in ({"version": 2, "entries": [{"x": 1}]}, {"entries": [{"x": 1}], "version": 2}):
        with pytest.raises(IntegrityError, match="unsupported tree version 2"):
            DirTable.decode(msgpack.packb(doc), "t")


def test_unknown_keys_are_ignored_in_any_order() -> None:
    nodes = [Node(name=b"f", type="f", mode=0o640, uid=7, gid=8, mtime=-5, atime=3, ctime=4, size=3,
                  chunks=[(b"\5" * 32, 3)], hardlink=2, nlink=3, xattrs={b"user.x": b"\0\1"}),
             Node(name=b"l", type="l", mode=0o777, target=b"../f"),
             Node(name=b"n", type="c", mode=0o600, rdev=0x0501)]
    ref = DirTable.decode_python(encode_tree(nodes), "t")
    entries = []
    for n in nodes:
        items = [*n.to_doc().items(), ("future", {"nested": [1, {b"k": [None, 2.5]}]}), ("later", [[]])]
        random.Random(n.name).shuffle(items)
        entries.append(dict(items))
    data = msgpack.packb({"entries": entries, "extra": {"a": [1, 2]}, "version": 1}, use_bin_type=True)
    assert DirTable.decode(data, "t").columns() == ref.columns()
    assert DirTable.decode_python(data, "t").columns() == ref.columns()


_names = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
_chunks = st.lists(st.tuples(st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
                             st.integers(0, 1 << 40)), max_size=4)
_node = st.builds(
    lambda name, kind, mode, uid, mtime, chunks, link, xattrs: Node(
        name=name, type=kind, mode=mode, uid=uid, gid=uid ^ 1, mtime=mtime, atime=mtime + 1, ctime=mtime - 1,
        size=sum(s for _, s in chunks) if kind == "f" else 0, chunks=chunks if kind == "f" else [],
        target=b"t" * (mode % 9) if kind == "l" else None, subtree=bytes([mode % 256]) * 32 if kind == "d" else None,
        rdev=uid if kind in "cb" else 0, xattrs=xattrs, hardlink=link if kind == "f" else 0,
        nlink=link + 1 if kind == "f" and link else 1),
    _names, st.sampled_from("fdlpcbs"), st.integers(0, 0o7777), st.integers(0, (1 << 32) - 1),
    st.integers(-(1 << 62), 1 << 62), _chunks, st.integers(0, 3),
    st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=8), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(_node, max_size=12, unique_by=lambda n: n.name))
def test_the_three_decoders_agree_on_any_tree(nodes: list[Node]) -> None:
    data = encode_tree(nodes)
    ref = DirTable.from_nodes(decode_tree(data, "t"))
    assert DirTable.decode(data, "t").columns() == ref.columns()
    assert DirTable.decode_python(data, "t").columns() == ref.columns()


@settings(max_examples=500, deadline=None)
@given(st.lists(_node, min_size=1, max_size=6, unique_by=lambda n: n.name), st.data())
def test_the_c_decoder_survives_damaged_trees(nodes: list[Node], data) -> None:
    """Flipped, cut or inserted bytes: an IntegrityError or the tree the Python decoder reads."""
    raw = bytearray(encode_tree(nodes))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del raw[at:]
            if not raw:
                break
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=5))
    try:
        fast = DirTable.decode(bytes(raw), "t")
    except IntegrityError:
        return
    # what C accepts follows the schema, so the Python decoder reads the same
    assert DirTable.decode_python(bytes(raw), "t").columns() == fast.columns()


def test_holes_and_sizes_survive_the_columns() -> None:
    nodes = [Node(name=b"sparse", type="f", mode=0o600, size=30,
                  chunks=[(None, 10), (b"\2" * 32, 5), (None, 0), (b"\3" * 32, 15)]),
             Node(name=b"sub", type=TYPE_DIR, mode=0o755, subtree=b"\4" * 32, xattrs={b"user.a": b"1"})]
    for decode in (DirTable.decode, DirTable.decode_python):
        t = decode(encode_tree(nodes), "t")
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
