"""Storage backends: a small interface (get, ranged get, atomic put, list, delete)."""

from .base import Backend, ObjectInfo
from .local import LocalBackend

__all__ = ["Backend", "LocalBackend", "ObjectInfo", "open_backend"]


def open_backend(url: str) -> Backend:
    """Open a location from its URL: a directory path, file:///path, or s3://bucket/prefix?...
    (parameters in kiwi_restore/storage/s3.py and docs/DEPLOYMENT.md)."""
    if url.startswith("file://"):
        return LocalBackend(url[len("file://"):])
    if url.startswith("s3://"):
        from .s3 import S3Backend  # botocore loads in ~0.2 s: only when a location needs it

        return S3Backend.from_url(url)
    if "://" in url:
        from ..errors import UsageError

        raise UsageError(f"unsupported storage location {url!r} (supported: a directory path, s3://BUCKET/PREFIX)")
    return LocalBackend(url)
