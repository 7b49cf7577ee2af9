"""Stored names (bytes) to destination keys (text) that are safe everywhere, reversibly.

A path component is kept as is when it is valid UTF-8 without control characters, without
'%' or '^', not '.' or '..', and at most MAX_COMPONENT bytes. Anything else is encoded byte
by byte: every offending byte (invalid UTF-8, a control character, '%', '^') becomes ^XX
(hex), so the rule is injective and a reader can decode it without our software. '^' and
not '%' is the escape because BagIt manifests give '%' a meaning of their own (RFC 8493
§2.1.3) that bagit-python does not implement: exported names never contain '%'. A component still too long after
encoding is cut and suffixed with a hash of the original; a whole key too long for the
destination becomes a hash below `~long/`. Both are recorded in the export's names.jsonl.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

from ..errors import KiwiError

MAX_COMPONENT = 255
ESCAPE = "^"
ESCAPED = ("%", "^")


class UnsafeKey(KiwiError):
    """A destination key that could escape the destination root (a bug, never written)."""


def _char_ok(ch: str) -> bool:
    cat = unicodedata.category(ch)
    # Cc: C0/C1 controls; Cs: surrogates (never in valid UTF-8); Zl/Zp: line/paragraph separators
    return cat not in ("Cc", "Cs", "Zl", "Zp") and ch not in ESCAPED


# What _char_ok refuses, as one character class: Cc is exactly U+0000-001F and U+007F-009F,
# Zl is U+2028 and Zp U+2029 alone; Cs (surrogates) never comes out of strict UTF-8 decoding.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc
_UNSAFE_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029%^\ud800-\udfff]")


def component_is_safe(name: bytes) -> bool:
    if not name or name in (b".", b"..") or len(name) > MAX_COMPONENT or b"/" in name:
        return False
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _UNSAFE_CHAR.search(text) is None


@functools.lru_cache(maxsize=1 << 16)
def encode_component(name: bytes) -> tuple[str, bool]:
    """(text, changed): NAME as a safe component, percent-encoded where needed."""
    if component_is_safe(name):
        return name.decode("utf-8"), False
    out: list[str] = []
    i = 0
    while i < len(name):
        # decode one UTF-8 character at a time; keep it when it is a safe character
        for width in (1, 2, 3, 4):
            piece = name[i:i + width]
            try:
                ch = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1 and _char_ok(ch) and ch != "/":
                out.append(ch)
                i += width
                break
            out.append("".join(f"^{b:02X}" for b in piece))
            i += width
            break
        else:
            out.append(f"^{name[i]:02X}")
            i += 1
    text = "".join(out)
    if text in (".", ".."):
        text = text.replace(".", "^2E")
    if len(text.encode()) > MAX_COMPONENT:
        text = _shorten(text, name)
    return text, True


def _shorten(text: str, original: bytes) -> str:
    tag = "~" + hashlib.sha256(original).hexdigest()[:16]
    room = MAX_COMPONENT - len(tag) - 16
    cut = ""
    for ch in text:
        if len((cut + ch).encode()) > room:
            break
        cut += ch
    # never end inside a %XX escape
    k = cut.rfind("^")
    if k >= 0 and len(cut) - k < 3:
        cut = cut[:k]
    return cut + tag


def _encode_components(path: bytes) -> tuple[str, bool]:
    changed = False
    out = []
    for p in path.split(b"/"):
        if p:
            text, c = encode_component(p)
            out.append(text)
            changed |= c
    return "/".join(out), changed


@functools.lru_cache(maxsize=1 << 12)
def _encode_dir(path: bytes) -> tuple[str, bool]:
    return _encode_components(path)


def encode_path(path: bytes) -> tuple[str, bool]:
    """A stored path ('/a/b', bytes) to a relative safe key ('a/b'), and whether it changed."""
    parent, _, name = path.rpartition(b"/")
    if not parent:
        return _encode_components(path)
    # walks list a directory's entries together: its encoding is computed once for all of them
    head, c1 = _encode_dir(parent)
    if not name:
        return head, c1
    text, c2 = encode_component(name)
    return (f"{head}/{text}" if head else text), c1 or c2


def long_key(prefix: str, original: bytes) -> str:
    """Where a path too long for the destination goes (recorded in names.jsonl)."""
    return f"{prefix}/~long/{hashlib.sha256(original).hexdigest()}"


def check_key(key: str, max_bytes: int = 1024) -> str:
    """Refuse any key that could land outside the destination root (defence in depth)."""
    if not key or key.startswith("/") or "\0" in key:
        raise UnsafeKey(f"unsafe destination key {key!r}")
    raw = key.encode("utf-8")
    if len(raw) > max_bytes:
        raise UnsafeKey(f"destination key too long ({len(raw)} bytes)")
    if _CONTROL.search(key):
        raise UnsafeKey(f"unsafe destination key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or len(part.encode()) > MAX_COMPONENT:
            raise UnsafeKey(f"unsafe destination key {key!r}")
    return key


def decode_component(text: str) -> bytes:
    """The inverse of encode_component for components that were not shortened."""
    out = bytearray()
    raw = text.encode("utf-8")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5E and i + 3 <= len(raw):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)
