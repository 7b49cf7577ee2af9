"""The FUSE browse view, through a real mount served by a separate `kiwi-restore mount` process.

A hostile tree (odd names, invalid UTF-8, 255-byte names, deep paths, 10,000 entries in one
directory, sparse and multi-chunk files, links, xattrs, special files) is backed up, mounted
and compared with its source by rsync; reads, errors, write refusals, snapshot selection,
signals, unmount and the audit trail are checked against the same real mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import flip, make_site, run_cli, store_files
from kiwi_restore.fuse.daemon import EndingSignals

from kiwi_restore.audit import open_fields
from kiwi_restore.fsutil import file_lock
from kiwi_restore.restore import lookup
from kiwi_restore.site import Site

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

T1 = "2025-01-10T08:00:00Z"
T2 = "2025-02-10T08:00:00Z"
T3 = "2025-03-10T08:00:00Z"


# -- helpers ---------------------------------------------------------------------------------
def mounted(mp: Path) -> bool:
    want = os.fsencode(str(mp))
    with open("/proc/mounts", "rb") as f:
        for line in f:
            field = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[1])
            if field == want:
                return True
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def mount(mp: Path, *args: str, contract: str = "acme") -> int:
    """Mount in the background (the command returns once the mount answers); the daemon's pid."""
    mp.mkdir(exist_ok=True)
    p = run_cli("mount", contract, str(mp), *args, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert mounted(mp)
    return int(re.search(rb"process (\d+)", p.stdout).group(1))


def umount(mp: Path, pid: int | None = None) -> None:
    if mounted(mp):
        p = run_cli("umount", str(mp), timeout=60)
        assert p.returncode == 0, p.stderr.decode()
    assert not mounted(mp)
    if pid is not None:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"mount process {pid} still running"


@contextlib.contextmanager
def foreground_mount(contract: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A one-file snapshot of CONTRACT being mounted by `mount --foreground` in a child
    process (not waited for); the process and the mount, if left, are cleared afterwards."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "kiwi_restore.cli", "mount", contract, str(mnt), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc, mnt
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)])


def snapshot_dirs(mp: Path, machine: str) -> list[str]:
    return sorted(n for n in os.listdir(mp / machine) if n != "latest")


def make_hostile_tree(root: Path) -> dict:
    """The tree the rsync comparison walks; returns a few paths the other tests use."""
    r = os.fsencode(str(root))
    os.makedirs(r)
    rng = random.Random(20240601)

    def write(path: bytes, data: bytes, mode: int = 0o644) -> None:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    odd = [b"with space", b" leading and trailing ", "accentu\u00e9 NFC".encode(), "accentue\u0301 NFD".encode(),
           b"new\nline", b"tab\tand\rcr", b"invalid \xff\xfe utf8", b"x" * 255, "\u00e9".encode() * 127 + b"z",
           b"-starts-with-dash", b"*?[glob]", b"back\\slash", b"quote'\"", b"..dots..", b".hidden"]
    os.makedirs(r + b"/odd")
    for i, name in enumerate(odd):
        write(r + b"/odd/" + name, f"file {i}\n".encode() * (i + 1))
    os.makedirs(r + b"/odd/dir with \xff byte/" + b"y" * 255)
    write(r + b"/odd/dir with \xff byte/" + b"y" * 255 + b"/inside", b"deep and odd\n")

    deep = r + b"/deep"
    for level in range(40):
        deep += b"/level %02d " % level + b"d" * 40
    os.makedirs(deep)
    write(deep + b"/bottom.txt", b"the bottom\n")

    many = r + b"/many"
    os.makedirs(many)
    for i in range(10_000):
        write(many + b"/entry %05d" % i, b"" if i % 3 else b"%d\n" % i)

    files = r + b"/files"
    os.makedirs(files)
    write(files + b"/empty", b"")
    big = bytes(rng.getrandbits(8) for _ in range(256)) * 16  # 4 KiB pattern, then random below
    multi = os.urandom(5 << 20) + big
    write(files + b"/multi-chunk.bin", multi)
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(200_000))
    write(files + b"/compressible.txt", text)
    with open(files + b"/sparse.img", "wb") as f:  # 16 MiB, two data islands
        f.truncate(16 << 20)
        f.seek(3 << 20)
        f.write(os.urandom(300_000))
        f.seek(12 << 20)
        f.write(b"island" * 50_000)
    write(files + b"/setuid", b"#!/bin/sh\n", 0o4755)
    write(files + b"/no-perms", b"secret\n", 0o000)
    write(files + b"/owned", b"someone else's\n", 0o640)
    os.chown(files + b"/owned", 1234, 5678)
    os.link(files + b"/multi-chunk.bin", files + b"/hardlink-1")
    os.makedirs(r + b"/other")
    os.link(files + b"/multi-chunk.bin", r + b"/other/hardlink-2")
    os.symlink(b"multi-chunk.bin", files + b"/rel-link")
    os.symlink(b"/etc/hostname", files + b"/abs-link")
    os.symlink(b"does/not/exist", files + b"/dangling")
    os.symlink(b"../odd/invalid \xff\xfe utf8", files + b"/link to \xff")
    os.mkfifo(files + b"/fifo")
    os.mknod(files + b"/null-device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.setxattr(files + b"/multi-chunk.bin", b"user.comment", "r\u00e9sum\u00e9".encode())
    os.setxattr(files + b"/multi-chunk.bin", b"user.binary", bytes(range(256)))
    os.setxattr(files + b"/empty", b"user.empty", b"")
    os.setxattr(r + b"/odd", b"user.on-a-directory", b"yes")
    os.makedirs(r + b"/empty dir")
    # fixed, distinct nanosecond mtimes, directories last (creating entries touches them)
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_000_000_000 + rng.randrange(10**15)),
                     follow_symlinks=False)
    os.utime(r, ns=(1_600_000_000_000_000_000, 1_650_000_000_987_654_321))
    # before 1970: negative nanoseconds, whose split into seconds and nanoseconds must floor
    os.utime(files + b"/setuid", ns=(-1_234_567_891, -86_400_000_000_001), follow_symlinks=False)
    return {"multi": multi, "text": text}


def snap_path(mp: Path, machine: str, snap: str, src: Path) -> Path:
    return mp / machine / snap / str(src).lstrip("/")


# -- one site, one hostile snapshot, one mount for the read-side tests -----------------------
@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    """Module-scoped like `home` in conftest (same environment variables), so the 10,000-entry
    tree is backed up once; the mount is a separate, detached `kiwi-restore mount` process."""
    base = tmp_path_factory.mktemp("fuse")
    home = base / "home"
    with pytest.MonkeyPatch.context() as mp:
        site = make_site(home, mp)
        for args in (["contract", "create", "acme", "--offer", "sante"], ["machine", "add", "acme", "pc1"]):
            run_cli(*args, check=True)
        src = base / "src"
        data = make_hostile_tree(src)
        p = run_cli("backup", "acme", str(src), "-m", "pc1", "--time", T1, "--json", check=True)
        assert json.loads(p.stdout)["stats"]["errors"] == 0
        mnt = base / "mnt"
        pid = mount(mnt)
        snap = snapshot_dirs(mnt, "pc1")[0]
        try:
            yield {"site": site, "src": src, "mnt": mnt, "pid": pid, "root": snap_path(mnt, "pc1", snap, src),
                   "snap": snap, **data}
        finally:
            umount(mnt, pid)


def test_rsync_finds_no_difference(hostile) -> None:
    src, root = hostile["src"], hostile["root"]
    p = subprocess.run(["rsync", "-naHAXc", "--itemize-changes", f"{src}/", f"{root}/"], capture_output=True)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert p.stdout == b"", p.stdout.decode(errors="replace")[:3000]
    # and the comparison did look at everything: same entry count both ways
    count = lambda top: sum(len(d) + len(f) for _, d, f in os.walk(os.fsencode(str(top))))  # noqa: E731
    assert count(root) == count(src) > 10_000


def test_metadata(hostile) -> None:
    src, root, mnt = hostile["src"], hostile["root"], hostile["mnt"]
    files = root / "files"
    # the attributes a listing gives (READDIRPLUS, filled from the table's columns) and those
    # a lookup gives equal the source's, a time before 1970 included. The kernel forgets its
    # entries first (root: drop_caches), so each way is the one that installs them.
    names = ("setuid", "multi-chunk.bin", "owned", "null-device", "sparse.img", "rel-link")
    Path("/proc/sys/vm/drop_caches").write_text("2")
    listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(files)}
    Path("/proc/sys/vm/drop_caches").write_text("2")
    looked_up = {name: os.lstat(files / name) for name in names}
    for name in names:
        s = os.lstat(src / "files" / name)
        for m in (listed[name], looked_up[name]):
            assert ((m.st_mtime_ns, m.st_mode, m.st_uid, m.st_gid, m.st_size, m.st_rdev, m.st_nlink)
                    == (s.st_mtime_ns, s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_rdev, s.st_nlink)), name
    assert listed["setuid"].st_mtime_ns == -86_400_000_000_001
    assert listed["hardlink-1"].st_ino == listed["multi-chunk.bin"].st_ino == looked_up["multi-chunk.bin"].st_ino
    a, b = os.stat(files / "multi-chunk.bin"), os.stat(root / "other" / "hardlink-2")
    assert a.st_ino == b.st_ino == os.stat(files / "hardlink-1").st_ino
    assert a.st_nlink == b.st_nlink == 3
    assert a.st_ino != os.stat(files / "compressible.txt").st_ino
    sparse = os.stat(files / "sparse.img")
    assert sparse.st_size == 16 << 20
    assert sparse.st_blocks * 512 < 1 << 20  # holes stay holes
    assert os.stat(files / "multi-chunk.bin").st_blocks * 512 >= 5 << 20
    assert os.readlink(files / "link to \udcff") == "../odd/invalid \udcff\udcfe utf8"
    assert os.getxattr(files / "multi-chunk.bin", "user.binary") == bytes(range(256))
    assert sorted(os.listxattr(files / "multi-chunk.bin")) == ["user.binary", "user.comment"]
    assert os.getxattr(root / "odd", "user.on-a-directory") == b"yes"
    with pytest.raises(OSError) as e:
        os.getxattr(files / "setuid", "user.none")
    assert e.value.errno == errno.ENODATA
    names = os.listdir(os.fsencode(str(root / "odd")))
    assert b"invalid \xff\xfe utf8" in names and b"x" * 255 in names and b"new\nline" in names
    assert len(os.listdir(root / "many")) == 10_000
    owned = os.stat(files / "owned")
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 5678, 0o640)
    assert stat.S_IMODE(os.stat(files / "setuid").st_mode) == 0o4755
    assert os.stat(files / "null-device", follow_symlinks=False).st_rdev == os.makedev(1, 3)
    assert os.stat(files / "multi-chunk.bin").st_mtime_ns == os.stat(src / "files" / "multi-chunk.bin").st_mtime_ns
    # the layout: snapshot directory named and dated by the snapshot's time, `latest` beside it
    snap_dir = mnt / "pc1" / hostile["snap"]
    assert hostile["snap"] == "2025-01-10T080000.000000Z"
    assert snap_dir.stat().st_mtime_ns == 1_736_496_000 * 10**9
    assert os.readlink(mnt / "pc1" / "latest") == hostile["snap"]
    assert os.listdir(mnt) == ["pc1"]
    st = os.statvfs(mnt)
    assert st.f_namemax == 255 and st.f_bavail == 0


def test_the_installed_pyfuse3_carries_the_patches() -> None:
    """scripts/setup.sh builds pyfuse3 with scripts/patches/: without them the tests below
    would only cover the slower paths (directory handles, joined read replies)."""
    import pyfuse3

    assert hasattr(pyfuse3.Operations, "skip_opendir"), "pyfuse3 lacks patch 01 (run scripts/setup.sh)"
    assert getattr(pyfuse3, "READ_REPLY_PARTS", False), "pyfuse3 lacks patch 04 (run scripts/setup.sh)"
    assert getattr(pyfuse3, "READDIR_REPLY_COLUMNS", False), "pyfuse3 lacks patch 05 (run scripts/setup.sh)"
    assert hasattr(pyfuse3, "readdir_end"), "pyfuse3 lacks patch 07 (run scripts/setup.sh)"


def test_random_reads_across_chunk_boundaries(hostile) -> None:
    site, root = hostile["site"], hostile["root"]
    multi = hostile["multi"]
    repo = site.open_repository(site.contract("acme"))
    snap = repo.list_snapshots()[0]
    node = lookup(repo, snap, str(hostile["src"] / "files" / "multi-chunk.bin"))
    assert len(node.chunks) >= 3
    rng = random.Random(7)
    starts = node.offsets()[1:]
    with open(root / "files" / "multi-chunk.bin", "rb", buffering=0) as f:
        for s in starts:  # straddle every boundary
            for off, n in ((s - 1, 2), (s - 5000, 10_000), (s - 1, 300_000)):
                assert os.pread(f.fileno(), n, off) == multi[off:off + n]
        for _ in range(300):
            off = rng.randrange(len(multi))
            n = rng.choice([1, 4096, 65536, 1 << 20])
            assert os.pread(f.fileno(), n, off) == multi[off:off + n]
        assert os.pread(f.fileno(), 100, len(multi)) == b""
    fd = os.open(root / "files" / "sparse.img", os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 1 << 20)
        for off in (0, 3 << 20, (3 << 20) + 200_000, 12 << 20, (16 << 20) - (1 << 20)):
            n = os.preadv(fd, [buf], off)
            with open(hostile["src"] / "files" / "sparse.img", "rb") as s:
                s.seek(off)
                assert buf[:n] == s.read(n)
    finally:
        os.close(fd)
    with open(root / "files" / "compressible.txt", "rb") as f:
        assert f.read() == hostile["text"]


def test_eight_concurrent_readers(hostile) -> None:
    root, src = hostile["root"], hostile["src"]
    paths = ["files/multi-chunk.bin", "files/compressible.txt", "files/sparse.img", "other/hardlink-2"]
    expected = {p: (src / p).read_bytes() for p in paths}
    errors: list[str] = []

    def reader(k: int) -> None:
        rng = random.Random(k)
        try:
            for _ in range(40):
                p = rng.choice(paths)
                data = expected[p]
                off = rng.randrange(len(data))
                n = rng.choice([4096, 100_000, 1 << 20])
                with open(root / p, "rb") as f:
                    f.seek(off)
                    if f.read(n) != data[off:off + n]:
                        errors.append(f"{p} at {off}")
            many = root / "many"
            for i in rng.sample(range(10_000), 200):
                want = b"" if i % 3 else b"%d\n" % i
                if (many / f"entry {i:05d}").read_bytes() != want:
                    errors.append(f"entry {i}")
        except Exception as exc:  # reported below, in the test's thread
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _open(path: Path, mode: str) -> None:
    with open(path, mode):
        pass


@pytest.mark.parametrize("action", [
    lambda r: _open(r / "files" / "empty", "wb"),
    lambda r: _open(r / "files" / "empty", "ab"),
    lambda r: _open(r / "files" / "new-file", "xb"),
    lambda r: os.mkdir(r / "new-dir"),
    lambda r: os.unlink(r / "files" / "empty"),
    lambda r: os.rmdir(r / "empty dir"),
    lambda r: os.rename(r / "files" / "empty", r / "files" / "moved"),
    lambda r: os.link(r / "files" / "empty", r / "files" / "new-link"),
    lambda r: os.symlink("x", r / "files" / "new-symlink"),
    lambda r: os.chmod(r / "files" / "empty", 0o777),
    lambda r: os.chown(r / "files" / "empty", 1, 1),
    lambda r: os.utime(r / "files" / "empty", (0, 0)),
    lambda r: os.truncate(r / "files" / "empty", 10),
    lambda r: os.setxattr(r / "files" / "empty", "user.new", b"1"),
    lambda r: os.removexattr(r / "files" / "empty", "user.empty"),
    lambda r: os.mkdir(Path(str(r).split("/pc1/")[0]) / "pc1" / "new-snapshot-dir"),
], ids=["truncate-open", "append-open", "create", "mkdir", "unlink", "rmdir", "rename", "link",
        "symlink", "chmod", "chown", "utime", "truncate", "setxattr", "removexattr", "mkdir-top"])
def test_writes_fail_with_erofs(hostile, action) -> None:
    with pytest.raises(OSError) as e:
        action(hostile["root"])
    assert e.value.errno == errno.EROFS
    assert os.path.exists(hostile["root"] / "files" / "empty")


# -- snapshot selection --------------------------------------------------------------------------
def test_latest_and_at_pick_the_right_snapshots(contract: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    versions = {}
    for when, machine, text in ((T1, "pc1", "one"), (T2, "pc1", "two"), (T3, "pc1", "three"),
                                (T2, "pc2", "pc2-two"), (T2, "pc2", "pc2-two-again")):
        (src / "v.txt").write_text(text)
        out = run_cli("backup", contract, str(src), "-m", machine, "--time", when, "--json", check=True).stdout
        versions[json.loads(out)["snapshot"]] = text
    mnt = tmp_path / "mnt"
    rel = str(src).lstrip("/") + "/v.txt"

    pid = mount(mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["pc1", "pc2"]
        assert snapshot_dirs(mnt, "pc1") == ["2025-01-10T080000.000000Z", "2025-02-10T080000.000000Z",
                                             "2025-03-10T080000.000000Z"]
        two = snapshot_dirs(mnt, "pc2")  # same time twice: the second gets its short id
        assert len(two) == 2 and two[0] == "2025-02-10T080000.000000Z"
        assert re.fullmatch(r"2025-02-10T080000\.000000Z-[0-9a-f]{8}", two[1])
        assert {(mnt / "pc2" / d / rel).read_text() for d in two} == {"pc2-two", "pc2-two-again"}
        assert os.readlink(mnt / "pc1" / "latest") == "2025-03-10T080000.000000Z"
        assert (mnt / "pc1" / "latest" / rel).read_text() == "three"
        assert (mnt / "pc1" / "2025-01-10T080000.000000Z" / rel).read_text() == "one"
    finally:
        umount(mnt, pid)

    pid = mount(mnt, "--at", "2025-02-20T00:00:00Z")
    try:
        assert snapshot_dirs(mnt, "pc1") == ["2025-02-10T080000.000000Z"]
        assert (mnt / "pc1" / "latest" / rel).read_text() == "two"
        assert len(snapshot_dirs(mnt, "pc2")) == 1
    finally:
        umount(mnt, pid)

    pid = mount(mnt, "--at", "2025-01-31", "--machine", "pc1")
    try:
        assert os.listdir(mnt) == ["pc1"]
        assert (mnt / "pc1" / "latest" / rel).read_text() == "one"
    finally:
        umount(mnt, pid)

    sid = next(s for s, t in versions.items() if t == "two")
    pid = mount(mnt, "--snapshot", sid[:10])
    try:
        assert os.listdir(mnt) == ["pc1"]
        assert (mnt / "pc1" / "latest" / rel).read_text() == "two"
    finally:
        umount(mnt, pid)

    p = run_cli("mount", contract, str(mnt), "--at", "2024-01-01")
    assert p.returncode == 4 and b"no snapshot at or before" in p.stderr
    assert not mounted(mnt)


# -- integrity --------------------------------------------------------------------------------------
def test_corrupt_chunk_gives_eio_and_the_mount_survives(contract: str, site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "broken dir").mkdir(parents=True)
    victim = os.urandom(6 << 20)
    (src / "victim.bin").write_bytes(victim)
    (src / "bystander.txt").write_bytes(b"still readable\n" * 1000)
    (src / "broken dir" / "inside").write_bytes(b"unreachable\n")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    repo = site.open_repository(site.contract(contract))
    snap = repo.list_snapshots()[0]
    node = lookup(repo, snap, str(src / "victim.bin"))
    assert len(node.chunks) >= 3
    k = len(node.chunks) // 2
    bad_id, bad_size = node.chunks[k]
    bad_start = node.offsets()[k]
    bad_tree = lookup(repo, snap, str(src / "broken dir")).subtree

    def flip(blob_id: bytes) -> None:  # one byte inside the sealed blob, in its pack
        loc = repo.locate(blob_id)
        with open(Path(site.path("store")) / repo.pack_key(loc.pack_id), "r+b") as f:
            f.seek(loc.offset + loc.length // 2)
            byte = f.read(1)
            f.seek(loc.offset + loc.length // 2)
            f.write(bytes([byte[0] ^ 0x55]))

    flip(bad_id)
    flip(bad_tree)

    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        f = mnt / "pc1" / "latest" / str(src).lstrip("/") / "victim.bin"
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(fd, 65536, 0) == victim[:65536]
            for off in (bad_start, bad_start + bad_size // 2, bad_start + bad_size - 1):
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, off)
                assert e.value.errno == errno.EIO
            end = len(victim)
            assert os.pread(fd, 4096, end - 4096) == victim[end - 4096:]
        finally:
            os.close(fd)
        other = mnt / "pc1" / "latest" / str(src).lstrip("/") / "bystander.txt"
        assert other.read_bytes() == b"still readable\n" * 1000
        with pytest.raises(OSError) as e:  # a directory whose tree is damaged
            os.listdir(mnt / "pc1" / "latest" / str(src).lstrip("/") / "broken dir")
        assert e.value.errno == errno.EIO
        assert alive(pid) and mounted(mnt) and os.listdir(mnt) == ["pc1"]
    finally:
        umount(mnt, pid)
    rec = site.contract(contract)
    cipher = site.contract_keys(rec).audit_cipher()
    alerts = {r["details"]["object"]: open_fields(cipher, rec.id, r["sealed"])["path"]
              for r in site.audit.records() if r["action"] == "alert.integrity"}
    assert alerts == {bad_id.hex(): str(src / "victim.bin"), bad_tree.hex(): str(src / "broken dir")}
    log = Path(site.tmp_dir(), "mounts")
    logs = "".join(p.read_text() for p in log.glob("*.log"))
    assert bad_id.hex() in logs  # the daemon's log names the object...
    assert "victim.bin" not in logs and "broken dir" not in logs  # ...never a file name in clear


# -- session: audit, signals, unmount ------------------------------------------------------------
def test_session_audit_and_sigterm_in_foreground(contract: str, site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "patients").mkdir(parents=True)
    (src / "patients" / "Dupont Jean.txt").write_text("confidential\n")
    (src / "patients" / "Martin \u00c9lise.txt").write_text("confidential too\n")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "kiwi_restore.cli", "mount", contract, str(mnt), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        base = mnt / "pc1" / "latest" / str(src).lstrip("/") / "patients"
        assert (base / "Dupont Jean.txt").read_text() == "confidential\n"
        assert (base / "Dupont Jean.txt").read_text() == "confidential\n"  # second open: one record
        assert (base / "Martin \u00c9lise.txt").read_text() == "confidential too\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        umount(mnt)
    assert not mounted(mnt)
    rec = site.contract(contract)
    cipher = site.contract_keys(rec).audit_cipher()
    records = [r for r in site.audit.records() if r.get("contract") == rec.id and r["action"].startswith("mount.")]
    assert [r["action"] for r in records][0] == "mount.start"
    assert records[-1]["action"] == "mount.end" and records[-1]["details"]["reason"] == "signal SIGTERM"
    sessions = {r["details"]["session"] for r in records}
    assert len(sessions) == 1
    opened = [f for r in records if r["action"] == "mount.files"
              for f in open_fields(cipher, rec.id, r["sealed"])["files"]]
    assert sorted(p for _, p in opened) == [str(src / "patients" / "Dupont Jean.txt"),
                                            str(src / "patients" / "Martin \u00c9lise.txt")]
    raw = Path(site.audit.path).read_text()
    assert "Dupont" not in raw and "patients" not in raw  # paths only sealed
    assert records[-1]["details"]["files_opened"] == 2
    last = list(site.audit.records())[-1]
    assert last["action"] == "audit.checkpoint"
    assert run_cli("audit", "verify").returncode == 0


@pytest.mark.parametrize(("sig", "delay"), [(signal.SIGINT, 0), (signal.SIGINT, 0.002), (signal.SIGINT, 0.01),
                                          (signal.SIGTERM, 0), (signal.SIGTERM, 0.004), (signal.SIGHUP, 0.002)])
def test_a_signal_as_the_mount_appears_still_unmounts(contract: str, tmp_path: Path, sig: signal.Signals,
                                                        delay: float) -> None:
    """The signal lands between the mount syscall and the loop serving the kernel's INIT: it
    once killed the process with the mount left dead (Ctrl-C at once), or hung the loop on its
    own first stat of the mount (a few ms later), so a Ctrl-C went unanswered. The delays
    spread the signals over that window; which moment each hits varies with the machine."""
    with foreground_mount(contract, tmp_path) as (proc, mnt):
        deadline = time.monotonic() + 60
        while not mounted(mnt):  # no sleep: the signal must come as soon as the mount exists
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert f"signal {sig.name}: unmounting".encode() in err
    assert not mounted(mnt)


def test_a_signal_during_a_stuck_unmount_is_noted_then_ends_the_process(contract: str, site: Site,
                                                                        tmp_path: Path) -> None:
    """After the loop stops, a signal within the grace (a Ctrl-C pressed twice) is only noted;
    past it the unmount is stuck (here on the audit trail's lock, held by another writer) and
    a signal ends the process, as `kiwi-restore umount` expects of its SIGTERM."""
    with foreground_mount(contract, tmp_path) as (proc, mnt):
        deadline = time.monotonic() + 60
        while not (mounted(mnt) and (mnt / "pc1").exists()):  # mounted and answering
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with file_lock(site.audit.path + ".lock"):
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 30
            while mounted(mnt):  # the mount goes; the session's end waits for the lock
                assert time.monotonic() < deadline
                time.sleep(0.05)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)  # within the grace: noted
            time.sleep(EndingSignals.GRACE + 0.5)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)  # past it: the process ends, by that signal
            proc.wait(timeout=10)
            assert time.monotonic() - stopped < 20  # not after the lock's own 30 s wait
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGTERM, err.decode()
    assert b"signal SIGTERM while the unmount has been stuck" in err
    assert not mounted(mnt)


def test_the_kernel_keeps_listings_so_a_second_walk_never_reaches_the_mount(contract: str, site: Site,
                                                                             tmp_path: Path) -> None:
    """pyfuse3 as setup.sh builds it skips opendir: the kernel caches each listing, and a
    directory listed again (find, ls, a second rsync) costs the mount no request."""
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(3000):  # a listing of several readdir requests
        (src / "many" / f"entry-{i:05d}.txt").write_bytes(b"")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    rec = site.contract(contract)
    want = sorted(f"entry-{i:05d}.txt" for i in range(3000))

    def session(walks: int) -> int:
        mnt = tmp_path / f"mnt{walks}"
        pid = mount(mnt)
        try:
            d = mnt / "pc1" / "latest" / str(src).lstrip("/") / "many"
            for _ in range(walks):
                assert sorted(os.listdir(d)) == want
                assert sum(1 for _ in os.scandir(d)) == 3000
        finally:
            umount(mnt, pid)
        ends = [r for r in site.audit.records() if r.get("contract") == rec.id and r["action"] == "mount.end"]
        return ends[-1]["details"]["listings"]

    once = session(1)
    assert once >= 3  # the root, machine, snapshot and path directories, then several for "many"
    assert session(5) == once
def test_the_request_past_a_complete_listing_never_reaches_the_mount(contract: str, site: Site,
                                                                     tmp_path: Path) -> None:
    """pyfuse3 patch 07: after each complete listing the kernel asks once more and an empty
    reply ends it; the mount tells pyfuse3 where its listings end, and pyfuse3 answers those
    requests itself, so a walk costs one listing request per directory instead of two."""
    src = tmp_path / "src"
    for i in range(12):
        (src / f"d{i:02d}").mkdir(parents=True)
        (src / f"d{i:02d}" / "f").write_bytes(b"x")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    rec = site.contract(contract)
    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        walked = list(os.walk(mnt))  # `latest` is a symlink: each directory is listed once
        assert sum(1 for _, _, files in walked if files == ["f"]) == 12
    finally:
        umount(mnt, pid)
    ends = [r for r in site.audit.records() if r.get("contract") == rec.id and r["action"] == "mount.end"]
    assert ends[-1]["details"]["listings"] == len(walked)


def test_umount_clears_a_mount_whose_process_died(contract: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # dead, still mounted
        assert mounted(mnt)
        p = run_cli("mount", contract, str(mnt))  # nothing is stacked on a dead mount
        assert p.returncode == 2 and b"already" in p.stderr
    finally:
        umount(mnt, pid)
    assert os.listdir(mnt) == []
    p = run_cli("umount", str(mnt))
    assert p.returncode == 4 and b"not mounted" in p.stderr


def test_refusals_before_mounting(contract: str, site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def refused(*args: str, env: dict | None = None) -> tuple[int, list[str]]:
        p = run_cli("mount", *args, env=env, timeout=60)
        assert not mounted(mnt)
        return p.returncode, p.stderr.decode().strip().splitlines()

    assert refused("nope", str(mnt)) == (4, ["kiwi-restore: error: unknown contract 'nope'"])
    code, lines = refused(contract, str(mnt), env={"KIWI_RESTORE_PASSPHRASE": "wrong"})
    assert code == 3 and len(lines) == 1 and "passphrase" in lines[0]
    code, lines = refused(contract, str(tmp_path / "missing"))
    assert code == 2 and len(lines) == 1
    code, lines = refused(contract, str(mnt), "--cache-size", "lots")
    assert code == 2 and len(lines) == 1
    code, lines = refused(contract, str(mnt), "--machine", "pc9")
    assert code == 4 and len(lines) == 1
    run_cli("contract", "terminate", contract, "--letter-received", "2020-01-06", check=True)
    code, lines = refused(contract, str(mnt))
    assert code == 7 and len(lines) == 1 and "restore window" in lines[0]
    assert any(r["action"] == "mount.refused" for r in site.audit.records())


def test_session_ends_when_access_ends(contract: str, site: Site, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A destruction request while mounted ends the session, as the restore window closing would."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    monkeypatch.setenv("KIWI_RESTORE_ACCESS_CHECK_SECONDS", "0.2")
    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        run_cli("contract", "destroy-request", contract, "--yes-destroy", contract, check=True)
        deadline = time.monotonic() + 20
        while (mounted(mnt) or alive(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not mounted(mnt) and not alive(pid)
    finally:
        umount(mnt, pid)
    rec = site.contract(contract)
    end = [r for r in site.audit.records() if r.get("contract") == rec.id and r["action"] == "mount.end"]
    assert end[-1]["details"]["reason"] == "access ended"


def test_browsing_needs_only_the_directories_index(contract: str, site: Site, tmp_path: Path) -> None:
    """The mount starts from treeindex/ alone: with every index/ file damaged, the tree still
    lists, and only reading a file's content fails, with EIO."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("content\n")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    assert store_files(site, contract, "treeindex") and store_files(site, contract, "index")
    for p in store_files(site, contract, "index"):
        flip(p, -5)
    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        root = mnt / "pc1" / "latest" / str(src).lstrip("/")
        assert sorted(os.listdir(root / "a" / "b")) == ["f.txt"]
        assert (root / "a" / "b" / "f.txt").stat().st_size == 8
        with pytest.raises(OSError) as e:
            (root / "a" / "b" / "f.txt").read_bytes()
        assert e.value.errno == errno.EIO
        assert alive(pid) and mounted(mnt)
    finally:
        umount(mnt, pid)
    logs = "".join(p.read_text() for p in Path(site.tmp_dir(), "mounts").glob("*.log"))
    damaged = store_files(site, contract, "index")[0].name
    assert f"index/{damaged}" in logs and "authentication failed" in logs


def test_a_repository_without_the_tree_copy_still_mounts(contract: str, site: Site, tmp_path: Path) -> None:
    """No treeindex/ (written before it existed): the mount finds the trees in the index."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.bin").write_bytes(os.urandom(300_000))
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    for p in store_files(site, contract, "treeindex"):
        p.unlink()
    mnt = tmp_path / "mnt"
    pid = mount(mnt)
    try:
        root = mnt / "pc1" / "latest" / str(src).lstrip("/")
        assert (root / "d" / "x.bin").read_bytes() == (src / "d" / "x.bin").read_bytes()
    finally:
        umount(mnt, pid)


def test_a_damaged_tree_copy_falls_back_to_the_index(contract: str, site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_text("x\n")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    for p in store_files(site, contract, "treeindex"):
        flip(p, -5)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_cli("mount", contract, str(mnt), timeout=60)
    assert p.returncode == 0 and b"looked up in the whole index" in p.stderr  # said, and mounted
    try:
        assert (mnt / "pc1" / "latest" / str(src).lstrip("/") / "d" / "x").read_text() == "x\n"
    finally:
        umount(mnt, int(re.search(rb"process (\d+)", p.stdout).group(1)))
    p = run_cli("check", contract)
    assert p.returncode == 5 and b"treeindex/" in p.stdout + p.stderr
