#!/usr/bin/env python3
"""Deterministic benchmark dataset generator (pure Python, seeded).

A copy of the anchor-benchmark generator (generator v4, same seed => same bytes),
kept here so scripts/bench_ingest_restore.py runs without /work/shared.

Builds a tree that resembles the data disk of a small medical office:

  <out>/src/Praxis Daten/...   small files (0-64 KiB), 5 directory levels,
                               ~20-200 entries per directory, mixed
                               compressible text (UTF-8, accents) and
                               incompressible binary (random bytes), a pool
                               of identical "template" files (whole-file dedup),
                               zero-byte files, relative/absolute/dangling
                               symlinks, a couple of hardlinks,
                               names with spaces and é/ü/ö/ä/ß.
  <out>/src/Bildarchiv/...     large files: 2 x incompressible (1 GiB at full
                               scale) and 1 x dedup-friendly file built from a
                               small pool of repeated 8 MiB random blocks.

Same --seed and --scale => byte-identical tree (contents, names, modes, mtimes).
A manifest (<out>/manifest.json) describes the result; if it already exists
with identical parameters the generator does nothing (idempotent).

Usage: make_dataset.py --scale {small,medium,full} [--out DIR] [--seed N]
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

GEN_VERSION = 4
MiB = 1 << 20

SCALES = {
    # n_small: number of small regular files
    # big: size of each of the 2 incompressible large files
    # dedup: size of the repeated-block file; block: repeated block size; pool: distinct blocks
    "small":  dict(n_small=4_000,   big=64 * MiB,   dedup=32 * MiB,  block=4 * MiB, pool=2),
    "medium": dict(n_small=30_000,  big=256 * MiB,  dedup=128 * MiB, block=8 * MiB, pool=4),
    "full":   dict(n_small=100_000, big=1024 * MiB, dedup=512 * MiB, block=8 * MiB, pool=8),
}

BASE_MTIME = 1672531200  # 2023-01-01T00:00:00Z

TOP_DIRS = ["Patienten", "Abrechnung", "Korrespondenz", "Labor Ergebnisse",
            "Vorlagen", "Benutzer", "Praxissoftware Export", "Scans Eingang",
            "Überweisungen", "Échographies"]
SURNAMES = ["Müller", "Schäfer", "Größ", "Böhm", "Jäger", "Lefèvre", "Dupré",
            "Hoffmann", "Weiß", "Kühn", "Öztürk", "Françoise", "Bérénice", "Zöller",
            "Schmidt", "Meyer", "Koch", "Fischer", "Gärtner", "Crémieux", "Brandt"]
GIVEN = ["Jürgen", "Jörg", "Hélène", "Renée", "Zoë", "Günther", "Björn", "Ines",
         "José", "André", "Anna", "Paul", "Lena", "Maël", "Sören", "Chloé"]
SUBDIRS = ["Befunde", "Briefe", "Scans", "Rezepte", "Laborwerte", "Bilder",
           "Arztbriefe", "Überweisung", "Rechnungen", "Einverständnis",
           "Röntgen", "EKG", "Impfungen", "Notizen", "Privat", "Kasse",
           "Dokumente", "Archiv alt", "Entwürfe", "Échanges"]
TEXT_EXT = [".txt", ".xml", ".hl7", ".csv", ".rtf", ".log"]
BIN_EXT = [".pdf", ".jpg", ".dcm", ".docx", ".png", ".xlsx"]
TEXT_STEM = ["Befund", "Arztbrief", "Laborbericht", "Anamnese", "Notiz",
             "Rechnung", "Überweisung", "Compte rendu", "Épicrise", "Verlauf",
             "Medikation", "Termin", "Rückfrage", "Kostenübernahme"]
BIN_STEM = ["Scan", "Röntgen Thorax", "EKG Ausdruck", "Foto Wunde", "Einverständnis",
            "Versichertenkarte", "Ultraschall", "Échographie", "Dokument", "Brief unterschrieben"]
WORDS = ["Patient", "Patientin", "Befund", "Diagnose", "Therapie", "Blutdruck", "Herzfrequenz", "Überweisung", "Röntgen", "Thorax", "unauffällig", "Kontrolle", "Medikation", "täglich", "morgens", "abends", "Beschwerden", "Schmerzen", "Rücken", "Kniegelenk", "Schulter", "Labor", "Hämoglobin", "Leukozyten", "Cholesterin", "Glukose", "erhöht", "normal", "Allergie", "Penicillin", "keine", "bekannt", "Anamnese", "Familienanamnese", "Größe", "Gewicht", "Körpertemperatur", "Impfung", "Tetanus", "Grippe", "Auffrischung", "Arbeitsunfähigkeit", "bis", "einschließlich", "Wiedervorstellung", "Wochen", "der", "die", "das", "und", "mit", "bei", "nach", "zur", "zum", "im", "am", "für", "über", "unter", "échographie", "abdominale", "résultat", "normal", "contrôle", "prévu", "à", "été", "très", "légère", "douleur", "épaule", "genou", "traitement", "poursuivi", "ICD-10", "J06.9", "M54.5", "I10", "E11.9", "Z00.0", "OPS", "EBM", "GOÄ", "Ziffer", "Betrag", "EUR"]


def size_small(r):
    u = r.random()
    if u < 0.02:
        return 0
    if u < 0.72:  # log-uniform 64 B .. 64 KiB (most office files are small)
        return int(math.exp(r.uniform(math.log(64), math.log(65536))))
    return r.randrange(0, 65537)  # uniform 0 .. 64 KiB


def build_corpus(r, nbytes):
    out, n = [], 0
    line = []
    while n < nbytes:
        w = r.choice(WORDS)
        line.append(w)
        if len(line) >= r.randint(6, 14):
            s = " ".join(line) + ".\n"
            out.append(s)
            n += len(s.encode())
            line = []
    return "".join(out).encode()


def person(r):
    return f"{r.choice(SURNAMES)}, {r.choice(GIVEN)} {r.randint(1930, 2020)}"


def uniq(name, used):
    base, i = name, 2
    while name in used:
        name = f"{base} ({i})"
        i += 1
    used.add(name)
    return name


def gen(out, scale, seed):
    p = SCALES[scale]
    r = random.Random(seed)
    src = os.path.join(out, "src")
    if os.path.exists(src):
        shutil.rmtree(src)
    os.makedirs(src)
    small_root_rel = "Praxis Daten"
    big_root_rel = "Bildarchiv"

    # ---- directory tree (root = depth 0, deepest dirs = depth 4 => files at depth 5)
    n_dirs_target = max(20, p["n_small"] // 60)
    # depth 1 is fixed (TOP_DIRS); pick mean branching b for depths 2..4
    b = 1.0
    while 1 + len(TOP_DIRS) * sum(b ** i for i in range(4)) < n_dirs_target:
        b += 0.05
    dirs = [(small_root_rel, 0)]
    i = 0
    while i < len(dirs):
        d, depth = dirs[i]
        i += 1
        if depth >= 4:
            continue
        if depth == 0:
            names = TOP_DIRS[:]
        else:
            k = r.randint(max(1, int(b * 0.5)), int(math.ceil(b * 1.5)))
            used = set()
            names = []
            for _ in range(k):
                if depth == 1 and d.endswith("Patienten") or r.random() < 0.3:
                    nm = person(r)
                elif depth >= 2 and r.random() < 0.4:
                    nm = str(r.randint(2015, 2025))
                else:
                    nm = r.choice(SUBDIRS)
                names.append(uniq(nm, used))
        for nm in names:
            dirs.append((os.path.join(d, nm), depth + 1))
    for d, _ in dirs:
        os.makedirs(os.path.join(src, d), exist_ok=True)

    # ---- allocate small files to dirs (weighted, deeper dirs hold more)
    weights = [r.randint(20, 200) * (0.3 if depth < 2 else 1.0) for _, depth in dirs]
    W = sum(weights)
    counts = [int(p["n_small"] * w / W) for w in weights]
    rem = p["n_small"] - sum(counts)
    for j in range(rem):
        counts[j % len(counts)] += 1

    corpus = build_corpus(r, 4 * MiB)
    templates = [r.randbytes(r.randint(8 << 10, 64 << 10)) for _ in range(50)]
    stats = dict(files=0, bytes=0, text_files=0, bin_files=0, template_copies=0,
                 zero_files=0, symlinks=0, hardlinks=0, dirs=len(dirs) + 1)
    regular_files = []
    for (d, _depth), cnt in zip(dirs, counts, strict=True):
        used = set()
        for _ in range(cnt):
            size = size_small(r)
            if r.random() < 0.6:
                nm = f"{r.choice(TEXT_STEM)} {r.randint(2015, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}{r.choice(TEXT_EXT)}"
                hdr = (f"Patient: {person(r)}\nID: {r.getrandbits(64):016x}\n").encode()
                off = r.randrange(0, len(corpus) - 65536)
                data = (hdr + corpus[off:off + size])[:size]
                stats["text_files"] += 1
            else:
                nm = f"{r.choice(BIN_STEM)} {r.randint(1, 99999):05d}{r.choice(BIN_EXT)}"
                if r.random() < 0.05:
                    data = r.choice(templates)
                    stats["template_copies"] += 1
                else:
                    data = r.randbytes(size)
                stats["bin_files"] += 1
            nm = uniq(nm, used)
            path = os.path.join(src, d, nm)
            with open(path, "wb") as f:
                f.write(data)
            mt = BASE_MTIME + r.randrange(0, 3 * 365 * 86400)
            os.utime(path, (mt, mt))
            stats["files"] += 1
            stats["bytes"] += len(data)
            stats["zero_files"] += len(data) == 0
            regular_files.append(os.path.join(d, nm))

        # symlinks: ~1 per directory with >30 files (relative to a sibling)
        if cnt > 30 and r.random() < 0.5:
            tgt = os.path.basename(regular_files[-1])
            os.symlink(tgt, os.path.join(src, d, uniq("aktuell → neuester Befund", used)))
            stats["symlinks"] += 1

    # special links
    os.symlink("Praxis Daten/Vorlagen", os.path.join(src, "Vorlagen Verknüpfung"))
    os.symlink("/etc/hostname", os.path.join(src, "Praxis Daten", "absoluter Link"))
    os.symlink("gibt es nicht.pdf", os.path.join(src, "Praxis Daten", "kaputter Link"))
    stats["symlinks"] += 3
    for k in range(2):
        a = regular_files[r.randrange(len(regular_files))]
        dst = os.path.join(src, small_root_rel, f"Hardlink Kopie {k + 1} – é ü.dat")
        os.link(os.path.join(src, a), dst)
        stats["hardlinks"] += 1

    # ---- large files
    big_dir = os.path.join(src, big_root_rel, "DICOM Export 2024")
    os.makedirs(big_dir)
    bigs = []
    for k in range(2):
        rel = os.path.join(big_root_rel, "DICOM Export 2024", f"CT Schädel Serie {k + 1}.raw")
        with open(os.path.join(src, rel), "wb") as f:
            left = p["big"]
            while left:
                n = min(4 * MiB, left)
                f.write(r.randbytes(n))
                left -= n
        bigs.append(rel)
    pool = [r.randbytes(p["block"]) for _ in range(p["pool"])]
    dedup_rel = os.path.join(big_root_rel, "praxis_db_sicherung.bak")
    with open(os.path.join(src, dedup_rel), "wb") as f:
        for _ in range(p["dedup"] // p["block"]):
            f.write(r.choice(pool))
    large_bytes = 2 * p["big"] + p["dedup"]
    for rel in bigs + [dedup_rel]:
        os.utime(os.path.join(src, rel), (BASE_MTIME, BASE_MTIME))

    # fixed directory mtimes (deepest first) for reproducible tar output
    for root, _dnames, _ in sorted(os.walk(src), key=lambda t: -t[0].count(os.sep)):
        os.utime(root, (BASE_MTIME, BASE_MTIME))

    return dict(
        generator_version=GEN_VERSION, scale=scale, seed=seed, params=p,
        src=src, small_dir=small_root_rel, big_files=bigs, dedup_file=dedup_rel,
        small_files=stats["files"], small_bytes=stats["bytes"], large_bytes=large_bytes,
        total_bytes=stats["bytes"] + large_bytes, dirs=stats["dirs"] + 2,
        text_files=stats["text_files"], bin_files=stats["bin_files"],
        template_copies=stats["template_copies"], zero_files=stats["zero_files"],
        symlinks=stats["symlinks"], hardlinks=stats["hardlinks"], complete=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=SCALES, default="small")
    ap.add_argument("--out", default=None, help="default /tmp/bench-data/<scale>")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    out = a.out or f"/tmp/bench-data/{a.scale}"
    man_path = os.path.join(out, "manifest.json")
    if not a.force and os.path.exists(man_path):
        try:
            with open(man_path) as fh:
                m = json.load(fh)
            if (m.get("complete") and m.get("generator_version") == GEN_VERSION
                    and m.get("seed") == a.seed and m.get("scale") == a.scale):
                print(f"dataset up to date: {man_path}", file=sys.stderr)
                print(json.dumps(m))
                return
        except Exception:
            pass
    os.makedirs(out, exist_ok=True)
    if os.path.exists(man_path):
        os.remove(man_path)
    t = time.time()
    m = gen(out, a.scale, a.seed)
    m["gen_seconds"] = round(time.time() - t, 1)
    with open(man_path + ".tmp", "w") as f:
        json.dump(m, f, indent=1, ensure_ascii=False)
    os.replace(man_path + ".tmp", man_path)
    print(json.dumps(m, ensure_ascii=False))


if __name__ == "__main__":
    main()
