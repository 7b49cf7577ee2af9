"""Snapshot manifests (one per backup of one machine) and how users name them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgpack

from .errors import IntegrityError, NotFound, UsageError
from .i18n import _

SNAPSHOT_VERSION = 1


@dataclass
class Snapshot:
    id: bytes  # 32 random bytes, also the object's name
    time: int  # ns since the epoch, UTC
    machine: str
    hostname: str
    paths: list[bytes]
    tree: bytes
    tags: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    program: str = ""

    @property
    def hex(self) -> str:
        return self.id.hex()

    @property
    def short(self) -> str:
        return self.id.hex()[:8]

    @property
    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.time / 1e9, UTC)

    def iso(self) -> str:
        return self.datetime.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def dirname(self) -> str:
        """The snapshot's time, ISO 8601 UTC, safe in a file name (no ':')."""
        return self.datetime.strftime("%Y-%m-%dT%H%M%S.%fZ")

    def encode(self) -> bytes:
        return msgpack.packb({
            "version": SNAPSHOT_VERSION, "time": self.time, "machine": self.machine,
            "hostname": self.hostname, "paths": self.paths, "tree": self.tree, "tags": self.tags,
            "stats": self.stats, "program": self.program,
        }, use_bin_type=True)

    @classmethod
    def decode(cls, sid: bytes, data: bytes) -> Snapshot:
        try:
            d = msgpack.unpackb(data, raw=False)
            if d.get("version") != SNAPSHOT_VERSION:
                raise IntegrityError(f"snapshot {sid.hex()}: unsupported version {d.get('version')}")
            return cls(id=sid, time=d["time"], machine=d["machine"], hostname=d["hostname"],
                       paths=list(d["paths"]), tree=d["tree"], tags=list(d.get("tags", [])),
                       stats=dict(d.get("stats", {})), program=d.get("program", ""))
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"snapshot {sid.hex()}: malformed ({exc})") from None


def parse_time(text: str) -> int:
    """An ISO 8601 time (UTC when no offset is given) to ns since the epoch."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(_("invalid time {text!r} (expected e.g. 2026-03-01T10:00)").format(text=text)) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1_000_000) * 1000


def newest_at(snaps: list[Snapshot], at_ns: int) -> Snapshot | None:
    best = None
    for s in snaps:
        if s.time <= at_ns and (best is None or s.time > best.time):
            best = s
    return best


def resolve(snaps: list[Snapshot], spec: str | None, at: str | None = None,
            machine: str | None = None) -> Snapshot:
    """SNAPSHOT as an id, a unique id prefix or 'latest'; or --at TIME (newest at or before)."""
    if machine is not None:
        snaps = [s for s in snaps if s.machine == machine]
    if at is not None:
        if spec not in (None, "latest"):
            raise UsageError(_("give either a snapshot or --at, not both"))
        found = newest_at(snaps, parse_time(at))
        if found is None:
            raise NotFound(_("no snapshot at or before {at}").format(at=at))
        return found
    if spec is None:
        raise UsageError(_("name a snapshot (an id, a unique prefix, 'latest') or use --at"))
    if spec == "latest":
        if not snaps:
            raise NotFound(_("this contract has no snapshot yet"))
        return max(snaps, key=lambda s: s.time)
    spec_l = spec.lower()
    matches = [s for s in snaps if s.hex.startswith(spec_l)]
    if not matches:
        raise NotFound(_("no snapshot {spec}").format(spec=spec))
    if len(matches) > 1:
        raise UsageError(_("snapshot prefix {spec} is ambiguous ({n} matches)").format(spec=spec, n=len(matches)))
    return matches[0]
