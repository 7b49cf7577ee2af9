"""Replicated contracts (Santé Art. 2.3): primary on Ceph RGW, disaster-recovery replica on moto
(two S3 implementations, two credential profiles), or a private moto instance a test stops.

Writes reach every location; reads fail over when an object is missing, unreadable or fails
authentication, and say so in the audit trail; `check --locations` names the damage and
`repair` mends it from an authentic copy."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_s3_support import (
    bucket_name,
    destroy_bucket,
    private_moto,  # noqa: F401 (fixture)
    s3_url,
    set_locations,
    use_credentials,
    write_credentials,
)
from treegen import make_hostile_tree, rsync_diff

from kiwi_restore import service
from kiwi_restore.errors import BackendError
from kiwi_restore.site import Site
from kiwi_restore.storage.s3 import S3Backend


def restored(out: Path, src: Path) -> Path:
    return out / str(src.resolve()).lstrip("/")


def failovers(site: Site) -> list[dict]:
    return [r for r in site.audit.records() if r.get("action") == "storage.failover"]


class Locations:
    def __init__(self, home: Path, tmp: Path, monkeypatch, servers: dict[str, dict], **params) -> None:
        """SERVERS: location name -> server env (one credentials profile per location)."""
        # no credentials in the environment at all: each location uses its own profile
        use_credentials(monkeypatch, {"AWS_ACCESS_KEY_ID": "none", "AWS_SECRET_ACCESS_KEY": "none",
                                      "AWS_DEFAULT_REGION": "us-east-1"})
        creds = write_credentials(tmp / "s3-credentials", servers)
        self.urls = {name: s3_url(env, bucket_name(name), "kiwi", profile=name, credentials_file=str(creds),
                                  **params) for name, env in servers.items()}
        self.backends = {n: S3Backend.from_url(u) for n, u in self.urls.items()}
        for b in self.backends.values():
            b.create_bucket()
        set_locations(home, self.urls)

    def objects(self, name: str) -> dict[str, int]:
        return {i.key: i.size for i in self.backends[name].list("contracts/")}

    def close(self) -> None:
        for b in self.backends.values():
            destroy_bucket(b)


@pytest.fixture
def ceph_moto(home, tmp_path, monkeypatch, ceph_s3, moto_s3):
    locs = Locations(home, tmp_path, monkeypatch, {"primary": ceph_s3, "replica": moto_s3})
    yield locs
    locs.close()


@pytest.fixture
def dr_contract(kiwi, ceph_moto) -> str:
    kiwi("contract", "create", "clinic", "--offer", "sante", "--client", "Clinique", "--location", "primary",
         "--location", "replica")
    kiwi("machine", "add", "clinic", "pc1")
    return "clinic"


def test_writes_reach_every_location(tmp_path, kiwi, site, ceph_moto, dr_contract):
    _, out = kiwi("contract", "show", dr_contract)
    assert "primary, replica" in out
    src = make_hostile_tree(tmp_path / "src", big=1 << 20)
    kiwi("backup", dr_contract, "-m", "pc1", str(src))
    primary, replica = ceph_moto.objects("primary"), ceph_moto.objects("replica")
    assert primary == replica and any("/data/" in k for k in primary)
    _, msg = kiwi("check", dr_contract, "--locations", "--read-data")
    assert "identical" in msg
    code, js = kiwi("check", dr_contract, "--locations", "--json")
    assert json.loads(js)["ok"] and json.loads(js)["objects"] == len(primary)
    out = tmp_path / "out"
    kiwi("restore", dr_contract, "latest", "--target", str(out))
    assert rsync_diff(src, restored(out, src)) == ""
    assert failovers(site) == []


def test_failover_check_and_repair(tmp_path, kiwi, site, ceph_moto, dr_contract):
    src = make_hostile_tree(tmp_path / "src", big=10 << 20)  # > one 8 MiB pack
    kiwi("backup", dr_contract, "-m", "pc1", str(src))
    primary = ceph_moto.backends["primary"]
    objs = ceph_moto.objects("primary")
    packs = sorted((k for k in objs if "/data/" in k), key=lambda k: objs[k])
    assert len(packs) >= 2
    lost_pack, bad_pack = packs[-1], packs[-2]
    lost_snap = next(k for k in objs if "/snapshots/" in k)
    lost_index = next(k for k in objs if "/index/" in k)
    lost_tindex = next(k for k in objs if "/treeindex/" in k)
    config = next(k for k in objs if k.endswith("/config"))
    for k in (lost_pack, lost_snap, lost_index, lost_tindex):
        primary.delete(k)
    for k in (bad_pack, config):  # same size, one byte flipped: only the AEAD can tell
        data = bytearray(primary.get(k))
        data[len(data) // 2] ^= 0x01
        primary.delete(k)
        primary.put(k, bytes(data))

    out = tmp_path / "out"
    kiwi("restore", dr_contract, "latest", "--target", str(out))
    assert rsync_diff(src, restored(out, src)) == ""
    recorded = {(r["details"]["key"], r["details"]["location"]) for r in failovers(site)}
    for k in (lost_pack, lost_snap, lost_index, bad_pack, config):  # a restore reads no treeindex/
        assert (k, "primary") in recorded, (k, recorded)
    reasons = {r["details"]["key"]: r["details"]["reason"] for r in failovers(site)}
    assert "authentication" in reasons[bad_pack] and "missing" in reasons[lost_pack]
    assert all(r["details"]["served_by"] == "replica" for r in failovers(site))

    code, msg = kiwi("check", dr_contract, "--locations", "--read-data", "--json", ok=False)
    assert code == 5
    found = {(d["key"], d["location"], d["problem"]) for d in json.loads(msg.split("\nkiwi-restore:")[0])["differences"]}
    for k in (lost_pack, lost_snap, lost_index, lost_tindex):
        assert (k, "primary", "missing") in found
    assert (bad_pack, "primary", "corrupt") in found and (config, "primary", "corrupt") in found
    assert not any(loc == "replica" for _, loc, _ in found)
    # without --read-data, only what the listings show
    code, msg = kiwi("check", dr_contract, "--locations", ok=False)
    assert code == 5 and f"missing: {lost_pack} in primary" in msg and bad_pack not in msg

    _, msg = kiwi("repair", dr_contract)
    assert "6 objects copied" in msg, msg
    _, msg = kiwi("check", dr_contract, "--locations", "--read-data")
    assert "identical" in msg
    n = len(failovers(site))
    out2 = tmp_path / "out2"
    kiwi("restore", dr_contract, "latest", "--target", str(out2))
    assert rsync_diff(src, restored(out2, src)) == ""
    assert len(failovers(site)) == n  # the primary serves everything again
    _, msg = kiwi("check", dr_contract, "--read-data")
    assert "no problem" in msg


def test_no_good_copy_anywhere_is_unrepairable(tmp_path, kiwi, ceph_moto, dr_contract):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    kiwi("backup", dr_contract, "-m", "pc1", str(src))
    pack = next(k for k in ceph_moto.objects("primary") if "/data/" in k)
    for b in ceph_moto.backends.values():
        data = bytearray(b.get(pack))
        data[40] ^= 0xFF
        b.delete(pack)
        b.put(pack, bytes(data))
    code, msg = kiwi("repair", dr_contract, ok=False)
    assert code == 5 and "no location holds an authentic copy" in msg
    code, msg = kiwi("restore", dr_contract, "latest", "--target", str(tmp_path / "o"), ok=False)
    assert code == 5


def test_location_commands(tmp_path, kiwi, ceph_s3, monkeypatch, home):
    use_credentials(monkeypatch, ceph_s3)
    url = s3_url(ceph_s3, bucket_name("dr"), "site-a")
    kiwi("location", "add", "dr", url, "--create-bucket")
    _, js = kiwi("location", "list", "--json")
    assert json.loads(js)["dr"]["url"] == url
    code, msg = kiwi("location", "add", "dr", url, ok=False)
    assert code == 2 and "already exists" in msg
    code, msg = kiwi("location", "add", "far", "s3://b/p?endpoint=http://192.0.2.1:80", ok=False)
    assert code == 2 and "loopback" in msg
    code, msg = kiwi("location", "add", "nobucket", s3_url(ceph_s3, bucket_name("no"), ""), ok=False)
    assert code == 8 and "does not exist" in msg
    code, msg = kiwi("contract", "create", "x", "--offer", "cloud", "--location", "primary", "--location", "nowhere",
                     ok=False)
    assert code == 2 and "nowhere" in msg
    kiwi("contract", "create", "x", "--offer", "sante", "--location", "primary", "--location", "dr")
    _, js = kiwi("contract", "show", "x", "--json")
    assert json.loads(js)["locations"] == ["primary", "dr"]
    src = tmp_path / "s"
    src.mkdir()
    (src / "a").write_text("hello")
    kiwi("machine", "add", "x", "m")
    kiwi("backup", "x", "-m", "m", str(src))
    _, msg = kiwi("check", "x", "--locations", "--read-data")
    assert "identical" in msg
    destroy_bucket(S3Backend.from_url(url))


def test_offer_default_locations(kiwi, home, tmp_path):
    set_locations(home, {"replica": str(tmp_path / "replica-store")}, {"sante": {"locations": ["primary", "replica"]}})
    kiwi("contract", "create", "h", "--offer", "sante")
    kiwi("contract", "create", "c", "--offer", "cloud")
    _, js = kiwi("contract", "list", "--json")
    assert {r["name"]: r["locations"] for r in json.loads(js)} == {"c": ["primary"], "h": ["primary", "replica"]}


# -- a server stopped in the middle -------------------------------------------------------
def test_replica_stopped_mid_ingest_then_repaired(tmp_path, home, site, kiwi, monkeypatch, ceph_s3,
                                                  private_moto):  # noqa: F811
    locs = Locations(home, tmp_path, monkeypatch, {"primary": ceph_s3, "replica": private_moto.env},
                     max_attempts="3", connect_timeout="2")
    try:
        kiwi("contract", "create", "c", "--offer", "sante", "--location", "primary", "--location", "replica")
        kiwi("machine", "add", "c", "pc1")
        src = make_hostile_tree(tmp_path / "src", big=24 << 20)
        seen = [0]

        def progress(_files: int, nbytes: int) -> None:
            seen[0] += nbytes
            if seen[0] > 12 << 20 and seen[0] - nbytes <= 12 << 20:
                private_moto.stop()  # the DR site goes away after the first pack

        with pytest.raises(BackendError, match="replica"):
            service.run_backup(site, "c", "pc1", [str(src)], [], None, progress)
        assert not [k for k in locs.objects("primary") if "/snapshots/" in k]  # no half snapshot
        failed = [r for r in site.audit.records() if r["action"] == "backup"][-1]
        assert failed["outcome"] == "failed" and "replica" in failed["details"]["error"]

        private_moto.start()  # moto keeps nothing: the replica comes back empty
        locs.backends["replica"].create_bucket()
        code, msg = kiwi("check", "c", "--locations", ok=False)
        assert code == 5 and "missing" in msg
        _, msg = kiwi("repair", "c")
        assert "copied" in msg
        _, msg = kiwi("check", "c", "--locations", "--read-data")
        assert "identical" in msg
        kiwi("backup", "c", "-m", "pc1", str(src))  # the rerun completes
        out = tmp_path / "out"
        kiwi("restore", "c", "latest", "--target", str(out))
        assert rsync_diff(src, restored(out, src)) == ""
        _, msg = kiwi("check", "c", "--locations", "--read-data")
        assert "identical" in msg
    finally:
        locs.close()


def test_primary_stopped_mid_restore_fails_over(tmp_path, home, site, kiwi, monkeypatch, ceph_s3, private_moto):  # noqa: F811
    locs = Locations(home, tmp_path, monkeypatch, {"primary": private_moto.env, "replica": ceph_s3},
                     max_attempts="2", connect_timeout="2")
    try:
        kiwi("contract", "create", "c", "--offer", "sante", "--location", "primary", "--location", "replica")
        kiwi("machine", "add", "c", "pc1")
        src = make_hostile_tree(tmp_path / "src", big=20 << 20)
        kiwi("backup", "c", "-m", "pc1", str(src))
        stopped = threading.Event()

        def progress(_files: int, nbytes: int) -> None:
            if nbytes and not stopped.is_set():
                stopped.set()
                private_moto.stop()

        out = tmp_path / "out"
        service.run_restore(site, "c", "latest", None, str(out), None, None, False, progress)
        assert stopped.is_set()
        assert rsync_diff(src, restored(out, src)) == ""
        rec = failovers(site)
        assert rec and all(r["details"]["location"] == "primary" and r["details"]["served_by"] == "replica"
                           for r in rec)
        assert any("unreadable" in r["details"]["reason"] for r in rec)
    finally:
        locs.close()


def test_single_store_server_stopped_mid_read_is_a_clear_error(tmp_path, home, site, kiwi, monkeypatch,
                                                               private_moto):  # noqa: F811  # noqa: F811
    use_credentials(monkeypatch, private_moto.env)
    url = s3_url(private_moto.env, bucket_name("solo"), "", max_attempts="2", connect_timeout="1")
    S3Backend.from_url(url).create_bucket()
    set_locations(home, {"primary": url})
    kiwi("contract", "create", "c", "--offer", "cloud")
    kiwi("machine", "add", "c", "pc1")
    src = make_hostile_tree(tmp_path / "src", big=20 << 20)
    kiwi("backup", "c", "-m", "pc1", str(src))

    # a server that hangs for a while (paused), then answers again: retries ride it out
    out = tmp_path / "out1"
    pid = private_moto.pid()
    paused = threading.Event()

    def pause(_files: int, nbytes: int) -> None:
        if nbytes and not paused.is_set():
            paused.set()
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(2.5, os.kill, (pid, signal.SIGCONT)).start()

    set_locations(home, {"primary": url.replace("max_attempts=2", "max_attempts=6") + "&read_timeout=2"})
    service.run_restore(Site(str(home), site._passphrase), "c", "latest", None, str(out), None, None, False, pause)
    assert paused.is_set() and rsync_diff(src, restored(out, src)) == ""

    # a server that is gone: a clear storage error (exit code 8), no traceback
    set_locations(home, {"primary": url})
    private_moto.stop()
    t0 = time.monotonic()
    code, msg = kiwi("restore", "c", "latest", "--target", str(tmp_path / "out2"), ok=False)
    assert code == 8 and "failed after 2 attempts" in msg and "Traceback" not in msg
    assert time.monotonic() - t0 < 30


def test_purge_empties_every_s3_location(tmp_path, kiwi, site, ceph_moto, dr_contract, monkeypatch):
    """The purge job works unchanged on a replicated S3 contract: both datacenters emptied."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "dossier.txt").write_text("x" * 5000)
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-09-01T10:00")
    kiwi("backup", dr_contract, "-m", "pc1", str(src))
    assert ceph_moto.objects("primary") and ceph_moto.objects("replica")
    kiwi("contract", "terminate", dr_contract, "--letter-received", "2026-09-01")
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2027-03-02T12:00")
    _, out = kiwi("purge", "--due")
    assert "purged" in out
    assert ceph_moto.objects("primary") == {} and ceph_moto.objects("replica") == {}
    (cert,) = Path(site.home, "certificates").glob("KR-DEL-*[0-9A-Z].json")
    doc = json.loads(cert.read_text())["document"]
    assert {loc["name"]: loc["verified_empty"] for loc in doc["locations"]} == {"primary": True, "replica": True}
    assert all(loc["url"].startswith("s3://") and "?" not in loc["url"] for loc in doc["locations"])
