"""Export a whole contract to a new provider, resumably, then verify and sign a report.

    export_contract()  selection -> journal -> content objects -> tag files -> verify -> report
    verify_export()    re-verify a destination against its signed report, on demand
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import __version__, memory
from ..errors import IntegrityError, NotFound, PolicyError, UsageError
from ..fsutil import syncfs
from ..service import audited, open_contract
from ..signing import verify as verify_signature
from ..site import Site
from ..snapshot import Snapshot, newest_at, parse_time
from .destinations import Destination, DestOptions, parse_destination, region_in_eu
from .fetch import Prefetcher
from .journal import Journal, job_id
from .pipeline import Engine, Progress
from .plan import FORMATS, REPORT_STEM, Plan
from .processes import default_workers
from .report import report_document, write_report
from .verify import VerifyResult, verify_destination


@dataclass
class ExportResult:
    job: str
    destination: str
    format: str
    snapshots: int
    objects: int
    files: int
    bytes: int
    sent: int
    skipped: int
    resumed: bool
    verification: VerifyResult
    report_path: str
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"job": self.job, "destination": self.destination, "format": self.format,
                "snapshots": self.snapshots, "objects": self.objects, "files": self.files, "bytes": self.bytes,
                "objects_sent": self.sent, "objects_already_there": self.skipped, "resumed": self.resumed,
                "verification": self.verification.to_dict(), "report": self.report_path,
                "seconds": round(self.seconds, 3), "warnings": self.warnings}


def select_snapshots(snaps: list[Snapshot], which: str, at: str | None, machines: list[str]) -> list[Snapshot]:
    if machines:
        snaps = [s for s in snaps if s.machine in machines]
    limit = parse_time(at) if at else None
    if limit is not None:
        snaps = [s for s in snaps if s.time <= limit]
    if which == "latest":
        by_machine: dict[str, list[Snapshot]] = {}
        for s in snaps:
            by_machine.setdefault(s.machine, []).append(s)
        snaps = [newest_at(v, limit if limit is not None else 2**63) for v in by_machine.values()]
    elif which != "all":
        raise UsageError(f"--snapshots: 'all' or 'latest', not {which!r}")
    return sorted(snaps, key=lambda s: (s.machine, s.time, s.id))


def check_region(dest: Destination, allow_non_eu: bool) -> bool:
    """True when the destination is in the EU; outside it needs --allow-non-eu (Art. 12.4)."""
    if region_in_eu(dest.region):
        return True
    if not allow_non_eu:
        raise PolicyError(f"destination region {dest.region or 'unknown'!r} is not known to be in the EU: "
                          f"exporting there needs the client's express authorisation (Art. 12.4); give "
                          f"--region with an EU region or country code, or --allow-non-eu")
    return False


EXPORT_TREE_CACHE = 40 << 20  # estimated bytes of decoded trees kept (about 60 MB real at most)


def export_contract(site: Site, contract: str, to: str, *, fmt: str = "bagit", which: str = "all",
                    at: str | None = None, machines: list[str] | None = None, jobs: int = 4,
                    opts: DestOptions | None = None, allow_non_eu: bool = False, tar_per_contract: bool = False,
                    progress_mode: str = "auto", verify: bool = True) -> ExportResult:
    if fmt not in FORMATS:
        raise UsageError(f"--format: one of {', '.join(FORMATS)}")
    opts = opts or DestOptions()
    opts.jobs = jobs
    rec, repo = open_contract(site, contract, "export")
    dest = parse_destination(to, opts)
    in_eu = check_region(dest, allow_non_eu)
    machines = sorted(machines or [])
    request = {"contract": rec.id, "destination": dest.display, "format": fmt, "snapshots": which, "at": at,
               "machines": machines, "tar_per_contract": tar_per_contract}
    job = job_id(request)
    journal = Journal(site, job, repo.keys)
    resumed = journal.open()
    all_snaps = repo.list_snapshots()
    if resumed:
        # the selection is fixed at the first run: a backup made meanwhile does not change the export
        by_id = {s.hex: s for s in all_snaps}
        missing = [h for h in journal.state["snapshots"] if h not in by_id]
        if missing:
            journal.close()
            raise NotFound(f"snapshot {missing[0][:8]} of this export is gone; remove the journal and start over")
        snaps = [by_id[h] for h in journal.state["snapshots"]]
        started = journal.state["started"]
    else:
        snaps = select_snapshots(all_snaps, which, at, machines)
        started = site.clock.iso()
    if not snaps:
        journal.remove()
        raise NotFound("no snapshot to export (check --machine, --at)")
    details = {"job": job, "format": fmt, "snapshots": len(snaps), "resumed": resumed, "region": dest.region,
               "in_eu": in_eu, "non_eu_authorised": bool(allow_non_eu and not in_eu), "destination_kind": dest.kind}
    sealed = {"destination": dest.display}
    site.audit.append("export.start", "started", rec.id, details, sealed, repo.keys.audit_cipher())
    # an export walks each snapshot several times (files, sidecar, inventory, names, manifests)
    repo.tree_cache.max_bytes = EXPORT_TREE_CACHE
    repo.tree_cache.keep_when_full = True
    memory.limit_malloc_arenas()  # before the threads start (and the forked writers inherit it)
    # local reads are short: more threads only contend for the GIL (hashing, decryption and
    # decompression release it); a remote store needs more requests in flight
    readers = ThreadPoolExecutor(jobs * 2 if repo.backend.remote else 2,
                                 thread_name_prefix="kiwi-export-read")
    producers = ThreadPoolExecutor(jobs + 1, thread_name_prefix="kiwi-export-produce")
    plan = Plan(repo, rec, snaps, fmt, started, max_key=dest.max_key, tar_per_contract=tar_per_contract,
                pool=readers, organization=site.config.get("organization", "kiwi-restore"))
    total_files = sum(s.stats.get("files", 0) for s in snaps)
    total_bytes = sum(s.stats.get("bytes", 0) for s in snaps)
    progress = Progress(total_files, total_bytes, progress_mode)
    try:
        with audited(site, "export", rec, dict(details), sealed, repo) as a, fewer_collections():
            try:
                result = asyncio.run(_export(site, rec, plan, dest, journal, resumed, jobs, progress, producers,
                                             details, verify, in_eu, allow_non_eu, which, at, machines))
            except _AlreadyComplete as done:
                result = _completed(site, to, opts, jobs, progress_mode, done.doc, verify, job)
                a["details"]["already_complete"] = done.doc["id"]
            a["details"].update({"objects": result.objects, "bytes": result.bytes, "sent": result.sent,
                                 "verified": result.verification.ok})
    finally:
        progress.close()
        readers.shutdown(wait=False, cancel_futures=True)
        # wait for writes still running (a failed job's siblings): none may outlive the command
        producers.shutdown(wait=True, cancel_futures=True)
        journal.close()
    if result.verification.ok:
        journal.remove()  # done: nothing temporary is left behind
    else:
        raise_verify_failure(result.verification)
    return result


@contextmanager
def fewer_collections() -> Iterator[None]:
    """An export makes a few objects per file and keeps almost none: the cyclic collector's
    default (a pass every 700 allocations, rescanning the loaded index and trees) cost
    about 5% of a small-file export's time. Collect rarely, and never rescan what existed
    before the export started."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


class _AlreadyComplete(Exception):
    def __init__(self, doc: dict) -> None:
        self.doc = doc


class VerificationFailed(IntegrityError):
    def __init__(self, res: VerifyResult) -> None:
        self.result = res
        parts = [f"{k}: {', '.join(v[:5])}{'…' if len(v) > 5 else ''}"
                 for k, v in (("missing", res.missing), ("extra", res.extra), ("changed", res.changed)) if v]
        super().__init__("verification FAILED at the destination: " + "; ".join(parts))


def _completed(site: Site, to: str, opts: DestOptions, jobs: int, progress_mode: str, doc: dict, verify: bool,
               job: str) -> ExportResult:
    """The same command rerun after its export finished: re-verify (unless --no-verify), send nothing."""
    import time

    t0 = time.monotonic()
    ver = verify_export(site, to, opts, jobs, progress_mode)[1] if verify else VerifyResult()
    local = os.path.join(site.home, "exports", doc["contract"]["id"], f"{doc['id']}-{REPORT_STEM}.json")
    c = doc["counts"]
    return ExportResult(job, doc["destination"]["url"], doc["format"], c["snapshots"], c["objects"], c["files"],
                        c["bytes"], 0, c["objects"], True, ver, local, time.monotonic() - t0)


def raise_verify_failure(res: VerifyResult) -> None:
    raise VerificationFailed(res)


async def _export(site: Site, rec, plan: Plan, dest: Destination, journal: Journal, resumed: bool,  # noqa: ANN001
                  jobs: int, progress: Progress, producers: ThreadPoolExecutor, details: dict, verify: bool,
                  in_eu: bool, allow_non_eu: bool, which: str, at: str | None, machines: list[str]) -> ExportResult:
    import time

    t0 = time.monotonic()
    await dest.start()
    engine = Engine(dest, journal, jobs, progress, plan.fmt == "bagit", producers,
                    prefetcher=lambda: Prefetcher(plan.repo, plan.pool),
                    processes=default_workers() if plan.fmt in ("bagit", "tree") else 0)
    ticker = asyncio.create_task(progress.ticker())
    try:
        if not resumed:
            existing = await dest.list()
            if f"{REPORT_STEM}.json" in existing:
                raw = b"".join([c async for c in dest.read(f"{REPORT_STEM}.json")])
                doc = json.loads(raw).get("document", {})
                if str(doc.get("id", "")).startswith(journal.job + "-"):
                    # this very export finished earlier (its journal is gone): nothing to send again
                    raise _AlreadyComplete(doc)
            if existing:
                raise UsageError(f"the destination {dest.display} is not empty ({len(existing)} objects); "
                                 f"export into an empty place (or re-run the interrupted export's exact command)")
            journal.state = {"snapshots": [s.hex for s in plan.snaps], "started": plan.started, "runs": 0}
        else:
            await dest.remove_partials()  # a killed run's half-written temporaries are not objects
        journal.state["runs"] = journal.state.get("runs", 0) + 1
        journal.save()
        progress.phase("export")
        count = await engine.run_all(plan.content)
        if dest.kind == "local":  # the files before the journal that says they are done
            await asyncio.to_thread(syncfs, dest.display)
        journal.sync()

        def digest(i: int):  # noqa: ANN202
            d = journal.read(i)
            if d is None:
                raise IntegrityError(f"export object #{i} has no digest in the journal")
            return d

        progress.phase("manifests")
        finals = plan.final(count, digest)
        for j, item in enumerate(finals):
            await engine.run_item(count + j, item)
        if dest.kind == "local":  # durable before it is verified and certified
            await asyncio.to_thread(syncfs, dest.display)
        journal.sync()
        roots = {}
        for j, item in enumerate(finals):
            if item.key in plan.roots:
                roots[item.key] = digest(count + j).sha256.hex()
        content_bytes = sum(digest(i).size for i in range(count))
        inv = json.loads(plan._inventory_json())
        ver = VerifyResult()
        if verify:
            progress.phase("verify")
            ver = await verify_destination(dest, roots, jobs, progress)
            site.audit.append("export.verify", "ok" if ver.ok else "failed", rec.id,
                              {"job": journal.job, "checked": ver.checked, "missing": len(ver.missing),
                               "extra": len(ver.extra), "changed": len(ver.changed)})
        doc = report_document(
            job=journal.job, rec=rec, fmt=plan.fmt, snaps=plan.snaps,
            selection={"snapshots": which, "at": at, "machines": machines},
            counts={"objects": count + len(finals) + 6, "files": inv["totals"]["files"], "bytes": content_bytes,
                    "payload_bytes": inv["totals"]["bytes"], "snapshots": len(plan.snaps)},
            roots=roots, dest=dest, in_eu=in_eu, non_eu_authorised=bool(allow_non_eu and not in_eu),
            started=plan.started, finished=site.clock.iso(), runs=journal.state["runs"], verification=ver,
            version=__version__, clock_override=site.clock.override, warnings=len(plan.warnings))
        if not verify:
            doc["verification"]["method"] = "skipped (--no-verify)"
        _env, local_path, files = write_report(site, doc)
        for key, data in files.items():
            await dest.put_bytes(key, data)
        return ExportResult(journal.job, dest.display, plan.fmt, len(plan.snaps), count + len(finals),
                            inv["totals"]["files"], content_bytes, engine.sent, engine.skipped, resumed, ver,
                            local_path, time.monotonic() - t0, list(plan.warnings))
    finally:
        ticker.cancel()
        progress.draw(final=True)
        engine.close()
        await dest.close()


def verify_export(site: Site, to: str, opts: DestOptions | None = None, jobs: int = 4,
                  progress_mode: str = "auto") -> tuple[dict, VerifyResult]:
    """Re-verify DEST against the signed report found there (signature checked with the site key)."""
    opts = opts or DestOptions()
    opts.jobs = jobs
    dest = parse_destination(to, opts)
    progress = Progress(0, 0, progress_mode, "verify")

    async def run() -> tuple[dict, VerifyResult]:
        await dest.start()
        ticker = asyncio.create_task(progress.ticker())
        try:
            try:
                raw = b"".join([c async for c in dest.read(f"{REPORT_STEM}.json")])
            except NotFound:
                raise IntegrityError(f"no {REPORT_STEM}.json at {dest.display}: not a kiwi-restore export, "
                                     f"or its report is missing") from None
            with tempfile.NamedTemporaryFile(dir=site.tmp_dir(), suffix=".json") as f:
                f.write(raw)
                f.flush()
                doc = verify_signature(f.name, site.keystore.public_key()).document
            if doc.get("type") != "export-report":
                raise IntegrityError(f"{REPORT_STEM}.json is a {doc.get('type')!r}, not an export report")
            res = await verify_destination(dest, doc["manifest"]["roots"], jobs, progress)
            return doc, res
        finally:
            ticker.cancel()
            progress.close()
            await dest.close()

    doc, res = asyncio.run(run())
    rec = next((r for r in site.list_contracts() if r.id == doc["contract"]["id"]), None)
    site.audit.append("export.verify", "ok" if res.ok else "failed", rec.id if rec else doc["contract"]["id"],
                      {"report": doc["id"], "checked": res.checked, "missing": len(res.missing),
                       "extra": len(res.extra), "changed": len(res.changed), "on_demand": True})
    return doc, res
