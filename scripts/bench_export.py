#!/usr/bin/env python3
"""Export throughput: kiwi-restore export (local tar, local BagIt) vs restic dump, borg
export-tar and plain `tar cf` of the source, on the same dataset (scripts/make_dataset.py).

Each command's wall time and peak RSS (its own and its children's, from wait4) are
measured; throughput = source bytes / wall time. Output: a table on stderr, JSON lines on
stdout. Goals: tar >= 220 MB/s, BagIt >= 150 MB/s, RSS <= 300 MiB.

Usage: scripts/bench_export.py [--scale small|medium|full] [--work DIR] [--tools ours,restic,borg,tar]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KIWI = [sys.executable, "-m", "kiwi_restore.cli"]
GOALS = {"ours-tar": 220e6, "ours-bagit": 150e6}


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall": wall, "rss_mib": usage.ru_maxrss / 1024}


def du(path: str) -> int:
    total = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(dp, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="small")
    ap.add_argument("--work", default="/tmp/bench-export")
    ap.add_argument("--tools", default="ours,restic,borg,tar")
    ap.add_argument("--jobs", type=int, default=4)
    a = ap.parse_args()
    tools = a.tools.split(",")
    data = os.path.join(a.work, "data")
    subprocess.run([sys.executable, os.path.join(HERE, "make_dataset.py"), "--scale", a.scale, "--out", data],
                   check=True, stdout=subprocess.DEVNULL)
    src = os.path.join(data, "src")
    size = du(src)
    out = os.path.join(a.work, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    results = []

    def emit(tool: str, r: dict) -> None:
        rate = size / r["wall"]
        goal = GOALS.get(tool)
        rec = {"tool": tool, "bytes": size, "seconds": round(r["wall"], 3), "MB_per_s": round(rate / 1e6, 1),
               "rss_MiB": round(r["rss_mib"], 1),
               "goal_met": None if goal is None else bool(rate >= goal and r["rss_mib"] <= 300)}
        results.append(rec)
        print(json.dumps(rec), flush=True)

    if "ours" in tools:
        home = os.path.join(a.work, "kiwi-home")
        shutil.rmtree(home, ignore_errors=True)
        env = {"KIWI_RESTORE_HOME": home, "KIWI_RESTORE_PASSPHRASE": "bench"}
        for cmd in (["init"], ["contract", "create", "bench", "--offer", "cloud"], ["machine", "add", "bench", "m1"],
                    ["backup", "bench", "--machine", "m1", src]):
            run(KIWI + cmd, env)
        for fmt in ("tar", "bagit"):
            emit(f"ours-{fmt}", run(KIWI + ["export", "bench", "--to", os.path.join(out, f"ours-{fmt}"), "--format",
                                            fmt, "--no-verify", "--progress", "none", "--jobs", str(a.jobs)], env))
    if "restic" in tools and shutil.which("restic"):
        repo = os.path.join(a.work, "restic-repo")
        shutil.rmtree(repo, ignore_errors=True)
        env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": os.path.join(a.work, "restic-cache")}
        run(["restic", "-r", repo, "init", "-q"], env)
        run(["restic", "-r", repo, "backup", "-q", src], env)
        emit("restic-dump", run(["sh", "-c", f"restic -r {repo} dump -q latest {src} > {out}/restic.tar"], env))
    if "borg" in tools and shutil.which("borg"):
        repo = os.path.join(a.work, "borg-repo")
        shutil.rmtree(repo, ignore_errors=True)
        env = {"BORG_PASSPHRASE": "bench", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
               "BORG_BASE_DIR": os.path.join(a.work, "borg-base")}
        run(["borg", "init", "-e", "repokey-blake2", repo], env)
        run(["borg", "create", f"{repo}::a1", src], env)
        emit("borg-export-tar", run(["borg", "export-tar", f"{repo}::a1", f"{out}/borg.tar"], env))
    if "tar" in tools:
        emit("tar-cf", run(["tar", "cf", f"{out}/plain.tar", "-C", data, "src"]))
    print(f"{'tool':18} {'MB/s':>8} {'s':>8} {'RSS MiB':>8}  goal", file=sys.stderr)
    for r in results:
        goal = {None: "", True: "met", False: "MISSED"}[r["goal_met"]]
        print(f"{r['tool']:18} {r['MB_per_s']:>8} {r['seconds']:>8} {r['rss_MiB']:>8}  {goal}", file=sys.stderr)


if __name__ == "__main__":
    main()
