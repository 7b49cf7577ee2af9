"""The signed export report (Art. 17-18 proof of transfer) and its French and English renderings.

The report is a kiwi_restore.signing document: STEM.json, STEM.canonical.json, STEM.sig,
checkable by `kiwi-restore certificate verify` or by openssl alone (docs/EXPORT.md). It
names no file: problems found by verification appear as SHA-256 hashes of their keys, so
the provider's own copy holds nothing that could identify a patient.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..keystore import public_key_pem
from ..signing import canonical_json, sign, write_signed
from ..site import Site
from ..units import human_bytes
from .plan import REPORT_STEM
from .verify import VerifyResult


def report_document(*, job: str, rec, fmt: str, snaps: list, selection: dict, counts: dict, roots: dict,  # noqa: ANN001
                    dest, in_eu: bool, non_eu_authorised: bool, started: str, finished: str, runs: int,
                    verification: VerifyResult, version: str, clock_override: str | None, warnings: int) -> dict:
    problems = verification.missing + verification.extra + verification.changed
    return {
        "type": "export-report", "version": 1, "id": f"{job}-{finished.replace(':', '').replace('-', '')[:15]}",
        "contract": {"id": rec.id, "name": rec.name, "offer": rec.offer, "client": rec.client},
        "format": fmt,
        "scope": {"selection": selection, "machines": sorted({s.machine for s in snaps}),
                  "snapshots": [{"id": s.hex, "machine": s.machine, "time": s.iso()} for s in snaps]},
        "counts": counts,
        "manifest": {"roots": roots, "algorithm": "sha256"},
        "destination": {"url": dest.display, "kind": dest.kind, "region": dest.region, "in_eu": in_eu,
                        "non_eu_authorised": non_eu_authorised},
        "started": started, "finished": finished, "runs": runs,
        "verification": {"method": "every object re-read from the destination and hashed (no ETag trusted)",
                         "ok": verification.ok, "objects_checked": verification.checked,
                         "bytes_read": verification.bytes, "missing": len(verification.missing),
                         "extra": len(verification.extra), "changed": len(verification.changed),
                         "problem_keys_sha256": sorted(hashlib.sha256(k.encode()).hexdigest() for k in problems)[:1000]},
        "tool": {"name": "kiwi-restore", "version": version},
        "clock_override": clock_override,
        "warnings": warnings,
    }




def render(doc: dict, lang: str) -> str:
    fr = lang == "fr"
    c, v, d, n = doc["contract"], doc["verification"], doc["destination"], doc["counts"]
    ok = (("réussie" if fr else "passed") if v["ok"] else ("ÉCHEC" if fr else "FAILED"))
    rows = [
        ("Contrat" if fr else "Contract", f"{c['name']} ({c['id']}), {'offre' if fr else 'offer'} {c['offer']}"),
        ("Client", c["client"] or "-"),
        ("Format", doc["format"]),
        ("Destination", f"{d['url']} ({d['kind']}, {'région' if fr else 'region'} {d['region'] or '?'})"),
        ("Hors UE autorisé (art. 12.4)" if fr else "Non-EU authorised (art. 12.4)",
         ("oui" if fr else "yes") if d["non_eu_authorised"] else ("non (destination dans l'UE)" if fr else "no (destination in the EU)")),
        ("Machines", ", ".join(doc["scope"]["machines"])),
        ("Instantanés" if fr else "Snapshots", str(len(doc["scope"]["snapshots"]))),
        ("Fichiers" if fr else "Files", str(n["files"])),
        ("Volume" if fr else "Size", f"{human_bytes(n['bytes'])} ({n['bytes']} {'octets' if fr else 'bytes'})"),
        ("Objets écrits" if fr else "Objects written", str(n["objects"])),
        ("Début" if fr else "Started", doc["started"]),
        ("Fin" if fr else "Finished", doc["finished"]),
        ("Exécutions (reprises)" if fr else "Runs (resumes)", str(doc["runs"])),
        ("Vérification" if fr else "Verification",
         f"{ok}: {v['objects_checked']} {'objets relus' if fr else 'objects re-read'}, "
         f"{v['missing']} {'manquants' if fr else 'missing'}, {v['extra']} {'en trop' if fr else 'extra'}, "
         f"{v['changed']} {'modifiés' if fr else 'changed'}"),
        ("Outil" if fr else "Tool", f"{doc['tool']['name']} {doc['tool']['version']}"),
    ]
    title = "Rapport d'export de réversibilité" if fr else "Reversibility export report"
    out = [f"# {title}", "", f"{'Identifiant' if fr else 'Report id'}: `{doc['id']}`", "",
           f"| {'Élément' if fr else 'Item'} | {'Valeur' if fr else 'Value'} |", "| --- | --- |"]
    out += [f"| {k} | {str(val).replace('|', '/')} |" for k, val in rows]
    out += ["", "## " + ("Manifestes racines (SHA-256)" if fr else "Root manifests (SHA-256)"), ""]
    out += [f"- `{k}`: `{h}`" for k, h in sorted(doc["manifest"]["roots"].items())]
    out += ["", "## " + ("Vérifier la signature" if fr else "Checking the signature"), "",
            ("Ce rapport est signé (Ed25519) par la clé du prestataire, jointe dans `provider-public-key.pem` "
             "(comparez son empreinte avec celle que le prestataire publie) :" if fr else
             "This report is signed (Ed25519) with the provider's key, included as `provider-public-key.pem` "
             "(compare its fingerprint with the one the provider publishes):"), "",
            "```", f"openssl pkeyutl -verify -pubin -inkey provider-public-key.pem -rawin "
                   f"-in {REPORT_STEM}.canonical.json -sigfile {REPORT_STEM}.sig", "```", ""]
    if doc.get("clock_override"):
        out += [("Horloge de test utilisée : " if fr else "Test clock override in use: ") + doc["clock_override"], ""]
    return "\n".join(out)


def write_report(site: Site, doc: dict) -> tuple[dict, str, dict[str, bytes]]:
    """Sign DOC; write it under <home>/exports/<contract id>/; return the envelope, the local
    path of STEM.json and the files to put at the destination."""
    env = sign(doc, site.keystore.signing_key())
    local_dir = os.path.join(site.home, "exports", doc["contract"]["id"])
    os.makedirs(local_dir, mode=0o700, exist_ok=True)
    stem = os.path.join(local_dir, f"{doc['id']}-{REPORT_STEM}")
    paths = write_signed(stem, env)
    en, fr = render(doc, "en").encode(), render(doc, "fr").encode()
    for lang, text in (("en", en), ("fr", fr)):
        with open(f"{stem}.{lang}.md", "wb") as f:
            f.write(text)
    import base64

    files = {
        f"{REPORT_STEM}.json": json.dumps(env, indent=1, ensure_ascii=False, sort_keys=True).encode(),
        f"{REPORT_STEM}.canonical.json": canonical_json(doc),
        f"{REPORT_STEM}.sig": base64.b64decode(env["signature"]["value"]),
        f"{REPORT_STEM}.en.md": en,
        f"{REPORT_STEM}.fr.md": fr,
        "provider-public-key.pem": public_key_pem(site.keystore.public_key()),
    }
    return env, paths[0], files
