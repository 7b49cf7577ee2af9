"""The foundation's commands on an S3 store (Ceph RGW and moto): backup, snapshots, ls, restore,
check and mount work unchanged, and the restored or mounted tree is identical to its source
(rsync -naHAXc prints nothing)."""

from __future__ import annotations

import json
import os
import random
import subprocess

from hypothesis import HealthCheck, given, settings
from test_fuse import mount, snapshot_dirs, umount
from test_roundtrip import random_tree_round_trip, restored, trees
from test_s3_support import s3_contract, s3_store  # noqa: F401 (fixtures)
from treegen import make_hostile_tree, rsync_diff

from kiwi_restore import service


def test_hostile_tree_round_trip_on_s3(tmp_path, kiwi, s3_contract, s3_store):  # noqa: F811
    src = make_hostile_tree(tmp_path / "src")
    kiwi("backup", s3_contract, "-m", "pc1", str(src))
    # everything landed in the bucket, nothing in the local store directory
    keys = [i.key for i in s3_store.list("contracts/")]
    assert any("/data/" in k for k in keys) and any("/snapshots/" in k for k in keys)
    assert not any(p.is_file() for p in (tmp_path / "home" / "store").rglob("*"))
    out = tmp_path / "out"
    kiwi("restore", s3_contract, "latest", "--target", str(out))
    assert rsync_diff(src, restored(out, src)) == ""
    a, b = restored(out, src) / "big.bin", restored(out, src) / "hardlink of big"
    assert a.stat().st_ino == b.stat().st_ino

    _, js = kiwi("snapshots", s3_contract, "--json")
    assert len(json.loads(js)) == 1
    _, listing = kiwi("ls", s3_contract, "latest", str(src), "-l")
    assert "big.bin" in listing
    _, msg = kiwi("check", s3_contract, "--read-data")
    assert "no problem" in msg

    before = sum(i.size for i in s3_store.list(""))
    kiwi("backup", s3_contract, "-m", "pc1", str(src))
    after = sum(i.size for i in s3_store.list(""))
    assert after - before < 20_000, after - before  # dedup works the same on S3


def test_restore_one_path_and_time_selection_on_s3(tmp_path, kiwi, s3_contract):  # noqa: F811
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i, when in enumerate(["2026-01-01T10:00", "2026-02-01T10:00"]):
        (src / "d" / "v.txt").write_text(f"version {i}")
        kiwi("backup", s3_contract, "-m", "pc1", str(src), "--time", when)
    out = tmp_path / "o"
    kiwi("restore", s3_contract, "--at", "2026-01-15", str(src / "d" / "v.txt"), "--target", str(out))
    assert (out / "v.txt").read_text() == "version 0"


def test_damaged_s3_object_is_detected(tmp_path, kiwi, s3_contract, s3_store):  # noqa: F811
    src = make_hostile_tree(tmp_path / "src", big=1 << 20)
    kiwi("backup", s3_contract, "-m", "pc1", str(src))
    pack = max((i for i in s3_store.list("contracts/") if "/data/" in i.key), key=lambda i: i.size)
    data = bytearray(s3_store.get(pack.key))
    data[len(data) // 2] ^= 0x40
    s3_store.delete(pack.key)
    s3_store.put(pack.key, bytes(data))
    code, msg = kiwi("check", s3_contract, "--read-data", ok=False)
    assert code == 5, msg
    assert "damaged file" in msg and pack.key.rsplit("/", 1)[-1] in msg, msg


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(entries=trees())
def test_random_trees_round_trip_on_s3(kiwi, s3_contract, entries):  # noqa: F811
    random_tree_round_trip(kiwi, s3_contract, entries)


def test_mount_on_s3(tmp_path, kiwi, site, s3_contract):  # noqa: F811
    """The browse view over S3 (remote fetch parameters: merged ranged GETs, more in flight)."""
    assert service.open_contract(site, s3_contract, "mount")[1].backend.remote
    src = make_hostile_tree(tmp_path / "src", big=3 << 20)
    kiwi("backup", s3_contract, "-m", "pc1", str(src))
    mnt = tmp_path / "mnt"
    pid = mount(mnt, contract=s3_contract)
    try:
        root = mnt / "pc1" / snapshot_dirs(mnt, "pc1")[0] / str(src).lstrip("/")
        p = subprocess.run(["rsync", "-naHAXc", "--itemize-changes", f"{src}/", f"{root}/"], capture_output=True)
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        assert p.stdout == b"", p.stdout.decode(errors="replace")[:3000]
        want = (src / "big.bin").read_bytes()
        r = random.Random(5)
        fd = os.open(root / "big.bin", os.O_RDONLY)
        try:
            for _ in range(200):
                off = r.randrange(len(want))
                n = r.choice((1, 4096, 70_000, 1 << 20))
                assert os.pread(fd, n, off) == want[off:off + n]
        finally:
            os.close(fd)
    finally:
        umount(mnt, pid)
