"""Signed documents (export reports, deletion certificates): canonical JSON + Ed25519.

A signed document is written as three files sharing a stem:
    STEM.json            {"document": {...}, "signature": {...}}  (what tools read)
    STEM.canonical.json  the exact bytes that were signed (canonical JSON of "document")
    STEM.sig             the raw 64-byte Ed25519 signature of those bytes
so a third party can check it with openssl alone (docs/CERTIFICATES.md):
    openssl pkeyutl -verify -pubin -inkey provider.pem -rawin -in STEM.canonical.json -sigfile STEM.sig

Canonical JSON: keys sorted, no insignificant whitespace, UTF-8, no floats (integers and
strings only), which makes it identical to RFC 8785 (JCS) for these documents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import IntegrityError, UsageError
from .fsutil import write_atomic


def canonical_json(doc: dict) -> bytes:
    _reject_floats(doc)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_floats(obj) -> None:
    if isinstance(obj, float):
        raise ValueError("floats are not allowed in signed documents (use integers or strings)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError("keys of signed documents must be strings")
            _reject_floats(v)
    elif isinstance(obj, list):
        for v in obj:
            _reject_floats(v)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    return "SHA256:" + hashlib.sha256(raw_public(key)).hexdigest()


def sign(doc: dict, key: Ed25519PrivateKey) -> dict:
    data = canonical_json(doc)
    pub = key.public_key()
    return {"document": doc, "signature": {
        "algorithm": "Ed25519", "canonicalization": "JSON, sorted keys, no whitespace, UTF-8 (RFC 8785 subset)",
        "public_key": base64.b64encode(raw_public(pub)).decode(), "key_fingerprint": fingerprint(pub),
        "value": base64.b64encode(key.sign(data)).decode(),
        "document_sha256": hashlib.sha256(data).hexdigest()}}


def write_signed(stem: str, envelope: dict) -> list[str]:
    """Write STEM.json, STEM.canonical.json and STEM.sig; return the paths."""
    data = canonical_json(envelope["document"])
    paths = [stem + ".json", stem + ".canonical.json", stem + ".sig"]
    write_atomic(paths[0], json.dumps(envelope, indent=1, ensure_ascii=False, sort_keys=True).encode(), 0o644)
    write_atomic(paths[1], data, 0o644)
    write_atomic(paths[2], base64.b64decode(envelope["signature"]["value"]), 0o644)
    return paths


@dataclass
class Verification:
    document: dict
    fingerprint: str
    trusted: bool  # the signing key is the one given as trusted (else only self-consistent)
    sha256: str


def verify(path: str, trusted: Ed25519PublicKey | None = None) -> Verification:
    """Check a signed document file (STEM.json); IntegrityError if anything is off."""
    try:
        with open(path, "rb") as f:
            env = json.load(f)
        doc, sig = env["document"], env["signature"]
        if sig.get("algorithm") != "Ed25519":
            raise IntegrityError(f"{path}: unsupported signature algorithm {sig.get('algorithm')!r}")
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"]))
        signature = base64.b64decode(sig["value"])
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path}: not a signed kiwi-restore document ({exc})") from None
    data = canonical_json(doc)
    if trusted is not None and raw_public(trusted) != raw_public(pub):
        raise IntegrityError(f"{path}: signed by key {fingerprint(pub)}, not by the trusted key {fingerprint(trusted)}")
    try:
        pub.verify(signature, data)
    except InvalidSignature:
        raise IntegrityError(f"{path}: signature does not match the document (altered)") from None
    stem = path[:-5] if path.endswith(".json") else path
    if os.path.exists(stem + ".canonical.json"):
        with open(stem + ".canonical.json", "rb") as f:
            if f.read() != data:
                raise IntegrityError(f"{stem}.canonical.json differs from the signed document")
    return Verification(doc, fingerprint(pub), trusted is not None, hashlib.sha256(data).hexdigest())
