"""Compression of blob and object payloads: one type byte, then the payload (FORMAT.md)."""

from __future__ import annotations

import threading

import zstandard

from .errors import IntegrityError

NONE = 0
ZSTD = 1
ZSTD_LEVEL = 3
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview) -> bytes:
    """Return type byte + payload; stored raw when zstd does not save at least 1/32."""
    if len(data) >= 64:
        packed = _compressor().compress(data)
        if len(packed) < len(data) - (len(data) >> 5):
            return bytes([ZSTD]) + packed
    return bytes([NONE]) + bytes(data)


def decompress(data: bytes, expected_size: int | None, what: str, view: bool = False) -> bytes | memoryview:
    """The payload of DATA. VIEW: a stored (uncompressed) payload comes back as a view of
    DATA instead of a copy (the mount reads gigabytes of incompressible chunks)."""
    if not data:
        raise IntegrityError(f"{what}: empty payload")
    kind = data[0]
    if kind == NONE:
        out = memoryview(data)[1:] if view else data[1:]
    elif kind == ZSTD:
        try:
            out = _decompressor().decompress(memoryview(data)[1:], max_output_size=expected_size or 0)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: bad compressed payload ({exc})") from None
    else:
        raise IntegrityError(f"{what}: unknown compression type {kind}")
    if expected_size is not None and len(out) != expected_size:
        raise IntegrityError(f"{what}: size {len(out)} differs from the index ({expected_size})")
    return out
