"""Exports end to end against real destinations: local, S3 (Ceph and moto), SFTP.

Each export is checked with the receivers' own tools (bagit, GNU tar, bsdtar, unzip,
sha256sum) and compared, content and metadata, with the source tree.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import bagit
import pytest
from conftest import run_cli
from kiwi_restore.exporter.journal import purge_temporary
from kiwi_restore.exporter.names import UnsafeKey, check_key, decode_component, encode_component
from treegen import make_hostile_tree, rsync_diff


@pytest.fixture
def exported_contract(kiwi, tmp_path: Path) -> tuple[str, Path]:
    """Contract acme, machine pc1, one snapshot of a hostile tree."""
    src = make_hostile_tree(tmp_path / "src", big=1 << 20)
    kiwi("contract", "create", "acme", "--offer", "sante", "--client", "Cabinet Dr Martin")
    kiwi("machine", "add", "acme", "pc1")
    kiwi("backup", "acme", "--machine", "pc1", str(src), "--time", "2026-03-01T10:00")
    return "acme", src


def export(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = run_cli("export", *args, "--progress", "none")
    if ok:
        assert r.returncode == 0, r.stderr.decode()
    return r


# -- checks of an export's content against the source ---------------------------------------------
def check_sidecar_and_payload(root: Path, src: Path, payload: bool = True) -> None:
    """Every source entry is in the sidecar with its metadata; payload files match byte for byte."""
    (sidecar,) = (root / "metadata" / "pc1").glob("*.jsonl")
    seen = 0
    for line in sidecar.read_text().splitlines():
        e = json.loads(line)
        p = base64.b64decode(e["path_b64"])
        if not p.startswith(os.fsencode(src)):
            continue
        st = os.lstat(p)
        assert int(e["mode"], 8) == st.st_mode & 0o7777, p
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), p
        assert e["mtime_ns"] == st.st_mtime_ns, p
        for k, v in (e.get("xattrs_b64") or {}).items():
            assert os.getxattr(p, base64.b64decode(k), follow_symlinks=False) == base64.b64decode(v)
        if e["type"] == "l":
            assert base64.b64decode(e["target_b64"]) == os.readlink(p)
        if e["type"] == "f" and payload:
            with open(p, "rb") as f:
                assert (root / e["exported"]).read_bytes() == f.read(), p
        seen += 1
    n_src = sum(1 for _ in os.walk(src)) - 1 + sum(len(f) + len([d for d in ds if os.path.islink(os.path.join(r, d))])
                                                      for r, ds, f in os.walk(src))
    assert seen == n_src + 1  # + the source root itself


def check_bagit(root: Path, src: Path) -> None:
    bag = bagit.Bag(str(root))
    bag.validate()  # raises BagValidationError with details
    info = bag.info
    assert info["Bag-Group-Identifier"] and info["Contract-Name"] == "acme"
    assert subprocess.run(["sha256sum", "-c", "--quiet", "manifest-sha256.txt"], cwd=root).returncode == 0
    check_sidecar_and_payload(root, src)


def check_tar(root: Path, src: Path, tmp: Path) -> None:
    (tar,) = (root / "archives" / "pc1").glob("*.tar")
    for tool, cmd in (("gnu", ["tar", "--xattrs", "--xattrs-include=*", "-xpf"]), ("bsd", ["bsdtar", "-xpf"])):
        out = tmp / f"x-{tool}"
        out.mkdir()
        subprocess.run([*cmd, str(tar), "-C", str(out)], check=True, capture_output=True)
        assert rsync_diff(src, out / str(src).lstrip("/")) == "", tool
        # nanosecond mtimes survive
        assert os.stat(out / str(src).lstrip("/") / "big.bin").st_mtime_ns == os.stat(src / "big.bin").st_mtime_ns
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root).returncode == 0


def check_zip(root: Path, src: Path, tmp: Path) -> None:
    (zpath,) = (root / "archives" / "pc1").glob("*.zip")
    subprocess.run(["unzip", "-tq", str(zpath)], check=True, capture_output=True)
    with zipfile.ZipFile(zpath) as z:
        assert z.testzip() is None
    out = tmp / "x-zip"
    subprocess.run(["unzip", "-q", "-X", "-K", str(zpath), "-d", str(out)], check=True, capture_output=True)
    sidecar = next((root / "metadata" / "pc1").glob("*.jsonl"))
    for line in sidecar.read_text().splitlines():
        e = json.loads(line)
        p = base64.b64decode(e["path_b64"])
        if e["type"] == "f" and p.startswith(os.fsencode(src)):
            got = out / e["exported"]
            with open(p, "rb") as f:
                assert got.read_bytes() == f.read()
            assert os.stat(got).st_mode & 0o7777 == int(e["mode"], 8)
            assert int(os.stat(got).st_mtime) == e["mtime_ns"] // 10**9
    check_sidecar_and_payload(root, src, payload=False)
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root).returncode == 0


def check_tree(root: Path, src: Path, tmp: Path) -> None:
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root).returncode == 0
    check_sidecar_and_payload(root, src)


def check_format(fmt: str, root: Path, src: Path, tmp: Path) -> None:
    assert json.loads((root / "inventory.json").read_text())["totals"]["snapshots"] == 1
    assert (root / "inventory.csv").read_text().startswith("machine,id,time")
    assert (root / "docs" / "EXPORT.md").exists()
    if fmt == "bagit":
        check_bagit(root, src)
    else:
        {"tar": check_tar, "zip": check_zip, "tree": check_tree}[fmt](root, src, tmp)


def check_report(root: Path) -> dict:
    r = run_cli("certificate", "verify", str(root / "export-report.json"), "--json")
    assert r.returncode == 0, r.stderr
    pem = root / "provider-public-key.pem"
    o = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pem), "-rawin",
                        "-in", str(root / "export-report.canonical.json"), "-sigfile", str(root / "export-report.sig")],
                       capture_output=True)
    assert o.returncode == 0 and b"Verified Successfully" in o.stdout
    return json.loads((root / "export-report.json").read_text())["document"]


# -- local -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bagit", "tar", "zip", "tree"])
def test_local_export_round_trip(exported_contract, tmp_path: Path, fmt: str, home: Path) -> None:
    contract, src = exported_contract
    dest = tmp_path / "dest"
    export(contract, "--to", str(dest), "--format", fmt)
    check_format(fmt, dest, src, tmp_path)
    doc = check_report(dest)
    assert doc["verification"]["ok"] and doc["destination"]["in_eu"] and doc["format"] == fmt
    assert doc["counts"]["files"] == 16
    # the journal is gone, a local signed copy of the report stays
    assert not os.listdir(home / "tmp" / "export")
    assert list((home / "exports").rglob("*export-report.json"))
    # the same export again finds its report there: nothing is sent or overwritten
    before = _tree_bytes(dest)
    assert b"0 objects sent" in export(contract, "--to", str(dest), "--format", fmt).stdout
    assert _tree_bytes(dest) == before


def test_verify_names_tampered_missing_and_extra(exported_contract, tmp_path: Path) -> None:
    contract, src = exported_contract
    dest = tmp_path / "dest"
    export(contract, "--to", str(dest))
    r = run_cli("export", "verify", "--to", str(dest), "--progress", "none")
    assert r.returncode == 0, r.stderr
    victim = dest / "data" / "pc1"
    target = next(p for p in victim.rglob("big.bin"))
    with open(target, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    (dest / "inventory.csv").unlink()
    (dest / "data" / "planted.txt").write_text("not ours")
    r = run_cli("export", "verify", "--to", str(dest), "--progress", "none")
    out = r.stdout.decode()
    assert r.returncode == 5
    assert "changed: " + str(target.relative_to(dest)) in out
    assert "missing: inventory.csv" in out and "extra: data/planted.txt" in out


def test_hostile_names_encoded_reversibly(exported_contract, tmp_path: Path) -> None:
    contract, src = exported_contract
    dest = tmp_path / "dest"
    export(contract, "--to", str(dest), "--format", "tree")
    names = [json.loads(x) for x in (dest / "names.jsonl").read_text().splitlines()]
    originals = {base64.b64decode(n["path_b64"]): n["exported"] for n in names}
    for bad in (b"new\nline", b"invalid \xff\xfe utf8", b"tab\there"):
        p = os.path.join(os.fsencode(src), bad)
        assert p in originals
        exported = originals[p]
        assert "\n" not in exported and "%" not in exported
        assert decode_component(exported.rsplit("/", 1)[-1]) == bad
        with open(p, "rb") as f:
            assert (dest / exported).read_bytes() == f.read()


def test_names_unit() -> None:
    for name in (b"..", b".", b"a%b", b"x^y", b"\xff", b"a\x00b", b"\x7f", "é".encode(), b"ok name"):
        text, changed = encode_component(name)
        check_key("data/" + text)
        assert decode_component(text) == name or not changed
    long, _ = encode_component(b"\xff" * 200)
    assert len(long.encode()) <= 255
    assert encode_component(b"a\nb")[0] != encode_component(b"a^0Ab")[0]  # injective: '^' is escaped too
    for bad in ("../x", "/abs", "a/../b", "a\0b", "a/\x01", "a//b"):
        with pytest.raises(UnsafeKey):
            check_key(bad)


# -- resume after kill -9 ---------------------------------------------------------------------
def _tree_bytes(root: Path) -> dict[str, bytes]:
    skip = {"export-report.json", "export-report.canonical.json", "export-report.sig",
            "export-report.en.md", "export-report.fr.md"}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name not in skip}


def _no_process_left(args: list[str]) -> None:
    pattern = " ".join(["export", *args])
    deadline = time.monotonic() + 5
    while True:
        left = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not left:
            return
        assert time.monotonic() < deadline, f"processes left after kill -9: {left}"
        time.sleep(0.05)


def _kill_and_resume(args: list[str], probe, delays: tuple[float, ...]) -> int:  # noqa: ANN001
    """Start the export, kill -9 it when PROBE() shows progress (+ a delay); returns the kills."""
    import sys

    kills = 0
    for delay in delays:
        p = subprocess.Popen([sys.executable, "-m", "kiwi_restore.cli", "export", *args, "--progress", "none",
                              "--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while p.poll() is None and not probe() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            _no_process_left(args)  # forked writer processes die with the export
        else:
            p.communicate()
    r = run_cli("export", *args, "--progress", "none", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return kills


@pytest.mark.parametrize("fmt", ["tar", "bagit"])
def test_kill_9_and_resume_is_identical(exported_contract, tmp_path: Path, fmt: str, home: Path,
                                       monkeypatch) -> None:
    contract, src = exported_contract
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-04-01T00:00:00")  # same Bagging-Date for both exports
    ref = tmp_path / "ref"
    export(contract, "--to", str(ref), "--format", fmt)
    dest = tmp_path / "dest"
    kills = _kill_and_resume([contract, "--to", str(dest), "--format", fmt],
                             lambda: dest.exists() and any(dest.rglob("*")), (0.0, 0.05, 0.2, 0.5))
    assert kills >= 1
    assert _tree_bytes(dest) == _tree_bytes(ref)
    assert not [p for p in dest.rglob(".kiwi-partial-*")]
    assert run_cli("export", "verify", "--to", str(dest), "--progress", "none").returncode == 0
    check_format(fmt, dest, src, tmp_path)


def test_journal_holds_no_name_and_purge(exported_contract, tmp_path: Path, home: Path, site) -> None:
    contract, src = exported_contract
    dest = tmp_path / "dest"
    _kill_and_resume_once = subprocess.Popen(
        [__import__("sys").executable, "-m", "kiwi_restore.cli", "export", contract, "--to", str(dest),
         "--progress", "none", "--jobs", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _kill_and_resume_once.poll() is None and not (dest.exists() and any(dest.rglob("*.bin"))):
        time.sleep(0.01)
    _kill_and_resume_once.send_signal(signal.SIGKILL)
    _kill_and_resume_once.wait()
    jdir = home / "tmp" / "export"
    jobs = os.listdir(jdir)
    assert len(jobs) == 1
    for f in (jdir / jobs[0]).iterdir():
        data = f.read_bytes()
        for needle in (b"big.bin", b"with space", b"acme", os.fsencode(src), b"pc1"):
            assert needle not in data, (f, needle)
    assert purge_temporary(site, older_than=30 * 86400) == []
    old = time.time() - 31 * 86400
    os.utime(jdir / jobs[0], (old, old))
    assert purge_temporary(site) == jobs[0:1]
    assert not os.listdir(jdir)


# -- policy ---------------------------------------------------------------------------------------
def test_plain_http_endpoint_refused_and_non_eu_needs_authorisation(exported_contract, tmp_path: Path) -> None:
    contract, _ = exported_contract
    r = export(contract, "--to", "s3://b/p", "--endpoint-url", "http://s3.example.com", "--region", "eu-west-3",
               ok=False)
    assert r.returncode == 7 and b"http://" in r.stderr
    r = export(contract, "--to", "sftp://u@127.0.0.1:1/x", ok=False)
    assert r.returncode == 7 and b"Art. 12.4" in r.stderr


# -- S3 (Ceph and moto) -------------------------------------------------------------------------------
def _s3(env: dict):  # noqa: ANN202
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def _download(s3, bucket: str, prefix: str, to: Path) -> None:  # noqa: ANN001
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            p = to / obj["Key"][len(prefix) + 1:]
            p.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(p))


@pytest.mark.parametrize("fmt", ["bagit", "tar", "zip", "tree"])
def test_s3_export(exported_contract, tmp_path: Path, s3_server: dict, fmt: str, monkeypatch) -> None:
    contract, src = exported_contract
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, s3_server[k])
    s3 = _s3(s3_server)
    bucket = f"export-{fmt}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    s3.create_bucket(Bucket=bucket)
    to = f"s3://{bucket}/handover"
    common = ["--endpoint-url", s3_server["S3_ENDPOINT_URL"]]
    if fmt == "tar":  # outside the EU: refused, then allowed and recorded
        r = export(contract, "--to", to, "--format", fmt, *common, "--region", "us-east-1", ok=False)
        assert r.returncode == 7
        export(contract, "--to", to, "--format", fmt, *common, "--region", "us-east-1", "--allow-non-eu")
    else:
        export(contract, "--to", to, "--format", fmt, *common, "--region", "eu-west-3")
    got = tmp_path / "got"
    _download(s3, bucket, "handover", got)
    check_format(fmt, got, src, tmp_path)
    doc = check_report(got)
    assert doc["destination"]["non_eu_authorised"] is (fmt == "tar")
    # tamper with one object at the destination: verify names it
    victim = "inventory.json"
    s3.put_object(Bucket=bucket, Key=f"handover/{victim}", Body=b"{}")
    r = run_cli("export", "verify", "--to", to, *common, "--region", "eu-west-3", "--progress", "none")
    assert r.returncode == 5 and f"changed: {victim}" in r.stdout.decode()


def test_s3_kill_9_resume_multipart(kiwi, tmp_path: Path, moto_s3: dict, monkeypatch) -> None:
    """A tar of ~24 MiB goes multipart (8 MiB parts): killed mid-upload, resumed, identical."""
    import random

    src = tmp_path / "src"
    src.mkdir()
    r = random.Random(7)
    (src / "a.bin").write_bytes(r.randbytes(12 << 20))
    (src / "b.bin").write_bytes(r.randbytes(12 << 20))
    kiwi("contract", "create", "acme", "--offer", "cloud")
    kiwi("machine", "add", "acme", "pc1")
    kiwi("backup", "acme", "--machine", "pc1", str(src), "--time", "2026-03-01T10:00")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, moto_s3[k])
    s3 = _s3(moto_s3)
    bucket = f"resume-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    s3.create_bucket(Bucket=bucket)
    common = ["--endpoint-url", moto_s3["S3_ENDPOINT_URL"], "--region", "eu-west-3", "--format", "tar"]
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-04-01T00:00:00")  # same start date for both exports
    ref = tmp_path / "ref"
    export("acme", "--to", str(ref), "--format", "tar")
    journal = tmp_path / "home" / "tmp" / "export"

    def in_flight() -> bool:
        ups = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return bool(ups) and journal.exists() and any(journal.rglob("state"))

    kills = _kill_and_resume(["acme", "--to", f"s3://{bucket}/x", *common], in_flight, (0.0, 0.1))
    assert kills >= 1
    got = tmp_path / "got"
    _download(s3, bucket, "x", got)
    assert _tree_bytes(got) == _tree_bytes(ref)


def _kill_mid_export_and_plant_partial(contract: str, to: str, opts: list[str], watch: Path) -> None:
    """Start an export, kill -9 it once a file lands under WATCH, and leave beside that file
    what a kill in the middle of a write leaves: a half-written temporary."""
    p = subprocess.Popen([__import__("sys").executable, "-m", "kiwi_restore.cli", "export", contract, "--to", to,
                          *opts, "--progress", "none", "--jobs", "1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while p.poll() is None and not (watch.exists() and any(watch.rglob("*.bin"))):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (next(watch.rglob("*.bin")).parent / ".kiwi-partial-0123456789abcdef").write_bytes(b"half an object")


def _sftp_target(e: dict, sub: str) -> tuple[str, list[str], Path]:
    """(destination URL, options, local path of that destination) on the test SFTP server."""
    to = f"sftp://{e['SFTP_USER']}@{e['SFTP_HOST']}:{e['SFTP_PORT']}{e['SFTP_ROOT']}/{sub}"
    opts = ["--ssh-key", e["SFTP_KEY"], "--known-hosts", e["SFTP_KNOWN_HOSTS"], "--region", "FR"]
    return to, opts, Path(e["SFTP_ROOT"]) / sub


# -- SFTP ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bagit", "tar", "zip", "tree"])
def test_sftp_export(exported_contract, tmp_path: Path, sftp_server: dict, fmt: str) -> None:
    contract, src = exported_contract
    to, opts, root = _sftp_target(sftp_server, f"export-{fmt}-{os.getpid()}-{int(time.time() * 1000) % 10**8}")
    export(contract, "--to", to, "--format", fmt, *opts)
    check_format(fmt, root, src, tmp_path)
    check_report(root)
    assert run_cli("export", "verify", "--to", to, *opts, "--progress", "none").returncode == 0


def test_sftp_resume_removes_partial_files_a_kill_left(exported_contract, sftp_server: dict) -> None:
    contract, _ = exported_contract
    to, opts, root = _sftp_target(sftp_server, f"resume-{os.getpid()}-{int(time.time() * 1000) % 10**8}")
    _kill_mid_export_and_plant_partial(contract, to, opts, root)
    export(contract, "--to", to, *opts)
    assert not list(root.rglob(".kiwi-partial-*"))
    assert run_cli("export", "verify", "--to", to, *opts, "--progress", "none").returncode == 0


@pytest.mark.parametrize("fmt", ["bagit", "tar"])
def test_corrupt_chunk_fails_the_export_cleanly(exported_contract, tmp_path: Path, site, fmt: str) -> None:
    """A chunk that fails authentication stops a local export with the object named: no file
    holds its bytes, no temporary file is left, no report is signed."""
    from kiwi_restore.restore import lookup

    contract, src = exported_contract
    repo = site.open_repository(site.contract(contract))
    node = lookup(repo, repo.list_snapshots()[-1], str(src / "big.bin"))
    loc = repo.locate(node.chunks[0][0])
    pack = Path(site.path("store")) / repo.pack_key(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 1
    pack.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    r = export(contract, "--to", str(dest), "--format", fmt, ok=False)
    assert r.returncode == 5, r.stderr.decode()
    assert loc.blob_id.hex() in r.stderr.decode() and b"authentication failed" in r.stderr
    assert not list(dest.rglob(".kiwi-partial-*"))
    assert not (dest / "export-report.json").exists()
    assert not [p for p in dest.rglob("big.bin")]  # the file that holds the bad chunk never appears


def test_rerunning_a_finished_export_sends_nothing_and_verifies(exported_contract, tmp_path: Path) -> None:
    """The same command run again after it completed (or was killed just after) is not an error."""
    contract, _ = exported_contract
    dest = tmp_path / "dest"
    export(contract, "--to", str(dest), "--format", "tar")
    before = _tree_bytes(dest)
    r = run_cli("export", contract, "--to", str(dest), "--format", "tar", "--progress", "none", "--json")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["objects_sent"] == 0 and out["verification"]["ok"]
    assert _tree_bytes(dest) == before
    # a different export into the same place is still refused
    r = run_cli("export", contract, "--to", str(dest), "--format", "zip", "--progress", "none")
    assert r.returncode == 2 and b"not empty" in r.stderr


def test_resume_removes_partial_files_a_kill_left(exported_contract, tmp_path: Path) -> None:
    contract, _ = exported_contract
    dest = tmp_path / "dest"
    _kill_mid_export_and_plant_partial(contract, str(dest), [], dest)
    export(contract, "--to", str(dest))
    assert not list(dest.rglob(".kiwi-partial-*"))
    assert run_cli("export", "verify", "--to", str(dest), "--progress", "none").returncode == 0


def test_transient_local_error_is_retried_over_the_whole_plan(exported_contract, tmp_path: Path, site,
                                                              monkeypatch) -> None:
    """An I/O error in a local export's fast path is retried the careful way (with backoff),
    over the plan again from its start: the export completes, identical and verified. (The
    retry used to continue the fast path's half-consumed walk and lose what it had taken.)"""
    import errno

    from kiwi_restore.exporter import destinations
    from kiwi_restore.exporter import export as export_module

    class FlakyDisk(destinations.LocalDestination):
        """A real local destination whose first archive open fails like a device hiccup."""

        failures = 0

        def sync_writer(self, key: str) -> destinations.LocalWriter:
            if key.startswith("archives/") and not FlakyDisk.failures:
                FlakyDisk.failures += 1
                raise OSError(errno.EIO, "injected: the destination disk did not answer")
            return super().sync_writer(key)

    contract, src = exported_contract
    dest = tmp_path / "dest"
    monkeypatch.setattr(export_module, "parse_destination", lambda to, opts: FlakyDisk(to))
    res = export_module.export_contract(site, contract, str(dest), fmt="tar", progress_mode="none")
    assert FlakyDisk.failures == 1
    assert res.verification.ok and res.sent == res.objects and res.skipped == 0
    check_format("tar", dest, src, tmp_path)
    assert not list(dest.rglob(".kiwi-partial-*"))
