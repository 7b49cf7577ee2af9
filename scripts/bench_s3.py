#!/usr/bin/env python3
"""Ingest + restore over S3 on loopback against the local store, same data, same process.

For each store (local directory; every S3 endpoint given), in a fresh site and bucket:
backup (timed), backup again unchanged (timed), restore into a fresh directory (timed),
with the restored tree compared by size and entry count. Prints a table and JSON lines.

S3 endpoints come from --s3 NAME=ENDPOINT,ACCESS_KEY,SECRET (repeatable); with none, the
S3_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment is used if set
(eval "$(bash scripts/servers/start-ceph-rgw.sh /tmp/ceph)" gives it).

Measured on loopback (2 cores, 128 MiB of 52 files): local backup 47 MiB/s, restore 74 MiB/s;
Ceph RGW 23 / 17 MiB/s; moto 21 / 12 MiB/s. Restore over S3 is latency-bound: one ranged GET
per chunk, issued one after another by the restorer.

Data: --data DIR, or a generated tree (--mib of random, partly duplicated files).

  scripts/bench_s3.py --mib 256
  scripts/bench_s3.py --data /tmp/bench-data/small --s3 ceph=http://127.0.0.1:7480,KEY,SECRET
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

PASS = "bench passphrase"


def make_tree(root: Path, mib: int, seed: int = 7) -> Path:
    r = random.Random(seed)
    root.mkdir(parents=True)
    left = mib << 20
    i = 0
    while left > 0:
        size = min(left, r.choice([4 << 10, 64 << 10, 1 << 20, 8 << 20]))
        d = root / f"d{i % 16:02d}"
        d.mkdir(exist_ok=True)
        data = r.randbytes(size)
        (d / f"f{i:05d}.bin").write_bytes(data)
        if i % 10 == 0:  # some duplicated content: dedup is part of the work
            (d / f"copy{i:05d}.bin").write_bytes(data)
        left -= size
        i += 1
    return root


def tree_stats(root: Path) -> tuple[int, int]:
    n = size = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            n += 1
            size += p.stat().st_size
    return n, size


def run(store: str, url: str | None, data: Path, work: Path) -> dict:
    from kiwi_restore import service
    from kiwi_restore.site import Site

    home = work / f"home-{store}"
    site = Site(str(home), lambda: PASS.encode())
    site.initialize()
    if url:
        from kiwi_restore.storage.s3 import S3Backend

        S3Backend.from_url(url).create_bucket()
        cfg = json.loads((home / "kiwi.json").read_text())
        cfg["locations"]["primary"] = url
        (home / "kiwi.json").write_text(json.dumps(cfg))
        site = Site(str(home), lambda: PASS.encode())
    service.create_contract(site, "bench", "cloud", "bench")
    service.add_machine(site, "bench", "m")
    res: dict = {"store": store}
    t = time.perf_counter()
    _snap, stats = service.run_backup(site, "bench", "m", [str(data)], [])
    res["backup_s"] = time.perf_counter() - t
    res["stored_MiB"] = stats.stored_bytes / 2**20
    t = time.perf_counter()
    service.run_backup(Site(str(home), lambda: PASS.encode()), "bench", "m", [str(data)], [])
    res["backup2_s"] = time.perf_counter() - t
    out = work / f"out-{store}"
    t = time.perf_counter()
    service.run_restore(Site(str(home), lambda: PASS.encode()), "bench", "latest", None, str(out), None, None, False)
    res["restore_s"] = time.perf_counter() - t
    restored = out / str(data.resolve()).lstrip("/")
    res["identical_size"] = tree_stats(restored) == tree_stats(data)
    shutil.rmtree(out)
    if url:
        from kiwi_restore.storage.s3 import S3Backend

        b = S3Backend.from_url(url)
        b.delete_many(i.key for i in b.list(""))
        b.client.delete_bucket(Bucket=b.bucket)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--s3", action="append", default=[], metavar="NAME=ENDPOINT,KEY,SECRET")
    args = ap.parse_args()
    os.environ.setdefault("KIWI_RESTORE_PASSPHRASE", PASS)
    endpoints: list[tuple[str, str, str, str]] = []
    for spec in args.s3:
        name, rest = spec.split("=", 1)
        ep, key, secret = rest.split(",", 2)
        endpoints.append((name, ep, key, secret))
    if not endpoints and os.environ.get("S3_ENDPOINT_URL"):
        endpoints.append(("s3", os.environ["S3_ENDPOINT_URL"], os.environ["AWS_ACCESS_KEY_ID"],
                          os.environ["AWS_SECRET_ACCESS_KEY"]))
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        data = args.data or make_tree(work / "data", args.mib)
        n, size = tree_stats(data)
        print(f"data: {n} files, {size / 2**20:.0f} MiB", file=sys.stderr)
        results = [run("local", None, data, work)]
        for name, ep, key, secret in endpoints:
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = key, secret
            url = f"s3://bench-{uuid.uuid4().hex[:10]}/kiwi?endpoint={ep}"
            results.append(run(name, url, data, work))
    mib = size / 2**20
    print(f"{'store':10} {'backup s':>9} {'MiB/s':>7} {'again s':>8} {'restore s':>10} {'MiB/s':>7} {'stored MiB':>11} ok")
    for r in results:
        print(f"{r['store']:10} {r['backup_s']:9.2f} {mib / r['backup_s']:7.0f} {r['backup2_s']:8.2f} "
              f"{r['restore_s']:10.2f} {mib / r['restore_s']:7.0f} {r['stored_MiB']:11.1f} {r['identical_size']}")
    for r in results:
        print(json.dumps(r | {"data_MiB": mib, "files": n}))


if __name__ == "__main__":
    main()
