"""The storage backend interface every location implements (local directory, S3...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Backend(ABC):
    """Keys are '/'-separated relative names ('contracts/<id>/data/ab/<hex>').

    Implementations are thread-safe and blocking. put() is atomic and never overwrites:
    an existing key raises ObjectExists. get() of a missing key raises NotFound.
    """

    url: str
    # a request costs a network round trip (milliseconds, not microseconds): readers
    # should keep more requests in flight and merge neighbouring ranges more eagerly
    remote: bool = False

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (idempotent)."""

    def exists(self, key: str) -> bool:
        from ..errors import NotFound

        try:
            self.get_range(key, 0, 0)
            return True
        except NotFound:
            return False

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several objects (S3 batches them); idempotent like delete()."""
        for key in keys:
            self.delete(key)

    def read_verified(self, key: str, read: Callable[[Backend], bytes], verify: Callable[[bytes], T],
                      data: bytes | None = None) -> T:
        """VERIFY (decrypt and authenticate) what READ fetches from this backend, or DATA when
        the caller already fetched it. A single location has nothing else to try; a replicated
        backend retries the other locations when VERIFY raises IntegrityError."""
        return verify(read(self) if data is None else data)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
