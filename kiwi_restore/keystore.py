"""The keystore: contract keys and the provider signing key, wrapped, apart from the data store.

Embedded default: a local directory (and optional backup directories that mirror it),
protected by one operator passphrase through Argon2id. The KeyStore interface is what a
KMS or HSM implementation would provide instead.
"""

from __future__ import annotations

import base64
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .crypto import CONTRACT_KEY_SIZE
from .errors import AuthError, KiwiError, NotFound
from .fsutil import shred, write_atomic
from .i18n import _

KEYSTORE_VERSION = 1
# Argon2id, RFC 9106 "second recommended option" memory, fewer passes: ~0.1 s here.
DEFAULT_KDF = {"alg": "argon2id", "memory_kib": 65536, "iterations": 2, "lanes": 2}
CHECK_PLAINTEXT = b"kiwi-restore keystore v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass(frozen=True)
class KeyState:
    present: bool
    destroyed_at: str | None = None


class KeyStore(ABC):
    """What the rest of kiwi-restore needs from a key manager."""

    @abstractmethod
    def create_contract_key(self, contract_id: str) -> bytes: ...

    @abstractmethod
    def load_contract_key(self, contract_id: str) -> bytes: ...

    @abstractmethod
    def destroy_contract_key(self, contract_id: str, when: str) -> list[str]:
        """Crypto-erase: remove every copy; return the places a copy was removed from."""

    @abstractmethod
    def contract_key_copies(self, contract_id: str) -> list[str]:
        """Every place a wrapped copy of the key still exists (empty after destroy)."""

    @abstractmethod
    def key_state(self, contract_id: str) -> KeyState: ...

    @abstractmethod
    def signing_key(self) -> Ed25519PrivateKey: ...

    @abstractmethod
    def public_key(self) -> Ed25519PublicKey: ...


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class LocalKeyStore(KeyStore):
    """A directory: keystore.json (KDF parameters, passphrase check), contracts/<id>.key,
    provider/signing.key (wrapped) and provider/signing.pub; mirrored into backup dirs."""

    def __init__(self, path: str, passphrase: Callable[[], bytes], backups: list[str] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.backups = [os.path.abspath(b) for b in (backups or [])]
        self._passphrase = passphrase
        self._kek: AESGCM | None = None

    # -- layout -------------------------------------------------------------
    @property
    def _dirs(self) -> list[str]:
        return [self.path, *self.backups]

    def _meta_path(self, root: str | None = None) -> str:
        return os.path.join(root or self.path, "keystore.json")

    def _key_path(self, contract_id: str, root: str | None = None) -> str:
        return os.path.join(root or self.path, "contracts", f"{contract_id}.key")

    def _tomb_path(self, contract_id: str) -> str:
        return os.path.join(self.path, "contracts", f"{contract_id}.destroyed")

    def exists(self) -> bool:
        return os.path.exists(self._meta_path())

    # -- set-up -------------------------------------------------------------
    def initialize(self, kdf: dict | None = None) -> None:
        """Create the keystore and the provider signing key (refuses to overwrite)."""
        if self.exists():
            raise KiwiError(_("a keystore already exists at {path}").format(path=self.path))
        params = dict(kdf or DEFAULT_KDF)
        params["salt"] = _b64(os.urandom(16))
        kek = AESGCM(self._derive(params))
        nonce = os.urandom(12)
        meta = {
            "version": KEYSTORE_VERSION,
            "kdf": params,
            "check": _b64(nonce + kek.encrypt(nonce, CHECK_PLAINTEXT, b"kiwi-restore/v1/keystore-check")),
        }
        self._kek = kek
        signing = Ed25519PrivateKey.generate()
        raw = signing.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        for root in self._dirs:
            os.makedirs(os.path.join(root, "contracts"), mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(root, "provider"), mode=0o700, exist_ok=True)
            os.chmod(root, 0o700)
            write_atomic(self._meta_path(root), json.dumps(meta, indent=1).encode())
            write_atomic(os.path.join(root, "provider", "signing.key"),
                         json.dumps({"version": 1, "wrapped": self._wrap(raw, b"provider-signing")}).encode())
            write_atomic(os.path.join(root, "provider", "signing.pub"),
                         public_key_pem(signing.public_key()), mode=0o644)

    # -- passphrase and wrapping ---------------------------------------------
    @staticmethod
    def _derive_with(params: dict, passphrase: bytes) -> bytes:
        if params.get("alg") != "argon2id":
            raise KiwiError(f"unsupported keystore KDF {params.get('alg')!r}")
        return Argon2id(
            salt=_unb64(params["salt"]), length=32, iterations=params["iterations"],
            lanes=params["lanes"], memory_cost=params["memory_kib"],
        ).derive(passphrase)

    def _derive(self, params: dict) -> bytes:
        return self._derive_with(params, self._passphrase())

    def _meta(self) -> dict:
        try:
            with open(self._meta_path(), "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise NotFound(_("no keystore at {path} (run 'kiwi-restore init')").format(path=self.path)) from None
        if meta.get("version") != KEYSTORE_VERSION:
            raise KiwiError(f"unsupported keystore version {meta.get('version')}")
        return meta

    def kek(self) -> AESGCM:
        if self._kek is None:
            meta = self._meta()
            kek = AESGCM(self._derive(meta["kdf"]))
            check = _unb64(meta["check"])
            try:
                kek.decrypt(check[:12], check[12:], b"kiwi-restore/v1/keystore-check")
            except InvalidTag:
                raise AuthError(_("wrong keystore passphrase")) from None
            self._kek = kek
        return self._kek

    def _wrap(self, secret: bytes, label: bytes) -> str:
        nonce = os.urandom(12)
        return _b64(nonce + self.kek().encrypt(nonce, secret, b"kiwi-restore/v1/wrap/" + label))

    def _unwrap(self, wrapped: str, label: bytes, what: str) -> bytes:
        raw = _unb64(wrapped)
        try:
            return self.kek().decrypt(raw[:12], raw[12:], b"kiwi-restore/v1/wrap/" + label)
        except InvalidTag:
            raise AuthError(_("{what}: cannot be unwrapped (corrupt or wrong keystore)").format(what=what)) from None

    # -- contract keys --------------------------------------------------------
    def create_contract_key(self, contract_id: str) -> bytes:
        if os.path.exists(self._key_path(contract_id)):
            raise KiwiError(f"a key already exists for contract {contract_id}")
        key = os.urandom(CONTRACT_KEY_SIZE)
        blob = json.dumps({"version": 1, "contract": contract_id,
                           "wrapped": self._wrap(key, b"contract/" + contract_id.encode())}).encode()
        for root in self._dirs:
            write_atomic(self._key_path(contract_id, root), blob)
        return key

    def load_contract_key(self, contract_id: str) -> bytes:
        for root in self._dirs:  # a damaged primary falls back to a keystore backup
            try:
                with open(self._key_path(contract_id, root), "rb") as f:
                    record = json.load(f)
            except (FileNotFoundError, ValueError):
                continue
            return self._unwrap(record["wrapped"], b"contract/" + contract_id.encode(),
                                _("key of contract {id}").format(id=contract_id))
        state = self.key_state(contract_id)
        if state.destroyed_at:
            raise AuthError(_("the key of this contract was destroyed on {when}: its data can no longer be decrypted")
                            .format(when=state.destroyed_at))
        raise AuthError(_("no key for contract {id} in the keystore").format(id=contract_id))

    def contract_key_copies(self, contract_id: str) -> list[str]:
        return [p for p in (self._key_path(contract_id, r) for r in self._dirs) if os.path.exists(p)]

    def destroy_contract_key(self, contract_id: str, when: str) -> list[str]:
        removed = [p for p in (self._key_path(contract_id, r) for r in self._dirs) if shred(p)]
        write_atomic(self._tomb_path(contract_id),
                     json.dumps({"contract": contract_id, "destroyed_at": when}).encode())
        return removed

    def key_state(self, contract_id: str) -> KeyState:
        if self.contract_key_copies(contract_id):
            return KeyState(present=True)
        try:
            with open(self._tomb_path(contract_id), "rb") as f:
                return KeyState(present=False, destroyed_at=json.load(f)["destroyed_at"])
        except FileNotFoundError:
            return KeyState(present=False)

    # -- provider signing key ---------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        with open(os.path.join(self.path, "provider", "signing.key"), "rb") as f:
            record = json.load(f)
        raw = self._unwrap(record["wrapped"], b"provider-signing", _("provider signing key"))
        return Ed25519PrivateKey.from_private_bytes(raw)

    def public_key(self) -> Ed25519PublicKey:
        try:
            with open(os.path.join(self.path, "provider", "signing.pub"), "rb") as f:
                key = serialization.load_pem_public_key(f.read())
        except FileNotFoundError:
            raise NotFound(_("no keystore at {path} (run 'kiwi-restore init')").format(path=self.path)) from None
        assert isinstance(key, Ed25519PublicKey)
        return key
