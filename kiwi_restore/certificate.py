"""Deletion certificates: NIST SP 800-88 Rev. 1 Appendix G, adapted to cloud object storage.

The certificate's content comes only from what the purge job recorded in the contract's
record (ids, dates, inventory, verification), so writing it again gives the same bytes
(Ed25519 signatures are deterministic): a purge interrupted and resumed issues one certificate.
"""

from __future__ import annotations

import html
import os

from . import __version__
from .fsutil import write_atomic
from .signing import fingerprint, sign, write_signed
from .site import ContractRecord, Site

METHOD = {
    "category": "Purge (NIST SP 800-88 Rev. 1), cloud adaptation",
    "technique": "logical deletion of every stored object of the contract in every storage location, "
                 "and cryptographic erase of the contract key (every wrapped copy, keystore backups included)",
    "encryption": "AES-256-GCM under keys derived from the contract key, active from the first write",
}


def certificate_dir(site: Site) -> str:
    path = os.path.join(site.home, "certificates")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def deletion_document(site: Site, rec: ContractRecord) -> dict:
    lc = rec.lifecycle
    p = lc["purge"]
    sched = lc.get("schedule") or {}
    inv = p["inventory"]
    return {
        "type": "deletion-certificate",
        "version": 1,
        "id": p["certificate_id"],
        "issued": p["completed"],
        "provider": {"organization": site.config.get("provider_name", "Kiwi Backup"),
                     "signing_key_fingerprint": fingerprint(site.keystore.public_key())},
        "contract": {"id": rec.id, "name": rec.name, "client": rec.client, "offer": rec.offer,
                     "machines": sorted(rec.machines)},
        "reason": p["reason"],
        "dates": {
            "termination_letter_received": sched.get("letter_received"),
            "end_of_contract": sched.get("end_of_contract"),
            "restore_window_last_day": sched.get("restore_window_last_day"),
            "deletion_requested_by_client": lc.get("destroy_requested"),
            "deletion_started": p["started"],
            "deletion_completed": p["completed"],
        },
        "method": METHOD,
        "locations": [{"name": name, "url": v["url"], "objects_deleted": v["objects"], "bytes_deleted": v["bytes"],
                       "verified_empty": p["verification"]["objects_listed_per_location"].get(name) == 0}
                      for name, v in sorted(inv["locations"].items())],
        "keys": {"contract_key_copies_destroyed": p.get("key_copies", 0),
                 "keystore": "local keystore and its backups",
                 "unwrap_after_destruction": p["verification"]["key_unwrap"]},
        "temporary_data": {"entries_deleted": p.get("temporary_entries", 0)},
        "inventory": {"objects": sum(v["objects"] for v in inv["locations"].values()),
                      "bytes": sum(v["bytes"] for v in inv["locations"].values()),
                      "sha256": inv["sha256"], "format": inv["format"]},
        "verification": {k: v for k, v in p["verification"].items() if k != "problems"},
        "export_reports": p.get("export_reports", []),
        "operator": p["operator"],
        "tool": {"name": "kiwi-restore", "version": __version__},
        "clock_override": site.clock.override,
        "legal_basis": ["Contract Art. 17 (destruction, no copy kept)", "Art. 18.1 (destruction on request)",
                        "Santé Art. 2.3 (every datacenter)", "NIST SP 800-88 Rev. 1 App. G (record)"],
    }


def write_deletion_certificate(site: Site, rec: ContractRecord) -> list[str]:
    doc = deletion_document(site, rec)
    stem = os.path.join(certificate_dir(site), doc["id"])
    paths = write_signed(stem, sign(doc, site.keystore.signing_key()))
    for lang in ("fr", "en"):
        write_atomic(f"{stem}.{lang}.html", render_html(doc, lang).encode(), 0o644)
        paths.append(f"{stem}.{lang}.html")
    return paths


LABELS = {
    "en": {"title": "Certificate of data deletion", "contract": "Contract", "client": "Client", "offer": "Offer",
           "reason": "Reason", "dates": "Dates", "method": "Method", "locations": "Storage locations",
           "objects": "objects deleted", "bytes": "bytes deleted", "empty": "verified empty",
           "keys": "Keys", "copies": "contract key copies destroyed", "unwrap": "unwrap after destruction",
           "inventory": "Inventory of deleted objects", "verification": "Verification", "operator": "Operator",
           "tool": "Tool", "clock": "Clock override (test or demonstration only)", "signature":
           "This document is signed (Ed25519) by the provider key {fp}. Check it with "
           "`kiwi-restore certificate verify {id}.json` or with openssl (docs/CERTIFICATES.md).",
           "yes": "yes", "no": "NO", "exports": "Export reports"},
    "fr": {"title": "Certificat de destruction de données", "contract": "Contrat", "client": "Client",
           "offer": "Offre", "reason": "Motif", "dates": "Dates", "method": "Méthode",
           "locations": "Emplacements de stockage", "objects": "objets supprimés", "bytes": "octets supprimés",
           "empty": "vide vérifié", "keys": "Clés", "copies": "copies de la clé du contrat détruites",
           "unwrap": "déballage après destruction", "inventory": "Inventaire des objets supprimés",
           "verification": "Vérification", "operator": "Opérateur", "tool": "Outil",
           "clock": "Horloge forcée (test ou démonstration uniquement)", "signature":
           "Ce document est signé (Ed25519) par la clé du prestataire {fp}. Vérifiez-le avec "
           "`kiwi-restore certificate verify {id}.json` ou avec openssl (docs/CERTIFICATES.md).",
           "yes": "oui", "no": "NON", "exports": "Rapports d'export"},
}


def render_html(doc: dict, lang: str) -> str:
    t = LABELS[lang]
    e = html.escape

    def row(k: str, v: object) -> str:
        return f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"

    c = doc["contract"]
    parts = [f"<!doctype html><html lang='{lang}'><meta charset='utf-8'><title>{e(t['title'])} {e(doc['id'])}</title>",
             "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto}th{text-align:left;padding-right:1em;"
             "vertical-align:top}td,th{border-bottom:1px solid #ddd;padding:.2em}</style>",
             f"<h1>{e(t['title'])}</h1><p><b>{e(doc['id'])}</b> — {e(doc['issued'])}</p><table>",
             row(t["contract"], f"{c['name']} ({c['id']})"), row(t["client"], c["client"]),
             row(t["offer"], c["offer"]), row(t["reason"], doc["reason"])]
    for k, v in doc["dates"].items():
        if v:
            parts.append(row(f"{t['dates']}: {k}", v))
    parts.append(row(t["method"], f"{doc['method']['category']}: {doc['method']['technique']}"))
    for loc in doc["locations"]:
        parts.append(row(f"{t['locations']}: {loc['name']}",
                         f"{loc['url']} — {loc['objects_deleted']} {t['objects']}, {loc['bytes_deleted']} "
                         f"{t['bytes']}, {t['empty']}: {t['yes'] if loc['verified_empty'] else t['no']}"))
    k = doc["keys"]
    parts.append(row(t["keys"], f"{k['contract_key_copies_destroyed']} {t['copies']}; {t['unwrap']}: "
                                f"{k['unwrap_after_destruction']}"))
    inv = doc["inventory"]
    parts.append(row(t["inventory"], f"{inv['objects']} / {inv['bytes']} B — SHA-256 {inv['sha256']}"))
    parts.append(row(t["verification"], f"{doc['verification']['result']} ({doc['verification']['method']})"))
    for r in doc["export_reports"]:
        parts.append(row(t["exports"], f"{r.get('id')} SHA-256 {r.get('sha256')}"))
    parts.append(row(t["operator"], doc["operator"]))
    parts.append(row(t["tool"], f"{doc['tool']['name']} {doc['tool']['version']}"))
    if doc.get("clock_override"):
        parts.append(row(t["clock"], doc["clock_override"]))
    parts.append("</table>")
    parts.append(f"<p>{e(t['signature'].format(fp=doc['provider']['signing_key_fingerprint'], id=doc['id']))}</p>")
    parts.append("</html>\n")
    return "".join(parts)
