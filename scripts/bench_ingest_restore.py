#!/usr/bin/env python3
"""Ingest/restore benchmark: kiwi-restore against restic and borg on the same data.

For each repetition, and for each tool in --tools (default: ours restic borg), in a
fresh repository every time:

  ours    kiwi-restore --home H init / contract create / machine add   (untimed setup)
          kiwi-restore backup      -> backup_s, store_MiB, backup_rss_MiB
          kiwi-restore backup      (same unchanged tree again) -> backup2_s, backup2_added_MiB
          kiwi-restore restore     (into a fresh directory)    -> restore_s, restore_rss_MiB
  restic  restic init (untimed); restic backup; restic backup again; restic restore latest
  borg    borg init -e repokey-blake2 (untimed); borg create ::a1; borg create ::a2; borg extract ::a1

`sync; echo 3 > /proc/sys/vm/drop_caches` runs before every timed step (needs root;
--no-drop-caches to skip). Peak RSS and CPU time are the child's own rusage (wait4).
Store sizes are `du` of the store directory (ours: H/store) or the repository.
Restored trees are checked cheaply (entry count, total bytes) and removed.

The dataset comes from scripts/make_dataset.py (deterministic, reused when present):
  small  = 4,000 small files + 2 x 64 MiB + 32 MiB dedup-friendly file (~0.23 GB)
  medium = 30,000 small files + 2 x 256 MiB + 128 MiB
  full   = 100,000 small files + 2 x 1 GiB + 512 MiB (4.3 GB)

Output: a table of medians (min-max, n) per metric and tool, with the ratios
ours/restic and ours/borg (< 1 means ours is smaller / faster), and JSON lines
(one per measurement) in <data-root>/results/<run-id>.jsonl (printed at the end).

Goals checked: backup time <= borg's, store size <= restic's, restore time <= restic's.

Examples:
  scripts/bench_ingest_restore.py --scale small --reps 1
  scripts/bench_ingest_restore.py --scale full --reps 3
  scripts/bench_ingest_restore.py --scale full --reps 1 --tools ours   # iterate on ours only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
TOOLS = ("ours", "restic", "borg")
PASSWORD = "bench-password"
MiB = 1 << 20

METRICS = [  # (name, unit, lower is better)
    ("backup_s", "s"),
    ("backup_MBps", "MB/s"),
    ("backup_cpu_s", "s"),
    ("backup_rss_MiB", "MiB"),
    ("store_MiB", "MiB"),
    ("backup2_s", "s"),
    ("backup2_added_MiB", "MiB"),
    ("restore_s", "s"),
    ("restore_MBps", "MB/s"),
    ("restore_cpu_s", "s"),
    ("restore_rss_MiB", "MiB"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_kiwi() -> str:
    for cand in (os.path.join(os.path.dirname(sys.executable), "kiwi-restore"),
                 os.path.join(REPO_ROOT, ".venv", "bin", "kiwi-restore")):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("kiwi-restore") or "kiwi-restore"


class Runner:
    def __init__(self, args: argparse.Namespace, data: str, run_id: str, out_path: str) -> None:
        self.args = args
        self.data = data
        self.src = os.path.join(data, "src")
        self.work = os.path.join(data, "bench-work")
        self.run_id = run_id
        self.out_path = out_path
        self.rows: list[dict] = []
        self.env = dict(os.environ)
        self.env.update(RESTIC_PASSWORD=PASSWORD, BORG_PASSPHRASE=PASSWORD, KIWI_RESTORE_PASSPHRASE=PASSWORD,
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
        self.env.pop("KIWI_RESTORE_HOME", None)

    # -- helpers ---------------------------------------------------------------
    def drop_caches(self) -> None:
        if self.args.no_drop_caches:
            return
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            log(f"cannot drop caches ({exc.strerror}); use --no-drop-caches or run as root")
            raise SystemExit(2) from None

    def run(self, argv: list[str], cwd: str | None = None, env: dict | None = None, log_name: str = "cmd",
            timed: bool = False) -> dict:
        """Run ARGV; returns wall time, the child's rusage (max RSS, CPU) and its stdout."""
        if timed:
            self.drop_caches()
        logf = os.path.join(self.work, f"{log_name}.log")
        with open(logf, "ab") as err:
            err.write(("\n$ " + " ".join(argv) + "\n").encode())
            err.flush()
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=err)
            out = p.stdout.read()
            _pid, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            p.stdout.close()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed with {p.returncode}; see {logf}")
        return {"wall": wall, "rss_MiB": ru.ru_maxrss / 1024, "cpu": ru.ru_utime + ru.ru_stime, "stdout": out}

    def emit(self, tool: str, rep: int, metric: str, value: float, unit: str, **extra) -> None:
        row = {"run": self.run_id, "scale": self.args.scale, "tool": tool, "rep": rep, "metric": metric,
               "value": round(value, 4), "unit": unit, **extra}
        self.rows.append(row)
        with open(self.out_path, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def emit_step(self, tool: str, rep: int, step: str, r: dict, nbytes: int | None = None) -> None:
        self.emit(tool, rep, f"{step}_s", r["wall"], "s")
        self.emit(tool, rep, f"{step}_cpu_s", r["cpu"], "s")
        self.emit(tool, rep, f"{step}_rss_MiB", r["rss_MiB"], "MiB")
        if nbytes:
            self.emit(tool, rep, f"{step}_MBps", nbytes / r["wall"] / 1e6, "MB/s")

    @staticmethod
    def du(path: str) -> int:
        """Allocated bytes below PATH (like du -s, in bytes)."""
        out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    def tree_summary(self, root: str) -> tuple[int, int]:
        """(entries, bytes of regular files) below ROOT, without following symlinks."""
        n = size = 0
        for dirpath, dirnames, filenames in os.walk(root):
            n += len(dirnames) + len(filenames)
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)):
                    size += st.st_size
        return n, size

    def check_restored(self, tool: str, restored_src: str) -> None:
        got = self.tree_summary(restored_src)
        if got != self.expected:
            raise RuntimeError(f"{tool}: restored tree {restored_src} has (entries, bytes) = {got}, "
                               f"the source has {self.expected}")

    def fresh(self, *paths: str) -> None:
        for p in paths:
            if os.path.lexists(p):
                shutil.rmtree(p)

    # -- tools -------------------------------------------------------------------
    def bench_ours(self, rep: int) -> None:
        kiwi = self.args.kiwi
        home = os.path.join(self.work, "ours-home")
        target = os.path.join(self.work, "ours-restore")
        self.fresh(home, target)
        k = [kiwi, "--home", home]
        self.run(k + ["init"], log_name="ours")
        self.run(k + ["contract", "create", "bench", "--offer", "cloud", "--client", "Bench"], log_name="ours")
        self.run(k + ["machine", "add", "bench", "m1"], log_name="ours")
        store = os.path.join(home, "store")
        before = self.du(store)
        log(f"ours rep {rep}: backup")
        r = self.run(k + ["backup", "bench", self.src, "-m", "m1", "--json"], log_name="ours", timed=True)
        self.emit_step("ours", rep, "backup", r, self.total_bytes)
        size1 = self.du(store)
        self.emit("ours", rep, "store_MiB", (size1 - before) / MiB, "MiB")
        log(f"ours rep {rep}: second backup (unchanged)")
        r = self.run(k + ["backup", "bench", self.src, "-m", "m1", "--json"], log_name="ours", timed=True)
        self.emit("ours", rep, "backup2_s", r["wall"], "s")
        self.emit("ours", rep, "backup2_added_MiB", (self.du(store) - size1) / MiB, "MiB")
        log(f"ours rep {rep}: restore")
        snaps = json.loads(self.run(k + ["snapshots", "bench", "--json"], log_name="ours")["stdout"])
        first = snaps[0]["id"]
        r = self.run(k + ["restore", "bench", first, self.src, "--target", target, "--json"],
                     log_name="ours", timed=True)
        self.emit_step("ours", rep, "restore", r, self.total_bytes)
        self.check_restored("ours", os.path.join(target, "src"))
        self.fresh(target)
        if not self.args.keep:
            self.fresh(home)

    def bench_restic(self, rep: int) -> None:
        repo = os.path.join(self.work, "restic-repo")
        cache = os.path.join(self.work, "restic-cache")
        target = os.path.join(self.work, "restic-restore")
        self.fresh(repo, cache, target)
        env = dict(self.env, RESTIC_CACHE_DIR=cache)
        self.run(["restic", "-r", repo, "init", "-q"], env=env, log_name="restic")
        log(f"restic rep {rep}: backup")
        r = self.run(["restic", "-r", repo, "backup", "-q", "src"], cwd=self.data, env=env, log_name="restic",
                     timed=True)
        self.emit_step("restic", rep, "backup", r, self.total_bytes)
        size1 = self.du(repo)
        self.emit("restic", rep, "store_MiB", size1 / MiB, "MiB")
        log(f"restic rep {rep}: second backup (unchanged)")
        r = self.run(["restic", "-r", repo, "backup", "-q", "src"], cwd=self.data, env=env, log_name="restic",
                     timed=True)
        self.emit("restic", rep, "backup2_s", r["wall"], "s")
        self.emit("restic", rep, "backup2_added_MiB", (self.du(repo) - size1) / MiB, "MiB")
        log(f"restic rep {rep}: restore")
        r = self.run(["restic", "-r", repo, "restore", "latest", "--target", target], env=env,
                     log_name="restic", timed=True)
        self.emit_step("restic", rep, "restore", r, self.total_bytes)
        rel = os.path.join(target, "src")  # restic 0.14 keeps the relative path it was given
        self.check_restored("restic", rel if os.path.isdir(rel) else target + self.src)
        self.fresh(target, cache)
        if not self.args.keep:
            self.fresh(repo)

    def bench_borg(self, rep: int) -> None:
        repo = os.path.join(self.work, "borg-repo")
        base = os.path.join(self.work, "borg-base")
        target = os.path.join(self.work, "borg-restore")
        self.fresh(repo, base, target)
        env = dict(self.env, BORG_BASE_DIR=base)
        self.run(["borg", "init", "-e", "repokey-blake2", repo], env=env, log_name="borg")
        log(f"borg rep {rep}: create")
        r = self.run(["borg", "create", f"{repo}::a1", "src"], cwd=self.data, env=env, log_name="borg", timed=True)
        self.emit_step("borg", rep, "backup", r, self.total_bytes)
        size1 = self.du(repo)
        self.emit("borg", rep, "store_MiB", size1 / MiB, "MiB")
        log(f"borg rep {rep}: second create (unchanged)")
        r = self.run(["borg", "create", f"{repo}::a2", "src"], cwd=self.data, env=env, log_name="borg", timed=True)
        self.emit("borg", rep, "backup2_s", r["wall"], "s")
        self.emit("borg", rep, "backup2_added_MiB", (self.du(repo) - size1) / MiB, "MiB")
        log(f"borg rep {rep}: extract")
        os.makedirs(target)
        r = self.run(["borg", "extract", f"{repo}::a1"], cwd=target, env=env, log_name="borg", timed=True)
        self.emit_step("borg", rep, "restore", r, self.total_bytes)
        self.check_restored("borg", os.path.join(target, "src"))
        self.fresh(target, base)
        if not self.args.keep:
            self.fresh(repo)

    # -- main ------------------------------------------------------------------------
    def main(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        with open(os.path.join(self.data, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.total_bytes = self.manifest["total_bytes"]
        self.expected = self.tree_summary(self.src)
        log(f"dataset {self.src}: {self.expected[0]} entries, {self.expected[1] / 1e9:.2f} GB")
        for rep in range(1, self.args.reps + 1):
            for tool in self.args.tools:
                getattr(self, f"bench_{tool}")(rep)


def summarize(rows: list[dict], tools: list[str]) -> str:
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["metric"], r["tool"]), []).append(r["value"])

    def cell(vals: list[float] | None) -> str:
        if not vals:
            return "–"
        med = statistics.median(vals)
        if len(vals) == 1:
            return f"{fmt(med)} (n=1)"
        return f"**{fmt(med)}** ({fmt(min(vals))}–{fmt(max(vals))}, n={len(vals)})"

    head = ["metric", *tools] + [f"ours/{t}" for t in tools if t != "ours" and "ours" in tools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, _unit in METRICS:
        if not any((metric, t) in by for t in tools):
            continue
        row = [metric] + [cell(by.get((metric, t))) for t in tools]
        ours = by.get((metric, "ours"))
        for t in tools:
            if t == "ours" or "ours" not in tools:
                continue
            other = by.get((metric, t))
            if ours and other and statistics.median(other) > 0:
                row.append(f"{statistics.median(ours) / statistics.median(other):.2f}")
            else:
                row.append("–")
        lines.append("| " + " | ".join(row) + " |")
    goals = []

    def med(metric: str, tool: str) -> float | None:
        v = by.get((metric, tool))
        return statistics.median(v) if v else None

    for metric, other, what in (("backup_s", "borg", "ingest time <= borg create"),
                                ("store_MiB", "restic", "store size <= restic"),
                                ("restore_s", "restic", "restore time <= restic restore")):
        a, b = med(metric, "ours"), med(metric, other)
        if a is not None and b is not None:
            goals.append(f"- {what}: ours {fmt(a)} vs {fmt(b)} -> {'MET' if a <= b else 'NOT MET'} "
                         f"(ratio {a / b:.2f})")
    return "\n".join(lines) + ("\n\nGoals:\n" + "\n".join(goals) if goals else "")


def fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("small", "medium", "full"), default="small",
                    help="dataset size (default small)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every step (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help="comma-separated subset of ours,restic,borg (default all; order = run order)")
    ap.add_argument("--data-root", default="/tmp/bench-data",
                    help="dataset at DATA_ROOT/<scale>/src, work dirs and results below it (default /tmp/bench-data)")
    ap.add_argument("--out", help="JSON lines file (default DATA_ROOT/results/<run-id>.jsonl)")
    ap.add_argument("--kiwi", default=default_kiwi(), help="kiwi-restore executable (default: the venv's)")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before timed steps")
    ap.add_argument("--keep", action="store_true", help="keep the last repositories under DATA_ROOT/<scale>/bench-work")
    ap.add_argument("--summary", metavar="JSONL", nargs="+",
                    help="only print the table for existing JSON lines files, run nothing")
    args = ap.parse_args()
    args.tools = [t for t in args.tools.split(",") if t]
    for t in args.tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}")

    if args.summary:
        rows = []
        for path in args.summary:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        print(summarize(rows, [t for t in TOOLS if any(r["tool"] == t for r in rows)]))
        return

    data = os.path.join(args.data_root, args.scale)
    log(f"dataset ({args.scale})")
    subprocess.run([sys.executable, os.path.join(HERE, "make_dataset.py"), "--scale", args.scale, "--out", data],
                   check=True, stdout=subprocess.DEVNULL)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{args.scale}"
    out = args.out or os.path.join(args.data_root, "results", f"{run_id}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runner = Runner(args, data, run_id, out)
    try:
        runner.main()
    finally:
        if runner.rows:
            print(f"\n## {args.scale} scale, {args.reps} rep(s), run {run_id}\n")
            print(summarize(runner.rows, args.tools))
            print(f"\nJSON lines: {out}")


if __name__ == "__main__":
    main()
