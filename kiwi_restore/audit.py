"""The audit trail: append-only JSON lines, each hashing the previous, with signed checkpoints.

Names and paths that could identify a patient go into the "sealed" field, encrypted
under the contract's audit key: the contract's crypto-erase makes them unreadable while
the chain (which hashes the ciphertext) still verifies. Format: docs/AUDIT.md.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .clock import Clock
from .errors import IntegrityError
from .fsutil import file_lock

GENESIS = "0" * 64
FILE_NAME = "audit.jsonl"


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(rec: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in rec.items() if k != "hash"})).hexdigest()


def actor() -> str:
    return os.environ.get("KIWI_RESTORE_ACTOR") or getpass.getuser()


def seal_fields(cipher: AESGCM, contract_id: str, fields: dict) -> str:
    nonce = os.urandom(12)
    ct = cipher.encrypt(nonce, canonical(fields), b"kiwi-restore/v1/audit/" + contract_id.encode())
    return base64.b64encode(nonce + ct).decode()


def open_fields(cipher: AESGCM, contract_id: str, sealed: str) -> dict:
    raw = base64.b64decode(sealed)
    try:
        return json.loads(cipher.decrypt(raw[:12], raw[12:], b"kiwi-restore/v1/audit/" + contract_id.encode()))
    except InvalidTag:
        raise IntegrityError("sealed audit fields do not authenticate") from None


@dataclass
class VerifyResult:
    records: int
    checkpoints: int
    last_checkpoint_seq: int
    unsigned_tail: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditTrail:
    """One trail file plus mirrors (written identically; verify compares them)."""

    def __init__(self, directory: str, clock: Clock, mirrors: list[str] | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.mirrors = [os.path.abspath(m) for m in (mirrors or [])]
        self.clock = clock
        self.path = os.path.join(self.directory, FILE_NAME)
        self.signer: Callable[[], Ed25519PrivateKey] | None = None
        self._since_checkpoint = 0

    def _last(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                if end == 0:
                    return None
                pos = max(0, end - 65536)
                while True:
                    f.seek(pos)
                    tail = f.read(end - pos)
                    lines = tail.rstrip(b"\n").split(b"\n")
                    if len(lines) > 1 or pos == 0:
                        return json.loads(lines[-1])
                    pos = max(0, pos - 65536)
        except FileNotFoundError:
            return None

    def append(self, action: str, outcome: str = "ok", contract: str | None = None,
               details: dict | None = None, sealed: dict | None = None,
               cipher: AESGCM | None = None) -> dict:
        """Append one record. SEALED fields are encrypted with CIPHER (the contract's audit key)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with file_lock(self.path + ".lock", wait=30, what="audit trail"):
            last = self._last()
            rec: dict = {
                "seq": (last["seq"] + 1) if last else 1,
                "time": self.clock.iso(),
                "actor": actor(),
                "action": action,
                "outcome": outcome,
                "contract": contract,
                "details": details or {},
                "prev": last["hash"] if last else GENESIS,
            }
            if self.clock.override:
                rec["clock_override"] = self.clock.override
            if sealed:
                if cipher is None or contract is None:
                    raise ValueError("sealed audit fields need the contract and its audit key")
                rec["sealed"] = seal_fields(cipher, contract, sealed)
            rec["hash"] = record_hash(rec)
            self._write_line(rec)
            self._since_checkpoint += 1
            return rec

    def _write_line(self, rec: dict) -> None:
        line = canonical(rec) + b"\n"
        for path in [self.path] + [os.path.join(m, FILE_NAME) for m in self.mirrors]:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def checkpoint(self, key: Ed25519PrivateKey) -> dict | None:
        """Sign the head of the chain (written at the end of every command that appended)."""
        if self._since_checkpoint == 0:
            return None
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with file_lock(self.path + ".lock", wait=30, what="audit trail"):
            last = self._last()
            assert last is not None
            rec = {"seq": last["seq"] + 1, "time": self.clock.iso(), "actor": actor(),
                   "action": "audit.checkpoint", "outcome": "ok", "contract": None,
                   "details": {"head_seq": last["seq"], "head_hash": last["hash"]}, "prev": last["hash"]}
            rec["signature"] = base64.b64encode(key.sign(checkpoint_message(last["seq"], last["hash"]))).decode()
            rec["hash"] = record_hash(rec)
            self._write_line(rec)
        self._since_checkpoint = 0
        return rec

    def records(self, path: str | None = None) -> Iterator[dict]:
        try:
            with open(path or self.path, "rb") as f:
                for n, line in enumerate(f, 1):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield {"_bad_line": n}
        except FileNotFoundError:
            return

    def verify(self, public_key: Ed25519PublicKey) -> VerifyResult:
        problems: list[str] = []
        prev = GENESIS
        count = checkpoints = last_cp = 0
        expected_seq = 1
        for rec in self.records():
            count += 1
            if "_bad_line" in rec:
                problems.append(f"line {rec['_bad_line']}: not valid JSON")
                prev = None
                continue
            seq = rec.get("seq")
            if seq != expected_seq:
                problems.append(f"record {seq}: sequence broken (expected {expected_seq})")
            expected_seq = (seq or expected_seq) + 1
            if rec.get("hash") != record_hash(rec):
                problems.append(f"record {seq}: content does not match its hash (altered)")
            if prev is not None and rec.get("prev") != prev:
                problems.append(f"record {seq}: does not chain to the previous record (inserted, removed or reordered)")
            if rec.get("action") == "audit.checkpoint":
                d = rec.get("details", {})
                try:
                    public_key.verify(base64.b64decode(rec["signature"]),
                                      checkpoint_message(d["head_seq"], d["head_hash"]))
                    if d["head_hash"] != rec.get("prev"):
                        raise InvalidSignature
                    checkpoints += 1
                    last_cp = seq
                except (InvalidSignature, KeyError, ValueError):
                    problems.append(f"record {seq}: checkpoint signature invalid")
            prev = rec.get("hash")
        for m in self.mirrors:
            mirror = os.path.join(m, FILE_NAME)
            if not os.path.exists(mirror):
                problems.append(f"mirror {mirror} is missing")
                continue
            with open(self.path, "rb") as a, open(mirror, "rb") as b:
                if a.read() != b.read():
                    problems.append(f"mirror {mirror} differs from the trail")
        return VerifyResult(count, checkpoints, last_cp, count - last_cp if count else 0, problems)


def checkpoint_message(seq: int, head_hash: str) -> bytes:
    return f"kiwi-restore audit checkpoint v1\n{seq}\n{head_hash}\n".encode()
