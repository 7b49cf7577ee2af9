"""The tar exporter's own header writer against tarfile's, byte for byte.

pax_member_header() writes a member's headers straight from the stored bytes (tarfile's
TarInfo costs five times more per file); the archives must stay exactly those tarfile
writes, so that a resumed export is identical and GNU tar and bsdtar read them as before.
"""

from __future__ import annotations

import io
import random
import tarfile

from kiwi_restore.exporter.formats import _tarinfo, pax_member_header

from kiwi_restore.tree import TYPE_DIR, TYPE_FIFO, TYPE_FILE, TYPE_SYMLINK, Node

NAMES = [b"a.txt", b"dir/sub/file with spaces", "réunion/été.pdf".encode(), b"bad\xff\xfename", b"new\nline",
         b"x" * 100, b"y" * 101, b"d/" + b"z" * 250, "日本語/ファイル".encode() * 8, b"\xed\xa0\x80surrogate",
         b"tab\tand\x01ctl", b"caf\xc3"]
USERS = [None, "", "root", "médecin", "u" * 40, "bad\udcffuser"]
XATTRS = [{}, {b"user.note": b"hello"}, {b"user.bin": bytes(range(256))}, {b"user.a": "é".encode(), b"user.b": b""},
          {b"security.selinux": b"system_u:object_r:user_home_t:s0\0"}]
TYPES = {TYPE_FILE: tarfile.REGTYPE, TYPE_DIR: tarfile.DIRTYPE, TYPE_SYMLINK: tarfile.SYMTYPE,
         TYPE_FIFO: tarfile.FIFOTYPE}


def _reference(name: bytes, typ: bytes, linkname: bytes, size: int, node: Node) -> bytes:
    return _tarinfo(name, typ, linkname, size, node).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_pax_member_header_is_tarfiles_byte_for_byte() -> None:
    rng = random.Random(8493)
    checked = 0
    for _ in range(3000):
        kind = rng.choice(list(TYPES))
        typ = TYPES[kind]
        name = rng.choice(NAMES)
        linkname = b""
        if kind == TYPE_SYMLINK or (kind == TYPE_FILE and rng.random() < 0.2):
            linkname = rng.choice(NAMES + [b"../../etc/passwd", b"/abs/target"])
            if kind == TYPE_FILE:
                typ = tarfile.LNKTYPE
        size = rng.choice([0, 1, 511, 512, 1 << 20, 8 ** 11 - 1]) if typ == tarfile.REGTYPE else 0
        node = Node(name=name.rsplit(b"/", 1)[-1], type=kind, mode=rng.choice([0o644, 0o755, 0o4755, 0o1777, 0]),
                    uid=rng.choice([0, 1000, 8 ** 7 - 1]), gid=rng.choice([0, 100, 65534]),
                    user=rng.choice(USERS), group=rng.choice(USERS),
                    mtime=rng.choice([0, 1_700_000_000_123_456_789, 1_600_000_000_000_000_000, 999]),
                    size=size, xattrs=rng.choice(XATTRS), target=linkname if kind == TYPE_SYMLINK else None)
        ours = pax_member_header(name, typ, linkname, size, node)
        assert ours is not None
        assert ours == _reference(name, typ, linkname, size, node), (name, typ, linkname, node)
        checked += 1
    assert checked == 3000


def test_out_of_range_numbers_are_left_to_tarfile() -> None:
    node = Node(name=b"f", type=TYPE_FILE, uid=8 ** 7, mtime=1)
    assert pax_member_header(b"f", tarfile.REGTYPE, b"", 0, node) is None
    node = Node(name=b"f", type=TYPE_FILE, mtime=-5_000_000_000)
    assert pax_member_header(b"f", tarfile.REGTYPE, b"", 0, node) is None
    # tarfile itself writes them (in pax records), and reads them back
    ref = _reference(b"f", tarfile.REGTYPE, b"", 0, node)
    with tarfile.open(fileobj=io.BytesIO(ref + bytes(1024))) as tf:
        ti = tf.next()
    assert ti is not None and ti.mtime == -5
