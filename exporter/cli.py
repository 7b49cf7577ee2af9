"""`kiwi-restore export` and `kiwi-restore export verify` (click); the work is in export.py."""

from __future__ import annotations

import json
import sys

import click

from ..i18n import _
from ..units import human_bytes


class _ExportGroup(click.Group):
    """`export CONTRACT --to DEST ...` runs an export; `export verify ...` verifies one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _dest_options(f):  # noqa: ANN001, ANN202
    for opt in reversed([
        click.option("--to", "to", required=True, metavar="DEST",
                     help=_("A directory, s3://bucket/prefix or sftp://user@host:port/path.")),
        click.option("--endpoint-url", help=_("S3 endpoint (https://; http:// only on loopback).")),
        click.option("--region", help=_("Destination region or EU country code (S3 signing region too).")),
        click.option("--profile", help=_("S3 credentials profile (else the AWS_* environment).")),
        click.option("--profile-file", type=click.Path(dir_okay=False, exists=True),
                     help=_("Credentials file holding --profile.")),
        click.option("--ssh-key", type=click.Path(dir_okay=False, exists=True), help=_("SFTP private key.")),
        click.option("--known-hosts", type=click.Path(dir_okay=False, exists=True),
                     help=_("SFTP known_hosts file (the host key is always checked).")),
        click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
                     help=_("Objects in flight to S3 or SFTP (not used by a local export: one writer thread for tar and zip, one writer process per core for BagIt and tree).")),
        click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]),
                     default="auto", show_default=True,
                     help=_("Progress bar on a terminal, JSON lines on stderr otherwise.")),
        click.option("--json", "as_json", is_flag=True, help=_("Print the summary as JSON.")),
    ]):
        f = opt(f)
    return f


def _opts(kw: dict):  # noqa: ANN202
    from .destinations import DestOptions

    return DestOptions(endpoint_url=kw.pop("endpoint_url"), region=kw.pop("region"), profile=kw.pop("profile"),
                       profile_file=kw.pop("profile_file"), ssh_key=kw.pop("ssh_key"),
                       known_hosts=kw.pop("known_hosts"))




@click.group("export", cls=_ExportGroup)
def export() -> None:
    """Reversibility: export a whole contract to a new provider, verify it there (docs/EXPORT.md)."""


@export.command("run")
@click.argument("contract")
@click.option("--format", "fmt", type=click.Choice(["bagit", "tar", "zip", "tree"]), default="bagit",
              show_default=True, help=_("BagIt bag, POSIX pax tar, ZIP64, or plain files."))
@click.option("--snapshots", "which", type=click.Choice(["all", "latest"]), default="all", show_default=True,
              help=_("Every snapshot, or the newest of each machine."))
@click.option("--at", help=_("Only snapshots at or before this time (ISO 8601, UTC)."))
@click.option("--machine", "-m", "machines", multiple=True, help=_("Only this machine (repeatable)."))
@click.option("--allow-non-eu", is_flag=True,
              help=_("The client expressly authorised a destination outside the EU (Art. 12.4); recorded."))
@click.option("--tar-per-contract", is_flag=True, help=_("One tar for the whole contract, not one per snapshot."))
@click.option("--no-verify", is_flag=True, help=_("Skip re-reading the destination at the end."))
@_dest_options
@click.pass_context
def run(ctx: click.Context, contract: str, fmt: str, which: str, at: str | None, machines: tuple[str, ...],
        allow_non_eu: bool, tar_per_contract: bool, no_verify: bool, **kw) -> None:
    """Export CONTRACT to --to DEST; re-running the same command resumes an interrupted export."""
    from .export import export_contract

    site = ctx.find_root().obj.site
    as_json, progress_mode, jobs, to = kw.pop("as_json"), kw.pop("progress_mode"), kw.pop("jobs"), kw.pop("to")
    res = export_contract(site, contract, to, fmt=fmt, which=which, at=at, machines=list(machines), jobs=jobs,
                          opts=_opts(kw), allow_non_eu=allow_non_eu, tar_per_contract=tar_per_contract,
                          progress_mode=progress_mode, verify=not no_verify)
    for w in res.warnings:
        click.echo(_("warning: {err}").format(err=w), err=True)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=1, ensure_ascii=False))
        return
    rate = res.bytes / res.seconds if res.seconds else 0
    click.echo(_("exported {snaps} snapshots ({files} files, {size}) of {contract} as {fmt} to {dest} in {secs:.1f} s "
                 "({rate}/s); {sent} objects sent, {skipped} already there").format(
        snaps=res.snapshots, files=res.files, size=human_bytes(res.bytes), contract=contract, fmt=res.format,
        dest=res.destination, secs=res.seconds, rate=human_bytes(rate), sent=res.sent, skipped=res.skipped))
    click.echo(_("verification: {n} objects re-read, all identical").format(n=res.verification.checked)
               if not no_verify else _("verification skipped"))
    click.echo(_("signed report: {path}").format(path=res.report_path))


@export.command("verify")
@_dest_options
@click.pass_context
def verify_cmd(ctx: click.Context, **kw) -> None:
    """Re-read every object at --to DEST and compare with its manifests and signed report (exit 5 if not)."""
    from .export import verify_export

    site = ctx.find_root().obj.site
    as_json, progress_mode, jobs, to = kw.pop("as_json"), kw.pop("progress_mode"), kw.pop("jobs"), kw.pop("to")
    doc, res = verify_export(site, to, _opts(kw), jobs, progress_mode)
    if as_json:
        click.echo(json.dumps({"report": doc["id"], "contract": doc["contract"]["name"], **res.to_dict()},
                              indent=1, ensure_ascii=False))
    else:
        for label, keys in ((_("missing"), res.missing), (_("extra"), res.extra), (_("changed"), res.changed)):
            for k in keys:
                click.echo(f"{label}: {k}")
        click.echo(_("{n} objects re-read ({size}) for report {id}: {result}").format(
            n=res.checked, size=human_bytes(res.bytes), id=doc["id"],
            result=_("all identical") if res.ok else _("VERIFICATION FAILED")))
    if not res.ok:
        sys.exit(5)
