"""Ingest -> restore round trips: content and metadata identical (rsync -naHAXc prints nothing)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treegen import make_hostile_tree, rsync_diff

from kiwi_restore.site import Site


def restored(out: Path, src: Path) -> Path:
    return out / str(src.resolve()).lstrip("/")


def test_hostile_tree_round_trip(tmp_path, kiwi, contract):
    src = make_hostile_tree(tmp_path / "src")
    kiwi("backup", contract, "-m", "pc1", str(src))
    out = tmp_path / "out"
    kiwi("restore", contract, "latest", "--target", str(out))
    assert rsync_diff(src, restored(out, src)) == ""
    sparse = restored(out, src) / "sparse.img"
    assert sparse.stat().st_blocks * 512 < 2 << 20  # holes stayed holes
    a, b = restored(out, src) / "big.bin", restored(out, src) / "hardlink of big"
    assert a.stat().st_ino == b.stat().st_ino
    assert os.stat(restored(out, src) / "big.bin").st_mtime_ns == 1_600_000_000_987_654_321


def test_second_backup_adds_almost_nothing(tmp_path, kiwi, contract, site: Site):
    src = make_hostile_tree(tmp_path / "src")
    kiwi("backup", contract, "-m", "pc1", str(src))
    store = Path(site.path("store"))
    before = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    kiwi("backup", contract, "-m", "pc1", str(src))
    kiwi("backup", contract, "-m", "pc2", str(src))  # another machine, same data: dedup too
    after = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert after - before < 20_000, after - before
    _, out = kiwi("snapshots", contract, "--json")
    assert out.count('"machine"') == 3


def test_restore_one_path_and_refuse_clobber(tmp_path, kiwi, contract):
    src = make_hostile_tree(tmp_path / "src")
    kiwi("backup", contract, "-m", "pc1", str(src))
    out = tmp_path / "out"
    kiwi("restore", contract, "latest", str(src / "sub"), "--target", str(out))
    assert (out / "sub" / "hardlink of empty").exists()
    code, msg = kiwi("restore", contract, "latest", str(src / "sub"), "--target", str(out), ok=False)
    assert code == 1 and "--overwrite" in msg
    kiwi("restore", contract, "latest", str(src / "sub"), "--target", str(out), "--overwrite")


def test_restore_never_follows_a_planted_symlink(tmp_path, kiwi, contract):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_bytes(b"payload")
    kiwi("backup", contract, "-m", "pc1", str(src))
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    os.symlink(outside, out / "dir")  # an attacker's link where a restored directory goes
    kiwi("restore", contract, "latest", str(src / "dir"), "--target", str(out), "--overwrite")
    assert list(outside.iterdir()) == []
    assert (out / "dir").is_dir() and not (out / "dir").is_symlink()
    assert (out / "dir" / "file").read_bytes() == b"payload"


def test_snapshot_selection_by_time_and_prefix(tmp_path, kiwi, contract):
    src = tmp_path / "src"
    src.mkdir()
    for i, when in enumerate(["2026-01-01T10:00", "2026-02-01T10:00", "2026-03-01T10:00"]):
        (src / "v.txt").write_text(f"version {i}")
        kiwi("backup", contract, "-m", "pc1", str(src), "--time", when)
    out = tmp_path / "o1"
    kiwi("restore", contract, "--at", "2026-02-15", str(src / "v.txt"), "--target", str(out))
    assert (out / "v.txt").read_text() == "version 1"
    code, msg = kiwi("restore", contract, "--at", "2025-12-31", str(src / "v.txt"), "--target", str(out), ok=False)
    assert code == 4
    _, js = kiwi("snapshots", contract, "--json")
    import json

    first = json.loads(js)[0]["id"]
    out2 = tmp_path / "o2"
    kiwi("restore", contract, first[:6], str(src / "v.txt"), "--target", str(out2))
    assert (out2 / "v.txt").read_text() == "version 0"


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@st.composite
def trees(draw):
    """(relative path bytes, kind, payload) entries describing a random tree."""
    entries = []
    dirs = [b""]
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = os.path.join(parent, name) if parent else name
        if any(e[0] == path for e in entries):
            continue
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "sparse", "hardlink", "empty"]))
        if kind == "dir":
            dirs.append(path)
            entries.append((path, "dir", None))
        elif kind == "file":
            entries.append((path, "file", draw(st.binary(max_size=3000)) * draw(st.integers(1, 200))))
        elif kind == "sparse":
            entries.append((path, "sparse", draw(st.integers(0, 3_000_000))))
        elif kind == "symlink":
            entries.append((path, "symlink", draw(names)))
        elif kind == "hardlink":
            files = [e[0] for e in entries if e[1] in ("file", "empty")]
            if files:
                entries.append((path, "hardlink", draw(st.sampled_from(files))))
        else:
            entries.append((path, "empty", draw(st.binary(max_size=64))))
    return entries


def build(root: bytes, entries) -> None:
    os.makedirs(root)
    for path, kind, payload in entries:
        full = os.path.join(root, path)
        if kind == "dir":
            os.mkdir(full)
        elif kind == "file":
            with open(full, "wb") as f:
                f.write(payload)
        elif kind == "empty":
            open(full, "wb").close()
            os.setxattr(full, b"user.x", payload or b"v")
        elif kind == "sparse":
            with open(full, "wb") as f:
                f.truncate(payload + 4096)
                f.seek(payload)
                f.write(b"end")
        elif kind == "symlink":
            os.symlink(payload, full)
        elif kind == "hardlink":
            os.link(os.path.join(root, payload), full)


def random_tree_round_trip(kiwi, contract: str, entries) -> None:
    """Build ENTRIES, back them up, restore them: rsync sees no difference."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp.encode(), b"src")
        build(src, entries)
        kiwi("backup", contract, "-m", "pc1", os.fsdecode(src))
        out = os.path.join(tmp, "out")
        kiwi("restore", contract, "latest", os.fsdecode(src), "--target", out)
        assert rsync_diff(os.fsdecode(src), os.path.join(out, "src")) == ""
        shutil.rmtree(out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(entries=trees())
def test_random_trees_round_trip(kiwi, contract, entries):
    random_tree_round_trip(kiwi, contract, entries)
