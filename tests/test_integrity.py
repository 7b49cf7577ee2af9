"""Bad input and damage: wrong key, flipped/truncated/swapped objects, unknown versions, crypto-erase."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import flip, store_files
from treegen import make_hostile_tree

from kiwi_restore.crypto import KIND_CHUNK, KIND_TREE
from kiwi_restore.site import Site


@pytest.fixture
def backed_up(tmp_path, kiwi, contract, site):
    src = make_hostile_tree(tmp_path / "src")
    kiwi("backup", contract, "-m", "pc1", str(src))
    return src


def _blob_of(site: Site, path: Path, kind: int):
    from kiwi_restore.restore import lookup

    rec = site.contract("acme")
    repo = site.open_repository(rec)
    snap = repo.list_snapshots()[-1]
    node = lookup(repo, snap, str(path))
    blob_id = node.chunks[0][0] if kind == KIND_CHUNK else node.subtree
    loc = repo.locate(blob_id)
    return Path(site.path("store")) / repo.pack_key(loc.pack_id), loc


def test_check_clean(backed_up, kiwi):
    _, out = kiwi("check", "acme", "--read-data")
    assert "no problem" in out


def test_flipped_chunk_is_detected_and_never_served(backed_up, kiwi, site, tmp_path):
    pack, loc = _blob_of(site, backed_up / "big.bin", KIND_CHUNK)
    flip(pack, loc.offset + loc.length // 2)
    code, out = kiwi("check", "acme", "--read-data", ok=False)
    assert code == 5
    assert loc.blob_id.hex() in out and "big.bin" in out and "authentication failed" in out
    code, out = kiwi("restore", "acme", "latest", str(backed_up / "big.bin"), "--target", str(tmp_path / "o"), ok=False)
    assert code == 5 and loc.blob_id.hex() in out
    assert not (tmp_path / "o" / "big.bin").exists()  # nothing half-written under the real name
    assert [p.name for p in (tmp_path / "o").iterdir()] == []


def test_flipped_tree_names_the_directory(backed_up, kiwi, site):
    pack, loc = _blob_of(site, backed_up / "sub", KIND_TREE)
    flip(pack, loc.offset + 20)
    code, out = kiwi("check", "acme", ok=False)
    assert code == 5 and "/sub" in out and loc.blob_id.hex() in out


def test_truncated_pack(backed_up, kiwi, site):
    pack, loc = _blob_of(site, backed_up / "big.bin", KIND_CHUNK)
    with open(pack, "r+b") as f:
        f.truncate(loc.offset + 10)
    code, out = kiwi("check", "acme", ok=False)
    assert code == 5 and "truncated" in out and "big.bin" in out


def test_missing_pack(backed_up, kiwi, site):
    pack, _ = _blob_of(site, backed_up / "big.bin", KIND_CHUNK)
    pack.unlink()
    code, out = kiwi("check", "acme", ok=False)
    assert code == 5 and "missing" in out and "big.bin" in out


def test_swapped_snapshot_objects_rejected(backed_up, kiwi, site, tmp_path):
    src2 = tmp_path / "src2"
    src2.mkdir()
    (src2 / "f").write_text("x")
    kiwi("backup", "acme", "-m", "pc2", str(src2))
    a, b = store_files(site, "acme", "snapshots")
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    code, out = kiwi("snapshots", "acme", ok=False)
    assert code == 5 and "authentication failed" in out


def test_flipped_index_and_snapshot_and_config(backed_up, kiwi, site):
    (idx,) = store_files(site, "acme", "index")
    saved = idx.read_bytes()
    flip(idx, len(saved) - 5)
    code, out = kiwi("ls", "acme", "latest", ok=False)
    assert code == 5 and f"index/{idx.name}" in out
    idx.write_bytes(saved)
    (tidx,) = store_files(site, "acme", "treeindex")  # the copy of the trees' records
    flip(tidx, len(tidx.read_bytes()) - 5)
    kiwi("ls", "acme", "latest")  # the index answers; check names the damaged copy
    code, out = kiwi("check", "acme", ok=False)
    assert code == 5 and f"treeindex/{tidx.name}" in out
    (snap,) = store_files(site, "acme", "snapshots")
    flip(snap, 30)
    code, out = kiwi("snapshots", "acme", ok=False)
    assert code == 5 and snap.name in out


def test_unknown_format_version_refused_by_name(backed_up, kiwi, site):
    config = Path(site.path("store")) / site.contract("acme").prefix / "config"
    data = bytearray(config.read_bytes())
    data[5] = 2  # preamble: magic(4) | version u16 big-endian | kind | reserved
    config.write_bytes(bytes(data))
    code, out = kiwi("snapshots", "acme", ok=False)
    assert code == 5 and "unsupported repository format version 2" in out


def test_wrong_passphrase_is_one_clear_line(backed_up, tmp_path, monkeypatch):
    from conftest import run_cli

    r = run_cli("snapshots", "acme", env={"KIWI_RESTORE_PASSPHRASE": "wrong"})
    assert r.returncode == 3
    assert r.stdout == b""
    assert r.stderr.decode().strip() == "kiwi-restore: error: wrong keystore passphrase"


def test_restore_key_of_another_contract_is_refused(backed_up, kiwi, site):
    kiwi("contract", "create", "other", "--offer", "cloud")
    a, b = site.contract("acme"), site.contract("other")
    ks = Path(site.keystore.path) / "contracts"
    shutil.copy(ks / f"{b.id}.key", ks / f"{a.id}.key")  # a key file moved to the wrong contract
    code, out = kiwi("snapshots", "acme", ok=False)
    assert code == 3 and "cannot be unwrapped" in out


def test_crypto_erase(backed_up, kiwi, site, tmp_path):
    rec = site.contract("acme")
    code, out = kiwi("key", "destroy", "acme", ok=False)  # no terminal, no confirmation
    assert code == 2 and "--yes-destroy" in out
    code, out = kiwi("key", "destroy", "acme", "--yes-destroy", "wrong-name", ok=False)
    assert code == 2
    kiwi("key", "destroy", "acme", "--yes-destroy", "acme")
    keystore_files = [p for p in Path(site.keystore.path).rglob("*") if p.is_file()]
    assert not any(rec.id in p.name and p.suffix == ".key" for p in keystore_files)
    for cmd in (["snapshots", "acme"], ["ls", "acme", "latest"],
                ["restore", "acme", "latest", "--target", str(tmp_path / "o")], ["check", "acme"]):
        code, out = kiwi(*cmd, ok=False)
        assert code == 3 and "destroyed" in out, (cmd, out)
    # the data is still there, and nothing in the site can open it any more
    assert store_files(site, "acme", "data")
    code, _ = kiwi("audit", "verify")
    assert code == 0


def test_key_backup_copies_are_destroyed_too(tmp_path, kiwi, site, monkeypatch):
    import json

    cfg = json.loads(Path(site.config_path).read_text())
    cfg["keystore"]["backups"] = [str(tmp_path / "keystore-backup")]
    Path(site.config_path).write_text(json.dumps(cfg))
    # the backup directory mirrors the keystore from then on
    shutil.copytree(site.keystore.path, tmp_path / "keystore-backup")
    kiwi("contract", "create", "c2", "--offer", "cloud")
    rec = Site(site.home).contract("c2")
    assert (tmp_path / "keystore-backup" / "contracts" / f"{rec.id}.key").exists()
    kiwi("key", "destroy", "c2", "--yes-destroy", "c2")
    assert not (tmp_path / "keystore-backup" / "contracts" / f"{rec.id}.key").exists()
    assert not (Path(site.keystore.path) / "contracts" / f"{rec.id}.key").exists()


def test_leftover_temp_files_are_not_objects(backed_up, kiwi, site):
    data = store_files(site, "acme", "data")[0]
    (data.parent / (data.name + ".tmp-123-456")).write_bytes(os.urandom(100))
    _, out = kiwi("check", "acme")
    assert "no problem" in out


def test_a_tree_disagreeing_with_the_index_is_refused(tmp_path, kiwi, contract, site):
    """A chunk whose size differs from what its tree records is never written (no shifted file)."""
    from kiwi_restore import compression
    from kiwi_restore.repository import PackWriter, new_id
    from kiwi_restore.snapshot import Snapshot
    from kiwi_restore.tree import encode_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(1000))
    kiwi("backup", contract, "-m", "pc1", str(src))
    repo = site.open_repository(site.contract(contract))
    base = repo.list_snapshots()[-1]
    with repo.lock():
        repo.load_index()
        writer = PackWriter(repo)

        def rewrite(tree_id: bytes) -> bytes:  # the same tree, every file's first chunk said 1 byte longer
            nodes = repo.load_tree(tree_id)
            for n in nodes:
                if n.type == "d":
                    n.subtree = rewrite(n.subtree)
                elif n.type == "f" and n.chunks:
                    n.chunks[0] = (n.chunks[0][0], n.chunks[0][1] + 1)
                    n.size += 1
            data = encode_tree(nodes)
            tid = repo.keys.blob_id(data)
            writer.add(tid, KIND_TREE, compression.compress(data), len(data))
            return tid

        root = rewrite(base.tree)
        writer.flush()
        repo.write_index(list(repo.index.pending.values()))
        repo.save_snapshot(Snapshot(new_id(), base.time + 1, "pc1", "h", base.paths, root))
    out = tmp_path / "o"
    code, msg = kiwi("restore", contract, "latest", str(src / "f.bin"), "--target", str(out), ok=False)
    assert code == 5 and "directory tree records 1001" in msg
    assert list(out.iterdir()) == []
