"""Which snapshots a mount shows, and under which names (pure: no FUSE, no I/O).

    MOUNT/<machine>/<snapshot time, ISO 8601 UTC>/<original absolute paths>
    MOUNT/<machine>/latest -> <newest snapshot directory of that machine>

Two snapshots of one machine with the same time get the snapshot's short id as a suffix,
so names stay stable whatever order the store lists them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NotFound, UsageError
from ..i18n import _
from ..snapshot import Snapshot, newest_at, parse_time, resolve


@dataclass
class SnapshotDir:
    name: bytes
    snap: Snapshot
    no: int  # index in Layout.snapshots


@dataclass
class MachineDir:
    name: bytes
    snapshots: list[SnapshotDir] = field(default_factory=list)  # oldest first

    @property
    def latest(self) -> SnapshotDir:
        return max(self.snapshots, key=lambda s: (s.snap.time, s.snap.id))


@dataclass
class Layout:
    machines: list[MachineDir]  # sorted by name

    @property
    def snapshots(self) -> list[Snapshot]:
        return [sd.snap for m in self.machines for sd in m.snapshots]

    @property
    def newest_time(self) -> int:
        return max(sd.snap.time for m in self.machines for sd in m.snapshots)


def select(snaps: list[Snapshot], machine: str | None = None, snapshot: str | None = None,
           at: str | None = None) -> list[Snapshot]:
    """The snapshots to show: all of them, one (--snapshot ID), the newest per machine
    (--snapshot latest), or per machine the newest at or before --at TIME."""
    if machine is not None:
        snaps = [s for s in snaps if s.machine == machine]
        if not snaps:
            raise NotFound(_("no snapshot of machine {m!r} in this contract").format(m=machine))
    if at is not None:
        if snapshot not in (None, "latest"):
            raise UsageError(_("give either a snapshot or --at, not both"))
        at_ns = parse_time(at)
        chosen = []
        for m in sorted({s.machine for s in snaps}):
            found = newest_at([s for s in snaps if s.machine == m], at_ns)
            if found is not None:
                chosen.append(found)
        if not chosen:
            raise NotFound(_("no snapshot at or before {at}").format(at=at))
        return chosen
    if snapshot == "latest":
        newest: dict[str, Snapshot] = {}
        for s in snaps:
            if s.machine not in newest or (s.time, s.id) > (newest[s.machine].time, newest[s.machine].id):
                newest[s.machine] = s
        if not newest:
            raise NotFound(_("this contract has no snapshot yet"))
        return [newest[m] for m in sorted(newest)]
    if snapshot is not None:
        return [resolve(snaps, snapshot)]
    if not snaps:
        raise NotFound(_("this contract has no snapshot yet"))
    return list(snaps)


def build(snaps: list[Snapshot]) -> Layout:
    by_machine: dict[str, list[Snapshot]] = {}
    for s in snaps:
        by_machine.setdefault(s.machine, []).append(s)
    machines = []
    no = 0
    for m in sorted(by_machine):
        md = MachineDir(m.encode())
        used: set[bytes] = {b"latest"}
        for s in sorted(by_machine[m], key=lambda s: (s.time, s.id)):
            name = s.dirname().encode()
            if name in used:
                name = f"{s.dirname()}-{s.short}".encode()
                if name in used:  # two ids with one 8-digit prefix: the full id is unique
                    name = f"{s.dirname()}-{s.hex}".encode()
            used.add(name)
            md.snapshots.append(SnapshotDir(name, s, no))
            no += 1
        machines.append(md)
    return Layout(machines)
