"""Real loopback servers for the tests, started by the project's own scripts (scripts/servers/).

Session-scoped: each server starts once per test run, on first use, and is stopped at the
end. Ceph RGW and moto give two S3 implementations; OpenSSH gives SFTP.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "servers"
STATE = Path(os.environ.get("KIWI_TEST_SERVERS", "/tmp/kiwi-test-servers"))


def _start(script: str, state: Path, env: dict | None = None) -> tuple[dict[str, str], bool]:
    """(the server's env vars, whether this call started it: a server found running is shared)."""
    out = subprocess.run(["bash", str(SCRIPTS / script), str(state)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{out.stderr[-3000:]}")
    return dict(re.findall(r"^export ([A-Z0-9_]+)=(.*)$", out.stdout, re.M)), "already running" not in out.stderr


def _stop(script: str, state: Path, started: bool, *args: str) -> None:
    # a server another test run started (and still uses) is left alone
    if started:
        subprocess.run(["bash", str(SCRIPTS / script), str(state), *args], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ceph_s3():
    """A single-node Ceph cluster with radosgw on 127.0.0.1:7480 (Debian packages)."""
    state = STATE / "ceph"
    env, started = _start("start-ceph-rgw.sh", state)
    yield env
    _stop("stop-ceph-rgw.sh", state, started, "--purge", "--fast")


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1:5055 with SigV4 auth enforced."""
    state = STATE / "moto"
    env, started = _start("start-moto.sh", state)
    yield env
    _stop("stop-moto.sh", state, started, "--purge")


@pytest.fixture(scope="session")
def sftp_server():
    """An SFTP-only OpenSSH server on 127.0.0.1:2222, key authentication only."""
    state = STATE / "sftp"
    env, started = _start("start-sftp.sh", state)
    yield env
    _stop("stop-sftp.sh", state, started, "--purge")


@pytest.fixture(params=["ceph", "moto"])
def s3_server(request):
    """Each S3 test runs against both implementations."""
    return request.getfixturevalue(f"{request.param}_s3") | {"KIND": request.param}
