"""Crash safety and concurrent writers, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from treegen import rsync_diff


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiwi_restore.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _big_tree(root, n_files=40, size=2 << 20):
    root.mkdir()
    for i in range(n_files):
        (root / f"f{i:03d}").write_bytes(os.urandom(size))
    return root


def _packs(site, contract):
    return sum(1 for p in (Path(site.path("store")) / site.contract(contract).prefix / "data").rglob("*")
               if p.is_file())


def test_kill_during_ingest_leaves_repository_consistent(tmp_path, kiwi, contract, site):
    first = tmp_path / "first"
    first.mkdir()
    (first / "a.txt").write_text("kept")
    kiwi("backup", contract, "-m", "pc1", str(first))
    big = _big_tree(tmp_path / "big", 100)
    before = _packs(site, contract)
    p = _spawn("backup", contract, "-m", "pc1", str(big))
    deadline = time.monotonic() + 60
    while _packs(site, contract) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.005)  # kill once packs are being written, before the snapshot is
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    _, out = kiwi("snapshots", contract, "--json")
    assert out.count('"id"') == 1  # the killed backup left no half snapshot
    code, out = kiwi("check", contract, "--read-data")
    assert code == 0
    # the killed writer's lock is stale (dead pid): the rerun takes over and completes
    kiwi("backup", contract, "-m", "pc1", str(big))
    o = tmp_path / "o"
    kiwi("restore", contract, "latest", str(big), "--target", str(o))
    assert rsync_diff(big, o / "big") == ""
    kiwi("check", contract, "--read-data")


def test_two_ingests_at_once_both_succeed(tmp_path, kiwi, contract):
    a = _big_tree(tmp_path / "a", 10, 1 << 20)
    b = _big_tree(tmp_path / "b", 10, 1 << 20)
    pa = _spawn("backup", contract, "-m", "pc1", str(a))
    pb = _spawn("backup", contract, "-m", "pc2", str(b))
    ra, rb = pa.wait(timeout=120), pb.wait(timeout=120)
    assert (ra, rb) == (0, 0), (pa.stderr.read(), pb.stderr.read())
    _, out = kiwi("snapshots", contract, "--json")
    assert out.count('"id"') == 2
    kiwi("check", contract, "--read-data")


def test_a_long_writer_keeps_its_lock_fresh(kiwi, contract, site, monkeypatch):
    from kiwi_restore import repository

    monkeypatch.setattr(repository, "LOCK_REFRESH_SECONDS", 0.05)
    repo = site.open_repository(site.contract(contract))
    with repo.lock() as lock:
        first = lock.lock_id
        deadline = time.monotonic() + 10
        while lock.lock_id == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.lock_id != first  # rewritten under a new id...
        while first in [lid for lid, _ in repo._ids("locks")] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first not in [lid for lid, _ in repo._ids("locks")]  # ...and the old one removed
    assert list(repo._ids("locks")) == []


def test_owner_names_that_are_not_utf8_are_left_out():
    from kiwi_restore.tree import Node, decode_tree, encode_tree

    n = Node(name=b"f", type="f", uid=1000, user="caf\udce9", group="staff")
    (back,) = decode_tree(encode_tree([n]), "tree")
    assert back.user is None and back.uid == 1000 and back.group == "staff"
