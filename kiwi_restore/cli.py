"""The kiwi-restore command line: parse, call the service layer, print. Exit codes: docs/USAGE.md."""

from __future__ import annotations

import json
import os
import stat
import sys
import traceback
from datetime import UTC, datetime

import click

from . import __version__, service
from .errors import KiwiError, UsageError
from .i18n import _
from .keystore import public_key_pem
from .site import OFFERS, Site, default_home, passphrase_source
from .snapshot import parse_time
from .tree import TYPE_DIR, TYPE_FILE, TYPE_SYMLINK, TYPE_TO_IFMT
from .units import human_bytes


class Ctx:
    def __init__(self, home: str, passphrase_file: str | None, debug: bool) -> None:
        self.debug = debug
        self.site = Site(home, passphrase_source(passphrase_file))


pass_ctx = click.make_pass_decorator(Ctx)


def _json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, ensure_ascii=False))




@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="KIWI_RESTORE_HOME", default=default_home, show_default="$KIWI_RESTORE_HOME",
              help=_("Site directory (configuration, contracts, default keystore and store)."))
@click.option("--passphrase-file", type=click.Path(dir_okay=False),
              help=_("Read the keystore passphrase from this file (else $KIWI_RESTORE_PASSPHRASE, else a prompt)."))
@click.option("--debug", is_flag=True, help=_("Show tracebacks."))
@click.version_option(__version__, prog_name="kiwi-restore")
@click.pass_context
def cli(ctx: click.Context, home: str, passphrase_file: str | None, debug: bool) -> None:
    """kiwi-restore: browse, restore, export and purge per-contract encrypted backups."""
    ctx.obj = Ctx(home, passphrase_file, debug)
    ctx.call_on_close(lambda: ctx.obj.site._audit is not None and ctx.obj.site.checkpoint_audit())


@cli.command()
@click.option("--production", is_flag=True, help=_("Mark the site as production (refuses clock overrides)."))
@pass_ctx
def init(c: Ctx, production: bool) -> None:
    """Create a site: configuration, keystore (asks for its passphrase) and local store."""
    c.site._passphrase = passphrase_source(None, confirm=True) if not (
        os.environ.get("KIWI_RESTORE_PASSPHRASE") or os.environ.get("KIWI_RESTORE_PASSPHRASE_FILE")
    ) else c.site._passphrase
    c.site.initialize(production)
    c.site.audit.append("site.init", details={"production": production})
    click.echo(_("site created in {home}").format(home=c.site.home))


# -- contracts -------------------------------------------------------------------
@cli.group()
def contract() -> None:
    """Contracts (Art. 7): the unit of isolation, export and deletion."""


@contract.command("create")
@click.argument("name")
@click.option("--offer", type=click.Choice(OFFERS), required=True, help=_("cloud, or sante (health data, HDS)."))
@click.option("--client", default="", help=_("Client's name, as written on the contract."))
@click.option("--location", "locations", multiple=True, metavar="NAME",
              help=_("Storage location (repeatable: primary first, then replicas; default: the offer's "
                     "locations in kiwi.json, else primary)."))
@pass_ctx
def contract_create(c: Ctx, name: str, offer: str, client: str, locations: tuple[str, ...]) -> None:
    """Create contract NAME with its own key and repository."""
    rec = service.create_contract(c.site, name, offer, client, locations=list(locations) or None)
    click.echo(_("contract {name} created (id {id}, offer {offer})").format(name=rec.name, id=rec.id, offer=rec.offer))


@contract.command("list")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def contract_list(c: Ctx, as_json: bool) -> None:
    """List the contracts of the site."""
    recs = c.site.list_contracts()
    if as_json:
        _json([r.to_json() for r in recs])
        return
    for r in recs:
        label = _("machines")
        click.echo(f"{r.name:24} {r.offer:6} {len(r.machines):3} {label}  {r.client}")


@contract.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def contract_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one contract: id, offer, client, machines, locations."""
    r = c.site.contract(name)
    state = c.site.keystore.key_state(r.id)
    doc = r.to_json() | {"key": "present" if state.present else f"destroyed {state.destroyed_at or ''}".strip()}
    if as_json:
        _json(doc)
        return
    for k in ("name", "id", "offer", "client", "created", "key"):
        click.echo(f"{k + ':':10} {doc[k]}")
    click.echo(f"{'locations:':10} {', '.join(r.locations)}")
    click.echo(f"{'machines:':10} {', '.join(sorted(r.machines)) or '-'}")


@contract.command("terminate")
@click.argument("name")
@click.option("--letter-received", "letter", required=True, metavar="DATE",
              help=_("Day the termination letter was received (YYYY-MM-DD)."))
@click.option("--notice-months", type=int, help=_("Notice in calendar months (default: the site's, 3)."))
@pass_ctx
def contract_terminate(c: Ctx, name: str, letter: str, notice_months: int | None) -> None:
    """Record the termination letter of NAME: end of contract, restore window, deletion date."""
    from . import termination

    rec = termination.terminate(c.site, name, letter, notice_months)
    s = rec.lifecycle["schedule"]
    click.echo(_("{name}: end of contract {eoc}; restores open until {last} inclusive; deletion due from {due}")
               .format(name=name, eoc=s["end_of_contract"], last=s["restore_window_last_day"], due=s["window_closes_at"]))


@contract.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def contract_status(c: Ctx, name: str, as_json: bool) -> None:
    """State of NAME, every date of its end, and what is due next."""
    from . import termination

    st = termination.status(c.site, name)
    if as_json:
        _json(st.to_json())
        return
    click.echo(_("contract: {name} ({offer})").format(name=st.name, offer=st.offer))
    click.echo(_("state: {state}").format(state=st.state))
    for k, v in (st.schedule or {}).items():
        click.echo(f"  {k}: {v}")
    if st.reversibility:
        click.echo(f"  reversibility_requested: {st.reversibility['requested']}"
                   + (" (late, forced)" if st.reversibility.get("forced") else ""))
    if st.destroy_requested:
        click.echo(f"  destroy_requested: {st.destroy_requested}")
    for h in st.holds:
        click.echo(_("  legal hold since {placed}: {reason}").format(**h))
    if st.data_act_flag:
        click.echo(_("flag: the restore window of this offer is shorter than the Data Act's 30-day retrieval "
                     "period (Regulation 2023/2854, Art. 25(2)(g)), where it applies"))
    click.echo(_("next: {what}").format(what=st.next_due))


@contract.command("reversibility")
@click.argument("name")
@click.option("--requested", required=True, metavar="DATE", help=_("Day the client's request was received."))
@click.option("--force", is_flag=True, help=_("Accept a request later than 1 month after the letter (audited)."))
@pass_ctx
def contract_reversibility(c: Ctx, name: str, requested: str, force: bool) -> None:
    """Record the client's reversibility request (Art. 18.1)."""
    from . import termination

    rec = termination.request_reversibility(c.site, name, requested, force)
    click.echo(_("reversibility request of {d} recorded for {name}").format(d=rec.lifecycle["reversibility"]["requested"],
                                                                             name=name))


@contract.command("destroy-request")
@click.argument("name")
@click.option("--yes-destroy", "confirm", metavar="NAME", help=_("Confirm by repeating the contract's name."))
@pass_ctx
def contract_destroy_request(c: Ctx, name: str, confirm: str | None) -> None:
    """Record the client's request to destroy all its data now (Art. 18.1); the next purge does it."""
    from . import termination

    _confirm(name, confirm, _("The client asks to destroy every copy of {name} now; restores end at once. "
                              "Type the contract's name to confirm"))
    termination.request_destruction(c.site, name)
    click.echo(_("destruction of {name} requested; the next 'kiwi-restore purge --due' carries it out").format(name=name))


@contract.command("hold")
@click.argument("name")
@click.option("--reason", required=True, help=_("Legal basis, e.g. the judicial request's reference."))
@pass_ctx
def contract_hold(c: Ctx, name: str, reason: str) -> None:
    """Put NAME under legal hold (Art. 19.3): no purge touches it until released."""
    from . import termination

    termination.hold(c.site, name, reason)
    click.echo(_("{name} is under legal hold; notify the client in writing (Art. 19.3)").format(name=name))


@contract.command("release")
@click.argument("name")
@pass_ctx
def contract_release(c: Ctx, name: str) -> None:
    """Release the legal holds of NAME."""
    from . import termination

    termination.release(c.site, name)
    click.echo(_("legal hold of {name} released").format(name=name))


def _confirm(name: str, given: str | None, prompt: str) -> None:
    if given is None:
        if not sys.stdin.isatty():
            raise UsageError(_("refused: confirm with --yes-destroy {name}").format(name=name))
        given = click.prompt(prompt.format(name=name))
    if given != name:
        raise UsageError(_("confirmation does not match the contract's name; nothing destroyed"))


@cli.command("purge")
@click.option("--due", is_flag=True, required=True, help=_("Purge every contract whose deletion is due."))
@click.option("--dry-run", is_flag=True, help=_("Say what would be purged; change nothing."))
@pass_ctx
def purge_cmd(c: Ctx, due: bool, dry_run: bool) -> None:
    """The nightly job: destroy every copy of contracts whose restore window closed (or whose
    client asked), crypto-erase their keys, verify, and issue signed deletion certificates.
    Idempotent; one run at a time; contracts under legal hold are never touched."""
    from .purge import purge_due

    outcomes = purge_due(c.site, dry_run, log=click.echo)
    if not outcomes:
        click.echo(_("nothing due"))
    if any(o.problems for o in outcomes):
        sys.exit(5)


@cli.group()
def reversibility() -> None:
    """Reversibility (Art. 18): information pack and plan."""


@reversibility.command("plan")
@click.argument("contract")
@click.option("--output", "-o", default=".", type=click.Path(file_okay=False), help=_("Directory for the documents."))
@click.option("--rate", default=50, show_default=True, help=_("Assumed transfer rate in MB/s for the estimate."))
@pass_ctx
def reversibility_plan(c: Ctx, contract: str, output: str, rate: int) -> None:
    """Write the reversibility information pack and plan of CONTRACT, in French and English."""
    from .reversibility import plan

    for p in plan(c.site, contract, output, rate):
        click.echo(p)


@cli.group()
def machine() -> None:
    """Machines registered under a contract (Art. 7, 10)."""


@machine.command("add")
@click.argument("contract")
@click.argument("name")
@pass_ctx
def machine_add(c: Ctx, contract: str, name: str) -> None:
    """Register machine NAME under CONTRACT."""
    service.add_machine(c.site, contract, name)
    click.echo(_("machine {m} registered under {c}").format(m=name, c=contract))


@machine.command("list")
@click.argument("contract")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def machine_list(c: Ctx, contract: str, as_json: bool) -> None:
    """List the machines of CONTRACT."""
    r = c.site.contract(contract)
    if as_json:
        _json(r.machines)
        return
    for m, info in sorted(r.machines.items()):
        click.echo(f"{m:24} {info.get('registered', '')}")


# -- ingest ----------------------------------------------------------------------
@cli.command("backup")
@click.argument("contract")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("--machine", "-m", required=True, help=_("Registered machine the data comes from."))
@click.option("--tag", "tags", multiple=True, help=_("Tag the snapshot (repeatable)."))
@click.option("--time", "when", help=_("Record the snapshot at this time (ISO 8601; default: now)."))
@click.option("--json", "as_json", is_flag=True, help=_("Print the result as JSON."))
@pass_ctx
def backup_cmd(c: Ctx, contract: str, paths: tuple[str, ...], machine: str, tags: tuple[str, ...],
               when: str | None, as_json: bool) -> None:
    """Snapshot local PATHS into CONTRACT (stands in for the backup agent)."""
    from .progress import bytes_bar

    with bytes_bar(_("backup")) as bar:
        snap, stats = service.run_backup(c.site, contract, machine, list(paths), list(tags),
                                         parse_time(when) if when else None, bar)
    for err in stats.errors:
        click.echo(_("warning: {err}").format(err=err), err=True)
    if as_json:
        _json({"snapshot": snap.hex, "time": snap.iso(), "stats": stats.to_dict()})
        return
    click.echo(_("snapshot {id} saved: {files} files, {size}, {new} new in the store ({unchanged} files unchanged)")
               .format(id=snap.short, files=stats.files, size=human_bytes(stats.bytes),
                       new=human_bytes(stats.stored_bytes), unchanged=stats.unchanged_files))


# -- read side ---------------------------------------------------------------------
@cli.command()
@click.argument("contract")
@click.option("--machine", "-m", help=_("Only this machine's snapshots."))
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def snapshots(c: Ctx, contract: str, machine: str | None, as_json: bool) -> None:
    """List the snapshots of CONTRACT, oldest first."""
    _rec, snaps = service.list_snapshots(c.site, contract, machine)
    if as_json:
        _json([{"id": s.hex, "time": s.iso(), "machine": s.machine, "hostname": s.hostname,
                "paths": [os.fsdecode(p) for p in s.paths], "tags": s.tags, "stats": s.stats} for s in snaps])
        return
    click.echo(f"{'ID':10} {'TIME (UTC)':20} {'MACHINE':16} {'FILES':>8} {'SIZE':>10}  PATHS")
    for s in snaps:
        click.echo(f"{s.short:10} {s.datetime.strftime('%Y-%m-%d %H:%M:%S'):20} {s.machine:16} "
                   f"{s.stats.get('files', 0):>8} {human_bytes(s.stats.get('bytes', 0)):>10}  "
                   f"{', '.join(os.fsdecode(p) for p in s.paths)}")
    click.echo(_("{n} snapshots").format(n=len(snaps)))


def _mode_string(node) -> str:
    return stat.filemode(TYPE_TO_IFMT[node.type] | node.mode)


def _display(name: bytes) -> str:
    """A stored byte name for a terminal: invalid UTF-8 and control characters escaped."""
    text = name.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _with_at(at: str | None, snapshot: str | None, path: str | None) -> tuple[str | None, str | None]:
    """With --at, the first positional after CONTRACT is the PATH."""
    if at is not None and path is None and snapshot not in (None, "latest"):
        return None, snapshot
    return snapshot, path


@cli.command("ls")
@click.argument("contract")
@click.argument("snapshot", required=False)
@click.argument("path", required=False)
@click.option("--at", help=_("Newest snapshot at or before this time (ISO 8601, UTC)."))
@click.option("--machine", "-m", help=_("Pick among this machine's snapshots."))
@click.option("--recursive", "-r", is_flag=True, help=_("List everything below PATH."))
@click.option("--long", "-l", "long_", is_flag=True, help=_("Show mode, owner, size and time."))
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON (names as UTF-8 with escapes, plus raw hex)."))
@pass_ctx
def ls_cmd(c: Ctx, contract: str, snapshot: str | None, path: str | None, at: str | None,
           machine: str | None, recursive: bool, long_: bool, as_json: bool) -> None:
    """List PATH (default /) in SNAPSHOT (an id, a unique prefix, 'latest') of CONTRACT.

    With --at TIME, leave SNAPSHOT out: `ls CONTRACT --at TIME [PATH]`.
    """
    snapshot, path = _with_at(at, snapshot, path)
    snap, entries = service.list_path(c.site, contract, snapshot, path, at, machine, recursive)
    if as_json:
        _json({"snapshot": snap.hex, "entries": [{
            "path": p.decode("utf-8", "backslashreplace"), "path_hex": p.hex(), "type": n.type,
            "mode": oct(n.mode), "uid": n.uid, "gid": n.gid, "user": n.user, "group": n.group,
            "size": n.size, "mtime_ns": n.mtime,
            "target": n.target.decode("utf-8", "backslashreplace") if n.target is not None else None,
        } for p, n in entries]})
        return
    for p, n in entries:
        shown = _display(p)
        if n.type == TYPE_SYMLINK:
            shown += " -> " + _display(n.target or b"")
        elif n.type == TYPE_DIR:
            shown += "/"
        if long_:
            t = datetime.fromtimestamp(n.mtime / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{_mode_string(n)} {n.user or n.uid:>8} {n.group or n.gid:>8} "
                       f"{n.size if n.type == TYPE_FILE else 0:>12} {t} {shown}")
        else:
            click.echo(shown)


@cli.command("restore")
@click.argument("contract")
@click.argument("snapshot", required=False)
@click.argument("path", required=False)
@click.option("--target", "-t", required=True, type=click.Path(file_okay=False),
              help=_("Directory to restore into (created if missing); nothing is written outside it."))
@click.option("--at", help=_("Newest snapshot at or before this time (ISO 8601, UTC)."))
@click.option("--machine", "-m", help=_("Pick among this machine's snapshots."))
@click.option("--overwrite", is_flag=True, help=_("Replace files that already exist in the target."))
@click.option("--json", "as_json", is_flag=True, help=_("Print the result as JSON."))
@pass_ctx
def restore_cmd(c: Ctx, contract: str, snapshot: str | None, path: str | None, target: str,
                at: str | None, machine: str | None, overwrite: bool, as_json: bool) -> None:
    """Restore SNAPSHOT of CONTRACT (or only PATH in it) into --target, metadata included.

    Without PATH the snapshot's whole tree is restored below the target with its original
    paths; with PATH, that file or directory lands in the target under its own name.
    With --at TIME, leave SNAPSHOT out: `restore CONTRACT --at TIME [PATH] --target DIR`.
    """
    snapshot, path = _with_at(at, snapshot, path)
    from .progress import bytes_bar

    with bytes_bar(_("restore")) as bar:
        snap, stats = service.run_restore(c.site, contract, snapshot, path, target, at, machine, overwrite, bar)
    for w in stats.warnings:
        click.echo(_("warning: {err}").format(err=w), err=True)
    if as_json:
        _json({"snapshot": snap.hex, "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
               "warnings": stats.warnings})
        return
    click.echo(_("restored {files} files ({size}) from snapshot {id} into {target}")
               .format(files=stats.files, size=human_bytes(stats.bytes), id=snap.short, target=target))


@cli.command("check")
@click.argument("contract")
@click.option("--read-data", is_flag=True, help=_("Also read, decrypt and authenticate every stored blob."))
@click.option("--locations", is_flag=True, help=_("Compare the contract's storage locations object by object "
                                                   "(with --read-data: content digests and authentication)."))
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def check_cmd(c: Ctx, contract: str, read_data: bool, locations: bool, as_json: bool) -> None:
    """Check that every reference of CONTRACT resolves (exit code 5 on any problem)."""
    if locations:
        from .location_cli import check_locations

        return check_locations(c.site, contract, read_data, as_json)
    report = service.run_check(c.site, contract, read_data)
    if as_json:
        _json(report.to_dict())
    else:
        for n in report.notes:
            click.echo(_("note: {n}").format(n=n))
        for p in report.problems:
            click.echo(_("error: {p}").format(p=p))
        click.echo(_("{snaps} snapshots, {trees} trees, {files} files, {packs} packs checked: {result}").format(
            snaps=report.snapshots, trees=report.trees, files=report.files, packs=report.packs,
            result=_("no problem") if report.ok else _("{n} problems").format(n=len(report.problems))))
    if not report.ok:
        sys.exit(5)


# -- keys ----------------------------------------------------------------------------
@cli.group()
def key() -> None:
    """Contract keys and the provider signing key."""


@key.command("destroy")
@click.argument("contract")
@click.option("--yes-destroy", "confirm", metavar="CONTRACT",
              help=_("Confirm without a prompt by repeating the contract's name."))
@pass_ctx
def key_destroy(c: Ctx, contract: str, confirm: str | None) -> None:
    """Crypto-erase CONTRACT: destroy every copy of its key. Nothing of it can be decrypted after."""
    rec = c.site.contract(contract)
    _confirm(rec.name, confirm, _("This destroys every copy of the key of {name}; its data becomes unreadable "
                                  "for good. Type the contract's name to confirm"))
    removed = service.destroy_key(c.site, contract)
    click.echo(_("key of {name} destroyed ({n} copies erased)").format(name=rec.name, n=len(removed)))


@key.command("public")
@pass_ctx
def key_public(c: Ctx) -> None:
    """Print the provider's Ed25519 public key (PEM), for third parties checking signatures."""
    click.echo(public_key_pem(c.site.keystore.public_key()).decode(), nl=False)


# -- audit -----------------------------------------------------------------------------
@cli.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@audit.command("show")
@click.option("--contract", help=_("Only records of this contract."))
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON lines as stored."))
@click.option("--unseal", is_flag=True, help=_("Decrypt sealed fields (paths) with the contract's key."))
@pass_ctx
def audit_show(c: Ctx, contract: str | None, as_json: bool, unseal: bool) -> None:
    """Show the audit trail."""
    from .audit import open_fields

    cid = c.site.contract(contract).id if contract else None
    ciphers: dict = {}
    for rec in c.site.audit.records():
        if cid and rec.get("contract") != cid:
            continue
        if unseal and rec.get("sealed") and rec.get("contract"):
            cc = rec["contract"]
            if cc not in ciphers:
                try:
                    r = next(x for x in c.site.list_contracts() if x.id == cc)
                    ciphers[cc] = c.site.contract_keys(r).audit_cipher()
                except (StopIteration, KiwiError):
                    ciphers[cc] = None
            if ciphers[cc] is not None:
                rec["unsealed"] = open_fields(ciphers[cc], cc, rec["sealed"])
        if as_json:
            click.echo(json.dumps(rec, ensure_ascii=False))
        else:
            extra = " ".join(f"{k}={v}" for k, v in rec.get("details", {}).items())
            if "unsealed" in rec:
                extra += " " + " ".join(f"{k}={v}" for k, v in rec["unsealed"].items())
            elif rec.get("sealed"):
                extra += " [sealed]"
            click.echo(f"{rec.get('seq'):>6} {rec.get('time')} {rec.get('actor')} {rec.get('action')} "
                       f"{rec.get('outcome')} {(rec.get('contract') or '-')[:8]} {extra}")


@audit.command("verify")
@pass_ctx
def audit_verify(c: Ctx) -> None:
    """Verify the hash chain, the checkpoint signatures and the mirrors (exit code 5 if broken)."""
    res = c.site.audit.verify(c.site.keystore.public_key())
    for p in res.problems:
        click.echo(_("error: {p}").format(p=p))
    click.echo(_("{n} records, {k} signed checkpoints (last at record {last}): {result}").format(
        n=res.records, k=res.checkpoints, last=res.last_checkpoint_seq,
        result=_("chain intact") if res.ok else _("TAMPERED OR DAMAGED")))
    if not res.ok:
        sys.exit(5)


@cli.group()
def certificate() -> None:
    """Signed export reports and deletion certificates."""


@certificate.command("verify")
@click.argument("document", type=click.Path(dir_okay=False))
@click.option("--public-key", type=click.Path(dir_okay=False, exists=True),
              help=_("Trust this provider public key (PEM) instead of the site's own."))
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@pass_ctx
def certificate_verify(c: Ctx, document: str, public_key: str | None, as_json: bool) -> None:
    """Check the Ed25519 signature of an export report or deletion certificate (offline)."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from .signing import verify

    if public_key:
        with open(public_key, "rb") as f:
            trusted = load_pem_public_key(f.read())
    else:
        trusted = c.site.keystore.public_key()
    res = verify(document, trusted)
    if as_json:
        _json({"valid": True, "key_fingerprint": res.fingerprint, "document_sha256": res.sha256,
               "type": res.document.get("type")})
        return
    click.echo(_("valid signature by the provider key {fp} on {type} {id}").format(
        fp=res.fingerprint, type=res.document.get("type", "?"), id=res.document.get("id", "?")))




@cli.command("command-server")
def command_server_cmd() -> None:
    """Keep kiwi-restore's runtime loaded and run this user's commands from it.

    Later `kiwi-restore` commands of the same user are forked from this process instead
    of starting Python and importing everything anew: a mount answers in about 0.2 s
    instead of 0.4 s. A command runs by itself as before when the server cannot hold it
    to what its caller is held to (docs/MOUNT.md). The socket is commands.sock in
    $KIWI_RESTORE_RUNTIME_DIR, else /run/kiwi-restore for root, else
    $XDG_RUNTIME_DIR/kiwi-restore. Stops on SIGTERM; the mounts it started stay. Meant for
    a systemd service (scripts/systemd/kiwi-restore-command-server.service).
    """
    from . import command_server, launcher

    command_server.run(launcher.runtime_dir())




from .fuse.cli import mount_cmd, umount_cmd  # noqa: E402, I001 - the FUSE view registers its commands
cli.add_command(mount_cmd), cli.add_command(umount_cmd)


from .exporter.cli import export as _export_cmd  # noqa: E402 (issue 4: the exporter's commands)

cli.add_command(_export_cmd)

from .location_cli import location, repair_cmd  # noqa: E402, I001 - storage locations and replicas
cli.add_command(location), cli.add_command(repair_cmd)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False, prog_name="kiwi-restore")
    except click.exceptions.Abort:
        click.echo(_("aborted"), err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KiwiError as exc:
        if debug:
            traceback.print_exc()
        label = _("error")
        click.echo(f"kiwi-restore: {label}: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(_("interrupted"), err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly, details with --debug
        if debug:
            traceback.print_exc()
        label = _("internal error")
        click.echo(f"kiwi-restore: {label}: {type(exc).__name__}: {exc}"
                   + ("" if debug else _(" (run with --debug for details)")), err=True)
        sys.exit(70)
    sys.exit(0)


if __name__ == "__main__":
    main()
