"""Storage backends: a small interface (get, ranged get, atomic put, list, delete)."""

from .base import Backend, ObjectInfo
from .local import LocalBackend

__all__ = ["Backend", "LocalBackend", "ObjectInfo", "open_backend"]


def open_backend(url: str) -> Backend:
    """Open a location from its URL: a plain path or file:///path for a local directory."""
    if url.startswith("file://"):
        return LocalBackend(url[len("file://"):])
    if "://" in url:
        from ..errors import UsageError

        raise UsageError(f"unsupported storage location {url!r} (supported: a directory path)")
    return LocalBackend(url)
