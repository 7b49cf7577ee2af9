#!/usr/bin/env python3
"""Measurement helpers for run_peers.sh. Every measuring subcommand appends one
JSON line per figure to --out (and echoes it on stdout).

  bench_util.py run      --out F --tag K=V... --metric M [--bytes-from-stdout] -- 'shell pipeline'
  bench_util.py waitls   --out F --tag K=V... --t0 EPOCH --path P [--timeout S]
  bench_util.py pread    --out F --tag K=V... --file P [--n 2000] [--bs 4096] [--seed 1]
  bench_util.py hwm      --out F --tag K=V... --pid PID
  bench_util.py emit     --out F --tag K=V... --metric M --value V --unit U
  bench_util.py hashspeed --out F --tag K=V...
  bench_util.py summary  RESULTS.jsonl...      (markdown table of medians)
"""
import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time


def emit(out, tags, metric, value, unit, **extra):
    rec = dict(ts=round(time.time(), 3), **tags, metric=metric, value=value, unit=unit)
    rec.update(extra)
    line = json.dumps(rec, ensure_ascii=False)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def parse_tags(tag_list):
    tags = {}
    for t in tag_list or []:
        k, _, v = t.partition("=")
        try:
            v = int(v)
        except ValueError:
            pass
        tags[k] = v
    return tags


def cmd_run(a, tags):
    t = time.perf_counter()
    p = subprocess.run(["bash", "-o", "pipefail", "-c", a.cmd], stdout=subprocess.PIPE)
    dt = time.perf_counter() - t
    out = p.stdout.decode(errors="replace").strip()
    extra = dict(rc=p.returncode, stdout=out[-200:])
    emit(a.out, tags, a.metric + "_s", round(dt, 4), "s", **extra)
    if a.bytes_from_stdout and p.returncode == 0:
        nbytes = int(out.split()[-1])
        emit(a.out, tags, a.metric + "_MBps", round(nbytes / dt / 1e6, 2), "MB/s", bytes=nbytes)
    if a.count_from_stdout and p.returncode == 0:
        emit(a.out, tags, a.metric + "_entries", int(out.split()[-1]), "count")
    if p.returncode != 0:
        print(f"WARNING: command failed rc={p.returncode}: {a.cmd}", file=sys.stderr)
    return p.returncode


def cmd_waitls(a, tags):
    if a.t1 is not None:  # the caller polled (from its own shell) and took the end time
        try:
            listed = os.listdir(a.path)
        except OSError:
            listed = []
        if not listed:
            emit(a.out, tags, a.metric, None, "s", error="timeout")
            return 1
        emit(a.out, tags, a.metric, round(a.t1 - a.t0, 4), "s")
        return 0
    deadline = time.time() + a.timeout
    while True:
        try:
            if os.listdir(a.path):
                break
        except OSError:
            pass
        if time.time() > deadline:
            emit(a.out, tags, a.metric, None, "s", error="timeout")
            return 1
        time.sleep(0.01)
    emit(a.out, tags, a.metric, round(time.time() - a.t0, 4), "s")
    return 0


def cmd_pread(a, tags):
    r = random.Random(a.seed)
    fd = os.open(a.file, os.O_RDONLY)
    size = os.fstat(fd).st_size
    nblk = size // a.bs
    lat = []
    t_all = time.perf_counter()
    for _ in range(a.n):
        off = r.randrange(nblk) * a.bs
        t = time.perf_counter_ns()
        d = os.pread(fd, a.bs, off)
        lat.append((time.perf_counter_ns() - t) / 1000.0)
        assert len(d) == a.bs
    total = time.perf_counter() - t_all
    os.close(fd)
    lat.sort()
    def q(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1)
    emit(a.out, tags, a.prefix + "_p50_us", q(0.50), "us", n=a.n)
    emit(a.out, tags, a.prefix + "_p99_us", q(0.99), "us", n=a.n)
    emit(a.out, tags, a.prefix + "_mean_us", round(statistics.fmean(lat), 1), "us", n=a.n, total_s=round(total, 3))
    return 0


def cmd_hwm(a, tags):
    try:
        with open(f"/proc/{a.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    kb = int(line.split()[1])
                    emit(a.out, tags, a.metric, round(kb / 1024, 1), "MiB")
                    return 0
    except OSError as e:
        emit(a.out, tags, a.metric, None, "MiB", error=str(e))
    return 1


def cmd_hashspeed(a, tags):
    buf = os.urandom(16 << 20)
    for name in ("sha256", "blake2b", "blake2s", "md5"):
        best = 0
        for _ in range(3):
            h = hashlib.new(name)
            mv = memoryview(buf)
            t = time.perf_counter()
            for i in range(0, len(buf), 1 << 20):  # 1 MiB updates (chunk-like)
                h.update(mv[i:i + (1 << 20)])
            h.digest()
            best = max(best, len(buf) / (time.perf_counter() - t) / 1e6)
        emit(a.out, tags, f"hashlib_{name}_MBps", round(best, 1), "MB/s", note="best of 3, 16 MiB in 1 MiB updates")
    # per-small-object hashing (one call per 16 KiB object): overhead of Python call per chunk
    objs = [buf[i:i + 16384] for i in range(0, 16 << 20, 16384)]
    for name in ("sha256", "blake2b"):
        f = getattr(hashlib, name)
        t = time.perf_counter()
        for o in objs:
            f(o).digest()
        emit(a.out, tags, f"hashlib_{name}_16KiB_objs_MBps",
             round(len(buf) / (time.perf_counter() - t) / 1e6, 1), "MB/s")
    return 0


def cmd_cryptospeed(a, tags):
    """AEAD decrypt speed from Python (cryptography package), per object size."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError as e:
        emit(a.out, tags, "py_aead_available", 0, "bool", error=str(e))
        return 0
    total = 32 << 20
    for cname, cls in (("aes256gcm", AESGCM), ("chacha20poly1305", ChaCha20Poly1305)):
        key = cls.generate_key(bit_length=256) if cls is AESGCM else cls.generate_key()
        c = cls(key)
        for osize in (16384, 1 << 20):
            nonce = os.urandom(12)
            ct = c.encrypt(nonce, os.urandom(osize), None)
            n = total // osize
            best = 0
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(n):
                    c.decrypt(nonce, ct, None)
                best = max(best, n * osize / (time.perf_counter() - t) / 1e6)
            emit(a.out, tags, f"py_{cname}_decrypt_{osize // 1024}KiB_MBps", round(best, 1), "MB/s",
                 note="cryptography AEAD decrypt, best of 3")
    return 0


def cmd_summary(a):
    recs = []
    for fn in a.files:
        with open(fn) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    groups = {}
    for r in recs:
        if r.get("value") is None:
            continue
        groups.setdefault((r.get("tool", "-"), r["metric"], r.get("unit", "")), []).append(r["value"])
    print("| tool | metric | n | median | min | max | unit |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (tool, metric, unit), vals in sorted(groups.items()):
        med = statistics.median(vals)
        def fmt(v):
            return (f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
        print(f"| {tool} | {metric} | {len(vals)} | {fmt(med)} | {fmt(min(vals))} | {fmt(max(vals))} | {unit} |")
    return 0


def fmtv(v):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cmd_pivot(a):
    """Markdown pivot: metric rows x tool columns, 'median (min–max) nN'."""
    recs = []
    for fn in a.files:
        with open(fn) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    vals, tools, metrics = {}, [], []
    for r in recs:
        if r.get("value") is None or not isinstance(r["value"], (int, float)):
            continue
        t, m = r.get("tool", "-"), r["metric"]
        if t == "limits":
            continue
        if t not in tools:
            tools.append(t)
        if m not in metrics:
            metrics.append(m)
        vals.setdefault((t, m), []).append(r["value"])
    order = a.tools.split(",") if a.tools else tools
    tools = [t for t in order if t in tools]
    mets = a.metrics.split(",") if a.metrics else sorted(metrics)
    print("| metric | " + " | ".join(tools) + " |")
    print("|---|" + "---:|" * len(tools))
    for m in mets:
        cells = []
        for t in tools:
            v = vals.get((t, m))
            if not v:
                cells.append("–")
            elif len(v) == 1:
                cells.append(fmtv(v[0]))
            else:
                cells.append(f"**{fmtv(statistics.median(v))}** ({fmtv(min(v))}–{fmtv(max(v))}, n={len(v)})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="sub", required=True)

    def common(p):
        p.add_argument("--out")
        p.add_argument("--tag", action="append")
        return p

    p = common(sub.add_parser("run"))
    p.add_argument("--metric", required=True)
    p.add_argument("--bytes-from-stdout", action="store_true")
    p.add_argument("--count-from-stdout", action="store_true")
    p.add_argument("cmd")
    p = common(sub.add_parser("waitls"))
    p.add_argument("--t0", type=float, required=True)
    p.add_argument("--t1", type=float, help="end time already taken by the caller: only check the listing")
    p.add_argument("--path", required=True)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--metric", default="mount_latency_s")
    p = common(sub.add_parser("pread"))
    p.add_argument("--file", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefix", default="rand4k")
    p = common(sub.add_parser("hwm"))
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--metric", default="rss_hwm_MiB")
    p = common(sub.add_parser("emit"))
    p.add_argument("--metric", required=True)
    p.add_argument("--value", required=True)
    p.add_argument("--unit", default="")
    common(sub.add_parser("hashspeed"))
    common(sub.add_parser("cryptospeed"))
    p = sub.add_parser("summary")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("pivot")
    p.add_argument("--tools")
    p.add_argument("--metrics")
    p.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.sub == "summary":
        return cmd_summary(a)
    if a.sub == "pivot":
        return cmd_pivot(a)
    tags = parse_tags(a.tag)
    if a.sub == "emit":
        try:
            v = float(a.value)
        except ValueError:
            v = a.value
        emit(a.out, tags, a.metric, v, a.unit)
        return 0
    return globals()["cmd_" + a.sub](a, tags)


if __name__ == "__main__":
    sys.exit(main())
