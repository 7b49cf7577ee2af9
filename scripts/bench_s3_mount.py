#!/usr/bin/env python3
"""The FUSE mount over S3 (issue #6): kiwi-restore mount on a Ceph RGW bucket on loopback,
against the same mount on a local directory store and against `restic mount` of a restic
repository on the same S3 server, on the same dataset (scripts/make_dataset.py), in one run.

Measured per tool and repetition (round-robin, so machine noise hits all alike), each cold
(page cache and the OSD's BlueStore cache dropped, then a fresh mount):
  tar_small  `tar cf - "Praxis Daten" | wc -c` of the small-file tree   (MB/s of tar stream)
  seq_read   `dd bs=1M of=/dev/null` of the first big file (1 GiB full)  (MB/s)
  mount_s    from the mount command to the snapshot's source directory listing
Goals: ours-s3 ahead of restic-s3, and at least half of ours-local.

s3-get (with ours-s3) is the server's ceiling for seq_read, measured in the same round-robin:
the byte ranges of the packs that hold the big file's chunks, fetched cold with kiwi-restore's
own S3 backend, 4 at a time (as the mount's prefetchers), in the file's order, and neither
decrypted nor passed through FUSE. Its MB/s counts the file's bytes, as seq_read does;
ours-s3 / s3-get is the share of what this server delivers that the mount turns into reads.
Its "FUSE cpu" column is the CPU of the process making the GETs (this script).
Output: JSON lines on stdout (one per measure, then medians, ratios and goals), a table on
stderr. Needs root (drop_caches), restic, fusermount3 and the ceph packages (radosgw).

The S3 server is scripts/servers/start-ceph-rgw.sh on non-default ports (RGW 7580, state
/tmp/bench-s3-ceph), BlueStore on a sparse file by default (--store-gib, grows with the
data: both repositories, ~2x the dataset); reused if already up, stopped at the end only if
this run started it (unless --keep-server). radosgw runs with beast's tcp_nodelay=1 (the
server script sets it; an older state directory without it gets radosgw restarted with it);
--no-tcp-nodelay restarts it without, where every small GET waits ~40 ms for Nagle against
the client's delayed ACK. --reuse keeps the repositories (sites under
--work, buckets on the server) of an earlier run instead of backing up again.

Small scale (4000 files, 64 MiB file), tcp_nodelay, 2 loaded cores, 4 runs: ours-s3 /
restic-s3 = 2.8-3.2 (tar_small), 1.0-1.1 (seq_read); ours-s3 / ours-local = 0.36-0.43 and
0.34-0.44. The S3 server shares the client's cores: each measure also reports the CPU
seconds of the FUSE process and of the server (radosgw + OSD).

Full scale (~3 GB per repository on S3; ~1 h with --reps 3, restic's tar being most of it):
  .venv/bin/python scripts/bench_s3_mount.py --data /tmp/bench-data/full --reps 3 --work /tmp/bench-s3-mount-full

Usage (as root, from the repository):
  .venv/bin/python scripts/bench_s3_mount.py --data /tmp/bench-data/small --reps 1
  .venv/bin/python scripts/bench_s3_mount.py --scale medium --work /tmp/bench-s3-mount
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench_export import du  # same directory: scripts/

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
KIWI = [VENV_PY if os.path.exists(VENV_PY) else sys.executable, "-m", "kiwi_restore.cli"]
START_RGW = os.path.join(HERE, "servers", "start-ceph-rgw.sh")
STOP_RGW = os.path.join(HERE, "servers", "stop-ceph-rgw.sh")
PASS = "bench-password"
CONTRACT, MACHINE = "bench", "m1"
OURS_BUCKET, RESTIC_BUCKET = "kiwi-bench-mount", "restic-bench-mount"
TOOLS = ("ours-local", "ours-s3", "restic-s3", "s3-get")
GET_THREADS = 4  # the mount's prefetchers on a remote store (fuse/blobs.py REMOTE)
METRICS = ("tar_small", "seq_read")
GiB = 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(rec: dict) -> None:
    print(json.dumps(rec, ensure_ascii=False), flush=True)


class Failed(RuntimeError):
    pass


def sh(cmd: list[str], env: dict | None = None, timeout: float | None = None, check: bool = True,
       what: str = "") -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise Failed(f"{what or shlex.join(cmd)} failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return p


def latest_is(snapshots_json: str, src: str) -> bool:
    """Whether the newest snapshot of a `snapshots --json` listing (ours or restic's) is of SRC
    alone: what the mount shows as latest must be this dataset."""
    try:
        snaps = json.loads(snapshots_json) or []
    except ValueError:
        return False
    return bool(snaps) and max(snaps, key=lambda s: s["time"]).get("paths") == [src]


def first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return ""


# -- S3 server ---------------------------------------------------------------------------------
class Server:
    """start-ceph-rgw.sh in --ceph-state, with this benchmark's ports; env = its exports."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.state = os.path.abspath(a.ceph_state)
        self.knobs = {"CEPH_RGW_PORT": str(a.rgw_port), "CEPH_MON_PORT": str(a.mon_port),
                      "CEPH_MS_PORT_MIN": str(a.ms_ports[0]), "CEPH_MS_PORT_MAX": str(a.ms_ports[1]),
                      "CEPH_OBJECTSTORE": a.objectstore, "CEPH_STORE_BYTES": str(a.store_gib * GiB),
                      "CEPH_START_TIMEOUT": "300"}
        self.env: dict[str, str] = {}
        self.started = False
        self.nodelay_was: bool | None = None  # RGW's TCP_NODELAY before this run changed it

    def start(self) -> None:
        log(f"S3 server: {START_RGW} {self.state} ({self.knobs['CEPH_OBJECTSTORE']}, "
            f"{int(self.knobs['CEPH_STORE_BYTES']) / GiB:.0f} GiB, RGW port {self.knobs['CEPH_RGW_PORT']})")
        p = sh(["bash", START_RGW, self.state], env=self.knobs, timeout=1800, what="start-ceph-rgw.sh")
        for line in p.stderr.splitlines():
            print(f"    {line}", file=sys.stderr)
        self.started = "already running" not in p.stderr
        for line in p.stdout.splitlines():
            m = re.match(r"export (\w+)=(.*)$", line.strip())
            if m:
                self.env[m.group(1)] = m.group(2)
        if "S3_ENDPOINT_URL" not in self.env:
            raise Failed(f"start-ceph-rgw.sh printed no S3_ENDPOINT_URL:\n{p.stdout}")

    # Without beast's tcp_nodelay every small response waits ~40 ms (Nagle on RGW's side
    # against the client's delayed ACK), which turns any small-GET workload into a measure of
    # that stall. start-ceph-rgw.sh now sets it in ceph.conf; for a state directory made
    # before, or for --no-tcp-nodelay, radosgw alone (same ceph.conf, same PID file) is
    # restarted with the frontends line changed on its command line.
    def _rgw_pid(self) -> int | None:
        try:
            with open(os.path.join(self.state, "pids", "rgw.a.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def rgw_nodelay(self) -> bool:
        try:
            with open(f"/proc/{self._rgw_pid()}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return False
        if b"--rgw_frontends" in args:  # set on the command line by an earlier restart
            return b"tcp_nodelay=1" in args[args.index(b"--rgw_frontends") + 1]
        with open(os.path.join(self.state, "ceph.conf"), "rb") as f:
            m = re.search(rb"^rgw frontends = (.*)$", f.read(), re.M)
        return bool(m and b"tcp_nodelay=1" in m.group(1))

    def set_rgw_nodelay(self, on: bool) -> None:
        if self.rgw_nodelay() == on:
            return
        if self.nodelay_was is None:
            self.nodelay_was = not on
        conf = os.path.join(self.state, "ceph.conf")
        with open(conf) as f:
            frontends = re.search(r"^rgw frontends = (.*)$", f.read(), re.M)
        if not frontends:
            raise Failed(f"no 'rgw frontends' line in {conf}")
        log(f"restarting radosgw with tcp_nodelay={int(on)}")
        pid = self._rgw_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(300):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        base = re.sub(r"\s*tcp_nodelay=\d", "", frontends.group(1))
        cmd = ["radosgw", "-c", conf, "-n", "client.rgw.a", "-f",
               "--rgw_frontends", base + (" tcp_nodelay=1" if on else "")]
        with open(os.path.join(self.state, "log", "rgw.a.out"), "a") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        with open(os.path.join(self.state, "pids", "rgw.a.pid"), "w") as f:
            f.write(f"{p.pid}\n")
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"radosgw did not come back (see {self.state}/log)")
            time.sleep(0.2)

    def cpu_s(self) -> float | None:
        """CPU seconds of radosgw + the OSD so far: the server shares the client's cores."""
        total = 0.0
        for d in ("rgw.a", "osd.0"):
            try:
                with open(os.path.join(self.state, "pids", f"{d}.pid")) as f:
                    c = cpu_s(int(f.read().strip()))
            except (OSError, ValueError):
                c = None
            if c is None:
                return None
            total += c
        return total

    def stop(self) -> None:
        if not self.started and self.nodelay_was is not None:
            self.set_rgw_nodelay(self.nodelay_was)  # leave a server we did not start as we found it
        if self.started:
            log("stopping the S3 server this run started")
            subprocess.run(["bash", STOP_RGW, self.state], env={**os.environ, "CEPH_STATE_DIR": self.state},
                           stderr=subprocess.DEVNULL, timeout=300)
            self.started = False

    @property
    def endpoint(self) -> str:
        return self.env["S3_ENDPOINT_URL"]

    @property
    def creds(self) -> dict[str, str]:
        return {k: self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}

    def drop_osd_cache(self) -> None:
        """The OSD keeps decoded onodes and data in its own (BlueStore) cache, which
        drop_caches does not reach."""
        conf = self.env.get("CEPH_CONF")
        if conf:
            subprocess.run(["ceph", "-c", conf, "tell", "osd.0", "cache", "drop"], capture_output=True,
                           timeout=60)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def bucket_bytes(self, bucket: str) -> tuple[int, int]:
        n = size = 0
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                n += 1
                size += o["Size"]
        return n, size

    def wipe_bucket(self, bucket: str) -> None:
        """Remove BUCKET and everything in it (an earlier run's repository)."""
        c = self.client()
        try:
            c.head_bucket(Bucket=bucket)
        except Exception:
            return
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        c.delete_bucket(Bucket=bucket)


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of PID so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def drop_caches(server: Server | None) -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    if server:
        server.drop_osd_cache()


def disk_free(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- tools -----------------------------------------------------------------------------------
class Tool:
    name = ""
    metrics = METRICS

    def __init__(self, a: argparse.Namespace, src: str, server: Server | None) -> None:
        self.a, self.src, self.server = a, src, server
        self.mnt = os.path.join(os.path.abspath(a.work), "mnt", self.name)
        self.pid: int | None = None

    def prepare(self) -> None: ...
    def mount(self) -> None: ...
    def root(self) -> str: ...
    def umount(self) -> None: ...

    def rss_mib(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except (OSError, TypeError):
            pass
        return None


class Ours(Tool):
    def __init__(self, a, src, server, s3: bool) -> None:
        self.name = "ours-s3" if s3 else "ours-local"
        super().__init__(a, src, server)
        self.s3 = s3
        self.home = os.path.join(os.path.abspath(a.work), self.name)
        self.env = {"KIWI_RESTORE_HOME": self.home, "KIWI_RESTORE_PASSPHRASE": PASS,
                    **(server.creds if s3 and server else {})}
        self.url = f"s3://{OURS_BUCKET}/kiwi?endpoint={server.endpoint}" if s3 and server else ""

    def kiwi(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return sh(KIWI + list(args), env=self.env, timeout=timeout, check=check, what=f"kiwi-restore {args[0]}")

    def has_snapshot(self) -> bool:
        if not os.path.exists(os.path.join(self.home, "kiwi.json")):
            return False
        p = self.kiwi("snapshots", CONTRACT, "--json", check=False, timeout=600)
        return p.returncode == 0 and latest_is(p.stdout, self.src)

    def prepare(self) -> None:
        if self.a.reuse and self.has_snapshot():
            log(f"{self.name}: reusing {self.home}")
            return
        shutil.rmtree(self.home, ignore_errors=True)
        if self.s3:
            self.server.wipe_bucket(OURS_BUCKET)
        self.kiwi("init")
        loc = []
        if self.s3:
            self.kiwi("location", "add", "s3", self.url, "--create-bucket")
            loc = ["--location", "s3"]
        self.kiwi("contract", "create", CONTRACT, "--offer", "cloud", *loc)
        self.kiwi("machine", "add", CONTRACT, MACHINE)
        log(f"{self.name}: backup {self.src}")
        t = time.monotonic()
        self.kiwi("backup", CONTRACT, "--machine", MACHINE, self.src)
        ingest = time.monotonic() - t
        stored = self.server.bucket_bytes(OURS_BUCKET)[1] if self.s3 else du(os.path.join(self.home, "store"))
        emit({"tool": self.name, "metric": "ingest", "seconds": round(ingest, 2),
              "stored_MiB": round(stored / 2**20, 1)})

    def mount(self) -> None:
        p = self.kiwi("mount", CONTRACT, self.mnt, timeout=self.a.timeout)
        m = re.search(r"\(\D*(\d+)\)", p.stdout)
        self.pid = int(m.group(1)) if m else None

    def root(self) -> str:
        return os.path.join(self.mnt, MACHINE, "latest") + self.src

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            self.kiwi("umount", self.mnt, timeout=120, check=False)
        self.pid = None


class Restic(Tool):
    name = "restic-s3"

    def __init__(self, a, src, server) -> None:
        super().__init__(a, src, server)
        self.repo = f"s3:{server.endpoint}/{RESTIC_BUCKET}"
        self.cache = os.path.join(os.path.abspath(a.work), "restic-cache")
        self.env = {"RESTIC_PASSWORD": PASS, "RESTIC_CACHE_DIR": self.cache, **server.creds}
        self.opts = ["--no-cache"] if a.restic_no_cache else []
        self.proc: subprocess.Popen | None = None
        self.logf = os.path.join(os.path.abspath(a.work), "restic-mount.log")

    def restic(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return sh(["restic", "-r", self.repo, *self.opts, *args], env=self.env, timeout=timeout, check=check,
                  what=f"restic {args[0]}")

    def prepare(self) -> None:
        if self.a.reuse:
            p = self.restic("snapshots", "--json", check=False, timeout=600)
            if p.returncode == 0 and latest_is(p.stdout, self.src):
                log(f"{self.name}: reusing {self.repo}")
                return
        self.server.wipe_bucket(RESTIC_BUCKET)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.restic("init", "-q")
        log(f"{self.name}: backup {self.src}")
        t = time.monotonic()
        self.restic("backup", "-q", self.src)
        ingest = time.monotonic() - t
        emit({"tool": self.name, "metric": "ingest", "seconds": round(ingest, 2),
              "stored_MiB": round(self.server.bucket_bytes(RESTIC_BUCKET)[1] / 2**20, 1)})

    def mount(self) -> None:
        f = open(self.logf, "a")  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen(["restic", "-r", self.repo, *self.opts, "mount", self.mnt],
                                     env={**os.environ, **self.env}, stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        f.close()
        self.pid = self.proc.pid

    def root(self) -> str:
        return os.path.join(self.mnt, "snapshots", "latest") + self.src

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        if self.proc:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.proc = self.pid = None


class RawGets(Tool):
    """Not a mount: the S3 server's ceiling for seq_read (see the module's docstring)."""

    name = "s3-get"
    metrics = ("seq_read",)

    def __init__(self, a, src, server, ours: Ours, big: str) -> None:
        super().__init__(a, src, server)
        self.ours, self.big = ours, big
        self.ranges: list[tuple[str, int, int]] = []
        self.backend = None

    def prepare(self) -> None:
        """Locate the big file's chunks in ours-s3's repository (after ours-s3 prepared it)."""
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        os.environ.update(self.ours.env)
        from kiwi_restore import service
        from kiwi_restore.restore import lookup
        from kiwi_restore.site import Site
        from kiwi_restore.snapshot import resolve

        _rec, repo = service.open_contract(Site(self.ours.home, lambda: PASS.encode()), CONTRACT)
        node = lookup(repo, resolve(repo.list_snapshots(), "latest", None, MACHINE), os.path.join(self.src, self.big))
        spans: dict[bytes, list[int]] = {}  # pack -> [first byte, end] of the file's chunks, in file order
        for cid, _size in node.chunks:
            if cid is not None:
                loc = repo.locate(cid)
                span = spans.setdefault(loc.pack_id, [loc.offset, loc.offset + loc.length])
                span[0], span[1] = min(span[0], loc.offset), max(span[1], loc.offset + loc.length)
        self.ranges = [(repo.pack_key(p), lo, hi - lo) for p, (lo, hi) in spans.items()]
        self.backend = repo.backend
        log(f"{self.name}: {len(self.ranges)} ranged GETs, {sum(r[2] for r in self.ranges) / 2**20:.0f} MiB "
            f"for a {node.size / 2**20:.0f} MiB file")

    def measure(self, rep: int, big_size: int) -> dict:
        rec: dict = {"tool": self.name, "rep": rep, "metric": "seq_read"}
        drop_caches(self.server)
        try:
            cpu0, srv0 = os.times(), self.server.cpu_s()
            t = time.monotonic()
            with ThreadPoolExecutor(GET_THREADS) as pool:
                fetched = sum(pool.map(lambda r: len(self.backend.get_range(*r)), self.ranges))
            dt = time.monotonic() - t
            cpu1, srv1 = os.times(), self.server.cpu_s()
            rec.update(seconds=round(dt, 3), bytes=big_size, fetched_bytes=fetched,
                       MB_per_s=round(big_size / dt / 1e6, 1), mount_s=None, rss_MiB=None,
                       fuse_cpu_s=round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 2),
                       server_cpu_s=None if None in (srv0, srv1) else round(srv1 - srv0, 2))
        except Exception as exc:  # reported like a failed measure
            rec["error"] = str(exc)[-1000:]
            log(f"{self.name} rep {rep}: FAILED: {rec['error']}")
        return rec


# -- measures --------------------------------------------------------------------------------
def wait_root(tool: Tool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.listdir(tool.root()):
                return
        except OSError:
            pass
        if isinstance(tool, Restic) and tool.proc and tool.proc.poll() is not None:
            raise RuntimeError(f"restic mount exited with {tool.proc.returncode} (log: {tool.logf})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tool.root()} not listable after {timeout:.0f} s")
        time.sleep(0.02)


def measure(tool: Tool, metric: str, rep: int, small_dir: str, big: str, timeout: float) -> dict:
    rec: dict = {"tool": tool.name, "rep": rep, "metric": metric}
    os.makedirs(tool.mnt, exist_ok=True)
    tool.umount()
    drop_caches(tool.server)
    try:
        t0 = time.monotonic()
        tool.mount()
        wait_root(tool, min(timeout, 1800))
        rec["mount_s"] = round(time.monotonic() - t0, 3)
        root = tool.root()
        if metric == "tar_small":
            cmd = f"tar cf - -C {shlex.quote(root)} {shlex.quote(small_dir)} | wc -c"
        else:
            path = shlex.quote(os.path.join(root, big))
            cmd = f"dd if={path} of=/dev/null bs=1M status=none && stat -L -c %s {path}"
        server = tool.server if tool.name.endswith("-s3") else None
        cpu0, srv0 = cpu_s(tool.pid), server.cpu_s() if server else None
        t = time.monotonic()
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        dt = time.monotonic() - t
        cpu1, srv1 = cpu_s(tool.pid), server.cpu_s() if server else None
        if p.returncode != 0:
            raise RuntimeError(f"rc={p.returncode}: {cmd}: {p.stderr.strip()[-500:]}")
        nbytes = int(p.stdout.split()[-1])
        rec.update(seconds=round(dt, 3), bytes=nbytes, MB_per_s=round(nbytes / dt / 1e6, 1), rss_MiB=tool.rss_mib(),
                   # CPU of the FUSE process and of the S3 server (radosgw + OSD) during the measure
                   fuse_cpu_s=None if None in (cpu0, cpu1) else round(cpu1 - cpu0, 2),
                   server_cpu_s=None if None in (srv0, srv1) else round(srv1 - srv0, 2))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        rec["error"] = str(exc)[-1000:]
        log(f"{tool.name} {metric} rep {rep}: FAILED: {rec['error']}")
    finally:
        tool.umount()
    return rec


def med_of(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, interrupted)  # unmount and stop the server on the way out
    try:
        bench()
    except Failed as exc:
        raise SystemExit(str(exc)) from None


def bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an existing dataset directory (holding src/ and manifest.json)")
    ap.add_argument("--scale", default="small", choices=("small", "medium", "full"),
                    help="without --data: generate this dataset under --work")
    ap.add_argument("--work", default="/tmp/bench-s3-mount", help="sites, restic cache, mount points")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="keep the repositories of an earlier run")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=10800,
                    help="per measure, seconds (a mount: at most 1800)")
    ap.add_argument("--ceph-state", default="/tmp/bench-s3-ceph")
    ap.add_argument("--objectstore", default="bluestore", choices=("bluestore", "memstore"),
                    help="bluestore: sparse file under --ceph-state; memstore: RAM")
    ap.add_argument("--store-gib", type=int, default=32,
                    help="BlueStore file size (sparse) / memstore cap; a change re-creates the server's store")
    ap.add_argument("--rgw-port", type=int, default=7580)
    ap.add_argument("--mon-port", type=int, default=3350)
    ap.add_argument("--ms-ports", type=int, nargs=2, default=(7600, 7700), metavar=("MIN", "MAX"))
    ap.add_argument("--keep-server", action="store_true", help="leave the S3 server running")
    ap.add_argument("--no-tcp-nodelay", action="store_true",
                    help="RGW exactly as start-ceph-rgw.sh starts it (Nagle on: ~40 ms per small GET)")
    ap.add_argument("--restic-no-cache", action="store_true",
                    help="restic without its local metadata cache (default: with it, as users run it)")
    a = ap.parse_args()
    tools = [t for t in a.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        raise SystemExit(f"unknown tools: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches, FUSE)")
    for exe in ("fusermount3", "tar", "dd") + (("restic",) if "restic-s3" in tools else ()):
        if not shutil.which(exe):
            raise SystemExit(f"{exe} not found")
    os.makedirs(a.work, exist_ok=True)
    t_start = time.monotonic()

    data = os.path.abspath(a.data) if a.data else os.path.join(os.path.abspath(a.work), "data")
    if not a.data:
        log(f"dataset: make_dataset.py --scale {a.scale} --out {data}")
        subprocess.run([sys.executable, os.path.join(HERE, "make_dataset.py"), "--scale", a.scale, "--out", data],
                       check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    src = os.path.join(data, "src")
    small_dir, big = manifest["small_dir"], manifest["big_files"][0]
    total = manifest["total_bytes"]
    big_size = os.path.getsize(os.path.join(src, big))

    # capacity: both repositories on the S3 server, no credit taken for dedup or compression
    s3_tools = [t for t in tools if t.endswith("-s3")]
    server = None
    if s3_tools:
        need = int(len(s3_tools) * total * 1.15) + GiB
        cap = a.store_gib * GiB * (0.8 if a.objectstore == "bluestore" else 0.95)
        if need > cap:
            raise SystemExit(f"the S3 store needs ~{need / GiB:.1f} GiB: raise --store-gib (now {a.store_gib})")
        block = os.path.join(a.ceph_state, "osd", "ceph-0", "block")
        have = os.stat(block).st_blocks * 512 if os.path.exists(block) else 0  # sparse: what it holds
        if a.objectstore == "bluestore" and disk_free(a.ceph_state) < need - have + 2 * GiB:
            raise SystemExit(f"not enough disk under {a.ceph_state} for ~{need / GiB:.1f} GiB of objects")
        if a.objectstore == "memstore" and mem_available() < need + 2 * GiB:
            raise SystemExit(f"memstore: ~{need / GiB:.1f} GiB of RAM needed, "
                             f"{mem_available() / GiB:.1f} available (use --objectstore bluestore)")
        server = Server(a)
    if "ours-local" in tools and disk_free(a.work) < total * 1.1 + GiB:
        raise SystemExit(f"not enough disk under {a.work} for the local store")

    objs: list[Tool] = []
    try:
        if server:
            server.start()
            server.set_rgw_nodelay(not a.no_tcp_nodelay)
        for name in tools:
            if name == "ours-local":
                objs.append(Ours(a, src, server, s3=False))
            elif name == "ours-s3":
                objs.append(Ours(a, src, server, s3=True))
            elif name == "restic-s3":
                objs.append(Restic(a, src, server))
        if "s3-get" in tools:
            ours_s3 = next((t for t in objs if t.name == "ours-s3"), None)
            if ours_s3 is None:
                raise SystemExit("s3-get reads ours-s3's repository: list ours-s3 in --tools too")
            objs.append(RawGets(a, src, server, ours_s3, big))
        for tool in objs:
            os.makedirs(tool.mnt, exist_ok=True)
            tool.umount()  # one left behind by an interrupted run
            tool.prepare()
        t_measure = time.monotonic()
        runs: list[dict] = []
        for rep in range(1, a.reps + 1):
            for tool in objs:
                for metric in tool.metrics:
                    log(f"{tool.name} {metric} rep {rep}")
                    if isinstance(tool, RawGets):
                        rec = tool.measure(rep, big_size)
                    else:
                        rec = measure(tool, metric, rep, small_dir, big, a.timeout)
                    runs.append(rec)
                    emit(rec)
    finally:
        for tool in objs:
            try:
                tool.umount()
            except Exception as exc:  # keep cleaning up
                log(f"umount {tool.name}: {exc}")
        if server and not a.keep_server:
            server.stop()

    # -- summary ---------------------------------------------------------------------------
    med: dict[tuple[str, str], dict] = {}
    for tool in objs:
        for metric in METRICS:
            ok = [r for r in runs if r["tool"] == tool.name and r["metric"] == metric and "error" not in r]
            if not ok:
                continue
            med[tool.name, metric] = {
                "MB_per_s": round(statistics.median(r["MB_per_s"] for r in ok), 1),
                "seconds": round(statistics.median(r["seconds"] for r in ok), 3),
                "mount_s": med_of(ok, "mount_s"),
                "fuse_cpu_s": med_of(ok, "fuse_cpu_s"), "server_cpu_s": med_of(ok, "server_cpu_s"),
                "bytes": ok[0]["bytes"], "runs": len(ok),
                "failed": sum(1 for r in runs if r["tool"] == tool.name and r["metric"] == metric) - len(ok),
                "rss_MiB": max((r["rss_MiB"] for r in ok if r.get("rss_MiB")), default=None)}
            emit({"summary": True, "tool": tool.name, "metric": metric, **med[tool.name, metric]})
            if len({r["bytes"] for r in ok}) > 1:
                log(f"WARNING: {tool.name} {metric}: byte counts differ between repetitions")
    for metric in METRICS:
        counts = {t: m["bytes"] for (t, mt), m in med.items() if mt == metric}
        if len(set(counts.values())) > 1:  # restic mount shows hard links as distinct files
            log(f"note: {metric}: the tools' streams differ in size: {counts}")
        if metric == "seq_read" and any(v != big_size for v in counts.values()):
            log(f"WARNING: seq_read: expected {big_size} bytes, got {counts}")

    def ratio(x: str, y: str, metric: str) -> float | None:
        if (x, metric) in med and (y, metric) in med:
            return round(med[x, metric]["MB_per_s"] / med[y, metric]["MB_per_s"], 2)
        return None

    goals = {}
    for metric in METRICS:
        vs_restic, vs_local = ratio("ours-s3", "restic-s3", metric), ratio("ours-s3", "ours-local", metric)
        goals[metric] = {"ours_s3_vs_restic_s3": vs_restic, "ours_s3_vs_ours_local": vs_local,
                         "ahead_of_restic": None if vs_restic is None else vs_restic > 1.0,
                         "half_of_local": None if vs_local is None else vs_local >= 0.5}
    ceiling = ratio("ours-s3", "s3-get", "seq_read")  # not a goal: where the rest of the time goes
    goals["seq_read"]["ours_s3_vs_s3_get"] = ceiling
    met = [v for g in goals.values() for k, v in g.items() if k in ("ahead_of_restic", "half_of_local")]
    emit({"goals": goals, "all_met": all(met) if met and None not in met else None, "dataset": src,
          "total_bytes": total, "small_files": manifest.get("small_files"), "big_file_bytes": big_size,
          "reps": a.reps, "objectstore": a.objectstore, "restic_cache": not a.restic_no_cache,
          "rgw_tcp_nodelay": not a.no_tcp_nodelay if server else None,
          "env": {"kernel": platform.release(), "ncpu": os.cpu_count(), "restic": first_line(["restic", "version"]),
                  "ceph": first_line(["radosgw", "--version"]), "python": platform.python_version(),
                  "load_avg": os.getloadavg()},
          "measure_s": round(time.monotonic() - t_measure, 1), "total_s": round(time.monotonic() - t_start, 1)})

    print(f"\ndataset {src}: {total / 1e6:.0f} MB ({manifest.get('small_files')} small files in "
          f"'{small_dir}', big file {big_size / 2**20:.0f} MiB); medians of {a.reps} round-robin cold runs; "
          f"S3 = Ceph RGW {a.objectstore} on loopback, tcp_nodelay={int(not a.no_tcp_nodelay)}", file=sys.stderr)
    print(f"{'tool':11} {'metric':10} {'MB/s':>8} {'s':>8} {'mount s':>8} {'RSS MiB':>8} {'FUSE cpu':>9} "
          f"{'S3 cpu':>7} {'n':>3}", file=sys.stderr)
    for (name, metric), m in med.items():
        print(f"{name:11} {metric:10} {m['MB_per_s']:>8} {m['seconds']:>8} {m['mount_s'] or '':>8} "
              f"{m['rss_MiB'] or '':>8} {m['fuse_cpu_s'] or '':>9} {m['server_cpu_s'] or '':>7} {m['runs']:>3}" + (f"  ({m['failed']} FAILED)" if m["failed"] else ""),
              file=sys.stderr)
    for metric, g in goals.items():
        def show(v, ok):
            return "–" if v is None else f"{v:.2f} ({'met' if ok else 'MISSED'})"
        print(f"{metric:10} ours-s3/restic-s3 {show(g['ours_s3_vs_restic_s3'], g['ahead_of_restic'])}  "
              f"ours-s3/ours-local {show(g['ours_s3_vs_ours_local'], g['half_of_local'])}", file=sys.stderr)
    if ceiling is not None:
        print(f"seq_read   ours-s3/s3-get {ceiling:.2f} (the share of the server's raw GET rate; not a goal)",
              file=sys.stderr)
    print(f"total {time.monotonic() - t_start:.0f} s (measures {time.monotonic() - t_measure:.0f} s)",
          file=sys.stderr)
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
