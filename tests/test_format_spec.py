"""docs/FORMAT.md is exact: an independent reader, written from the document alone, reads real backups.

Nothing here imports kiwi_restore: the reader below uses only cryptography, msgpack,
zstandard, hashlib and hmac, and follows the sections of docs/FORMAT.md it names. The
product is used only to make backups (through the CLI fixture `kiwi`), and the site
directory is found through the `home` fixture. The reader unwraps the contract key from
the keystore files with the passphrase, derives the working keys, decrypts the config,
loads the index, lists the snapshots, walks the trees and reassembles every file (holes
included), and the result is compared with the source tree. A FastCDC chunker written
from section 15.1 and the tables of the appendices must reproduce the stored chunk ids.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import os
import pwd
import re
import socket
import stat
import struct
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from treegen import make_hostile_tree

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

# -- section 6.3: object kinds ----------------------------------------------------------
CONFIG, PACK, CHUNK, TREE, INDEX, SNAPSHOT, LOCK, TRAILER = 1, 2, 3, 4, 5, 6, 7, 8
ZERO_ID = bytes(32)
HEX_NAME = re.compile(r"^[0-9a-f]{64}$")
NODE_TYPES = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO,
              "c": stat.S_IFCHR, "b": stat.S_IFBLK, "s": stat.S_IFSOCK}


class SpecError(Exception):
    """The data does not follow the specification (or fails authentication)."""


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)  # section 1: str as text, bin as bytes


# -- section 4: keystore ------------------------------------------------------------------
def kek_from(keystore: Path, passphrase: bytes) -> AESGCM:
    meta = json.loads((keystore / "keystore.json").read_text())
    if meta["version"] != 1 or meta["kdf"]["alg"] != "argon2id":
        raise SpecError("unsupported keystore")
    kdf = meta["kdf"]
    kek = AESGCM(Argon2id(salt=base64.b64decode(kdf["salt"]), length=32, iterations=kdf["iterations"],
                          lanes=kdf["lanes"], memory_cost=kdf["memory_kib"]).derive(passphrase))
    check = base64.b64decode(meta["check"])
    try:
        plain = kek.decrypt(check[:12], check[12:], b"kiwi-restore/v1/keystore-check")
    except InvalidTag:
        raise SpecError("wrong passphrase") from None
    assert plain == b"kiwi-restore keystore v1"
    return kek


def unwrap_contract_key(keystore: Path, contract_hex: str, passphrase: bytes) -> bytes:
    kek = kek_from(keystore, passphrase)
    record = json.loads((keystore / "contracts" / f"{contract_hex}.key").read_text())
    assert record["version"] == 1 and record["contract"] == contract_hex
    raw = base64.b64decode(record["wrapped"])
    key = kek.decrypt(raw[:12], raw[12:], b"kiwi-restore/v1/wrap/contract/" + contract_hex.encode())
    assert len(key) == 32
    return key


# -- section 5: working keys ---------------------------------------------------------------
def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


class Keys:
    def __init__(self, contract_id: bytes, contract_key: bytes) -> None:
        assert len(contract_id) == 16 and len(contract_key) == 32
        self.contract_id = contract_id
        self.data_key = hkdf(contract_key, b"kiwi-restore/v1/data")
        self.id_key = hkdf(contract_key, b"kiwi-restore/v1/id")
        self.audit_key = hkdf(contract_key, b"kiwi-restore/v1/audit")
        self.chunker_raw = hkdf(contract_key, b"kiwi-restore/v1/chunker", 8)
        self.chunker_seed = (int.from_bytes(self.chunker_raw, "big") >> 1) or 1
        self._ciphers: dict[bytes, AESGCM] = {}

    def file_key(self, file_id: bytes) -> bytes:
        assert len(file_id) == 32
        return hkdf(self.data_key, b"kiwi-restore/v1/file/" + file_id)

    def cipher(self, file_id: bytes) -> AESGCM:
        if file_id not in self._ciphers:
            self._ciphers[file_id] = AESGCM(self.file_key(file_id))
        return self._ciphers[file_id]

    def ad(self, kind: int, object_id: bytes) -> bytes:  # section 6.2
        ad = b"KIWI" + struct.pack(">HB", 1, kind) + self.contract_id + object_id
        assert len(ad) == 55
        return ad

    def blob_id(self, plaintext: bytes) -> bytes:
        return hmac.digest(self.id_key, plaintext, "sha256")


def open_sealed(cipher: AESGCM, sealed: bytes, ad: bytes) -> bytes:  # section 6.1
    if len(sealed) < 28:
        raise SpecError("truncated")
    try:
        return cipher.decrypt(sealed[:12], sealed[12:], ad)
    except InvalidTag:
        raise SpecError("authentication failed") from None


def check_preamble(data: bytes, kind: int) -> None:  # section 6.4
    magic, version, got, _reserved = struct.unpack(">4sHBB", data[:8])
    if magic != b"KIWI":
        raise SpecError("bad magic")
    if version != 1:
        raise SpecError(f"unsupported format version {version}")
    if got != kind:
        raise SpecError(f"kind {got}, expected {kind}")


def decompress(plain: bytes, seen: dict[int, int] | None = None) -> bytes:  # section 7
    if not plain:
        raise SpecError("empty")
    if seen is not None:
        seen[plain[0]] = seen.get(plain[0], 0) + 1
    if plain[0] == 0:
        return plain[1:]
    if plain[0] == 1:
        params = zstandard.get_frame_parameters(plain[1:])
        assert params.content_size != zstandard.CONTENTSIZE_UNKNOWN  # the frame carries its size
        return zstandard.ZstdDecompressor().decompress(plain[1:])
    raise SpecError(f"unknown compression type {plain[0]}")


# -- sections 8 to 14: the repository ------------------------------------------------------
class Reader:
    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys
        self.compression_types: dict[int, int] = {}
        self.config = unpack(self.read_object("config", CONFIG, ZERO_ID))  # section 9.2
        if self.config["version"] != 1 or self.config["contract_id"] != keys.contract_id:
            raise SpecError("config")
        self.index = self.load_index()

    def read_object(self, rel: str, kind: int, object_id: bytes) -> bytes:  # section 9.1
        raw = (self.root / rel).read_bytes()
        check_preamble(raw, kind)
        plain = open_sealed(self.keys.cipher(object_id), raw[8:], self.keys.ad(kind, object_id))
        assert len(raw) == 8 + 12 + len(plain) + 16
        return decompress(plain, self.compression_types)

    def ids(self, folder: str) -> list[bytes]:  # section 8: only names of 64 hex characters
        d = self.root / folder
        names = sorted(os.listdir(d)) if d.is_dir() else []
        return [bytes.fromhex(n) for n in names if HEX_NAME.match(n)]

    def pack_path(self, pack_id: bytes) -> Path:
        h = pack_id.hex()
        return self.root / "data" / h[:2] / h

    def pack_ids(self) -> list[bytes]:
        return [bytes.fromhex(p.name) for p in sorted((self.root / "data").glob("*/*")) if HEX_NAME.match(p.name)]

    def load_index(self) -> dict[bytes, tuple[bytes, int, int, int, int]]:  # section 11
        files = []
        for iid in self.ids("index"):
            doc = unpack(self.read_object(f"index/{iid.hex()}", INDEX, iid))
            packs, records = doc["packs"], doc["records"]
            assert isinstance(records, bytes) and len(records) % 49 == 0
            assert all(isinstance(p, bytes) and len(p) == 32 for p in packs)
            rows = [records[i:i + 49] for i in range(0, len(records), 49)]
            assert rows == sorted(rows), "records sorted"
            files.append((iid, packs, rows, doc.get("supersedes", [])))
        gone = {s for _, _, _, sup in files for s in sup}
        index: dict[bytes, tuple[bytes, int, int, int, int]] = {}
        for iid, packs, rows, _ in files:
            if iid in gone:
                continue
            for row in rows:
                blob_id, pack_no, offset, length, raw_length, kind = struct.unpack(">32sIIIIB", row)
                if pack_no >= len(packs):
                    raise SpecError("pack number beyond the table")
                index.setdefault(blob_id, (packs[pack_no], offset, length, raw_length, kind))
        self.index_files = [f[0] for f in files]
        return index

    def tree_copy(self) -> dict[bytes, tuple[bytes, int, int, int, int]]:  # section 11, treeindex/
        index: dict[bytes, tuple[bytes, int, int, int, int]] = {}
        docs = {iid: unpack(self.read_object(f"treeindex/{iid.hex()}", INDEX, iid)) for iid in self.ids("treeindex")}
        gone = {s for doc in docs.values() for s in doc.get("supersedes", [])}
        for iid, doc in docs.items():
            if iid in gone:
                continue
            packs, records = doc["packs"], doc["records"]
            for i in range(0, len(records), 49):
                blob_id, pack_no, offset, length, raw_length, kind = struct.unpack(">32sIIIIB", records[i:i + 49])
                index.setdefault(blob_id, (packs[pack_no], offset, length, raw_length, kind))
        return index

    def snapshots(self) -> list[dict]:  # section 12
        out = []
        for sid in self.ids("snapshots"):
            doc = unpack(self.read_object(f"snapshots/{sid.hex()}", SNAPSHOT, sid))
            if doc["version"] != 1:
                raise SpecError("snapshot version")
            doc["id"] = sid
            out.append(doc)
        return sorted(out, key=lambda s: (s["time"], s["id"]))

    def read_blob(self, blob_id: bytes, kind: int) -> bytes:  # section 14 step 6
        pack_id, offset, length, raw_length, got = self.index[blob_id]
        if got != kind:
            raise SpecError(f"blob kind {got}, expected {kind}")
        with open(self.pack_path(pack_id), "rb") as f:
            f.seek(offset)
            sealed = f.read(length)
        plain = decompress(open_sealed(self.keys.cipher(pack_id), sealed, self.keys.ad(kind, blob_id)),
                           self.compression_types)
        if len(plain) != raw_length:
            raise SpecError("raw length")
        if not hmac.compare_digest(self.keys.blob_id(plain), blob_id):
            raise SpecError("content does not match its id")
        return plain

    def tree(self, tree_id: bytes) -> list[dict]:  # section 13
        doc = unpack(self.read_blob(tree_id, TREE))
        if doc["version"] != 1:
            raise SpecError("tree version")
        entries = doc["entries"]
        names = [e["name"] for e in entries]
        assert all(isinstance(n, bytes) for n in names)
        if any(a >= b for a, b in zip(names, names[1:], strict=False)):
            raise SpecError("entries not sorted")
        for e in entries:
            n = e["name"]
            if not n or b"/" in n or b"\0" in n or n in (b".", b".."):
                raise SpecError("unsafe name")
            if e["type"] not in NODE_TYPES:
                raise SpecError("unknown type")
            assert isinstance(e["mode"], int) and e["mode"] == e["mode"] & 0o7777
            if e["type"] == "f" and sum(size for _, size in e["chunks"]) != e["size"]:
                raise SpecError("chunk sizes")
            if e["type"] == "d":
                assert isinstance(e["subtree"], bytes) and len(e["subtree"]) == 32
            if e["type"] == "l":
                assert isinstance(e["target"], bytes)
        return entries

    def lookup(self, snap: dict, path: bytes) -> dict:  # section 14 step 7
        node = {"type": "d", "subtree": snap["tree"]}
        for part in [p for p in path.split(b"/") if p and p != b"."]:
            assert part != b".."
            assert node["type"] == "d"
            found = [e for e in self.tree(node["subtree"]) if e["name"] == part]
            if not found:
                raise KeyError(path)
            node = found[0]
        return node

    def file_bytes(self, node: dict, holes: list[int] | None = None) -> bytes:  # section 14 step 8
        out = bytearray()
        for chunk_id, size in node["chunks"]:
            if chunk_id is None:
                out += bytes(size)
                if holes is not None:
                    holes.append(size)
            else:
                data = self.read_blob(chunk_id, CHUNK)
                assert len(data) == size
                out += data
        assert len(out) == node["size"]
        return bytes(out)

    def walk(self, tree_id: bytes, prefix: bytes = b""):
        for e in self.tree(tree_id):
            p = e["name"] if not prefix else prefix + b"/" + e["name"]
            yield p, e
            if e["type"] == "d":
                yield from self.walk(e["subtree"], p)

    def pack_trailer(self, pack_id: bytes) -> list[list]:  # section 10
        data = self.pack_path(pack_id).read_bytes()
        check_preamble(data, PACK)
        (tlen,) = struct.unpack(">I", data[-4:])
        sealed = data[len(data) - 4 - tlen:-4]
        rows = unpack(decompress(open_sealed(self.keys.cipher(pack_id), sealed, self.keys.ad(TRAILER, pack_id))))
        pos = 8
        for blob_id, kind, offset, length, raw_length in rows:  # contiguous, in pack order
            assert offset == pos and kind in (CHUNK, TREE)
            assert len(blob_id) == 32 and raw_length >= 0
            pos += length
        assert pos == len(data) - 4 - tlen
        return rows


# -- section 15.1: the chunker (writer side), tables from the appendices ----------------------
def doc_table(name: str) -> list[int]:
    text = DOC.read_text()
    body = text.split(f"{name}_TABLE_BEGIN\n", 1)[1].split(f"\n{name}_TABLE_END", 1)[0]
    words = body.split()
    if name == "MASKS":
        assert [int(w) for w in words[0::2]] == list(range(26))
        words = words[1::2]
    return [int(w, 16) for w in words]


class Chunker:
    M = (1 << 64) - 1

    def __init__(self, params: dict, seed: int) -> None:
        gear, masks = doc_table("GEAR"), doc_table("MASKS")
        assert len(gear) == 256 and len(masks) == 26
        assert params["algorithm"] == "fastcdc2020"
        self.min, self.avg, self.max = params["min_size"], params["avg_size"], params["max_size"]
        nc = params["normalization"]
        bits = math.floor(math.log2(self.avg) + 0.5)
        self.mask_s, self.mask_l = masks[bits + nc], masks[bits - nc]
        self.mask_s_ls, self.mask_l_ls = (self.mask_s << 1) & self.M, (self.mask_l << 1) & self.M
        self.gear = [g ^ seed for g in gear]
        self.gear_ls = [((g << 1) & self.M) ^ ((seed << 1) & self.M) for g in gear]

    def cut(self, buf: bytes, start: int) -> int:
        n = len(buf) - start
        if n <= self.min:
            return n
        center = self.avg
        if n > self.max:
            n = self.max
        elif n < center:
            center = n
        h, M, g, gl = 0, self.M, self.gear, self.gear_ls
        for pos in range(self.min // 2 * 2, center // 2 * 2, 2):
            h = ((h << 2) + gl[buf[start + pos]]) & M
            if not h & self.mask_s_ls:
                return pos
            h = (h + g[buf[start + pos + 1]]) & M
            if not h & self.mask_s:
                return pos + 1
        for pos in range(center // 2 * 2, n // 2 * 2, 2):
            h = ((h << 2) + gl[buf[start + pos]]) & M
            if not h & self.mask_l_ls:
                return pos
            h = (h + g[buf[start + pos + 1]]) & M
            if not h & self.mask_l:
                return pos + 1
        return n

    def chunks(self, data: bytes) -> list[bytes]:
        if len(data) <= self.min:  # small files are one chunk
            return [data] if data else []
        out, pos = [], 0
        while pos < len(data):
            c = self.cut(data, pos)
            out.append(data[pos:pos + c])
            pos += c
        return out


# -- the source tree, as the file system shows it ---------------------------------------------
def xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def describe(path: bytes) -> dict:
    st = os.lstat(path)
    kind = next(t for t, fmt in NODE_TYPES.items() if stat.S_IFMT(st.st_mode) == fmt)
    d = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
         "mtime": st.st_mtime_ns, "xattrs": xattrs(path)}
    if kind == "f":
        with open(path, "rb") as f:
            d["data"] = f.read()
        d["sparse"] = st.st_blocks * 512 < st.st_size
        d["ino"] = st.st_ino if st.st_nlink > 1 else None
        d["nlink"] = st.st_nlink
    elif kind == "l":
        d["target"] = os.readlink(path)
    return d


def source_manifest(root: Path) -> dict[bytes, dict]:
    rb = os.fsencode(root)
    out = {b"": describe(rb)}
    for dirpath, dirnames, filenames in os.walk(rb):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, rb)] = describe(p)
    return out


def snapshot_manifest(reader: Reader, snap: dict, src: bytes, holes: list[int]) -> dict[bytes, dict]:
    def describe_node(e: dict) -> dict:
        d = {"type": e["type"], "mode": e["mode"], "uid": e["uid"], "gid": e["gid"],
             "mtime": e["mtime"], "xattrs": e.get("xattrs", {})}
        if "user" in e:
            assert e["user"] == pwd.getpwuid(e["uid"]).pw_name
        if e["type"] == "f":
            d["data"] = reader.file_bytes(e, holes)
            d["hardlink"] = e.get("hardlink", 0)
            d["nlink"] = e.get("nlink", 1)
        elif e["type"] == "l":
            d["target"] = e["target"]
        return d

    top = reader.lookup(snap, src)
    out = {b"": describe_node(top)}
    for rel, e in reader.walk(top["subtree"]):
        out[rel] = describe_node(e)
    return out


def compare(expected: dict[bytes, dict], got: dict[bytes, dict]) -> None:
    assert sorted(got) == sorted(expected)
    for rel, exp in expected.items():
        g = got[rel]
        for field in ("type", "mode", "uid", "gid", "mtime", "xattrs", "target"):
            assert g.get(field) == exp.get(field), (rel, field)
        if exp["type"] == "f":
            assert g["data"] == exp["data"], rel
            if exp["ino"] is not None:
                assert g["hardlink"] > 0 and g["nlink"] == exp["nlink"], rel
    # hardlink groups: the same names share an inode in the source and a number in the snapshot
    src_groups: dict[int, set] = {}
    snap_groups: dict[int, set] = {}
    for rel, exp in expected.items():
        if exp["type"] == "f" and exp["ino"] is not None:
            src_groups.setdefault(exp["ino"], set()).add(rel)
            snap_groups.setdefault(got[rel]["hardlink"], set()).add(rel)
    assert sorted(map(sorted, src_groups.values())) == sorted(map(sorted, snap_groups.values()))


def open_contract(home: Path, name: str) -> tuple[Path, Keys]:
    """Section 3 and 4: from the site directory to the repository and its keys."""
    site = json.loads((home / "kiwi.json").read_text())
    assert site["version"] == 1
    record = json.loads((home / "contracts" / f"{name}.json").read_text())
    location = site["locations"][record["locations"][0]]
    if location.startswith("file://"):
        location = location[len("file://"):]
    keystore = Path(site["keystore"]["path"])
    keystore = keystore if keystore.is_absolute() else home / keystore
    passphrase = os.environ["KIWI_RESTORE_PASSPHRASE"].encode()
    key = unwrap_contract_key(keystore, record["id"], passphrase)
    root = Path(location) if os.path.isabs(location) else home / location
    return root / "contracts" / record["id"], Keys(bytes.fromhex(record["id"]), key)


# -- the tests -------------------------------------------------------------------------------
def test_independent_reader_reads_every_file_of_every_snapshot(tmp_path, home, kiwi, contract):
    src = make_hostile_tree(tmp_path / "src")
    (src / "text.txt").write_bytes(b"".join(b"line %d of a compressible text file\n" % (i % 700)
                                            for i in range(6000)))
    (src / "exactly-min").write_bytes(os.urandom(64 << 10))
    (src / "min-plus-one").write_bytes(os.urandom((64 << 10) + 1))
    with open(src / "holes-everywhere", "wb") as f:  # holes first, between and last
        f.truncate(5 << 20)
        for at in (1 << 20, 3 << 20):
            f.seek(at)
            f.write(os.urandom(200_000))
    expected = [source_manifest(src)]
    kiwi("backup", contract, "-m", "pc1", str(src))

    (src / "text.txt").write_bytes(b"changed\n" * 10)
    (src / "new file").write_bytes(os.urandom(100_000))
    os.unlink(src / "min-plus-one")
    os.setxattr(src / "sub", b"user.dir", b"2")
    expected.append(source_manifest(src))
    kiwi("backup", contract, "-m", "pc1", str(src))
    kiwi("backup", contract, "-m", "pc2", str(src), "--time", "2020-03-01T10:00")  # oldest

    repo, keys = open_contract(home, contract)
    reader = Reader(repo, keys)
    assert reader.config["chunker"] == {"algorithm": "fastcdc2020", "min_size": 65536, "avg_size": 262144,
                                        "max_size": 1048576, "normalization": 1}
    assert len(reader.index_files) >= 2  # one per backup that stored something
    copy = reader.tree_copy()  # the trees' records again, and nothing else
    assert copy and copy == {b: loc for b, loc in reader.index.items() if loc[4] == TREE}
    assert reader.ids("locks") == []  # released

    snaps = reader.snapshots()
    assert [s["machine"] for s in snaps] == ["pc2", "pc1", "pc1"]  # ordered by time
    assert snaps[0]["time"] == int(datetime(2020, 3, 1, 10, tzinfo=UTC).timestamp()) * 10**9
    expected = [expected[1], expected[0], expected[1]]
    srcb = os.fsencode(src)
    holes: list[int] = []
    for snap, exp in zip(snaps, expected, strict=True):
        assert snap["paths"] == [srcb] and snap["hostname"] == socket.gethostname()
        assert snap["program"].startswith("kiwi-restore ") and snap["stats"]["files"] > 0
        assert isinstance(snap["tags"], list)
        # the root tree is "/", intermediate directories list only the way to the source path
        parts = [p for p in srcb.split(b"/") if p]
        node = {"type": "d", "subtree": snap["tree"]}
        for part in parts:
            entries = reader.tree(node["subtree"])
            assert [e["name"] for e in entries] == [part]
            node = entries[0]
        compare(exp, snapshot_manifest(reader, snap, srcb, holes))
    assert any(d["sparse"] for d in expected[1].values() if d["type"] == "f")
    assert holes, "sparse files must be stored with holes"

    # every blob: in a pack listed by its trailer, decrypts, and its id is HMAC(id_key, plaintext)
    by_pack: dict[bytes, set] = {}
    for blob_id, (pack_id, offset, length, raw_length, kind) in reader.index.items():
        reader.read_blob(blob_id, kind)
        by_pack.setdefault(pack_id, set()).add((blob_id, kind, offset, length, raw_length))
    assert sorted(by_pack) == sorted(reader.pack_ids())
    for pack_id, entries in by_pack.items():
        assert {tuple(r) for r in reader.pack_trailer(pack_id)} == entries
        kinds = {e[1] for e in entries}
        assert len(kinds) == 1  # the reference keeps chunks and trees apart
    assert reader.compression_types.get(0) and reader.compression_types.get(1)

    # the writer's chunker, built from section 15.1 and the appendices, finds the same chunks
    chunker = Chunker(reader.config["chunker"], keys.chunker_seed)
    first = snaps[1]
    for name in (b"big.bin", b"text.txt", b"exactly-min", b"min-plus-one", b"with space"):
        node = reader.lookup(first, srcb + b"/" + name)
        data = expected[1][name]["data"]
        assert [(keys.blob_id(c), len(c)) for c in chunker.chunks(data)] == [tuple(c) for c in node["chunks"]]
    assert len(reader.lookup(first, srcb + b"/big.bin")["chunks"]) > 3

    # refusals the specification requires
    with pytest.raises(SpecError, match="passphrase"):
        kek_from(home / "keystore", b"wrong passphrase")
    raw = (repo / "config").read_bytes()
    with pytest.raises(SpecError, match="version 2"):
        check_preamble(raw[:4] + b"\x00\x02" + raw[6:], CONFIG)
    some_chunk = next(b for b, loc in reader.index.items() if loc[4] == CHUNK)
    pack_id, offset, length, _, _ = reader.index[some_chunk]
    sealed = reader.pack_path(pack_id).read_bytes()[offset:offset + length]
    with pytest.raises(SpecError, match="authentication"):  # the kind is authenticated
        open_sealed(keys.cipher(pack_id), sealed, keys.ad(TREE, some_chunk))
    with pytest.raises(SpecError, match="authentication"):  # so is the pack (its key)
        open_sealed(keys.cipher(ZERO_ID), sealed, keys.ad(CHUNK, some_chunk))


def test_worked_example_vectors():
    """Section 16: the reader's primitives reproduce the document's test vectors."""
    doc = re.sub(r"\s", "", DOC.read_text())

    def in_doc(value: str) -> str:
        assert value in doc, value
        return value

    keys = Keys(bytes.fromhex("0123456789abcdef0123456789abcdef"), bytes(range(32)))
    assert keys.data_key.hex() == in_doc("fe7214f06dd913ea9a24ef57f0d623ed876f1e52a8d853638552043ffb4cfbae")
    assert keys.id_key.hex() == in_doc("91c1a203952174c6ab73056e02dafa3c8737df81c4769f719f427cec41d4f940")
    assert keys.audit_key.hex() == in_doc("036d0db7ab295fec8c35fc0acf4320020fe0436c3a0720a98d3f7f8af37defab")
    assert keys.chunker_raw.hex() == in_doc("7125abbe494db9a1")
    assert keys.chunker_seed == int(in_doc("0x3892d5df24a6dcd0"), 16) == 4076555767093058768
    assert keys.file_key(ZERO_ID).hex() == in_doc("1cbfa186d8bc243cafc94509cf740f759296f21070041111973f7f0af8290f09")
    pack_id = b"\xaa" * 32
    assert keys.file_key(pack_id).hex() == in_doc("0abbaaf6d0725be6dbdb6aa2d37ac8a478ac7d09754ce94fd09780a96c3e4cbb")

    chunk = b"hello, kiwi\n"
    blob_id = keys.blob_id(chunk)
    assert blob_id.hex() == in_doc("ed69c851b842b1db003f6c1db1654ef9d3e51af0a7dac5735f8da887752adc57")
    assert keys.ad(CHUNK, blob_id).hex() == in_doc(
        "4b4957490001030123456789abcdef0123456789abcdefed69c851b842b1db003f6c1db1654ef9d3e51af0a7dac5735f8da887752adc57")
    nonce = bytes(range(12))
    sealed = nonce + keys.cipher(pack_id).encrypt(nonce, b"\x00" + chunk, keys.ad(CHUNK, blob_id))
    assert sealed.hex() == in_doc("000102030405060708090a0b2a5e0b6092f7687070d9f0c9282e371e963205959b58e057ed8099b2e2")

    pack = bytes.fromhex(in_doc(
        "4b49574900010200000102030405060708090a0b2a5e0b6092f7687070d9f0c9"
        "282e371e963205959b58e057ed8099b2e20c0d0e0f1011121314151617684f38"
        "6d17ed7d0d19ea3bdb1458b5b9425d313721a7e20be125649bddf2a22d93f73f"
        "b55bbd1d49e6879b7e2d6b15f92f43132380b50fba6300000045"))
    check_preamble(pack, PACK)
    (tlen,) = struct.unpack(">I", pack[-4:])
    assert tlen == 69 and len(pack) == 122
    trailer = open_sealed(keys.cipher(pack_id), pack[-4 - tlen:-4], keys.ad(TRAILER, pack_id))
    assert trailer.hex() == in_doc("009195c420ed69c851b842b1db003f6c1db1654ef9d3e51af0a7dac5735f8da887752adc570308290c")
    [[bid, kind, offset, length, raw_length]] = unpack(decompress(trailer))
    assert (bid, kind, offset, length, raw_length) == (blob_id, CHUNK, 8, 41, 12)
    plain = open_sealed(keys.cipher(pack_id), pack[offset:offset + length], keys.ad(kind, bid))
    assert decompress(plain) == chunk

    index = msgpack.packb({"packs": [pack_id], "records": struct.pack(">32sIIIIB", blob_id, 0, 8, 41, 12, CHUNK),
                           "supersedes": []}, use_bin_type=True)
    assert len(index) == 113 and index.startswith(bytes.fromhex("83a57061636b7391c420"))

    node = {"name": b"hello.txt", "type": "f", "mode": 0o644, "uid": 1000, "gid": 1000,
            "mtime": 1700000000123456789, "atime": 1700000000123456789, "ctime": 1700000000123456789,
            "user": "alice", "group": "alice", "size": 12, "chunks": [[blob_id, 12]]}
    tree = msgpack.packb({"version": 1, "entries": [node]}, use_bin_type=True)
    assert len(tree) == 183
    assert keys.blob_id(tree).hex() == in_doc("1167d3179e52eff76e21df8b516f0a18e7ca02e791f31d33288159dec7927c51")

    kek = Argon2id(salt=base64.b64decode(in_doc("AAECAwQFBgcICQoLDA0ODw==")), length=32, iterations=1,
                   lanes=1, memory_cost=8192).derive(b"correct horse battery staple")
    assert kek.hex() == in_doc("9aeef75313e585f492c33c5e12d82e9ad253b7dd78632d537e899cd4eddd789c")
    check = base64.b64decode(in_doc("JCUmJygpKissLS4v+qM7qXEKbQYmk+qsR/AK9HOMOVyw29s1o3mD1nm66j/v5GgIznzuTQ=="))
    assert AESGCM(kek).decrypt(check[:12], check[12:], b"kiwi-restore/v1/keystore-check") == b"kiwi-restore keystore v1"
    wrapped = base64.b64decode(in_doc("GBkaGxwdHh8gISIj5SiXO+DlNfFq/lrRHiJWGMsaA4lqg8gOnpDRLkhXnDkJhietaims4hETdyKlZe+l"))
    assert wrapped[:12] == bytes(range(24, 36)) and len(wrapped) == 60
    assert AESGCM(kek).decrypt(wrapped[:12], wrapped[12:],
                               b"kiwi-restore/v1/wrap/contract/0123456789abcdef0123456789abcdef") == bytes(range(32))
