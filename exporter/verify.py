"""Verification: re-read every object at the destination and compare with the manifests.

The chain of trust starts at the root manifests whose SHA-256 the signed report pins
(tagmanifest-sha{256,512}.txt for a bag, SHA256SUMS otherwise); each manifest is hashed
while it is parsed, then every object it lists is read back in full and hashed. An S3
ETag is never used: it is not a content hash for multipart objects (and Ceph 16 returns
an empty one). The listing gives the extras.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from ..errors import NotFound
from .destinations import Destination
from .pipeline import Progress
from .plan import REPORT_FILES

ALGS = ("sha256", "sha512")


@dataclass
class VerifyResult:
    checked: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "objects_checked": self.checked, "bytes_read": self.bytes,
                "missing": sorted(self.missing), "extra": sorted(self.extra), "changed": sorted(self.changed)}


def _manifest_alg(key: str) -> tuple[str, str] | None:
    """(style, algorithm) of a manifest file, by its name."""
    base = key.rsplit("/", 1)[-1]
    for alg in ALGS:
        if base in (f"manifest-{alg}.txt", f"tagmanifest-{alg}.txt"):
            return "bagit", alg
        if base == f"{alg.upper()}SUMS":
            return "sums", alg
    return None


def parse_line(style: str, line: str) -> tuple[str, str] | None:
    line = line.rstrip("\n").rstrip("\r")
    if not line.strip():
        return None
    if style == "bagit":
        digest, _, path = line.partition(" ")
        path = path.lstrip(" \t")
        path = path.replace("%0D", "\r").replace("%0d", "\r").replace("%0A", "\n").replace("%0a", "\n")
        return digest.lower(), path.replace("%25", "%")
    escaped = line.startswith("\\")
    if escaped:
        line = line[1:]
    digest, _, path = line.partition(" ")
    if path.startswith(" ") or path.startswith("*"):
        path = path[1:]
    if escaped:
        out, i = [], 0
        while i < len(path):
            if path[i] == "\\" and i + 1 < len(path):
                out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(path[i + 1], path[i + 1]))
                i += 2
            else:
                out.append(path[i])
                i += 1
        path = "".join(out)
    return digest.lower(), path


async def _hash_object(dest: Destination, key: str, algs: set[str], progress: Progress | None,
                       parse: tuple[str, dict, str] | None = None) -> tuple[dict[str, str], int]:
    hashers = {a: hashlib.new(a) for a in algs}
    size = 0
    tail = b""
    async for data in dest.read(key):
        for h in hashers.values():
            h.update(data)
        size += len(data)
        if progress:
            progress.add(0, len(data))
        if parse is not None:
            style = parse[0]
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for raw in lines:
                _add(parse[1], style, raw, parse)
    if parse is not None and tail:
        _add(parse[1], parse[0], tail, parse)
    return {a: h.hexdigest() for a, h in hashers.items()}, size


def _add(entries: dict, style: str, raw: bytes, parse: tuple) -> None:
    got = parse_line(style, raw.decode("utf-8", "surrogateescape"))
    if got:
        digest, path = got
        entries.setdefault(path, {})[parse[2]] = digest


async def verify_destination(dest: Destination, roots: dict[str, str], jobs: int = 4,
                             progress: Progress | None = None) -> VerifyResult:
    """ROOTS: {root manifest key: its SHA-256} (from the journal or the signed report)."""
    res = VerifyResult()
    listing = await dest.list()
    expected: dict[str, dict[str, str]] = {k: {"sha256": v} for k, v in roots.items()}
    checked: set[str] = set()
    queue = list(roots)
    while queue:  # manifests first: each one read once, hashed while parsed
        key = queue.pop(0)
        entries: dict[str, dict[str, str]] = {}
        style, alg = _manifest_alg(key) or ("sums", "sha256")
        try:
            got, size = await _hash_object(dest, key, set(expected[key]), progress, (style, entries, alg))
        except NotFound:
            res.missing.append(key)
            checked.add(key)
            continue
        checked.add(key)
        res.checked += 1
        res.bytes += size
        if any(got[a] != v for a, v in expected[key].items()):
            res.changed.append(key)
            continue  # a changed manifest vouches for nothing
        for path, digests in entries.items():
            expected.setdefault(path, {}).update(digests)
            if _manifest_alg(path) and path not in checked and path not in queue:
                queue.append(path)

    todo = iter([k for k in expected if k not in checked])

    async def worker() -> None:
        for key in todo:  # shared iterator: JOBS objects read at a time
            if key not in listing:
                res.missing.append(key)
                continue
            try:
                got, size = await _hash_object(dest, key, set(expected[key]), progress)
            except NotFound:
                res.missing.append(key)
                continue
            res.checked += 1
            res.bytes += size
            if progress:
                progress.add(1, 0)
            if any(got[a] != v for a, v in expected[key].items()):
                res.changed.append(key)

    await asyncio.gather(*(worker() for _ in range(jobs)))
    allowed = set(expected) | set(REPORT_FILES)
    res.extra = sorted(k for k in listing if k not in allowed)
    return res
