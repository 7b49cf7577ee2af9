"""The index (index/) and the copy of its tree records (treeindex/), which a mount starts from."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import store_files

from kiwi_restore.crypto import KIND_TREE
from kiwi_restore.repository import INDEX_CONSOLIDATE_AT, TREE_INDEX
from kiwi_restore.site import Site


def index_names(site: Site, contract: str, folder: str) -> list[str]:
    return [p.name for p in store_files(site, contract, folder)]


def backups(kiwi, contract: str, src: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_bytes(os.urandom(5000))
        kiwi("backup", contract, "-m", "pc1", str(src))


def tree_records(index) -> set:
    return {(loc.blob_id, loc.pack_id, loc.offset) for loc in index.all_locations() if loc.kind == KIND_TREE}


def test_the_tree_copy_holds_the_index_s_trees_and_nothing_else(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", 2)
    repo = site.open_repository(site.contract(contract))
    repo.load_tree_index()
    copy = repo.tree_index
    assert copy is not None and len(copy.files) == 2  # one per backup
    assert all(loc.kind == KIND_TREE for loc in copy.all_locations())
    assert not repo._index_loaded  # a mount's start reads nothing else
    for snap in repo.list_snapshots():
        assert repo.locate(snap.tree).kind == KIND_TREE
    assert not repo._index_loaded
    assert tree_records(copy) == tree_records(repo.load_index())


def test_the_merge_keeps_one_file_per_folder(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", INDEX_CONSOLIDATE_AT)
    assert len(index_names(site, contract, "index")) == 1
    assert len(index_names(site, contract, TREE_INDEX)) == 1
    repo = site.open_repository(site.contract(contract))
    repo.load_tree_index()
    assert tree_records(repo.tree_index) == tree_records(repo.load_index())
    kiwi("check", contract, "--read-data")


def test_a_repository_without_the_copy_gets_it_at_its_next_merge(kiwi, contract, site, tmp_path):
    """Written before treeindex/ existed (or the copies lost): trees are found in the index,
    and the merge writes the whole copy."""
    src = tmp_path / "src"
    backups(kiwi, contract, src, 3)
    for p in store_files(site, contract, TREE_INDEX):
        p.unlink()
    repo = site.open_repository(site.contract(contract))
    repo.load_tree_index()
    for snap in repo.list_snapshots():  # not in the (empty) copy: looked up in the index
        assert repo.locate(snap.tree).kind == KIND_TREE
    backups(kiwi, contract, src, INDEX_CONSOLIDATE_AT - 3, start=3)
    fresh = site.open_repository(site.contract(contract))
    fresh.load_tree_index()
    assert tree_records(fresh.tree_index) == tree_records(fresh.load_index())


def test_a_merge_while_a_mount_holds_only_the_copy(kiwi, contract, site, tmp_path):
    """The race a split index would have: the reader loaded the tree copy, then a writer
    merged and deleted every file it had seen; the index, read afterwards, answers alone."""
    src = tmp_path / "src"
    backups(kiwi, contract, src, 2)
    reader = site.open_repository(site.contract(contract))
    reader.load_tree_index()
    snaps = reader.list_snapshots()
    backups(kiwi, contract, src, INDEX_CONSOLIDATE_AT - 2, start=2)  # the last one merges
    assert len(index_names(site, contract, "index")) == 1
    for snap in snaps:  # the copy it holds still points at the right bytes: blobs never move
        assert reader.load_tree(snap.tree)
    assert not reader._index_loaded


def test_a_merge_stopped_before_the_copy_loses_nothing(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", 3)
    repo = site.open_repository(site.contract(contract))
    index = repo.load_index()
    old = [f.file_id for f in index.files]
    with repo.lock():  # the merge's first write, then nothing: a crash
        repo._write_index_file("index", list(index.all_locations()), old)
    fresh = site.open_repository(site.contract(contract))
    fresh.load_tree_index()  # the old copies: still true, the blobs have not moved
    for snap in fresh.list_snapshots():
        assert fresh.locate(snap.tree).kind == KIND_TREE
    assert len(fresh.load_index().files) == 1
    kiwi("check", contract, "--read-data")
    out = tmp_path / "out"
    kiwi("restore", contract, "latest", str(tmp_path / "src"), "--target", str(out))
    assert len(list(out.rglob("f"))) == 3


def test_after_a_merge_the_reader_finds_a_tree_its_copy_lacks(kiwi, contract, site, tmp_path):
    src = tmp_path / "src"
    backups(kiwi, contract, src, 2)
    reader = site.open_repository(site.contract(contract))
    reader.load_tree_index()
    backups(kiwi, contract, src, INDEX_CONSOLIDATE_AT - 2, start=2)  # the last one merges
    newest = max(site.open_repository(site.contract(contract)).list_snapshots(), key=lambda s: s.time)
    assert reader.tree_index.find(newest.tree) is None  # the copy it holds predates it
    assert reader.locate(newest.tree).kind == KIND_TREE  # so the index, read now, answers


def test_a_merge_never_drops_an_index_file_it_did_not_read(kiwi, contract, site, tmp_path, monkeypatch):
    """A writer whose lock was judged stale writes its index file while a merge is under
    way: the merge leaves it in force."""
    src = tmp_path / "src"
    backups(kiwi, contract, src, INDEX_CONSOLIDATE_AT - 1)  # not merged yet
    merger = site.open_repository(site.contract(contract))
    late = site.open_repository(site.contract(contract))
    entry = next(iter(merger.load_index().files[0]))  # any record: the late writer indexes it again
    merger.write_index([entry])  # the merge's threshold reached
    merger._reset_index()
    load = merger.load_index

    def load_then_a_late_writer_indexes():
        index = load()
        if not hasattr(late, "wrote"):
            late.wrote = late.write_index([entry])
        return index

    monkeypatch.setattr(merger, "load_index", load_then_a_late_writer_indexes)
    assert merger.consolidate_index()
    assert late.wrote.hex() in index_names(site, contract, "index")  # neither superseded nor deleted
    fresh = site.open_repository(site.contract(contract))
    assert late.wrote in {f.file_id for f in fresh.load_index().files}


def test_a_merge_after_a_stopped_merge_leaves_one_file(kiwi, contract, site, tmp_path):
    src = tmp_path / "src"
    backups(kiwi, contract, src, 3)
    repo = site.open_repository(site.contract(contract))
    index = repo.load_index()
    with repo.lock():  # merged file written, the old ones not deleted: a crash
        repo._write_index_file("index", list(index.all_locations()), [f.file_id for f in index.files])
    backups(kiwi, contract, src, INDEX_CONSOLIDATE_AT - 1, start=3)  # 16 in force at the last: merged
    assert len(index_names(site, contract, "index")) == 1  # the superseded ones went too
    kiwi("check", contract)
