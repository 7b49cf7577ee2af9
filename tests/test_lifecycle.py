"""Contract end dates with a controlled clock: both offers, month ends, leap years, requests, holds."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from kiwi_restore import lifecycle


@pytest.mark.parametrize("letter,end", [
    ("2026-11-30", "2027-02-28"),   # no 30 February: the month's last day
    ("2027-11-30", "2028-02-29"),   # leap year
    ("2027-01-31", "2027-04-30"),   # no 31 April
    ("2026-03-15", "2026-06-15"),
    ("2026-10-31", "2027-01-31"),   # across the year
])
def test_end_of_contract_calendar_months(letter, end):
    assert lifecycle.add_months(date.fromisoformat(letter), 3) == date.fromisoformat(end)


@pytest.mark.parametrize("offer,days,last,closes", [
    ("cloud", 15, "2027-03-15", "2027-03-15T23:00:00.000000Z"),   # winter: Paris is UTC+1
    ("sante", 90, "2027-05-29", "2027-05-29T22:00:00.000000Z"),   # summer: UTC+2
])
def test_restore_window_per_offer(offer, days, last, closes):
    s = lifecycle.schedule(date(2026, 11, 30), 3, days)
    assert s.end_of_contract == date(2027, 2, 28)
    assert s.window_last_day.isoformat() == last
    assert s.window_closes_at == closes
    assert s.data_act_short == (days < 30)


def _status(kiwi, name, clock, monkeypatch):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", clock)
    _, out = kiwi("contract", "status", name, "--json")
    return json.loads(out)


def test_status_through_the_lifecycle(kiwi, contract, monkeypatch, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f").write_text("x")
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-09-01T12:00")
    kiwi("backup", contract, "-m", "pc1", str(tmp_path / "s"))
    assert _status(kiwi, contract, "2026-09-01T12:00", monkeypatch)["state"] == "active"
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-09-02T12:00")
    code, out = kiwi("contract", "terminate", contract, "--letter-received", "2026-12-01", ok=False)
    assert code == 2 and "future" in out
    kiwi("contract", "terminate", contract, "--letter-received", "2026-09-01")
    st = _status(kiwi, contract, "2026-09-02T12:00", monkeypatch)
    assert st["state"] == "terminated" and st["schedule"]["end_of_contract"] == "2026-12-01"
    assert st["schedule"]["restore_window_last_day"] == "2027-03-01" and not st["data_act_flag"]  # sante: 90 days
    assert _status(kiwi, contract, "2027-01-10T00:00", monkeypatch)["state"] == "restore-window"
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2027-03-01T22:59")  # last day, Paris time
    kiwi("restore", contract, "latest", str(tmp_path / "s" / "f"), "--target", str(tmp_path / "o"))
    assert _status(kiwi, contract, "2027-03-01T23:00", monkeypatch)["state"] == "deletion-due"
    code, out = kiwi("restore", contract, "latest", str(tmp_path / "s" / "f"), "--target", str(tmp_path / "o2"), ok=False)
    assert code == 7 and "2027-03-01" in out and "2026-12-01" in out  # the message gives the dates


def test_reversibility_request_deadline(kiwi, contract, monkeypatch, site):
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-10-15T12:00")
    code, _ = kiwi("contract", "reversibility", contract, "--requested", "2026-09-20", ok=False)
    assert code == 2  # no letter yet
    kiwi("contract", "terminate", contract, "--letter-received", "2026-08-31")
    code, out = kiwi("contract", "reversibility", contract, "--requested", "2026-10-01", ok=False)
    assert code == 7 and "2026-09-30" in out
    kiwi("contract", "reversibility", contract, "--requested", "2026-10-01", "--force")
    recs = [json.loads(x) for x in Path(site.audit.path).read_text().splitlines()]
    forced = [r for r in recs if r["action"] == "contract.reversibility_request"]
    assert forced and forced[-1]["outcome"] == "forced" and forced[-1]["clock_override"] == "2026-10-15T12:00"


def test_cloud_window_is_flagged_against_the_data_act(kiwi, monkeypatch):
    kiwi("contract", "create", "shop", "--offer", "cloud")
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2026-10-01T00:00")
    kiwi("contract", "terminate", "shop", "--letter-received", "2026-09-01")
    _, out = kiwi("contract", "status", "shop")
    assert "Data Act" in out


def test_clock_override_refused_on_production(kiwi, site, monkeypatch):
    cfg = json.loads(Path(site.config_path).read_text())
    cfg["production"] = True
    Path(site.config_path).write_text(json.dumps(cfg))
    monkeypatch.setenv("KIWI_RESTORE_CLOCK", "2030-01-01")
    code, out = kiwi("contract", "create", "x", "--offer", "cloud", ok=False)
    assert code == 7 and "production" in out


def test_reversibility_plan_in_both_languages(kiwi, contract, monkeypatch, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f").write_bytes(b"x" * 1000)
    kiwi("backup", contract, "-m", "pc1", str(tmp_path / "s"))
    kiwi("contract", "terminate", contract, "--letter-received", "2026-09-01")
    kiwi("reversibility", "plan", contract, "-o", str(tmp_path / "plan"))
    fr = (tmp_path / "plan" / f"reversibility-plan-{contract}.fr.md").read_text()
    en = (tmp_path / "plan" / f"reversibility-plan-{contract}.en.md").read_text()
    assert "Tâches du client" in fr and "Tasks of the provider" in en
    assert "2026-12-01" in fr and "| pc1 | 1 | 1 | 1000 |" in en
