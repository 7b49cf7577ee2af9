"""Shared fixtures: a real site in a temporary directory, and the real CLI run in-process or as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from servers import ceph_s3, moto_s3, s3_server, sftp_server  # noqa: F401 (fixtures)

from kiwi_restore.cli import cli
from kiwi_restore.fsutil import write_atomic
from kiwi_restore.site import DEFAULT_CONFIG, Site

PASSPHRASE = "correct horse battery staple"
# Fast KDF for tests only: the keystore records its parameters, so this changes nothing else.
TEST_KDF = {"alg": "argon2id", "memory_kib": 8192, "iterations": 1, "lanes": 1}


def make_site(home: Path, mp: pytest.MonkeyPatch) -> Site:
    """A fresh site at HOME, with the environment a user of it would have (set through MP)."""
    mp.setenv("KIWI_RESTORE_HOME", str(home))
    mp.setenv("KIWI_RESTORE_PASSPHRASE", PASSPHRASE)
    mp.delenv("KIWI_RESTORE_CLOCK", raising=False)
    mp.setenv("LANG", "C.UTF-8")
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        mp.delenv(var, raising=False)
    site = Site(str(home), lambda: PASSPHRASE.encode())
    os.makedirs(home, mode=0o700)
    cfg = json.loads(json.dumps(DEFAULT_CONFIG))
    site._config = cfg
    site.keystore.initialize(TEST_KDF)
    for sub in ("contracts", "audit", "tmp", "store"):
        os.makedirs(site.path(sub), mode=0o700, exist_ok=True)
    write_atomic(site.config_path, json.dumps(cfg).encode())
    return site


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    make_site(h, monkeypatch)
    return h


@pytest.fixture
def site(home: Path) -> Site:
    return Site(str(home), lambda: PASSPHRASE.encode())


class Kiwi:
    """Runs the real CLI in-process (fast) and returns (exit code, stdout+stderr)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True, input: str | None = None):
        from kiwi_restore import i18n

        i18n.reset()
        result = self.runner.invoke(cli, list(args), input=input, catch_exceptions=True)
        code = result.exit_code
        out = result.output
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            from kiwi_restore.errors import KiwiError

            if isinstance(exc, KiwiError):
                code = exc.exit_code
                out += f"\nkiwi-restore: error: {exc}"
            else:
                raise exc
        if ok and code != 0:
            raise AssertionError(f"kiwi-restore {' '.join(args)} exited {code}:\n{out}")
        return code, out


@pytest.fixture
def kiwi(home: Path) -> Kiwi:
    return Kiwi()


def run_cli(*args: str, env: dict | None = None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """The installed console script as a separate process (exit codes, stderr, signals)."""
    return subprocess.run([sys.executable, "-m", "kiwi_restore.cli", *args], capture_output=True,
                          env={**os.environ, **(env or {})}, check=check, **kw)


@pytest.fixture
def contract(kiwi: Kiwi) -> str:
    kiwi("contract", "create", "acme", "--offer", "sante", "--client", "Cabinet Dr Martin")
    kiwi("machine", "add", "acme", "pc1")
    kiwi("machine", "add", "acme", "pc2")
    return "acme"


def store_files(site: Site, rec_name: str, folder: str) -> list[Path]:
    """The files of one folder of a contract's repository on the local store, sorted."""
    rec = site.contract(rec_name)
    base = Path(site.path("store")) / rec.prefix / folder
    return sorted(p for p in base.rglob("*") if p.is_file())


def flip(path: Path, offset: int) -> None:
    """Damage one bit of PATH at OFFSET (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
