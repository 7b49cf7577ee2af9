"""CLI for storage locations: `location add/list`, `repair`, and `check --locations`
(registered on the main group by cli.py; kept apart so cli.py stays thin)."""

from __future__ import annotations

import json
import sys

import click

from .i18n import _
from .site import Site


def _json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, ensure_ascii=False))


@click.group()
def location() -> None:
    """Storage locations of the site (primary store, disaster-recovery replica...)."""


@location.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--create-bucket", is_flag=True, help=_("Create the S3 bucket if it does not exist."))
@click.pass_obj
def location_add(c, name: str, url: str, create_bucket: bool) -> None:
    """Declare location NAME at URL (a directory, or s3://BUCKET/PREFIX?endpoint=...), after
    checking that it answers. Credentials are never part of the URL (docs/DEPLOYMENT.md)."""
    site: Site = c.site
    site.add_location(name, url, create_bucket)
    site.audit.append("location.add", details={"name": name, "url": url})
    click.echo(_("location {name} added: {url}").format(name=name, url=url))


@location.command("list")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@click.pass_obj
def location_list(c, as_json: bool) -> None:
    """List the site's locations and how many contracts use each."""
    site: Site = c.site
    used: dict[str, int] = {}
    for r in site.list_contracts():
        for n in r.locations:
            used[n] = used.get(n, 0) + 1
    locs = site.config["locations"]
    if as_json:
        _json({n: {"url": u, "contracts": used.get(n, 0)} for n, u in locs.items()})
        return
    for n, u in locs.items():
        click.echo(f"{n:16} {used.get(n, 0):4} {u}")


def check_locations(site: Site, contract: str, read_data: bool, as_json: bool) -> None:
    """`check CONTRACT --locations`: exit code 5 when the locations differ."""
    from .locations import compare_audited
    from .progress import bytes_bar

    with bytes_bar(_("check")) as bar:
        diff = compare_audited(site, contract, read_data, (lambda n: bar(0, n)) if bar and read_data else None)
    if as_json:
        _json(diff.to_dict())
    else:
        for name, err in diff.unreachable.items():
            click.echo(_("error: location {name} unreachable: {err}").format(name=name, err=err))
        for d in diff.differences:
            click.echo(_("{problem}: {key} in {location} ({detail})").format(**d))
        click.echo(_("{n} objects compared across {locs}: {result}").format(
            n=diff.objects, locs=", ".join(diff.locations),
            result=_("identical") if diff.ok else _("{n} differences").format(n=len(diff.differences))))
    if not diff.ok:
        sys.exit(5)


@click.command("repair")
@click.argument("contract")
@click.option("--json", "as_json", is_flag=True, help=_("Print JSON."))
@click.pass_obj
def repair_cmd(c, contract: str, as_json: bool) -> None:
    """Copy what is missing or corrupt in a location of CONTRACT from a location whose copy
    decrypts and authenticates (exit code 5 if something has no good copy anywhere)."""
    from .locations import repair_audited
    from .progress import bytes_bar

    with bytes_bar(_("repair")) as bar:
        report = repair_audited(c.site, contract, (lambda n: bar(0, n)) if bar else None)
    if as_json:
        _json(report.to_dict())
    else:
        for r in report.copied:
            click.echo(_("copied {key} from {src} to {dst} ({reason})").format(
                key=r["key"], src=r["from"], dst=r["to"], reason=r["reason"]))
        for r in report.unrepairable:
            click.echo(_("error: {key}: {detail}").format(**r))
        click.echo(_("{n} objects copied; {bad} without a good copy").format(
            n=len(report.copied), bad=len(report.unrepairable)))
    if not report.ok:
        sys.exit(5)
