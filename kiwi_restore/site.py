"""A kiwi-restore site: its configuration, contract registry, keystore, locations, audit trail.

    <home>/kiwi.json       site configuration (locations, keystore, audit mirrors, offers)
    <home>/contracts/      one JSON record per contract (no client data, no keys)
    <home>/keystore/       default local keystore (kept apart from the data store)
    <home>/store/          default local data store ("primary" location)
    <home>/audit/          audit trail
    <home>/tmp/            temporary data (Art. 8.1: purged after at most 1 month)
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .audit import AuditTrail
from .clock import Clock, site_clock
from .crypto import ContractKeys
from .errors import AuthError, KiwiError, NotFound, UsageError
from .fsutil import file_lock, write_atomic
from .i18n import _
from .keystore import LocalKeyStore
from .repository import Repository
from .storage import Backend, open_backend

SITE_VERSION = 1
ENV_HOME = "KIWI_RESTORE_HOME"
ENV_PASSPHRASE = "KIWI_RESTORE_PASSPHRASE"
ENV_PASSPHRASE_FILE = "KIWI_RESTORE_PASSPHRASE_FILE"
OFFERS = ("cloud", "sante")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_CONFIG = {
    "version": SITE_VERSION,
    "production": False,
    "keystore": {"type": "local", "path": "keystore", "backups": []},
    "locations": {"primary": "store"},
    "audit": {"path": "audit", "mirrors": []},
    "tmp": "tmp",
    "offers": {"cloud": {"restore_window_days": 15}, "sante": {"restore_window_days": 90}},
    "notice_months": 3,
}


def default_home() -> str:
    if os.environ.get(ENV_HOME):
        return os.environ[ENV_HOME]
    if os.geteuid() == 0:
        return "/var/lib/kiwi-restore"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "kiwi-restore")


def passphrase_source(passphrase_file: str | None = None, confirm: bool = False) -> Callable[[], bytes]:
    """The keystore passphrase: --passphrase-file, then $KIWI_RESTORE_PASSPHRASE(_FILE), then a prompt."""
    cache: list[bytes] = []

    def get() -> bytes:
        if cache:
            return cache[0]
        path = passphrase_file or os.environ.get(ENV_PASSPHRASE_FILE)
        if path:
            try:
                with open(path, "rb") as f:
                    value = f.read().rstrip(b"\r\n")
            except OSError as exc:
                raise UsageError(_("cannot read the passphrase file {path}: {err}").format(path=path, err=exc.strerror)) from None
        elif os.environ.get(ENV_PASSPHRASE):
            value = os.environ[ENV_PASSPHRASE].encode()
        elif sys.stdin.isatty():
            value = getpass.getpass(_("Keystore passphrase: ")).encode()
            if confirm and getpass.getpass(_("Repeat the passphrase: ")).encode() != value:
                raise UsageError(_("the passphrases differ"))
        else:
            raise AuthError(_("no passphrase: use --passphrase-file, {env} or a terminal").format(env=ENV_PASSPHRASE))
        if not value:
            raise AuthError(_("empty passphrase"))
        cache.append(value)
        return value

    return get


@dataclass
class ContractRecord:
    id: str  # UUID, hex without dashes
    name: str
    offer: str
    client: str
    created: str
    machines: dict[str, dict] = field(default_factory=dict)
    locations: list[str] = field(default_factory=lambda: ["primary"])
    lifecycle: dict = field(default_factory=dict)

    @property
    def id_bytes(self) -> bytes:
        return bytes.fromhex(self.id)

    @property
    def prefix(self) -> str:
        return f"contracts/{self.id}"

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "offer": self.offer, "client": self.client,
                "created": self.created, "machines": self.machines, "locations": self.locations,
                "lifecycle": self.lifecycle}


class Site:
    def __init__(self, home: str, passphrase: Callable[[], bytes] | None = None) -> None:
        self.home = os.path.abspath(home)
        self._passphrase = passphrase or passphrase_source()
        self._config: dict | None = None
        self._keystore: LocalKeyStore | None = None
        self._audit: AuditTrail | None = None
        self._backends: dict[str, Backend] = {}
        self._clock: Clock | None = None

    # -- configuration ---------------------------------------------------------
    @property
    def config_path(self) -> str:
        return os.path.join(self.home, "kiwi.json")

    def exists(self) -> bool:
        return os.path.exists(self.config_path)

    @property
    def config(self) -> dict:
        if self._config is None:
            try:
                with open(self.config_path, "rb") as f:
                    cfg = json.load(f)
            except FileNotFoundError:
                raise NotFound(_("no kiwi-restore site at {home} (run 'kiwi-restore init')").format(home=self.home)) from None
            except ValueError as exc:
                raise KiwiError(f"{self.config_path}: invalid JSON ({exc})") from None
            if cfg.get("version") != SITE_VERSION:
                raise KiwiError(f"{self.config_path}: unsupported site version {cfg.get('version')}")
            self._config = cfg
        return self._config

    def path(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(self.home, rel)

    def initialize(self, production: bool = False) -> None:
        if self.exists():
            raise KiwiError(_("a site already exists at {home}").format(home=self.home))
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        cfg = json.loads(json.dumps(DEFAULT_CONFIG))
        cfg["production"] = production
        self._config = cfg
        self.keystore.initialize()
        for sub in ("contracts", "audit", "tmp", "store"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)
        write_atomic(self.config_path, json.dumps(cfg, indent=1).encode())

    @property
    def clock(self) -> Clock:
        if self._clock is None:
            self._clock = site_clock(bool(self.config.get("production")))
        return self._clock

    @property
    def keystore(self) -> LocalKeyStore:
        if self._keystore is None:
            ks = self.config["keystore"]
            if ks.get("type", "local") != "local":
                raise KiwiError(f"unsupported keystore type {ks.get('type')!r}")
            self._keystore = LocalKeyStore(self.path(ks["path"]), self._passphrase,
                                           [self.path(b) for b in ks.get("backups", [])])
        return self._keystore

    @property
    def audit(self) -> AuditTrail:
        if self._audit is None:
            a = self.config["audit"]
            self._audit = AuditTrail(self.path(a["path"]), self.clock, [self.path(m) for m in a.get("mirrors", [])])
        return self._audit

    def checkpoint_audit(self) -> None:
        """Sign the audit chain's head if this command appended to it."""
        if self._audit is not None and self._audit._since_checkpoint:
            self._audit.checkpoint(self.keystore.signing_key())

    def backend(self, location: str) -> Backend:
        if location not in self._backends:
            locs = self.config["locations"]
            if location not in locs:
                raise UsageError(_("unknown storage location {name!r}").format(name=location))
            url = locs[location]
            self._backends[location] = open_backend(url if "://" in url else self.path(url))
        return self._backends[location]

    def add_location(self, name: str, url: str, create_bucket: bool = False) -> Backend:
        """Declare storage location NAME in kiwi.json after checking that it answers."""
        if not NAME_RE.match(name):
            raise UsageError(_("invalid location name {name!r}").format(name=name))
        backend = open_backend(url if "://" in url else self.path(url))
        if create_bucket and hasattr(backend, "create_bucket"):
            backend.create_bucket()
        if hasattr(backend, "check_access"):
            backend.check_access()
        with file_lock(self.config_path + ".lock", wait=30, what="site configuration"):
            self._config = None
            cfg = self.config
            if name in cfg["locations"]:
                raise UsageError(_("location {name!r} already exists ({url})").format(name=name, url=cfg["locations"][name]))
            cfg["locations"][name] = url
            write_atomic(self.config_path, json.dumps(cfg, indent=1).encode())
        self._backends[name] = backend
        return backend

    def contract_backend(self, rec: ContractRecord) -> Backend:
        """The contract's storage: its one location, or all of them replicated (reads fail over
        in order, writes go everywhere; failovers are audited as storage.failover)."""
        if len(rec.locations) == 1:
            return self.backend(rec.locations[0])
        from .storage.replicated import ReplicatedBackend

        def failover(key: str, failed: str, served: str, why: str) -> None:
            self.audit.append("storage.failover", "recovered", rec.id,
                              {"key": key, "location": failed, "served_by": served, "reason": why[:300]})

        return ReplicatedBackend([(n, self.backend(n)) for n in rec.locations], failover)

    def tmp_dir(self) -> str:
        path = self.path(self.config.get("tmp", "tmp"))
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    # -- contracts ---------------------------------------------------------------
    def _record_path(self, name: str) -> str:
        return os.path.join(self.path("contracts"), f"{name}.json")

    def list_contracts(self) -> list[ContractRecord]:
        out = []
        directory = self.path("contracts")
        if os.path.isdir(directory):
            for fname in sorted(os.listdir(directory)):
                if fname.endswith(".json"):
                    out.append(self.contract(fname[:-5]))
        return out

    def contract(self, name: str) -> ContractRecord:
        if not NAME_RE.match(name):
            raise NotFound(_("unknown contract {name!r}").format(name=name))
        try:
            with open(self._record_path(name), "rb") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise NotFound(_("unknown contract {name!r}").format(name=name)) from None
        return ContractRecord(**d)

    def save_contract(self, rec: ContractRecord) -> None:
        write_atomic(self._record_path(rec.name), json.dumps(rec.to_json(), indent=1, ensure_ascii=False).encode())

    def registry_lock(self, wait: float = 30):
        return file_lock(os.path.join(self.path("contracts"), ".lock"), wait=wait, what="contract registry")

    def create_contract(self, name: str, offer: str, client: str, locations: list[str] | None = None) -> ContractRecord:
        if not NAME_RE.match(name):
            raise UsageError(_("invalid contract name {name!r} (letters, digits, '.', '_', '-'; 64 at most)").format(name=name))
        if offer not in OFFERS:
            raise UsageError(_("unknown offer {offer!r} (cloud or sante)").format(offer=offer))
        # Default: the offer's locations in kiwi.json (e.g. sante: primary + replica), else primary.
        locations = list(locations or self.config["offers"].get(offer, {}).get("locations") or ["primary"])
        if len(set(locations)) != len(locations):
            raise UsageError(_("a location is named twice: {locs}").format(locs=", ".join(locations)))
        for loc in locations:
            self.backend(loc)
        with self.registry_lock():
            if os.path.exists(self._record_path(name)):
                raise UsageError(_("contract {name!r} already exists").format(name=name))
            rec = ContractRecord(id=uuid.uuid4().hex, name=name, offer=offer, client=client,
                                 created=self.clock.iso(), locations=locations)
            key = self.keystore.create_contract_key(rec.id)
            keys = ContractKeys.derive(rec.id_bytes, key)
            # One write to every location: the copies are byte-identical (check --locations).
            Repository.create(self.contract_backend(rec), rec.prefix, keys)
            self.save_contract(rec)
        return rec

    def contract_keys(self, rec: ContractRecord) -> ContractKeys:
        return ContractKeys.derive(rec.id_bytes, self.keystore.load_contract_key(rec.id))

    def open_repository(self, rec: ContractRecord, keys: ContractKeys | None = None, **kw) -> Repository:
        keys = keys or self.contract_keys(rec)
        return Repository.open(self.contract_backend(rec), rec.prefix, keys, **kw)
