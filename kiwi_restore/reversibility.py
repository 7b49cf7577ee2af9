"""The reversibility information pack and plan (Art. 18.1-18.2), in French and English.

Inventory from the snapshot manifests (machines, snapshots, files, bytes), the open formats
offered, an estimated transfer time, the tasks of both parties and every date.
"""

from __future__ import annotations

import os
from datetime import timedelta

from . import lifecycle
from .fsutil import write_atomic
from .service import audited, open_contract
from .site import Site

FORMATS = [
    ("BagIt (RFC 8493)", "bagit", "SHA-512 and SHA-256 manifests; metadata sidecar per snapshot"),
    ("POSIX pax tar", "tar", "one archive per snapshot; ns times, owners, xattrs, links"),
    ("ZIP64", "zip", "for Windows users; times to 2 s, no xattrs"),
    ("Plain tree + manifest", "tree", "files as they were, with a SHA-256 manifest"),
]

TASKS = {
    "en": {
        "provider": ["Send this information pack and plan", "Keep restores open until the last day of the window",
                     "Run the export to the destination the client designates (S3-compatible storage, SFTP)",
                     "Verify what arrived and send the signed export report",
                     "After the window: destroy every copy (replicas included), crypto-erase the keys, "
                     "send the signed deletion certificate"],
        "client": ["Designate the destination platform and give credentials with write access",
                   "Say which snapshots to export (all, or the latest per machine) and the format",
                   "Check the delivery (bagit validation, sha256sum -c) and confirm reception",
                   "Disable the backup agents at the end of contract"],
    },
    "fr": {
        "provider": ["Remettre ce dossier d'information et ce plan",
                     "Maintenir la restauration ouverte jusqu'au dernier jour de la période",
                     "Exporter vers la destination désignée par le client (stockage compatible S3, SFTP)",
                     "Vérifier ce qui est arrivé et remettre le rapport d'export signé",
                     "Après la période : détruire toutes les copies (répliques comprises), effacer les clés "
                     "par destruction cryptographique, remettre le certificat de destruction signé"],
        "client": ["Désigner la plateforme de destination et fournir des identifiants en écriture",
                   "Indiquer les instantanés à exporter (tous, ou le dernier par machine) et le format",
                   "Contrôler la livraison (validation bagit, sha256sum -c) et en accuser réception",
                   "Désactiver les agents de sauvegarde à la fin du contrat"],
    },
}

TITLES = {
    "en": ("Reversibility information pack and plan", "Inventory", "Formats offered", "Estimated transfer time",
           "Tasks of the provider", "Tasks of the client", "Schedule", "Warning"),
    "fr": ("Dossier d'information et plan de réversibilité", "Inventaire", "Formats proposés",
           "Durée de transfert estimée", "Tâches du prestataire", "Tâches du client", "Calendrier", "Avertissement"),
}


def inventory(site: Site, name: str) -> dict:
    rec, repo = open_contract(site, name)
    snaps = repo.list_snapshots()
    machines: dict[str, dict] = {}
    for s in snaps:
        m = machines.setdefault(s.machine, {"snapshots": 0, "files": 0, "bytes": 0, "latest": None})
        m["snapshots"] += 1
        m["files"] += s.stats.get("files", 0)
        m["bytes"] += s.stats.get("bytes", 0)
        m["latest"] = {"time": s.iso(), "files": s.stats.get("files", 0), "bytes": s.stats.get("bytes", 0)}
    stored = sum(info.size for info in repo.backend.list(repo.prefix))
    return {"contract": rec.name, "offer": rec.offer, "client": rec.client, "machines": machines,
            "snapshots": len(snaps), "files_all_snapshots": sum(m["files"] for m in machines.values()),
            "bytes_all_snapshots": sum(m["bytes"] for m in machines.values()),
            "bytes_latest": sum(m["latest"]["bytes"] for m in machines.values()), "stored_bytes": stored}


def plan(site: Site, name: str, out_dir: str, rate_mb_s: int = 50) -> list[str]:
    with audited(site, "reversibility.plan", site.contract(name)):
        inv = inventory(site, name)
    rec = site.contract(name)
    sched = rec.lifecycle.get("schedule")
    secs_all = inv["bytes_all_snapshots"] / (rate_mb_s * 1e6)
    secs_latest = inv["bytes_latest"] / (rate_mb_s * 1e6)
    flag = int(site.config["offers"][rec.offer]["restore_window_days"]) < lifecycle.DATA_ACT_MIN_RETRIEVAL_DAYS
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for lang in ("fr", "en"):
        t = TITLES[lang]
        lines = [f"# {t[0]} — {rec.name}", ""]
        lines += [f"- Client: {rec.client or '-'}", f"- {'Offer' if lang == 'en' else 'Offre'}: {rec.offer}",
                  f"- {'Contract id' if lang == 'en' else 'Identifiant du contrat'}: {rec.id}", ""]
        lines += [f"## {t[1]}", "", "| machine | snapshots | files | bytes | latest |", "|---|---:|---:|---:|---|"]
        for m, v in sorted(inv["machines"].items()):
            lines.append(f"| {m} | {v['snapshots']} | {v['files']} | {v['bytes']} | {v['latest']['time']} |")
        lines += ["", f"Total: {inv['snapshots']} snapshots, {inv['files_all_snapshots']} files, "
                      f"{inv['bytes_all_snapshots']} bytes (latest per machine: {inv['bytes_latest']} bytes; "
                      f"stored, deduplicated and compressed: {inv['stored_bytes']} bytes).", ""]
        lines += [f"## {t[2]}", ""] + [f"- {n} (`--format {k}`): {d}" for n, k, d in FORMATS]
        lines += ["", "An inventory (JSON, CSV), the repository format (FORMAT.md) and a signed export report "
                      "come with every export." if lang == "en" else
                  "Chaque export comprend un inventaire (JSON, CSV), la description du format du dépôt "
                  "(FORMAT.md) et un rapport d'export signé.", ""]
        lines += [f"## {t[3]}", "", f"- {timedelta(seconds=int(secs_all))} (all snapshots / tous les instantanés, "
                                    f"{rate_mb_s} MB/s)",
                  f"- {timedelta(seconds=int(secs_latest))} (latest per machine / dernier par machine)", ""]
        lines += [f"## {t[4]}", ""] + [f"{i}. {x}" for i, x in enumerate(TASKS[lang]["provider"], 1)]
        lines += ["", f"## {t[5]}", ""] + [f"{i}. {x}" for i, x in enumerate(TASKS[lang]["client"], 1)]
        lines += ["", f"## {t[6]}", ""]
        if sched:
            for k in ("letter_received", "reversibility_request_deadline", "reversibility_info_due",
                      "end_of_contract", "restore_window_last_day", "window_closes_at"):
                lines.append(f"- {k}: {sched[k]}")
            rv = rec.lifecycle.get("reversibility")
            if rv:
                lines.append(f"- reversibility_requested: {rv['requested']}{' (late, accepted)' if rv['forced'] else ''}")
        else:
            lines.append("- no termination letter recorded / aucune lettre de résiliation enregistrée")
        if flag:
            lines += ["", f"## {t[7]}", "",
                      "The restore window of this offer is shorter than the 30-day retrieval period of the "
                      "EU Data Act (Regulation 2023/2854, Art. 25(2)(g)) where it applies." if lang == "en" else
                      "La période de restauration de cette offre est plus courte que la période de récupération "
                      "de 30 jours du règlement européen sur les données (2023/2854, art. 25(2)(g)) lorsqu'il "
                      "s'applique."]
        path = os.path.join(out_dir, f"reversibility-plan-{rec.name}.{lang}.md")
        write_atomic(path, ("\n".join(lines) + "\n").encode(), 0o644)
        written.append(path)
    return written
