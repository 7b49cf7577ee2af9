"""Builders of hostile source trees for round-trip tests (shared by core, FUSE and export tests)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

HOSTILE_NAMES = [
    b"with space", b"accents \xc3\xa9\xc3\xa8\xc3\xbc", b"new\nline", b"invalid \xff\xfe utf8",
    b"x" * 255, b"-starts-with-dash", b"tab\there", b"quote'\"", b"back\\slash", b"\xe2\x86\x92 arrow",
]


def make_hostile_tree(root: Path, seed: int = 1, big: int = 3 << 20) -> Path:
    """A tree with the cases the product must keep: names as bytes, holes, links, xattrs, fifos."""
    r = random.Random(seed)
    rb = os.fsencode(root)
    os.makedirs(rb, exist_ok=True)
    for i, name in enumerate(HOSTILE_NAMES):
        with open(os.path.join(rb, name), "wb") as f:
            f.write(r.randbytes(r.randrange(0, 5000)) if i % 3 else b"")
    deep = rb
    for i in range(20):
        deep = os.path.join(deep, b"level %d" % i)
    os.makedirs(deep)
    with open(os.path.join(deep, b"deep.txt"), "wb") as f:
        f.write(b"deep content\n")
    with open(os.path.join(rb, b"big.bin"), "wb") as f:
        f.write(r.randbytes(big))
    with open(os.path.join(rb, b"sparse.img"), "wb") as f:
        f.truncate(20 << 20)
        f.seek(7 << 20)
        f.write(r.randbytes(300_000))
    with open(os.path.join(rb, b"empty"), "wb"):
        pass
    os.symlink(b"big.bin", os.path.join(rb, b"link to big"))
    os.symlink(b"/etc/passwd", os.path.join(rb, b"absolute link"))
    os.symlink(b"does not exist", os.path.join(rb, b"dangling"))
    os.link(os.path.join(rb, b"big.bin"), os.path.join(rb, b"hardlink of big"))
    os.mkdir(os.path.join(rb, b"sub"))
    os.link(os.path.join(rb, b"empty"), os.path.join(rb, b"sub", b"hardlink of empty"))
    os.mkfifo(os.path.join(rb, b"fifo"))
    x = os.path.join(rb, b"with space")
    os.setxattr(x, b"user.comment", b"Dossier patient \xc3\xa9")
    os.setxattr(x, b"user.binary", bytes(range(256)))
    os.setxattr(os.path.join(rb, b"sub"), b"user.dir", b"1")
    os.chmod(os.path.join(rb, b"sub", b"hardlink of empty"), 0o640)
    os.chmod(os.path.join(rb, b"empty"), 0o4755)
    os.chown(os.path.join(rb, HOSTILE_NAMES[1]), 1234, 5678)
    os.utime(os.path.join(rb, b"big.bin"), ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    return root


def rsync_diff(src: Path | str, dst: Path | str) -> str:
    """What `rsync -naHAXc --itemize-changes` sees differ (empty: identical content and metadata)."""
    out = subprocess.run(["rsync", "-naHAXc", "--itemize-changes", f"{src}/", f"{dst}/"],
                         capture_output=True, check=True)
    return out.stdout.decode("utf-8", "backslashreplace")
