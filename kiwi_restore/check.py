"""Repository check: every reference resolves; with read_data every blob decrypts and authenticates.

Problems name the object and, for chunks and trees, the files they affect.
"""

from __future__ import annotations

import hmac
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .crypto import KIND_NAMES
from .errors import IntegrityError, KiwiError
from .index import BlobLocation
from .repository import Repository
from .snapshot import Snapshot
from .tree import TYPE_DIR, TYPE_FILE, Node, decode_tree


@dataclass
class CheckReport:
    snapshots: int = 0
    trees: int = 0
    files: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check(repo: Repository, read_data: bool = False,
          progress: Callable[[int], None] | None = None) -> CheckReport:
    rep = CheckReport()
    try:
        snaps = repo.list_snapshots()
    except IntegrityError as exc:
        rep.problems.append(str(exc))
        snaps = []
        for sid, _ in repo._ids("snapshots"):
            try:
                snaps.append(repo.load_snapshot(sid))
            except IntegrityError as e:
                rep.problems.append(str(e))
    rep.snapshots = len(snaps)
    copies = repo.list_tree_index()  # before the index: each copy's index file is then read
    index = repo.load_index()
    rep.problems.extend(repo.tree_index_problems(copies))
    packs = dict(repo.list_packs())
    rep.packs = len(packs)

    bad: dict[bytes, str] = {}  # blob id -> why it cannot be read
    by_pack: dict[bytes, list[BlobLocation]] = defaultdict(list)
    for loc in index.all_locations():
        by_pack[loc.pack_id].append(loc)
        rep.blobs += 1
    for pack_id, locs in by_pack.items():
        size = packs.get(pack_id)
        if size is None:
            rep.problems.append(f"pack {pack_id.hex()} is missing ({len(locs)} blobs of the index point to it)")
            for loc in locs:
                bad[loc.blob_id] = f"pack {pack_id.hex()} missing"
            continue
        for loc in locs:
            if loc.offset + loc.length > size:
                rep.problems.append(f"{KIND_NAMES[loc.kind]} {loc.blob_id.hex()}: beyond the end of pack {pack_id.hex()} (truncated pack)")
                bad[loc.blob_id] = f"pack {pack_id.hex()} truncated"
    for pack_id in packs:
        if pack_id not in by_pack:
            rep.notes.append(f"pack {pack_id.hex()} is not referenced by the index (left by an interrupted backup)")

    if read_data:
        for pack_id, locs in by_pack.items():
            size = packs.get(pack_id)
            if size is None:
                continue
            try:
                data = repo.backend.get(repo.pack_key(pack_id))
            except KiwiError as exc:
                rep.problems.append(f"pack {pack_id.hex()}: {exc}")
                for loc in locs:
                    bad[loc.blob_id] = "unreadable pack"
                continue
            rep.bytes_read += len(data)
            try:
                trailer = {(e.blob_id, e.offset) for e in repo.read_pack_trailer(pack_id, size)}
            except KiwiError as exc:
                rep.problems.append(str(exc))
                trailer = None
            for loc in locs:
                if loc.blob_id in bad:
                    continue
                try:
                    plain = repo.open_blob(loc, data[loc.offset:loc.offset + loc.length])
                    if not hmac.compare_digest(repo.keys.blob_id(plain), loc.blob_id):
                        raise IntegrityError(f"{KIND_NAMES[loc.kind]} {loc.blob_id.hex()}: content does not match its id")
                    if trailer is not None and (loc.blob_id, loc.offset) not in trailer:
                        rep.notes.append(f"{KIND_NAMES[loc.kind]} {loc.blob_id.hex()}: not listed in its pack's trailer")
                except IntegrityError as exc:
                    rep.problems.append(str(exc))
                    bad[loc.blob_id] = "corrupt"
            if progress:
                progress(len(data))

    seen_trees: set[bytes] = set()
    affected: dict[str, None] = {}

    def visit(snap: Snapshot, tree_id: bytes, path: str) -> None:
        if tree_id in seen_trees:
            return
        seen_trees.add(tree_id)
        rep.trees += 1
        loc = index.find(tree_id)
        if loc is None or tree_id in bad:
            why = bad.get(tree_id, "not in the index")
            rep.problems.append(f"tree {tree_id.hex()} ({why}): directory {path or '/'} of snapshot {snap.short} and everything below it")
            affected[f"{snap.short}:{path or '/'}"] = None
            return
        try:
            nodes: list[Node] = decode_tree(repo.open_blob(loc, repo.read_sealed(loc)), f"tree {tree_id.hex()}")
        except IntegrityError as exc:
            rep.problems.append(f"{exc}: directory {path or '/'} of snapshot {snap.short}")
            affected[f"{snap.short}:{path or '/'}"] = None
            return
        for n in nodes:
            p = f"{path}/{n.name.decode('utf-8', 'backslashreplace')}"
            if n.type == TYPE_DIR:
                visit(snap, n.subtree, p)
            elif n.type == TYPE_FILE:
                rep.files += 1
                for cid, _size in n.chunks:
                    if cid is None:
                        continue
                    if cid in bad:
                        affected[f"{snap.short}:{p}"] = None
                    elif index.find(cid) is None:
                        bad[cid] = "not in the index"
                        rep.problems.append(f"chunk {cid.hex()} is not in the index")
                        affected[f"{snap.short}:{p}"] = None

    for snap in snaps:
        visit(snap, snap.tree, "")
    # Tree ids are shared between snapshots: files under an unchanged damaged directory are
    # named once, under the first snapshot that holds them.
    rep.damaged_files = list(affected)
    failovers = getattr(repo.backend, "failovers", None)  # a replicated contract's reads
    if failovers:
        rep.notes.append(f"{len(failovers)} objects were read from another location than the primary "
                         f"(first: {failovers[0]['key']} in {failovers[0]['failed']}: {failovers[0]['reason'][:120]}); "
                         "run check --locations and repair")
    for f in rep.damaged_files[:1000]:
        rep.problems.append(f"damaged file: {f}")
    return rep


