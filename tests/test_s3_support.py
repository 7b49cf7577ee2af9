"""Helpers and fixtures for the S3 and replica tests (real Ceph RGW and moto servers, no mocks).

Each test gets its own bucket(s), emptied and removed afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import Kiwi
from servers import SCRIPTS

from kiwi_restore.storage.s3 import S3Backend


def bucket_name(tag: str = "t") -> str:
    return f"kiwi-{tag}-{uuid.uuid4().hex[:12]}"


def s3_url(env: dict, bucket: str, prefix: str = "", **params) -> str:
    q = {"endpoint": env["S3_ENDPOINT_URL"], "region": env.get("AWS_DEFAULT_REGION", "us-east-1"), **params}
    return f"s3://{bucket}/{prefix}?" + "&".join(f"{k}={v}" for k, v in q.items())


def use_credentials(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    """Credentials through the environment, as a service unit would set them."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, env[k])
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no ~/.aws leaking into tests


def write_credentials(path: Path, profiles: dict[str, dict]) -> Path:
    """An AWS-style credentials file with one profile per location (different providers)."""
    lines = []
    for name, env in profiles.items():
        lines += [f"[{name}]", f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}",
                  f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}", ""]
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def destroy_bucket(backend: S3Backend) -> None:
    try:
        backend.delete_many(i.key for i in backend.list(""))
        backend.client.delete_bucket(Bucket=backend.bucket)
    except Exception:
        pass  # a stopped test server: nothing to clean
    backend.close()


def set_locations(home: Path, locations: dict[str, str], offers: dict | None = None) -> None:
    cfg_path = home / "kiwi.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["locations"].update(locations)
    for offer, extra in (offers or {}).items():
        cfg["offers"][offer].update(extra)
    cfg_path.write_text(json.dumps(cfg))


@pytest.fixture
def s3_store(home: Path, s3_server: dict, monkeypatch: pytest.MonkeyPatch):
    """The site's primary location is a fresh bucket on the S3 server under test."""
    use_credentials(monkeypatch, s3_server)
    bucket = bucket_name(s3_server["KIND"])
    url = s3_url(s3_server, bucket, "kiwi")
    backend = S3Backend.from_url(url)
    backend.create_bucket()
    set_locations(home, {"primary": url})
    yield backend
    destroy_bucket(backend)


@pytest.fixture
def s3_contract(s3_store, kiwi: Kiwi) -> str:
    kiwi("contract", "create", "acme", "--offer", "cloud", "--client", "Cabinet Dr Martin")
    kiwi("machine", "add", "acme", "pc1")
    return "acme"


class MotoInstance:
    """A private moto server (own port and state dir) that a test may stop and restart;
    auth off so its credentials survive a restart. Never the shared session servers."""

    def __init__(self, state: Path, port: int) -> None:
        self.state, self.port = state, port
        self.env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "private",
                    "AWS_SECRET_ACCESS_KEY": "private-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        out = subprocess.run(["bash", str(SCRIPTS / "start-moto.sh"), str(self.state)], capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "MOTO_PORT": str(self.port), "MOTO_AUTH": "0"})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPTS / "stop-moto.sh"), str(self.state)], capture_output=True, timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=0.5)
            except OSError:
                return
            time.sleep(0.1)

    def pid(self) -> int:
        return int((self.state / "pids" / "moto.pid").read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_moto(tmp_path: Path):
    m = MotoInstance(tmp_path / "moto-state", free_port())
    m.start()
    yield m
    m.stop()
