"""Operations on a site's contracts, each checked against the contract's rules and audited.

The CLI, the FUSE daemon and the exporter call these; they hold no user interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import KiwiError, NotFound, PolicyError, UsageError
from .i18n import _
from .repository import Repository
from .site import NAME_RE, ContractRecord, Site
from .snapshot import Snapshot, resolve

if TYPE_CHECKING:  # the heavy modules load with the command that needs them: a mount starts faster
    from .check import CheckReport
    from .ingest import IngestStats
    from .restore import RestoreStats
    from .tree import Node


@contextmanager
def audited(site: Site, action: str, rec: ContractRecord | None, details: dict | None = None,
            sealed: dict | None = None, repo: Repository | None = None):
    """Record ACTION with its outcome (ok / the error) whatever happens inside."""
    out: dict = {"details": dict(details or {}), "sealed": dict(sealed or {})}
    try:
        yield out
    except BaseException as exc:
        out["details"]["error"] = str(exc) if isinstance(exc, KiwiError) else type(exc).__name__
        _append(site, action, "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted", rec, out, repo)
        raise
    _append(site, action, "ok", rec, out, repo)


def _append(site: Site, action: str, outcome: str, rec: ContractRecord | None, out: dict,
            repo: Repository | None) -> None:
    cipher = None
    sealed = out["sealed"] or None
    if sealed:
        try:
            keys = repo.keys if repo is not None else site.contract_keys(rec)
            cipher = keys.audit_cipher()
        except KiwiError:
            sealed = None  # no key (destroyed): nothing identifying is written in clear either
    site.audit.append(action, outcome, rec.id if rec else None, out["details"], sealed, cipher)


def ensure_access(site: Site, rec: ContractRecord, action: str) -> None:
    """Refuse reading a contract's data once its restore window has closed (Art. 17, 18.1),
    once its client asked for its destruction, or once it is purged."""
    from . import lifecycle

    lc = rec.lifecycle
    now = site.clock.iso()
    sched = lc.get("schedule") or {}
    reason = None
    if (lc.get("purge") or {}).get("started"):
        reason = _("{action} refused: contract {name} has been purged (certificate {cert})").format(
            action=action, name=rec.name, cert=lc["purge"].get("certificate_id"))
    elif lc.get("destroy_requested"):
        reason = _("{action} refused: the client asked for the destruction of {name} on {when}").format(
            action=action, name=rec.name, when=lc["destroy_requested"])
    elif lifecycle.deletion_due(lc, now):
        reason = _("{action} refused: the restore window of {name} closed on {end} "
                   "(end of contract {eoc}, last day of restores {last})").format(
            action=action, name=rec.name, end=sched["window_closes_at"], eoc=sched["end_of_contract"],
            last=sched["restore_window_last_day"])
    if reason:
        site.audit.append(f"{action}.refused", "refused", rec.id, {"reason": reason})
        raise PolicyError(reason)


def open_contract(site: Site, name: str, action: str | None = None) -> tuple[ContractRecord, Repository]:
    """The contract's record and repository; ACTION (mount, restore, export...) checks access."""
    rec = site.contract(name)
    if action is not None:
        ensure_access(site, rec, action)
    return rec, site.open_repository(rec)


def create_contract(site: Site, name: str, offer: str, client: str,
                    locations: list[str] | None = None) -> ContractRecord:
    with audited(site, "contract.create", None, {"name": name, "offer": offer}) as a:
        rec = site.create_contract(name, offer, client, locations)
        a["details"]["contract_id"] = rec.id
        a["details"]["locations"] = rec.locations
    return rec


def add_machine(site: Site, contract: str, machine: str) -> ContractRecord:
    if not NAME_RE.match(machine):
        raise UsageError(_("invalid machine name {name!r} (letters, digits, '.', '_', '-'; 64 at most)").format(name=machine))
    with site.registry_lock():
        rec = site.contract(contract)
        with audited(site, "machine.add", rec, {"machine": machine}):
            if machine in rec.machines:
                raise UsageError(_("machine {m!r} is already registered under {c!r}").format(m=machine, c=contract))
            rec.machines[machine] = {"registered": site.clock.iso()}
            site.save_contract(rec)
    return rec


def run_backup(site: Site, contract: str, machine: str, paths: list[str], tags: list[str],
               time_ns: int | None = None, progress: Callable[[int, int], None] | None = None,
               ) -> tuple[Snapshot, IngestStats]:
    rec, repo = open_contract(site, contract)
    if machine not in rec.machines:
        raise NotFound(_("machine {m!r} is not registered under contract {c!r} (kiwi-restore machine add {c} {m})")
                       .format(m=machine, c=contract))
    from .ingest import backup

    bpaths = [os.fsencode(p) for p in paths]
    with audited(site, "backup", rec, {"machine": machine}, {"paths": [os.fsdecode(p) for p in bpaths]}, repo) as a:
        snap, stats = backup(repo, machine, bpaths, tags, time_ns or site.clock.now_ns(), progress)
        a["details"].update({"snapshot": snap.hex, "files": stats.files, "bytes": stats.bytes,
                             "stored_bytes": stats.stored_bytes, "errors": len(stats.errors)})
    return snap, stats


def list_snapshots(site: Site, contract: str, machine: str | None = None) -> tuple[ContractRecord, list[Snapshot]]:
    rec, repo = open_contract(site, contract)
    with audited(site, "snapshots.list", rec, {"machine": machine}):
        snaps = repo.list_snapshots()
    if machine:
        snaps = [s for s in snaps if s.machine == machine]
    return rec, snaps


def list_path(site: Site, contract: str, spec: str | None, path: str | None, at: str | None,
              machine: str | None, recursive: bool = False) -> tuple[Snapshot, list[tuple[bytes, Node]]]:
    from .restore import lookup, split_path
    from .tree import TYPE_DIR

    rec, repo = open_contract(site, contract, "ls")
    with audited(site, "ls", rec, {}, {"path": path or "/"}, repo) as a:
        snap = resolve(repo.list_snapshots(), spec, at, machine)
        a["details"]["snapshot"] = snap.hex
        node = lookup(repo, snap, path)
        base = b"/" + b"/".join(split_path(path or "/"))
        base = base.rstrip(b"/")
        if node.type != TYPE_DIR:
            return snap, [(base, node)]
        if recursive:
            from .restore import walk

            return snap, [(base + p, n) for p, n in walk(repo, node)]
        return snap, [(base + b"/" + n.name, n) for n in repo.load_tree(node.subtree)]


def run_restore(site: Site, contract: str, spec: str | None, path: str | None, target: str,
                at: str | None, machine: str | None, overwrite: bool,
                progress: Callable[[int, int], None] | None = None) -> tuple[Snapshot, RestoreStats]:
    from .restore import Restorer

    rec, repo = open_contract(site, contract, "restore")
    with audited(site, "restore", rec, {"overwrite": overwrite},
                 {"path": path or "/", "target": os.path.abspath(target)}, repo) as a:
        snap = resolve(repo.list_snapshots(), spec, at, machine)
        a["details"]["snapshot"] = snap.hex
        stats = Restorer(repo, overwrite, progress).run(snap, path, target)
        a["details"].update({"files": stats.files, "bytes": stats.bytes})
    return snap, stats


def run_check(site: Site, contract: str, read_data: bool,
              progress: Callable[[int], None] | None = None) -> CheckReport:
    from .check import check

    rec, repo = open_contract(site, contract)
    with audited(site, "check", rec, {"read_data": read_data}) as a:
        report = check(repo, read_data, progress)
        a["details"].update({"problems": len(report.problems), "snapshots": report.snapshots})
    if not report.ok:
        site.audit.append("alert.integrity", "detected", rec.id,
                          {"problems": len(report.problems), "first": report.problems[0][:300]})
    return report


def destroy_key(site: Site, contract: str) -> list[str]:
    rec = site.contract(contract)
    with audited(site, "key.destroy", rec) as a:
        removed = site.keystore.destroy_contract_key(rec.id, site.clock.iso())
        left = site.keystore.contract_key_copies(rec.id)
        if left:
            raise KiwiError(f"key copies remain: {left}")
        a["details"]["copies_destroyed"] = len(removed)
    return removed
