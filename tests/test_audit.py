"""The audit trail: every command is recorded, the chain and checkpoints detect tampering,
and paths are sealed under the contract key."""

from __future__ import annotations

import json
from pathlib import Path

from kiwi_restore.site import Site


def trail(site: Site) -> Path:
    return Path(site.audit.path)


def test_commands_are_recorded_with_sealed_paths(tmp_path, kiwi, contract, site):
    src = tmp_path / "Dossier Patient Dupont"
    src.mkdir()
    (src / "compte rendu.txt").write_text("x")
    kiwi("backup", contract, "-m", "pc1", str(src))
    kiwi("restore", contract, "latest", str(src / "compte rendu.txt"), "--target", str(tmp_path / "o"))
    raw = trail(site).read_text()
    actions = [json.loads(line)["action"] for line in raw.splitlines()]
    for a in ("contract.create", "machine.add", "backup", "restore", "audit.checkpoint"):
        assert a in actions
    assert "Dupont" not in raw and "compte rendu" not in raw  # paths only sealed
    _, shown = kiwi("audit", "show", "--contract", contract, "--unseal")
    assert "Dupont" in shown
    code, out = kiwi("audit", "verify")
    assert code == 0 and "chain intact" in out


def _rewrite(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_altered_record_detected(tmp_path, kiwi, contract, site):
    def alter(lines):
        rec = json.loads(lines[2])
        rec["actor"] = "somebody-else"
        lines[2] = json.dumps(rec)
        return lines

    _rewrite(trail(site), alter)
    code, out = kiwi("audit", "verify", ok=False)
    assert code == 5 and "altered" in out


def test_removed_record_detected(kiwi, contract, site):
    _rewrite(trail(site), lambda lines: lines[:1] + lines[2:])
    code, out = kiwi("audit", "verify", ok=False)
    assert code == 5 and "sequence broken" in out


def test_rehashed_forgery_fails_the_checkpoint_signature(kiwi, contract, site):
    """An attacker who edits a record and recomputes every hash still cannot sign."""
    from kiwi_restore.audit import record_hash

    def forge(lines):
        recs = [json.loads(x) for x in lines]
        recs[1]["details"]["machine"] = "forged"
        prev = recs[0]["hash"]
        for r in recs[1:]:
            r["prev"] = prev
            if r["action"] == "audit.checkpoint":
                r["details"]["head_hash"] = prev
            r["hash"] = record_hash(r)
            prev = r["hash"]
        return [json.dumps(r) for r in recs]

    _rewrite(trail(site), forge)
    code, out = kiwi("audit", "verify", ok=False)
    assert code == 5 and "checkpoint signature invalid" in out


def test_mirror_kept_and_compared(tmp_path, kiwi, site):
    cfg = json.loads(Path(site.config_path).read_text())
    cfg["audit"]["mirrors"] = [str(tmp_path / "audit-mirror")]
    Path(site.config_path).write_text(json.dumps(cfg))
    trail(site).unlink(missing_ok=True)
    kiwi("contract", "create", "m1", "--offer", "cloud")
    mirror = tmp_path / "audit-mirror" / "audit.jsonl"
    assert mirror.read_bytes() == trail(site).read_bytes()
    kiwi("audit", "verify")
    mirror.write_text(mirror.read_text().replace("m1", "m2"))
    code, out = kiwi("audit", "verify", ok=False)
    assert code == 5 and "differs" in out
