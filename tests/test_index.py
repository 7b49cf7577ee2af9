"""The index in two folders: treeindex/ (directories) and index/ (the rest), merged per folder."""

from __future__ import annotations

import os
from pathlib import Path

from kiwi_restore.crypto import KIND_TREE
from kiwi_restore.repository import INDEX_CONSOLIDATE_AT, TREE_INDEX
from kiwi_restore.site import Site


def index_names(site: Site, contract: str, folder: str) -> list[str]:
    base = Path(site.path("store")) / site.contract(contract).prefix / folder
    return sorted(p.name for p in base.iterdir() if p.is_file())


def backups(kiwi, contract: str, src: Path, n: int) -> None:
    for i in range(n):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_bytes(os.urandom(5000))
        kiwi("backup", contract, "-m", "pc1", str(src))


def test_a_backup_indexes_its_trees_apart(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", 1)
    repo = site.open_repository(site.contract(contract))
    repo.load_tree_index()
    assert repo.index.files and all(f.folder == TREE_INDEX for f in repo.index.files)
    assert all(loc.kind == KIND_TREE for loc in repo.index.all_locations())
    snap = repo.list_snapshots()[0]
    assert repo.locate(snap.tree).kind == KIND_TREE
    repo.load_index()
    assert {f.folder for f in repo.index.files} == {TREE_INDEX, "index"}
    assert all(loc.kind != KIND_TREE for f in repo.index.files if f.folder == "index" for loc in f)


def test_the_merge_keeps_one_file_per_folder(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", INDEX_CONSOLIDATE_AT // 2)  # two files each
    assert len(index_names(site, contract, TREE_INDEX)) == 1
    assert len(index_names(site, contract, "index")) == 1
    kiwi("check", contract, "--read-data")
    out = tmp_path / "out"
    kiwi("restore", contract, "latest", str(tmp_path / "src"), "--target", str(out))
    assert len(list(out.rglob("f"))) == INDEX_CONSOLIDATE_AT // 2


def test_a_merge_stopped_between_its_two_files_loses_nothing(kiwi, contract, site, tmp_path):
    backups(kiwi, contract, tmp_path / "src", 3)
    repo = site.open_repository(site.contract(contract))
    repo.load_index()
    files = list(repo.index.files)
    trees = [loc for loc in repo.index.all_locations() if loc.kind == KIND_TREE]
    with repo.lock():  # the merge's first write, then nothing: a crash
        repo._write_index_file(TREE_INDEX, trees, [f.file_id for f in files if f.folder == TREE_INDEX])
    fresh = site.open_repository(site.contract(contract))
    fresh.load_tree_index()
    assert len(fresh.index.files) == 1  # the merged file; the ones it supersedes are left out
    for snap in fresh.list_snapshots():
        assert fresh.locate(snap.tree).kind == KIND_TREE
    kiwi("check", contract, "--read-data")
    out = tmp_path / "out"
    kiwi("restore", contract, "latest", str(tmp_path / "src"), "--target", str(out))
    assert len(list(out.rglob("f"))) == 3
