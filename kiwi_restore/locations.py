"""Compare a contract's storage locations and repair one from another (Santé Art. 2.3).

`compare` lists what differs between the locations: objects missing from one, extra in
one, of another size, or (with read_data) of other content, and for each differing copy
whether it authenticates. `repair` copies every missing or damaged object from a location
whose copy decrypts and authenticates, under the repository's writer lock.
Lock objects (locks/) are transient per writer and are not compared.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .crypto import ID_SIZE, KIND_CONFIG, KIND_INDEX, KIND_SNAPSHOT
from .errors import BackendError, IntegrityError, KiwiError, NotFound, ObjectExists
from .repository import CONFIG_ID, RepoConfig, Repository
from .site import ContractRecord, Site
from .storage.base import Backend, ObjectInfo

FOLDER_KINDS = {"index": KIND_INDEX, "treeindex": KIND_INDEX, "snapshots": KIND_SNAPSHOT}


class _OneObject(Backend):
    """Serves one object's bytes already read, so the repository's own readers verify them."""

    def __init__(self, key: str, data: bytes) -> None:
        self.key, self.data, self.url = key, data, "memory"

    def get(self, key: str) -> bytes:
        if key != self.key:
            raise NotFound(key)
        return self.data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.get(key)[offset:offset + length]
        if len(data) != length:
            raise BackendError(f"short read of {key}")
        return data

    def put(self, key: str, data: bytes) -> None:
        raise BackendError("read-only")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(())

    def delete(self, key: str) -> None:
        raise BackendError("read-only")


def verify_object(site_repo: Repository, key: str, data: bytes) -> None:
    """Raise IntegrityError unless DATA is an authentic copy of object KEY (relative to the
    contract's prefix): every blob of a pack, or the whole sealed file, decrypts and
    authenticates under the contract's key, with the id its name says."""
    repo = Repository(_OneObject(site_repo.prefix + key, data), site_repo.prefix, site_repo.keys,
                      site_repo.config)
    folder, _, name = key.partition("/")
    if key == "config":
        repo._get_object("config", KIND_CONFIG, CONFIG_ID)
        return
    try:
        oid = bytes.fromhex(name.rsplit("/", 1)[-1])
    except ValueError:
        raise IntegrityError(f"{key}: not a repository object name") from None
    if len(oid) != ID_SIZE:
        raise IntegrityError(f"{key}: not a repository object name")
    if folder in FOLDER_KINDS:
        repo._get_object(key, FOLDER_KINDS[folder], oid)
        return
    if folder != "data":
        raise IntegrityError(f"{key}: unknown object kind")
    for loc in repo.read_pack_trailer(oid, len(data)):
        plain = repo.open_blob(loc, data[loc.offset:loc.offset + loc.length])
        if not hmac.compare_digest(repo.keys.blob_id(plain), loc.blob_id):
            raise IntegrityError(f"{key}: blob {loc.blob_id.hex()} does not match its id")


@dataclass
class LocationDiff:
    locations: list[str]
    objects: int = 0
    differences: list[dict] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differences and not self.unreachable

    def to_dict(self) -> dict:
        return {"locations": self.locations, "objects": self.objects, "ok": self.ok,
                "differences": self.differences, "unreachable": self.unreachable}


def _listing(backend: Backend, prefix: str) -> dict[str, int]:
    return {i.key[len(prefix):]: i.size for i in backend.list(prefix) if not i.key[len(prefix):].startswith("locks/")}


def _repo_for(site: Site, rec: ContractRecord, keys=None) -> Repository:
    """A Repository object bound to the keys, to verify copies (the config is not read)."""
    keys = keys or site.contract_keys(rec)
    return Repository(site.backend(rec.locations[0]), rec.prefix, keys, RepoConfig(keys.contract_id, 0, {}))


def compare(site: Site, rec: ContractRecord, read_data: bool = False,
            progress: Callable[[int], None] | None = None) -> LocationDiff:
    """What differs between REC's locations; with READ_DATA, content digests and authentication."""
    prefix = rec.prefix + "/"
    diff = LocationDiff(list(rec.locations))
    listings: dict[str, dict[str, int]] = {}
    for name in rec.locations:
        try:
            listings[name] = _listing(site.backend(name), prefix)
        except KiwiError as exc:
            diff.unreachable[name] = str(exc)
    if not listings:
        return diff
    keys = sorted(set().union(*listings.values()))
    diff.objects = len(keys)
    repo = _repo_for(site, rec) if read_data else None
    for key in keys:
        holders = [n for n in listings if key in listings[n]]
        # Symmetric: an object in A and not in B is "missing" in B (B is the one to repair),
        # whether A is the primary or a replica.
        for name in listings:
            if key not in listings[name]:
                diff.differences.append({"key": prefix + key, "location": name, "problem": "missing",
                                         "detail": f"present in {', '.join(holders)}"})
        sizes = {n: listings[n][key] for n in holders}
        if len(set(sizes.values())) > 1:
            diff.differences.append({"key": prefix + key, "location": ",".join(holders), "problem": "size",
                                     "detail": ", ".join(f"{n}={s}" for n, s in sizes.items())})
        if repo is not None:
            digests: dict[str, str] = {}
            verdict: dict[str, str] = {}
            for n in holders:
                try:
                    data = site.backend(n).get(prefix + key)
                except KiwiError as exc:
                    digests[n], verdict[n] = "unreadable", str(exc)
                    continue
                if progress:
                    progress(len(data))
                digests[n] = hashlib.sha256(data).hexdigest()
                try:
                    verify_object(repo, key, data)
                    verdict[n] = "authentic"
                except IntegrityError as exc:
                    verdict[n] = f"fails authentication: {exc}"
            for n in holders:
                if verdict[n] != "authentic":
                    diff.differences.append({"key": prefix + key, "location": n, "problem": "corrupt",
                                             "detail": verdict[n], "sha256": digests[n]})
            if len(set(digests.values())) > 1 and all(v == "authentic" for v in verdict.values()):
                diff.differences.append({"key": prefix + key, "location": ",".join(holders), "problem": "content",
                                         "detail": ", ".join(f"{n}={d[:16]}" for n, d in digests.items())})
    return diff


@dataclass
class RepairReport:
    copied: list[dict] = field(default_factory=list)
    unrepairable: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unrepairable

    def to_dict(self) -> dict:
        return {"copied": self.copied, "unrepairable": self.unrepairable, "ok": self.ok}


def repair(site: Site, rec: ContractRecord, progress: Callable[[int], None] | None = None) -> RepairReport:
    """Make every location hold an authentic copy of every object, copying from a location
    whose copy authenticates. Holds the writer lock: a backup writing meanwhile would
    otherwise meet objects it has not finished writing everywhere."""
    if len(rec.locations) < 2:
        return RepairReport()
    prefix = rec.prefix + "/"
    report = RepairReport()
    replicated = site.open_repository(rec)
    repo = _repo_for(site, rec, replicated.keys)
    with replicated.lock():
        listings = {n: _listing(site.backend(n), prefix) for n in rec.locations}
        for key in sorted(set().union(*listings.values())):
            copies: dict[str, bytes | None] = {}
            good: bytes | None = None
            source = None
            for n in rec.locations:
                if key not in listings[n]:
                    continue
                try:
                    data = site.backend(n).get(prefix + key)
                    verify_object(repo, key, data)
                except NotFound:
                    copies[n] = None
                    continue
                except IntegrityError:
                    copies[n] = None  # present but damaged: replaced below
                    continue
                copies[n] = data
                if progress:
                    progress(len(data))
                if good is None:
                    good, source = data, n
            targets = [n for n in rec.locations if copies.get(n) is None]
            if not targets:
                continue
            if good is None:
                report.unrepairable.append({"key": prefix + key, "detail": "no location holds an authentic copy",
                                            "locations": sorted(copies)})
                continue
            for n in targets:
                backend = site.backend(n)
                damaged = key in listings[n]
                if damaged:
                    backend.delete(prefix + key)  # put() never overwrites: remove the bad copy first
                try:
                    backend.put(prefix + key, good)
                except ObjectExists:
                    pass  # written meanwhile (another repair): verified on the next run
                report.copied.append({"key": prefix + key, "from": source, "to": n,
                                      "reason": "corrupt" if damaged else "missing", "bytes": len(good)})
    return report


def compare_audited(site: Site, contract: str, read_data: bool,
                    progress: Callable[[int], None] | None = None) -> LocationDiff:
    from .service import audited

    rec = site.contract(contract)
    with audited(site, "check.locations", rec, {"read_data": read_data, "locations": rec.locations}) as a:
        diff = compare(site, rec, read_data, progress)
        a["details"].update({"objects": diff.objects, "differences": len(diff.differences),
                             "unreachable": sorted(diff.unreachable)})
    if not diff.ok:
        site.audit.append("alert.replica", "detected", rec.id,
                          {"differences": len(diff.differences), "unreachable": sorted(diff.unreachable)})
    return diff


def repair_audited(site: Site, contract: str, progress: Callable[[int], None] | None = None) -> RepairReport:
    from .service import audited

    rec = site.contract(contract)
    with audited(site, "repair", rec, {"locations": rec.locations}) as a:
        report = repair(site, rec, progress)
        a["details"].update({"copied": len(report.copied), "unrepairable": len(report.unrepairable),
                             "bytes": sum(c["bytes"] for c in report.copied)})
        for c in report.copied[:200]:
            site.audit.append("storage.repair", "ok", rec.id, {k: c[k] for k in ("key", "from", "to", "reason")})
    return report
