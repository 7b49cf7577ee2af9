#!/usr/bin/env python3
"""Export throughput: kiwi-restore export (local tar, local BagIt) vs restic dump, borg
export-tar and plain `tar cf` of the source, on the same dataset (scripts/make_dataset.py).

Each command's wall time and peak RSS are measured: the peak of the RSS summed over the
command's process tree, sampled every 20 ms (our BagIt export forks writer processes), or
the largest single process's from wait4 if that is higher; throughput = source bytes / wall time. Every tool's time includes flushing its
output (`sync -f` after the peers; ours calls syncfs before it verifies and signs), so all
are measured at the same durability. Outputs go to --out, by default a tmpfs
(/dev/shm/kiwi-bench-export): the figures then measure the tools, not this VM's disk, like
the issue's "piped" baselines; --out on a disk measures the disk too. On ext4, each run
writes into a new directory and the BagIt trees are deleted only at the end: ext4 allocates
inodes slowly right after 100,000 files were deleted (recently_deleted), which would
penalise the tree format, not the tars. With --repeat N the tools run round-robin
N times (so a neighbour's load hits them alike) and the median is reported, with its ratio
to restic dump, borg export-tar and tar cf measured in the same run. Output: a table on
stderr, JSON lines on stdout. Goals: tar >= 220 MB/s, BagIt >= 150 MB/s, RSS <= 300 MiB.

Usage: scripts/bench_export.py [--scale small|medium|full] [--data DIR] [--work DIR] [--out DIR]
                               [--tools ours,restic,borg,tar] [--repeat N] [--reuse]

--data DIR uses an existing dataset (DIR/src, e.g. /tmp/bench-data/full) instead of
generating one under --work; --reuse keeps the repositories of an earlier run (same --work)
instead of backing up again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KIWI = [sys.executable, "-m", "kiwi_restore.cli"]
GOALS = {"ours-tar": 220e6, "ours-bagit": 150e6}
PEERS = ("restic-dump", "borg-export-tar", "tar-cf")


def _tree_rss(pid: int) -> int:
    """RSS in bytes of PID and all its descendants, summed (shared pages counted in each:
    an upper bound, fair to a tool that forks workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


class TreeMemory(threading.Thread):
    """Samples the peak summed RSS of a process tree every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _tree_rss(self.pid))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    mem = TreeMemory(p.pid)
    _, status, usage = os.wait4(p.pid, 0)
    tree_peak = mem.stop()
    wall = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    # the larger of the biggest single process (wait4) and the sampled sum over the tree
    return {"wall": wall, "rss_mib": max(usage.ru_maxrss / 1024, tree_peak / 2**20),
            "cpu": usage.ru_utime + usage.ru_stime}


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
    ap.add_argument("--data", help="an existing dataset directory (holding src/)")
    ap.add_argument("--work", default="/tmp/bench-export")
    ap.add_argument("--out", default="/dev/shm/kiwi-bench-export", help="where the exports are written")
    ap.add_argument("--tools", default="ours,restic,borg,tar")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="keep the repositories of an earlier run")
    a = ap.parse_args()
    tools = a.tools.split(",")
    os.makedirs(a.work, exist_ok=True)
    data = a.data or os.path.join(a.work, "data")
    if not a.data:
        subprocess.run([sys.executable, os.path.join(HERE, "make_dataset.py"), "--scale", a.scale, "--out", data],
                       check=True, stdout=subprocess.DEVNULL)
    src = os.path.join(data, "src")
    size = du(src)
    out = a.out
    tmpfs = subprocess.run(["stat", "-f", "-c", "%T", os.path.dirname(out) or "."], capture_output=True,
                           text=True).stdout.strip() == "tmpfs"
    runs: dict[str, list[dict]] = {}

    seq = iter(range(1, 1 << 30))

    def fresh(path: str) -> str:
        return f"{path}-{next(seq)}"  # never a place just deleted (see above)

    cases: list[tuple[str, object]] = []  # (tool, callable running it once)
    if "ours" in tools:
        home = os.path.join(a.work, "kiwi-home")
        env = {"KIWI_RESTORE_HOME": home, "KIWI_RESTORE_PASSPHRASE": "bench"}
        if not (a.reuse and os.path.isdir(home)):
            shutil.rmtree(home, ignore_errors=True)
            for cmd in (["init"], ["contract", "create", "bench", "--offer", "cloud"],
                        ["machine", "add", "bench", "m1"], ["backup", "bench", "--machine", "m1", src]):
                run(KIWI + cmd, env)
        for fmt in ("tar", "bagit"):
            cases.append((f"ours-{fmt}", lambda fmt=fmt, env=env: run(
                KIWI + ["export", "bench", "--to", fresh(os.path.join(out, f"ours-{fmt}")), "--format", fmt,
                        "--no-verify", "--progress", "none", "--jobs", str(a.jobs)], env)))
    if "restic" in tools and shutil.which("restic"):
        repo = os.path.join(a.work, "restic-repo")
        env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": os.path.join(a.work, "restic-cache")}
        if not (a.reuse and os.path.isdir(repo)):
            shutil.rmtree(repo, ignore_errors=True)
            run(["restic", "-r", repo, "init", "-q"], env)
            run(["restic", "-r", repo, "backup", "-q", src], env)
        cases.append(("restic-dump", lambda repo=repo, env=env: run(
            ["sh", "-c", f"restic -r {repo} dump -q latest {src} > {fresh(out + '/restic')}.tar && sync -f {out}"],
            env)))
    if "borg" in tools and shutil.which("borg"):
        repo = os.path.join(a.work, "borg-repo")
        env = {"BORG_PASSPHRASE": "bench", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
               "BORG_BASE_DIR": os.path.join(a.work, "borg-base")}
        if not (a.reuse and os.path.isdir(repo)):
            shutil.rmtree(repo, ignore_errors=True)
            run(["borg", "init", "-e", "repokey-blake2", repo], env)
            run(["borg", "create", f"{repo}::a1", src], env)
        cases.append(("borg-export-tar", lambda repo=repo, env=env: run(
            ["sh", "-c", f"borg export-tar {repo}::a1 {fresh(out + '/borg')}.tar && sync -f {out}"], env)))
    if "tar" in tools:
        cases.append(("tar-cf", lambda: run(
            ["sh", "-c", f"tar cf {fresh(out + '/plain')}.tar -C {data} src && sync -f {out}"])))

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for rep in range(a.repeat):
        for tool, once in cases:
            r = once()  # type: ignore[operator]
            for name in os.listdir(out):  # single big files go now; the BagIt trees at the end
                if tmpfs or not name.startswith("ours-bagit"):
                    p = os.path.join(out, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
            runs.setdefault(tool, []).append(r)
            print(json.dumps({"tool": tool, "rep": rep + 1, "seconds": round(r["wall"], 3),
                              "MB_per_s": round(size / r["wall"] / 1e6, 1), "cpu_s": round(r["cpu"], 2),
                              "rss_MiB": round(r["rss_mib"], 1)}), flush=True)
    shutil.rmtree(out, ignore_errors=True)

    med = {t: statistics.median(x["wall"] for x in rs) for t, rs in runs.items()}
    results = []
    for tool, rs in runs.items():
        rate = size / med[tool]
        rss = max(x["rss_mib"] for x in rs)
        goal = GOALS.get(tool)
        rec = {"tool": tool, "bytes": size, "runs": len(rs), "median_s": round(med[tool], 3),
               "MB_per_s": round(rate / 1e6, 1), "cpu_s": round(statistics.median(x["cpu"] for x in rs), 2),
               "rss_MiB": round(rss, 1),
               "vs": {p: round(med[p] / med[tool], 2) for p in PEERS if p in med and p != tool},
               "goal_met": None if goal is None else bool(rate >= goal and rss <= 300)}
        results.append(rec)
        print(json.dumps({"summary": True, **rec}), flush=True)
    print(f"dataset {src}: {size / 1e6:.0f} MB; medians of {a.repeat} round-robin runs; outputs in {out} "
          f"({'tmpfs' if tmpfs else 'disk'})", file=sys.stderr)
    print(f"{'tool':16} {'MB/s':>7} {'s':>8} {'cpu s':>7} {'RSS MiB':>8}  {'x restic':>8} {'x borg':>7} "
          f"{'x tar':>6}  goal", file=sys.stderr)
    for r in results:
        goal = {None: "", True: "met", False: "MISSED"}[r["goal_met"]]
        vs = [str(r["vs"].get(p, "")) for p in PEERS]
        print(f"{r['tool']:16} {r['MB_per_s']:>7} {r['median_s']:>8} {r['cpu_s']:>7} {r['rss_MiB']:>8}  "
              f"{vs[0]:>8} {vs[1]:>7} {vs[2]:>6}  {goal}", file=sys.stderr)


if __name__ == "__main__":
    main()
