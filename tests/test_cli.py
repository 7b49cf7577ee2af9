"""The command line as a user meets it: help, exit codes, no tracebacks, French messages."""

from __future__ import annotations

import json

from conftest import run_cli


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("init", "contract", "machine", "backup", "snapshots", "ls", "restore", "check", "key", "audit"):
        assert cmd in r.stdout.decode()


def test_unknown_contract_is_exit_4_without_traceback(home):
    r = run_cli("snapshots", "nope")
    assert r.returncode == 4
    assert b"Traceback" not in r.stderr
    assert r.stderr.decode().strip() == "kiwi-restore: error: unknown contract 'nope'"


def test_debug_shows_the_traceback(home):
    r = run_cli("--debug", "snapshots", "nope")
    assert r.returncode == 4 and b"Traceback" in r.stderr


def test_usage_errors_are_exit_2(home):
    assert run_cli("contract", "create", "x", "--offer", "gold").returncode == 2
    assert run_cli("contract", "create", "bad/name", "--offer", "cloud").returncode == 2
    r = run_cli("ls", "acme", "latest", "--at", "2026-01-01")
    assert r.returncode in (2, 4)


def test_french_messages(home):
    r = run_cli("snapshots", "nope", env={"LANG": "fr_FR.UTF-8"})
    assert r.returncode == 4
    assert "contrat inconnu 'nope'" in r.stderr.decode()
    r = run_cli("restore", "--help", env={"LANG": "fr_FR.UTF-8"})
    assert "Répertoire où restaurer" in r.stdout.decode()


def test_machine_must_be_registered(tmp_path, kiwi, contract):
    code, out = kiwi("backup", contract, "-m", "laptop", str(tmp_path), ok=False)
    assert code == 4 and "machine add" in out


def test_json_listings(tmp_path, kiwi, contract):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "b\xe9.txt").write_text("x")
    kiwi("backup", contract, "-m", "pc1", str(tmp_path / "s"))
    _, out = kiwi("contract", "list", "--json")
    assert json.loads(out)[0]["name"] == contract
    _, out = kiwi("ls", contract, "latest", str(tmp_path / "s"), "--json")
    entries = json.loads(out)["entries"]
    assert entries[0]["path"].endswith("bé.txt") and entries[0]["size"] == 1
    _, out = kiwi("contract", "show", contract, "--json")
    assert json.loads(out)["key"] == "present"


def test_init_refuses_an_existing_site(home):
    r = run_cli("init")
    assert r.returncode == 1 and b"already exists" in r.stderr


def test_every_message_has_a_french_translation():
    """scripts/update-translations.sh keeps the catalog in step with the code; nothing left behind."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    po = (root / "kiwi_restore/locale/fr/LC_MESSAGES/kiwi_restore.po").read_text()
    assert "#, fuzzy" not in po.split("\n\n", 1)[1]
    assert not re.search(r'^msgid "(?!")(.*)"\nmsgstr ""\n\n', po, re.M)
    sources = sorted(str(p) for d in ("kiwi_restore", "fuse", "exporter") for p in (root / d).rglob("*.py"))
    pot = subprocess.run(["xgettext", "--language=Python", "--keyword=_", "--from-code=UTF-8", "--no-wrap",
                          "-o", "-", *sources], capture_output=True, text=True, check=True).stdout
    in_code = set(re.findall(r'^msgid "(.+)"$', pot, re.M))
    in_catalog = set(re.findall(r'^msgid "(.+)"$', po, re.M))
    assert in_code <= in_catalog, f"run scripts/update-translations.sh: {sorted(in_code - in_catalog)[:5]}"
