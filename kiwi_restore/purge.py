"""The nightly purge-and-certify job (Art. 17, 18.1; Santé Art. 2.3; Art. 8.1).

For each contract whose restore window has closed, or whose client asked for deletion,
and that is not under legal hold: inventory every object in every location, delete them
all, crypto-erase the contract key (keystore backups included), delete the contract's
temporary data, verify that nothing is left and that the key cannot be unwrapped, then
issue one signed deletion certificate. Every step is recorded in the contract's record
before the next begins, so a run killed at any point is finished by the next run, and the
certificate's content is fixed before it is written, so there is only ever one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, lifecycle
from .audit import actor
from .certificate import write_deletion_certificate
from .errors import AuthError, LockedError
from .fsutil import file_lock
from .i18n import _
from .site import ContractRecord, Site

EXPORT_JOURNALS = "export"  # tmp/ subdirectory of the exporter's resume journals
TEMP_MAX_AGE_DAYS = 27  # deleted before 28 days: within "1 month" whatever the month and timer slack
STEPS = ("inventoried", "objects_deleted", "keys_destroyed", "temporary_deleted", "verified", "certified")


@dataclass
class PurgeOutcome:
    contract: str
    done: bool
    certificate: str | None = None
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)


def _failpoint(name: str) -> None:
    """Test aid: KIWI_RESTORE_FAILPOINT=<step> kills the job right after that step."""
    if os.environ.get("KIWI_RESTORE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def due_contracts(site: Site) -> list[tuple[ContractRecord, str]]:
    """(record, why) for every contract whose deletion is due, held ones included."""
    now = site.clock.iso()
    out = []
    for rec in site.list_contracts():
        lc = rec.lifecycle
        if (lc.get("purge") or {}).get("certificate"):
            continue
        if lifecycle.deletion_due(lc, now):
            out.append((rec, "client request (Art. 18.1)" if lc.get("destroy_requested") else
                        "restore window closed (Art. 17)"))
    return out


def contract_temp_entries(site: Site, rec: ContractRecord) -> list[str]:
    """The contract's temporary data: entries of tmp/ and of the export journals named by its id."""
    out = []
    for d in (site.tmp_dir(), os.path.join(site.tmp_dir(), EXPORT_JOURNALS)):
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.startswith(rec.id)]
    return out


def export_reports(site: Site, rec: ContractRecord) -> list[dict]:
    """References (id, SHA-256 of the signed bytes) of the contract's signed export reports."""
    directory = os.path.join(site.home, "exports", rec.id)
    refs = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".canonical.json"):
                data = Path(directory, name).read_bytes()
                refs.append({"id": json.loads(data).get("id"), "sha256": hashlib.sha256(data).hexdigest()})
    return refs


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=False)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def purge_temporary(site: Site, max_age_days: int = TEMP_MAX_AGE_DAYS) -> int:
    """Remove temporary data (restore/export staging, journals, spools) older than the limit."""
    from .exporter.journal import purge_temporary as purge_export_journals

    tmp = site.tmp_dir()
    limit = site.clock.now_ns() / 1e9 - max_age_days * 86400
    # export journals age by their last use; a journal in use is locked and kept
    removed = len(purge_export_journals(site, max_age_days * 86400))
    for name in sorted(os.listdir(tmp)):
        if name == EXPORT_JOURNALS:
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        # creation age, as near as POSIX tells it: an entry's ctime and mtime only move forward
        created = min(st.st_ctime, st.st_mtime)
        if created <= limit:
            _remove(path)
            removed += 1
    if removed:
        site.audit.append("temporary.purge", details={"entries": removed, "older_than_days": max_age_days})
    return removed


class PurgeJob:
    def __init__(self, site: Site, dry_run: bool = False, log: Callable[[str], None] = print) -> None:
        self.site = site
        self.dry_run = dry_run
        self.log = log

    def run(self) -> list[PurgeOutcome]:
        lock = os.path.join(self.site.home, "purge.lock")
        try:
            with file_lock(lock, wait=0, what="purge job"):
                return self._run_locked()
        except LockedError:
            raise LockedError(_("another purge job is running (lock {path}); this one exits").format(path=lock)) from None

    def _run_locked(self) -> list[PurgeOutcome]:
        outcomes = []
        for rec, why in due_contracts(self.site):
            if rec.lifecycle.get("holds"):
                reasons = "; ".join(h["reason"] for h in rec.lifecycle["holds"])
                self.log(_("{name}: deletion due but under legal hold ({reasons}): not touched").format(
                    name=rec.name, reasons=reasons))
                if not self.dry_run:
                    self.site.audit.append("purge.skipped", "held", rec.id, {"holds": len(rec.lifecycle["holds"])})
                outcomes.append(PurgeOutcome(rec.name, False, skipped="legal hold"))
                continue
            if self.dry_run:
                self.log(_("{name}: deletion due ({why}): would purge {locations}").format(
                    name=rec.name, why=why, locations=", ".join(rec.locations)))
                outcomes.append(PurgeOutcome(rec.name, False, skipped="dry run"))
                continue
            outcomes.append(self.purge_contract(rec, why))
        if not self.dry_run:
            n = purge_temporary(self.site)
            if n:
                self.log(_("{n} temporary entries older than {days} days removed").format(n=n, days=TEMP_MAX_AGE_DAYS))
        return outcomes

    # -- one contract ------------------------------------------------------------
    def _save(self, rec: ContractRecord, **changes) -> None:
        with self.site.registry_lock():
            fresh = self.site.contract(rec.name)
            purge = dict(fresh.lifecycle.get("purge") or {})
            purge.update(changes)
            fresh.lifecycle["purge"] = purge
            self.site.save_contract(fresh)
            rec.lifecycle = fresh.lifecycle

    def _step(self, rec: ContractRecord, name: str, audit: dict | None = None, **extra) -> None:
        """Record step NAME as done, and its audit record (AUDIT: action and details)."""
        done = list((rec.lifecycle.get("purge") or {}).get("steps", []))
        done.append(name)
        self._save(rec, steps=done, **extra)
        audit = audit or {"action": f"purge.{name}", "details": {
            k: v for k, v in extra.items() if k in ("objects", "bytes", "copies_destroyed", "temporary_entries")}}
        self.site.audit.append(audit["action"], contract=rec.id, details=audit["details"])
        _failpoint(name)

    def purge_contract(self, rec: ContractRecord, why: str) -> PurgeOutcome:
        purge = rec.lifecycle.get("purge") or {}
        steps = set(purge.get("steps", []))
        if not purge.get("started"):
            self._save(rec, started=self.site.clock.iso(), reason=why, operator=actor(),
                       certificate_id="KR-DEL-" + uuid.uuid4().hex[:20].upper(), steps=[])
            self.site.audit.append("purge.start", contract=rec.id, details={"reason": why, "locations": rec.locations})
        else:
            self.site.audit.append("purge.resume", contract=rec.id, details={"done": sorted(steps)})
        self.log(_("{name}: purging ({why})").format(name=rec.name, why=why))

        if "inventoried" not in steps:
            inv = self._inventory(rec)
            self._step(rec, "inventoried", inventory=inv, export_reports=export_reports(self.site, rec), objects=sum(v["objects"] for v in inv["locations"].values()),
                       bytes=sum(v["bytes"] for v in inv["locations"].values()),
                       key_copies=len(self.site.keystore.contract_key_copies(rec.id)))
        if "objects_deleted" not in steps:
            for loc in rec.locations:
                backend = self.site.backend(loc)
                backend.delete_many([info.key for info in backend.list(rec.prefix + "/")])  # S3: batches
                if hasattr(backend, "list_temporaries"):  # a local store: half-written puts too
                    for path in list(backend.list_temporaries(rec.prefix)):
                        os.unlink(path)
                    backend.remove_empty_dirs(rec.prefix)
            self._step(rec, "objects_deleted")
        if "keys_destroyed" not in steps:
            removed = self.site.keystore.destroy_contract_key(rec.id, self.site.clock.iso())
            self._step(rec, "keys_destroyed", copies_destroyed=len(removed))
        if "temporary_deleted" not in steps:
            entries = contract_temp_entries(self.site, rec)
            for path in entries:
                _remove(path)
            self._step(rec, "temporary_deleted", temporary_entries=len(entries))
        verification = self._verify(rec)
        if verification["problems"]:
            self.site.audit.append("purge.verification", "failed", rec.id, {"problems": verification["problems"][:20]})
            self.log(_("{name}: verification FAILED, no certificate: {p}").format(
                name=rec.name, p="; ".join(verification["problems"][:5])))
            return PurgeOutcome(rec.name, False, problems=verification["problems"])
        if "verified" not in steps:
            self._step(rec, "verified", verification=verification, completed=self.site.clock.iso())
        paths = write_deletion_certificate(self.site, rec)
        if "certified" not in steps:
            self._step(rec, "certified", certificate=paths[0], audit={"action": "certificate.issued", "details": {
                "certificate": rec.lifecycle["purge"]["certificate_id"],
                "sha256": hashlib.sha256(Path(paths[1]).read_bytes()).hexdigest()}})
        self.log(_("{name}: purged; certificate {path}").format(name=rec.name, path=paths[0]))
        return PurgeOutcome(rec.name, True, certificate=paths[0])

    def _inventory(self, rec: ContractRecord) -> dict:
        """Every object in every location: counts, bytes, and a digest of the sorted list."""
        lines = []
        per: dict[str, dict] = {}
        for loc in rec.locations:
            backend = self.site.backend(loc)
            count = size = 0
            for info in backend.list(rec.prefix + "/"):
                lines.append(f"{loc}\t{info.key}\t{info.size}\n")
                count += 1
                size += info.size
            per[loc] = {"url": _safe_url(backend.url), "objects": count, "bytes": size}
        lines.sort()
        digest = hashlib.sha256("".join(lines).encode()).hexdigest()
        inv_dir = os.path.join(self.site.home, "certificates")
        os.makedirs(inv_dir, mode=0o700, exist_ok=True)
        # object names are random hex ids: the list identifies nothing about the client's files
        with open(os.path.join(inv_dir, f"{rec.id}.inventory.txt"), "w") as f:
            f.writelines(lines)
        return {"locations": per, "sha256": digest, "format": "sorted lines: location TAB key TAB size LF"}

    def _verify(self, rec: ContractRecord) -> dict:
        problems = []
        listed = {}
        for loc in rec.locations:
            backend = self.site.backend(loc)
            left = list(backend.list(rec.prefix + "/"))
            if hasattr(backend, "list_temporaries"):
                left += list(backend.list_temporaries(rec.prefix))
            listed[loc] = len(left)
            if left:
                problems.append(f"{len(left)} objects remain in location {loc}")
        copies = self.site.keystore.contract_key_copies(rec.id)
        if copies:
            problems.append(f"key copies remain: {', '.join(copies)}")
        try:
            self.site.keystore.load_contract_key(rec.id)
            problems.append("the contract key can still be unwrapped")
            unwrap = "succeeded"
        except AuthError:
            unwrap = "failed as expected"
        temp = contract_temp_entries(self.site, rec)
        if temp:
            problems.append(f"{len(temp)} temporary entries remain")
        return {"checked_at": self.site.clock.iso(), "objects_listed_per_location": listed,
                "key_copies_found": len(copies), "key_unwrap": unwrap, "temporary_entries_found": len(temp),
                "problems": problems, "result": "passed" if not problems else "failed",
                "method": "full listing of every storage location under the contract's prefix; search of the "
                          "keystore and its backups for key copies; attempted unwrap of the contract key"}


def _safe_url(url: str) -> str:
    """A location URL without credentials, for documents."""
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url.split("?", 1)[0]


def purge_due(site: Site, dry_run: bool, log: Callable[[str], None] = print) -> list[PurgeOutcome]:
    t0 = time.monotonic()
    outcomes = PurgeJob(site, dry_run, log).run()
    if not dry_run:
        site.audit.append("purge.run", details={"contracts": len(outcomes), "seconds": int(time.monotonic() - t0),
                                                "tool": f"kiwi-restore {__version__}"})
    return outcomes

