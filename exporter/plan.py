"""What an export writes, in a deterministic order: content objects, then tag files.

Layout at the destination (docs/EXPORT.md):

    bagit   bagit.txt  bag-info.txt  manifest-sha{256,512}.txt  tagmanifest-sha{256,512}.txt
            data/<machine>/<snapshot time>/<original paths>      (payload: plain files)
            metadata/<machine>/<snapshot time>.jsonl              (modes, owners, ns times, xattrs,
                                                                   links, holes, special files)
    tree    as bagit without the bag files, plus SHA256SUMS
    tar     archives/<machine>/<snapshot time>.tar (or archives/<contract>.tar) + SHA256SUMS
    zip     archives/<machine>/<snapshot time>.zip + metadata/... + SHA256SUMS
    all     inventory.json  inventory.csv  names.jsonl  docs/FORMAT.md  docs/EXPORT.md
            export-report.{json,canonical.json,sig,en.md,fr.md}  provider-public-key.pem

Objects are numbered by their position in this order; the journal keys on that number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..repository import Repository
from ..site import ContractRecord
from ..snapshot import Snapshot
from ..tree import TYPE_DIR, TYPE_FILE, TYPE_SYMLINK, Node
from .fetch import Prefetcher, walk_ahead
from .formats import (
    Sink,
    TarWriter,
    file_content,
    file_wanted,
    metadata_line,
    snapshot_entries,
    write_zip,
)
from .journal import Digest
from .names import encode_path, long_key

FORMATS = ("bagit", "tar", "zip", "tree")
REPORT_STEM = "export-report"
REPORT_FILES = (f"{REPORT_STEM}.json", f"{REPORT_STEM}.canonical.json", f"{REPORT_STEM}.sig",
                f"{REPORT_STEM}.en.md", f"{REPORT_STEM}.fr.md", "provider-public-key.pem")
DOCS = ("FORMAT.md", "EXPORT.md")


@dataclass
class Item:
    key: str
    produce: Callable[[Sink], None]
    size_hint: int = 0
    files: int = 0
    payload: bool = False  # a BagIt payload file (manifest-*.txt, Payload-Oxum)
    node: Node | None = None  # a file's node: its content is exactly this node's bytes


@dataclass
class SnapStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    other: int = 0
    bytes: int = 0
    hardlinked: int = 0
    renamed: int = 0


@dataclass
class Plan:
    repo: Repository
    rec: ContractRecord
    snaps: list[Snapshot]
    fmt: str
    started: str  # ISO time of the job's first run (fixed across resumes)
    max_key: int = 1024
    tar_per_contract: bool = False
    pool: Executor | None = None
    organization: str = "kiwi-restore"
    warnings: list[str] = field(default_factory=list)
    _bases: dict = field(default_factory=dict, repr=False)
    _inventory: dict | None = field(default=None, repr=False)

    # -- keys ------------------------------------------------------------------------------
    def snap_base(self, s: Snapshot) -> str:
        base = self._bases.get(s.id)
        if base is None:
            base = self._bases[s.id] = f"{s.machine}/{s.dirname()}"
        return base

    def file_key(self, s: Snapshot, path: bytes) -> tuple[str, bool]:
        base = "data/" + self.snap_base(s)
        rel, changed = encode_path(path)
        key = f"{base}/{rel}"
        if len(key.encode()) > self.max_key:
            return long_key(base, path), True
        return key, changed

    @property
    def roots(self) -> list[str]:
        """The manifests the signed report pins; everything else hangs from them."""
        return ["tagmanifest-sha256.txt", "tagmanifest-sha512.txt"] if self.fmt == "bagit" else ["SHA256SUMS"]

    # -- content -----------------------------------------------------------------------------
    def content(self) -> Iterator[Item]:
        if self.fmt == "tar":
            yield from self._tar_items()
            return
        for kind, s, node, key in self._content_specs():
            if kind == "file":
                yield Item(key, self._file_producer(node), size_hint=node.size, files=1,
                           payload=self.fmt == "bagit", node=node)
            elif kind == "zip":
                yield Item(key, self._zip_producer(s), size_hint=int(s.stats.get("bytes", 0) * 1.02) + (1 << 20),
                           files=s.stats.get("files", 0))
            else:
                yield Item(key, self._sidecar_producer(s))

    def content_keys(self) -> Iterator[tuple[str, bool]]:
        """(key, payload) of every content object, in content()'s order, without building Items."""
        if self.fmt == "tar":
            for it in self._tar_items():
                yield it.key, it.payload
            return
        bagit = self.fmt == "bagit"
        for kind, _s, _node, key in self._content_specs():
            yield key, bagit and kind == "file"

    def _content_specs(self) -> Iterator[tuple[str, Snapshot, Node | None, str]]:
        for s in self.snaps:
            if self.fmt == "zip":
                yield "zip", s, None, f"archives/{self.snap_base(s)}.zip"
            else:
                for path, node in snapshot_entries(self.repo, s.tree):
                    if node.type == TYPE_FILE:
                        yield "file", s, node, self.file_key(s, path)[0]
            yield "sidecar", s, None, f"metadata/{self.snap_base(s)}.jsonl"

    def _file_producer(self, node) -> Callable[[Sink], None]:
        return lambda sink: file_content(self.repo, node, sink, self.pool)

    def _zip_producer(self, s: Snapshot) -> Callable[[Sink], None]:
        def produce(sink: Sink) -> None:
            self.warnings.extend(write_zip(self.repo, s.tree, sink, self.pool))
        return produce

    def _tar_items(self) -> Iterator[Item]:
        def produce_for(snaps: list[Snapshot], prefixed: bool) -> Callable[[Sink], None]:
            def produce(sink: Sink) -> None:
                tw = TarWriter(sink)
                pf = Prefetcher(self.repo, self.pool)
                try:
                    for s in snaps:
                        prefix = (self.snap_base(s) + "/").encode() if prefixed else b""
                        links: dict[int, bytes] = {}
                        entries = walk_ahead(pf, snapshot_entries(self.repo, s.tree), file_wanted())
                        for path, node, ticket in entries:
                            tw.add(self.repo, prefix + path.lstrip(b"/"), node, links, self.pool, pf, ticket)
                finally:
                    pf.close()
                tw.close()
                self.warnings.extend(tw.warnings)
            return produce

        def hint(snaps: list[Snapshot]) -> int:
            return sum(int(s.stats.get("bytes", 0) * 1.02) + 1024 * s.stats.get("files", 0) for s in snaps) + (1 << 20)

        if self.tar_per_contract:
            yield Item(f"archives/{self.rec.name}.tar", produce_for(self.snaps, True), hint(self.snaps),
                       files=sum(s.stats.get("files", 0) for s in self.snaps))
            return
        for s in self.snaps:
            yield Item(f"archives/{self.snap_base(s)}.tar", produce_for([s], False), hint([s]),
                       files=s.stats.get("files", 0))

    def _sidecar_producer(self, s: Snapshot) -> Callable[[Sink], None]:
        def produce(sink: Sink) -> None:
            for path, node in snapshot_entries(self.repo, s.tree):
                exported = None
                if node.type == TYPE_FILE and self.fmt in ("bagit", "tree"):
                    exported = self.file_key(s, path)[0]
                elif self.fmt == "zip" and node.type in (TYPE_FILE, TYPE_DIR, TYPE_SYMLINK):
                    exported = encode_path(path)[0] + ("/" if node.type == TYPE_DIR else "")
                line = metadata_line(path, node, exported)
                sink.write(json.dumps(line, ensure_ascii=False, sort_keys=True).encode() + b"\n")
        return produce

    # -- statistics (inventory) -----------------------------------------------------------------
    def snap_stats(self, s: Snapshot) -> SnapStats:
        st = SnapStats()
        for path, node in snapshot_entries(self.repo, s.tree):
            if node.type == TYPE_FILE:
                st.files += 1
                st.bytes += node.size
                st.hardlinked += bool(node.hardlink)
            elif node.type == TYPE_DIR:
                st.dirs += 1
            elif node.type == TYPE_SYMLINK:
                st.symlinks += 1
            else:
                st.other += 1
            if self.fmt != "tar" and encode_path(path)[1]:
                st.renamed += 1
        return st

    # -- tag files --------------------------------------------------------------------------------
    def final(self, count: int, digest: Callable[[int], Digest]) -> list[Item]:
        """The tag files, in order; COUNT content objects precede them, DIGEST(index) gives
        the digest of any object already written (content or an earlier tag file)."""
        items: list[Item] = []
        index_of: dict[str, int] = {}

        def add(key: str, produce: Callable[[Sink], None]) -> None:
            index_of[key] = count + len(items)
            items.append(Item(key, produce))

        add("inventory.json", lambda sink: sink.write(self._inventory_json()))
        add("inventory.csv", lambda sink: sink.write(self._inventory_csv()))
        add("names.jsonl", self._names)
        for name in DOCS:
            text = doc_text(name)
            if text is None:
                self.warnings.append(f"docs/{name} not found; not included")
                continue
            add(f"docs/{name}", lambda sink, t=text: sink.write(t))

        def listed() -> Iterator[tuple[str, Digest, bool]]:
            for i, (key, payload) in enumerate(self.content_keys()):
                yield key, digest(i), payload
            for k, i in index_of.items():
                if k not in ("SHA256SUMS",) and not k.startswith("tagmanifest-"):
                    yield k, digest(i), False

        if self.fmt != "bagit":
            def sums(sink: Sink) -> None:
                for key, d, _ in listed():
                    sink.write(sha256sum_line(d.sha256.hex(), key))
            add("SHA256SUMS", sums)
            return items

        # the content objects that are tag files (metadata sidecars), by index: found while a
        # manifest is written, or by a walk of their own when the manifests were done by an
        # earlier run
        tags: list[tuple[int, str]] | None = None

        def tag_objects() -> list[tuple[int, str]]:
            nonlocal tags
            if tags is None:
                tags = [(i, key) for i, (key, payload) in enumerate(self.content_keys()) if not payload]
            return tags

        def manifest(alg: str) -> Callable[[Sink], None]:
            def produce(sink: Sink) -> None:
                nonlocal tags
                found = []
                for i, (key, payload) in enumerate(self.content_keys()):
                    if payload:
                        sink.write(bagit_line(_hex(digest(i), alg), key))
                    else:
                        found.append((i, key))
                tags = found
            return produce

        add("manifest-sha256.txt", manifest("sha256"))
        add("manifest-sha512.txt", manifest("sha512"))
        add("bag-info.txt", lambda sink: sink.write(self._bag_info(count, digest, tag_objects())))
        add("bagit.txt", lambda sink: sink.write(b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"))

        def tagmanifest(alg: str) -> Callable[[Sink], None]:
            def produce(sink: Sink) -> None:
                for i, key in tag_objects():
                    sink.write(bagit_line(_hex(digest(i), alg), key))
                for k, i in index_of.items():
                    if not k.startswith("tagmanifest-"):
                        sink.write(bagit_line(_hex(digest(i), alg), k))
            return produce

        add("tagmanifest-sha256.txt", tagmanifest("sha256"))
        add("tagmanifest-sha512.txt", tagmanifest("sha512"))
        return items

    def _names(self, sink: Sink) -> None:
        """Every stored path whose exported name differs (safe-name encoding), reversibly."""
        import base64

        if self.fmt == "tar":
            return  # tar keeps the stored bytes
        for s in self.snaps:
            for path, node in snapshot_entries(self.repo, s.tree):
                if self.fmt == "zip":
                    exported, changed = encode_path(path)
                    exported = f"archives/{self.snap_base(s)}.zip:{exported}"
                else:
                    exported, changed = self.file_key(s, path) if node.type == TYPE_FILE else encode_path(path)
                if changed:
                    line = {"snapshot": s.hex, "machine": s.machine, "path_b64": base64.b64encode(path).decode(),
                            "path": path.decode("utf-8", "backslashreplace"), "exported": exported}
                    sink.write(json.dumps(line, ensure_ascii=False, sort_keys=True).encode() + b"\n")

    def inventory(self) -> dict:
        if self._inventory is None:
            self._inventory = self._compute_inventory()
        return self._inventory

    def _compute_inventory(self) -> dict:
        snaps = []
        totals = SnapStats()
        for s in self.snaps:
            st = self.snap_stats(s)
            for f in ("files", "dirs", "symlinks", "other", "bytes", "hardlinked", "renamed"):
                setattr(totals, f, getattr(totals, f) + getattr(st, f))
            snaps.append({"id": s.hex, "machine": s.machine, "hostname": s.hostname, "time": s.iso(),
                          "directory": self.snap_base(s), "paths": [p.decode("utf-8", "backslashreplace") for p in s.paths],
                          "tags": s.tags, "files": st.files, "dirs": st.dirs, "symlinks": st.symlinks,
                          "other": st.other, "bytes": st.bytes, "hardlinked_files": st.hardlinked,
                          "renamed": st.renamed})
        return {"type": "kiwi-restore export inventory", "version": 1,
                "contract": {"id": self.rec.id, "name": self.rec.name, "offer": self.rec.offer, "client": self.rec.client},
                "format": self.fmt, "export_started": self.started, "tool": f"kiwi-restore {__version__}",
                "machines": sorted({s.machine for s in self.snaps}), "snapshots": snaps,
                "totals": {"snapshots": len(snaps), "files": totals.files, "dirs": totals.dirs,
                           "symlinks": totals.symlinks, "other": totals.other, "bytes": totals.bytes,
                           "renamed": totals.renamed}}

    def _inventory_json(self) -> bytes:
        return json.dumps(self.inventory(), ensure_ascii=False, indent=1, sort_keys=True).encode() + b"\n"

    def _inventory_csv(self) -> bytes:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        cols = ["machine", "id", "time", "hostname", "directory", "files", "dirs", "symlinks", "other", "bytes"]
        w.writerow(cols)
        for s in self.inventory()["snapshots"]:
            w.writerow([s[c] for c in cols])
        return out.getvalue().encode()

    def _bag_info(self, count: int, digest: Callable[[int], Digest], tags: list[tuple[int, str]]) -> bytes:
        tag_index = {i for i, _ in tags}
        nbytes = nfiles = 0
        for i in range(count):
            if i not in tag_index:
                nbytes += digest(i).size
                nfiles += 1
        machines = sorted({s.machine for s in self.snaps})

        def one_line(v: str) -> str:
            return " ".join(v.split())

        fields = [
            ("Source-Organization", self.organization),
            ("Bagging-Date", self.started[:10]),
            ("Bag-Software-Agent", f"kiwi-restore {__version__}"),
            ("External-Identifier", self.rec.name),
            ("Bag-Group-Identifier", self.rec.id),
            ("Bag-Count", "1 of 1"),
            ("Payload-Oxum", f"{nbytes}.{nfiles}"),
            ("Internal-Sender-Identifier", self.rec.id),
            ("Internal-Sender-Description", f"Reversibility export of contract {self.rec.name} "
                                            f"(offer {self.rec.offer}): {len(self.snaps)} snapshots of "
                                            f"{len(machines)} machines"),
            ("Contract-Id", self.rec.id),
            ("Contract-Name", self.rec.name),
            ("Contract-Offer", self.rec.offer),
            ("Contract-Client", self.rec.client or "-"),
            ("Machines", ", ".join(machines)),
            ("Snapshot-Count", str(len(self.snaps))),
            ("Metadata-Sidecars", "metadata/<machine>/<snapshot>.jsonl (modes, owners, ns times, xattrs, links)"),
        ]
        return "".join(f"{k}: {one_line(v)}\n" for k, v in fields).encode()


def _hex(d: Digest, alg: str) -> str:
    return (d.sha256 if alg == "sha256" else d.sha512).hex()


def bagit_line(hexdigest: str, path: str) -> bytes:
    """RFC 8493 §2.1.3: percent-encode %, CR and LF in manifest paths."""
    p = path.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"{hexdigest}  {p}\n".encode()


def sha256sum_line(hexdigest: str, path: str) -> bytes:
    """GNU coreutils format: a name with a backslash or newline is escaped, line starts with '\\'."""
    if "\\" in path or "\n" in path or "\r" in path:
        p = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{hexdigest}  {p}\n".encode()
    return f"{hexdigest}  {path}\n".encode()


def doc_text(name: str) -> bytes | None:
    """docs/NAME from the source tree (editable install) or the installed data files."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "docs" / name, Path(sys.prefix) / "share" / "doc" / "kiwi-restore" / name,
                 Path(os.environ.get("KIWI_RESTORE_DOCS", "/nonexistent")) / name):
        if cand.is_file():
            return cand.read_bytes()
    return None
