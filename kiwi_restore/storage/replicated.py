"""A contract stored in several locations (primary + disaster-recovery replica, Santé Art. 2.3).

Writes go to every location and succeed only when every location has the object.
Reads go to the first location (the primary) and fail over, in order, to the next one when
the object is missing, the location is unreachable, or — through read_verified(), which the
repository calls with its AEAD check — the bytes fail authentication. Each failover is logged
and reported once per (object, location) to `on_failover` (the site writes it to the audit
trail as `storage.failover`). Listings are the union of every reachable location, so an
object lost in the primary is still found. Deletes go to every location.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..errors import BackendError, IntegrityError, NotFound, ObjectExists
from .base import Backend, ObjectInfo

log = logging.getLogger("kiwi_restore.storage")
T = TypeVar("T")
# (object key, location that failed, location that served, why)
FailoverHook = Callable[[str, str, str, str], None]


class ReplicatedBackend(Backend):
    # A location that failed (network, 5xx after its retries) is tried last for this long:
    # reads go straight to a healthy copy, writes fail at once instead of paying the
    # retries again for every object of a backup that can no longer succeed.
    DOWN_SECONDS = 30.0

    def __init__(self, locations: list[tuple[str, Backend]], on_failover: FailoverHook | None = None) -> None:
        if not locations:
            raise ValueError("a replicated backend needs at least one location")
        self.locations = list(locations)
        self.names = [n for n, _ in self.locations]
        self.url = self.locations[0][1].url + "".join(f" (+{n} {b.url})" for n, b in self.locations[1:])
        self.remote = self.locations[0][1].remote  # reads go to the first healthy location
        self.on_failover = on_failover
        self.failovers: list[dict] = []
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._served = threading.local()  # which location answered this thread's last read
        self._writers: ThreadPoolExecutor | None = None
        self._down: dict[str, tuple[float, str]] = {}  # name -> (until, why)

    # -- health ------------------------------------------------------------------
    def _mark_down(self, name: str, why: str) -> None:
        with self._lock:
            self._down[name] = (time.monotonic() + self.DOWN_SECONDS, why)

    def _mark_up(self, name: str) -> None:
        if name in self._down:
            with self._lock:
                self._down.pop(name, None)

    def _down_reason(self, name: str) -> str | None:
        entry = self._down.get(name)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def _ordered(self) -> list[tuple[str, Backend]]:
        """Healthy locations first, in their configured order; recently failed ones last."""
        up = [(n, b) for n, b in self.locations if self._down_reason(n) is None]
        return up + [(n, b) for n, b in self.locations if self._down_reason(n) is not None]

    # -- failover ----------------------------------------------------------------
    def _failover(self, key: str, failed: str, served: str, why: str) -> None:
        with self._lock:
            if (key, failed) in self._reported:
                return
            self._reported.add((key, failed))
            self.failovers.append({"key": key, "failed": failed, "served": served, "reason": why})
        log.warning("storage failover: %s unreadable in %s (%s), read from %s", key, failed, why, served)
        if self.on_failover is not None:
            self.on_failover(key, failed, served, why)

    def _read(self, key: str, fn: Callable[[Backend], bytes]) -> bytes:
        failed: list[tuple[str, str]] = []
        missing = 0
        for name, backend in self._ordered():
            try:
                data = fn(backend)
            except NotFound:
                failed.append((name, "missing"))
                missing += 1
                continue
            except BackendError as exc:
                self._mark_down(name, str(exc))
                failed.append((name, f"unreadable: {exc}"))
                continue
            self._mark_up(name)
            self._served.name = name
            for fname, why in failed:
                self._failover(key, fname, name, why)
            if name != self.names[0] and not failed:
                # the primary is skipped while it is down: say so once, for this first key
                why = self._down_reason(self.names[0])
                if why is not None:
                    self._failover("*", self.names[0], name, f"unreadable: {why}")
            return data
        if missing == len(self.locations):
            raise NotFound(f"object {key} is missing from every location ({', '.join(self.names)})")
        raise BackendError(f"object {key} cannot be read from any location: "
                           + "; ".join(f"{n}: {why}" for n, why in failed))

    def get(self, key: str) -> bytes:
        return self._read(key, lambda b: b.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._read(key, lambda b: b.get_range(key, offset, length))

    def read_verified(self, key: str, read: Callable[[Backend], bytes], verify: Callable[[bytes], T],
                      data: bytes | None = None) -> T:
        skip = None
        try:
            if data is None:
                data = read(self)
                skip = self._served.name  # no need to read that copy again
            return verify(data)
        except IntegrityError as exc:
            first = exc
        # DATA handed in may have come from any location (another thread may have read it):
        # then every location is tried again, the bad one simply fails a second time.
        bad = skip or getattr(self._served, "name", self.names[0])
        for name, backend in self.locations:
            if name == skip:
                continue
            try:
                result = verify(read(backend))
            except (IntegrityError, NotFound, BackendError):
                continue
            if name == bad:
                return result  # that copy is good after all: the bytes handed in were not it
            self._failover(key, bad, name, f"authentication failed: {first}")
            return result
        raise first

    # -- writes ------------------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replica-put")
            return self._writers

    def put(self, key: str, data: bytes) -> None:
        # Every location in parallel; success only when each one has it. A failed location
        # leaves the others' copy in place: a rerun writes new random ids, and
        # `kiwi-restore repair` copies anything still missing.
        for name, _b in self.locations:
            why = self._down_reason(name)
            if why is not None:
                raise BackendError(f"write of {key} refused: location {name} failed less than "
                                   f"{self.DOWN_SECONDS:.0f} s ago ({why})")
        futures = [(name, self._pool().submit(b.put, key, data)) for name, b in self.locations[1:]]
        errors: list[tuple[str, BaseException]] = []
        try:
            self.locations[0][1].put(key, data)
        except Exception as exc:
            errors.append((self.names[0], exc))
        for name, fut in futures:
            try:
                fut.result()
            except Exception as exc:
                errors.append((name, exc))
        if not errors:
            return
        if all(isinstance(e, ObjectExists) for _, e in errors):
            raise ObjectExists(f"object {key} already exists in {', '.join(n for n, _ in errors)}")
        hard = [(n, e) for n, e in errors if not isinstance(e, ObjectExists)]
        for n, e in hard:
            if isinstance(e, BackendError):
                self._mark_down(n, str(e))
        name, exc = hard[0]
        raise BackendError(f"write of {key} failed in location {name}: {exc}"
                           + (f" (and {len(hard) - 1} more)" if len(hard) > 1 else "")) from exc

    def delete(self, key: str) -> None:
        self._each(lambda b: b.delete(key), f"delete {key}")

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._each(lambda b: b.delete_many(keys), f"delete of {len(keys)} objects")

    def _each(self, fn: Callable[[Backend], None], what: str) -> None:
        errors = []
        for name, backend in self.locations:
            try:
                fn(backend)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise BackendError(f"{what} failed in " + "; ".join(errors))

    # -- listing -----------------------------------------------------------------
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        seen: dict[str, ObjectInfo] = {}
        errors = []
        for name, backend in self.locations:
            try:
                for info in backend.list(prefix):
                    seen.setdefault(info.key, info)
            except BackendError as exc:
                errors.append((name, exc))
        if len(errors) == len(self.locations):
            raise BackendError(f"cannot list {prefix} in any location: "
                               + "; ".join(f"{n}: {e}" for n, e in errors))
        for name, exc in errors:
            reachable = next(n for n in self.names if n not in {e[0] for e in errors})
            self._failover(prefix or "/", name, reachable, f"listing failed: {exc}")
        yield from (seen[k] for k in sorted(seen))

    def exists(self, key: str) -> bool:
        for _name, backend in self.locations:
            try:
                if backend.exists(key):
                    return True
            except BackendError:
                continue
        return False

    def close(self) -> None:
        with self._lock:
            pool, self._writers = self._writers, None
        if pool is not None:
            pool.shutdown(wait=True)
