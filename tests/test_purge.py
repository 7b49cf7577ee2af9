"""The purge-and-certify job: never early, never under hold, every location, resumable, one certificate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from kiwi_restore.purge import STEPS
from kiwi_restore.site import Site

AFTER = "2027-03-02T12:00"  # after the sante window of a letter of 2026-09-01 (last day 2027-03-01)


@pytest.fixture
def ended(tmp_path, kiwi, site: Site, monkeypatch):
    """A sante contract in two locations, with data, terminated on 2026-09-01."""
    cfg = json.loads(Path(site.config_path).read_text())
    cfg["locations"]["replica"] = str(tmp_path / "replica-store")
    Path(site.config_path).write_text(json.dumps(cfg))
    site = Site(site.home, site._passphrase)
    site.create_contract("clinic", "sante", "Clinique du Parc", ["primary", "replica"])
    kiwi("machine", "add", "clinic", "pc1")
    src = tmp_path / "Dossiers patients"
    src.mkdir()
    (src / "Compte rendu Mme Durand.txt").write_text("confidential")
    (src / "scan.bin").write_bytes(b"\x01" * 300_000)
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-09-01T10:00")
    kiwi("backup", "clinic", "-m", "pc1", str(src))
    kiwi("contract", "terminate", "clinic", "--letter-received", "2026-09-01")
    (Path(site.tmp_dir()) / f"{site.contract('clinic').id}-restore-staging").write_bytes(b"staging")
    data = Path(site.path("store"), site.contract("clinic").prefix, "data")
    (next(data.iterdir()) / ("0" * 64 + ".tmp-123-456")).write_bytes(b"a put a crash interrupted")
    journal = Path(site.tmp_dir()) / "export" / f"{site.contract('clinic').id}-0123abcd"
    journal.mkdir(parents=True)
    (journal / "digests").write_bytes(b"\0" * 100)  # an interrupted export's journal
    return src


def objects(site: Site, location: str, rec) -> list:
    return list(site.backend(location).list(rec.prefix + "/"))


def test_purge_refused_before_the_window_closes(ended, kiwi, site, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2027-03-01T22:59")
    _, out = kiwi("purge", "--due")
    assert "nothing due" in out
    assert objects(site, "primary", site.contract("clinic"))


def test_purge_after_the_window(ended, kiwi, site, monkeypatch, tmp_path):
    rec = site.contract("clinic")
    assert objects(site, "replica", rec)
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-12-10T10:00")  # in the window: the client's export
    kiwi("export", "clinic", "--to", str(tmp_path / "new-provider"))
    (report,) = Path(site.home, "exports", rec.id).glob("*.canonical.json")
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", AFTER)
    _, out = kiwi("purge", "--due", "--dry-run")
    assert "would purge" in out and objects(site, "primary", rec)
    _, out = kiwi("purge", "--due")
    assert "purged; certificate" in out
    assert objects(site, "primary", rec) == [] and objects(site, "replica", rec) == []
    assert not [p for p in Path(site.path("store"), rec.prefix).rglob("*") if p.is_file()]
    assert site.keystore.contract_key_copies(rec.id) == []
    assert [p.name for p in Path(site.tmp_dir()).rglob("*")] == ["export"]
    for cmd in (["restore", "clinic", "latest", "--target", str(tmp_path / "o")], ["ls", "clinic", "latest"]):
        code, msg = kiwi(*cmd, ok=False)
        assert code == 7 and "purged" in msg
    from kiwi_restore.errors import AuthError

    with pytest.raises(AuthError):
        site.keystore.load_contract_key(rec.id)
    kiwi("audit", "verify")
    trail = Path(site.audit.path).read_text()
    assert "Durand" not in trail and "Dossiers patients" not in trail and "scan.bin" not in trail
    certs = sorted(Path(site.home, "certificates").glob("KR-DEL-*[0-9A-Z].json"))
    assert len(certs) == 1
    _, out = kiwi("certificate", "verify", str(certs[0]))
    assert "valid signature" in out
    doc = json.loads(certs[0].read_text())["document"]
    assert [loc["name"] for loc in doc["locations"]] == ["primary", "replica"]
    assert all(loc["verified_empty"] and loc["objects_deleted"] > 0 for loc in doc["locations"])
    assert doc["dates"]["end_of_contract"] == "2026-12-01" and doc["clock_override"] == AFTER
    assert doc["keys"]["contract_key_copies_destroyed"] == 1 and doc["verification"]["result"] == "passed"
    assert doc["temporary_data"]["entries_deleted"] == 2
    import hashlib

    assert doc["export_reports"] == [{"id": json.loads(report.read_bytes())["id"],
                                      "sha256": hashlib.sha256(report.read_bytes()).hexdigest()}]
    # idempotent: nothing more to do, still one certificate
    _, out = kiwi("purge", "--due")
    assert "nothing due" in out


def test_certificate_tampering_detected(ended, kiwi, site, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", AFTER)
    kiwi("purge", "--due")
    (cert,) = Path(site.home, "certificates").glob("KR-DEL-*[0-9A-Z].json")
    text = cert.read_text()
    i = text.index('"bytes_deleted": ') + len('"bytes_deleted": ')
    cert.write_text(text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1:])  # one byte changed
    code, out = kiwi("certificate", "verify", str(cert), ok=False)
    assert code == 5 and "altered" in out
    openssl = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "/dev/stdin", "-rawin",
                              "-in", str(cert).replace(".json", ".canonical.json"), "-sigfile",
                              str(cert).replace(".json", ".sig")],
                             input=kiwi("key", "public")[1].encode(), capture_output=True)
    assert openssl.returncode == 0  # the untouched canonical file still verifies with openssl alone


def test_legal_hold_blocks_the_purge(ended, kiwi, site, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", AFTER)
    kiwi("contract", "hold", "clinic", "--reason", "Réquisition judiciaire n° 2027/114")
    _, out = kiwi("purge", "--due")
    assert "legal hold" in out
    assert objects(site, "primary", site.contract("clinic"))
    assert site.keystore.contract_key_copies(site.contract("clinic").id)
    kiwi("contract", "release", "clinic")
    _, out = kiwi("purge", "--due")
    assert "purged" in out


def test_early_destruction_on_request(ended, kiwi, site, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-09-05T10:00")
    code, _ = kiwi("contract", "destroy-request", "clinic", ok=False)
    assert code == 2
    kiwi("contract", "destroy-request", "clinic", "--yes-destroy", "clinic")
    _, out = kiwi("purge", "--due")
    assert "client request" in out and "purged" in out


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_each_step_then_completed_once(ended, site, step, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", AFTER)
    r = run_cli("purge", "--due", env={"KIWI_RESTORE_FAILPOINT": step})
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli("purge", "--due")
    assert r.returncode == 0, r.stderr
    rec = site.contract("clinic")
    assert objects(site, "primary", rec) == [] and objects(site, "replica", rec) == []
    certs = list(Path(site.home, "certificates").glob("KR-DEL-*[0-9A-Z].json"))
    assert len(certs) == 1
    assert run_cli("certificate", "verify", str(certs[0])).returncode == 0
    issued = [x for x in Path(site.audit.path).read_text().splitlines() if '"certificate.issued"' in x]
    assert len(issued) == 1
    assert run_cli("audit", "verify").returncode == 0


def test_two_purges_at_once(ended, site, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", AFTER)
    from kiwi_restore.fsutil import file_lock

    # a running purge holds the lock: a second one exits at once with "locked"
    with file_lock(str(Path(site.home) / "purge.lock")):
        r = subprocess.run([sys.executable, "-m", "kiwi_restore.cli", "purge", "--due"], capture_output=True)
    assert r.returncode == 6 and b"another purge" in r.stderr
    assert objects(site, "primary", site.contract("clinic"))


def test_old_temporary_data_is_removed(kiwi, site, monkeypatch):
    tmp = Path(site.tmp_dir())
    (tmp / "some-export-spool").mkdir()
    (tmp / "some-export-spool" / "part").write_bytes(b"x")
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "+20d")
    kiwi("purge", "--due")
    assert (tmp / "some-export-spool").exists()
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "+28d")
    kiwi("purge", "--due")
    assert not (tmp / "some-export-spool").exists()
