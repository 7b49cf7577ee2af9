"""Contract keys, derived working keys and the AEAD envelope of every stored object.

The exact byte layouts are specified in docs/FORMAT.md; this module is their reference
implementation. AES-256-GCM with 96-bit random nonces under a key derived per stored file
(pack or object), so the number of encryptions under one key stays tiny (see FORMAT.md
"Nonce bound").
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

FORMAT_VERSION = 1
MAGIC = b"KIWI"
NONCE_SIZE = 12
TAG_SIZE = 16
ID_SIZE = 32
CONTRACT_KEY_SIZE = 32

# Object kinds, part of every preamble and every associated data.
KIND_CONFIG = 1
KIND_PACK = 2
KIND_CHUNK = 3
KIND_TREE = 4
KIND_INDEX = 5
KIND_SNAPSHOT = 6
KIND_LOCK = 7
KIND_PACK_TRAILER = 8

KIND_NAMES = {
    KIND_CONFIG: "config",
    KIND_PACK: "pack",
    KIND_CHUNK: "chunk",
    KIND_TREE: "tree",
    KIND_INDEX: "index",
    KIND_SNAPSHOT: "snapshot",
    KIND_LOCK: "lock",
    KIND_PACK_TRAILER: "pack trailer",
}

PREAMBLE = struct.Struct(">4sHBB")  # magic, format version, kind, reserved (0)


def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


@dataclass(frozen=True)
class ContractKeys:
    """Working keys derived from one contract key (HKDF-SHA256, FORMAT.md "Keys")."""

    contract_id: bytes  # 16 bytes (the contract's UUID)
    data_key: bytes
    id_key: bytes
    audit_key: bytes
    chunker_seed: int

    @classmethod
    def derive(cls, contract_id: bytes, contract_key: bytes) -> ContractKeys:
        if len(contract_key) != CONTRACT_KEY_SIZE or len(contract_id) != 16:
            raise ValueError("bad contract key or id size")
        # 63 bits: the chunker XORs the seed, and the seed shifted left by one, into its gear tables
        seed = (int.from_bytes(hkdf(contract_key, b"kiwi-restore/v1/chunker", 8), "big") >> 1) or 1
        return cls(
            contract_id=contract_id,
            data_key=hkdf(contract_key, b"kiwi-restore/v1/data"),
            id_key=hkdf(contract_key, b"kiwi-restore/v1/id"),
            audit_key=hkdf(contract_key, b"kiwi-restore/v1/audit"),
            chunker_seed=seed,
        )

    def blob_id(self, plaintext: bytes | memoryview) -> bytes:
        """Keyed id of a chunk or tree: HMAC-SHA256(id_key, plaintext)."""
        return hmac.digest(self.id_key, plaintext, "sha256")

    def file_cipher(self, file_id: bytes) -> AESGCM:
        return _file_cipher(self.data_key, file_id)

    def audit_cipher(self) -> AESGCM:
        return AESGCM(self.audit_key)


@lru_cache(maxsize=4096)
def _file_cipher(data_key: bytes, file_id: bytes) -> AESGCM:
    return AESGCM(hkdf(data_key, b"kiwi-restore/v1/file/" + file_id))


def associated_data(contract_id: bytes, kind: int, object_id: bytes) -> bytes:
    return MAGIC + struct.pack(">HB", FORMAT_VERSION, kind) + contract_id + object_id


def preamble(kind: int) -> bytes:
    return PREAMBLE.pack(MAGIC, FORMAT_VERSION, kind, 0)


def check_preamble(data: bytes | memoryview, kind: int, what: str) -> None:
    if len(data) < PREAMBLE.size:
        raise IntegrityError(f"{what}: truncated (no header)")
    magic, version, got_kind, _ = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise IntegrityError(f"{what}: not a kiwi-restore object (bad magic)")
    if version != FORMAT_VERSION:
        raise IntegrityError(
            f"{what}: unsupported repository format version {version} "
            f"(this kiwi-restore reads version {FORMAT_VERSION})"
        )
    if got_kind != kind:
        raise IntegrityError(f"{what}: is a {KIND_NAMES.get(got_kind, got_kind)}, expected a {KIND_NAMES[kind]}")


def seal(cipher: AESGCM, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + cipher.encrypt(nonce, plaintext, ad)


def open_sealed(cipher: AESGCM, sealed: bytes | memoryview, ad: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise IntegrityError(f"{what}: truncated")
    try:
        # a view, not a copy: the ciphertext is most of what the mount and exports read
        return cipher.decrypt(bytes(sealed[:NONCE_SIZE]), memoryview(sealed)[NONCE_SIZE:], ad)
    except InvalidTag:
        raise IntegrityError(f"{what}: authentication failed (corrupt, swapped or wrong key)") from None
