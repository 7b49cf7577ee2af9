"""`kiwi-restore mount` and `kiwi-restore umount` (registered by kiwi_restore/cli.py).

pyfuse3 and trio are imported inside the commands, so `kiwi-restore --help` stays fast.
"""

from __future__ import annotations

import click

from ..i18n import _


@click.command("mount")
@click.argument("contract")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--machine", "-m", help=_("Only this machine's snapshots."))
@click.option("--snapshot", "-s", metavar="ID|latest",
              help=_("Only this snapshot (an id or unique prefix), or 'latest': the newest of each machine."))
@click.option("--at", metavar="TIME",
              help=_("Per machine, only the newest snapshot at or before TIME (ISO 8601, UTC)."))
@click.option("--foreground", "-f", is_flag=True, help=_("Stay in the foreground (Ctrl-C unmounts)."))
@click.option("--allow-other", is_flag=True,
              help=_("Let other local users in (the stored permissions still apply)."))
@click.option("--cache-size", default="64M", show_default=True, metavar="SIZE",
              help=_("Memory for directory listings (a third) and decrypted chunks (the rest)."))
@click.pass_obj
def mount_cmd(c, contract: str, mountpoint: str, machine: str | None, snapshot: str | None,
              at: str | None, foreground: bool, allow_other: bool, cache_size: str) -> None:
    """Mount the snapshots of CONTRACT read-only on MOUNTPOINT.

    Layout: MOUNTPOINT/<machine>/<snapshot time, UTC>/<original paths>, and a 'latest'
    link per machine. Without --foreground the command returns once the mount answers.
    """
    from .daemon import MountOptions, mount, parse_size

    opts = MountOptions(mountpoint, machine, snapshot, at, foreground, allow_other,
                        parse_size(cache_size), c.debug)
    click.echo(mount(c.site, contract, opts), err=foreground)


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.pass_obj
def umount_cmd(c, mountpoint: str) -> None:
    """Unmount a kiwi-restore mount, also one left behind by a process that died."""
    from ..errors import KiwiError
    from .daemon import umount

    site = c.site
    try:
        site.tmp_dir()
    except KiwiError:
        site = None  # no site here: unmount all the same, without waiting for the daemon
    click.echo(umount(site, mountpoint))
