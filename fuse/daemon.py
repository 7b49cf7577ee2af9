"""The mount session: checks, mount, detach, serve on trio, unmount, audit.

Everything that can fail for a user's reason (key, contract, restore window, snapshot
choice, mount point) is checked before the process detaches, so it ends as one line with
its exit code. The detached child tells the parent over a pipe once the mount answers
(a stat of the mount point went through the FUSE loop); only then does the parent exit 0.

SIGINT, SIGTERM and SIGHUP end the session and unmount, whenever they come (EndingSignals):
a Ctrl-C right after the mount appears neither kills the process before it can unmount nor
leaves the loop waiting on a mount nobody serves; once the loop has stopped, one within a
grace period is only logged, a later one ends a stuck process. If the loop itself dies (a bug),
the mount is deliberately left in place, dead (ENOTCONN), like borg does: an empty mount
point could make an `rsync --delete` from it wipe a mirror. `kiwi-restore umount` clears it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import memory, service
from ..errors import KiwiError, NotFound, PolicyError, UsageError
from ..i18n import _
from ..repository import Repository
from ..site import ContractRecord, Site
from .layout import Layout, build
from .layout import select as select_snapshots

if TYPE_CHECKING:  # imported by serve() itself: pyfuse3 and trio load off the start's path
    from .audit import AuditWriter
    from .fs import KiwiFS

log = logging.getLogger("kiwi_restore.fuse")

FSTYPE = "fuse.kiwi-restore"
READY_TIMEOUT = 60.0
READ_AHEAD_KB = 1024  # per-mount kernel readahead (default 128 KiB): fewer, larger reads
TRIM_SECONDS = 2.0
SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ACCESS_CHECK_SECONDS = 60  # how often a live session re-checks the contract's access rules
# (KIWI_RESTORE_ACCESS_CHECK_SECONDS overrides it, for tests)


@dataclass
class MountOptions:
    mountpoint: str
    machine: str | None = None
    snapshot: str | None = None
    at: str | None = None
    foreground: bool = False
    allow_other: bool = False
    cache_bytes: int = 64 << 20
    debug: bool = False


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M', '1G', '512KiB', '1048576' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(_("invalid size {text!r} (e.g. 64M, 1G)").format(text=text))
    n = float(m.group(1)) * (1024 ** " kmgt".index(m.group(2).lower() or " "))
    if n < 4 << 20:
        raise UsageError(_("--cache-size must be at least 4M"))
    return int(n)


# -- mount table, state files --------------------------------------------------------------
def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounted(mountpoint: str) -> str | None:
    """The file system type mounted at MOUNTPOINT (absolute), from /proc/mounts, or None."""
    want = os.fsencode(mountpoint)
    found = None
    with open("/proc/mounts", "rb") as f:
        for line in f:
            parts = line.split(b" ")
            if len(parts) >= 3 and _unescape(parts[1]) == want:
                found = parts[2].decode(errors="replace")  # the last one is on top
    return found


def _state_path(site: Site, mountpoint: str) -> str:
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(site.tmp_dir(), "mounts", key)


def alive(pid: int) -> bool:
    """True if PID runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


# -- mount -------------------------------------------------------------------------------------
def prepare(site: Site, contract: str, opts: MountOptions) -> tuple[ContractRecord, Repository, Layout]:
    """Everything that can be refused, before any mount: key, contract, window, snapshots."""
    mp = opts.mountpoint
    if mounted(mp) == FSTYPE:  # live or left dead: stacking on it would hide it
        raise UsageError(_("{mp} is already a mount point (kiwi-restore umount {mp})").format(mp=mp))
    if not os.path.isdir(mp):
        raise UsageError(_("mount point {mp} is not a directory").format(mp=mp))
    home = os.path.realpath(site.home)
    real = os.path.realpath(mp)
    if real == home or real.startswith(home + os.sep):
        # serving the store from below itself deadlocks the kernel (restic #5234)
        raise UsageError(_("mount point {mp} is inside the site directory {home}").format(mp=mp, home=site.home))
    if not os.path.exists("/dev/fuse"):
        raise KiwiError(_("FUSE is not available on this machine (no /dev/fuse)"))
    rec, repo = service.open_contract(site, contract, "mount")
    repo.tree_cache.max_bytes = 0  # the mount keeps trees in its own, compact form (dirs.py)
    layout = build(select_snapshots(repo.list_snapshots(), opts.machine, opts.snapshot, opts.at))
    # the directories' index only (a few hundredths of the whole); the trees wait for their
    # first lookup, the rest of the index for the first read of a file's content (loaded on
    # the side as soon as the mount answers, it slowed the first listings it raced with)
    repo.load_tree_index()
    return rec, repo, layout


def _import_runtime() -> None:
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import audit, fs  # noqa: F401


def mount(site: Site, contract: str, opts: MountOptions) -> str:
    """Mount and return a message for the user; detaches unless opts.foreground."""
    opts.mountpoint = os.path.abspath(opts.mountpoint)
    # the contract key's Argon2id derivation releases the GIL: import the mount's runtime
    # meanwhile (about 0.1 s of a 0.3 s start), and before the fork, so the daemon has it.
    # One malloc arena first: a second thread would get its own, and the daemon inherit it
    memory.limit_malloc_arenas()
    importer = threading.Thread(target=_import_runtime, name="kiwi-mount-import")
    importer.start()
    try:
        rec, repo, layout = prepare(site, contract, opts)
    finally:
        importer.join()
    session = os.urandom(8).hex()
    if opts.foreground:
        failure: list[str] = []

        def ready(error: str | None) -> None:
            if error is None:
                print(_("{contract} mounted on {mp}; Ctrl-C to unmount").format(
                    contract=rec.name, mp=opts.mountpoint), file=sys.stderr, flush=True)
            else:
                failure.append(error)

        if serve(site, rec, repo, layout, opts, session, ready):
            raise KiwiError(failure[0] if failure else _("the mount on {mp} failed").format(mp=opts.mountpoint))
        return _("{mp} unmounted").format(mp=opts.mountpoint)
    return _detach(site, rec, repo, layout, opts, session)


def _detach(site: Site, rec: ContractRecord, repo: Repository, layout: Layout, opts: MountOptions,
            session: str) -> str:
    log_path = _state_path(site, opts.mountpoint) + ".log"
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        code = 1

        told = []

        def ready(error: str | None) -> None:
            if told:  # only the first word counts; the parent is gone after it
                return
            told.append(error)
            try:
                os.write(w, b"ok\n" if error is None else b"error " + error.encode(errors="replace") + b"\n")
                os.close(w)
            except OSError:
                pass

        try:
            os.setsid()  # no controlling terminal: the shell's Ctrl-C does not reach us
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            os.close(null)
            os.chdir("/")
            code = serve(site, rec, repo, layout, opts, session, ready)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    message = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not message.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.close(r)
            raise KiwiError(_("the mount process {pid} did not answer within {s} s (log: {log})").format(
                pid=pid, s=int(READY_TIMEOUT), log=log_path))
        chunk = os.read(r, 4096)
        if not chunk:
            break
        message += chunk
    os.close(r)
    if message.startswith(b"ok"):
        return _("{contract} mounted on {mp} (process {pid}); unmount with: kiwi-restore umount {mp}").format(
            contract=rec.name, mp=opts.mountpoint, pid=pid)
    if message.startswith(b"error "):
        raise KiwiError(message[6:].decode(errors="replace").strip())
    raise KiwiError(_("the mount process ended before the mount answered (log: {log})").format(log=log_path))


def _mount_options(rec: ContractRecord, opts: MountOptions) -> set[str]:
    # ro and default_permissions: the kernel refuses writes and checks the stored modes itself
    options = {"ro", "nosuid", "nodev", "noatime", "default_permissions",
               f"fsname=kiwi-restore:{rec.name}", "subtype=kiwi-restore"}
    if opts.allow_other:
        options.add("allow_other")
    return options


def serve(site: Site, rec: ContractRecord, repo: Repository, layout: Layout, opts: MountOptions,
          session: str, ready: Callable[[str | None], None]) -> int:
    """Mount, serve until unmounted or signalled, unmount; returns an exit code."""
    from .audit import AuditWriter
    from .fs import KiwiFS

    # worker threads decode trees and chunks while holding the GIL; a short switch interval
    # lets the trio thread answer the kernel within a fraction of a millisecond meanwhile
    sys.setswitchinterval(SWITCH_INTERVAL)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kiwi-restore mount[%(process)d] %(levelname)s %(message)s")
    audit = AuditWriter(site, rec, repo.keys.audit_cipher(), session)
    fs = KiwiFS(repo, layout, opts.cache_bytes, audit)
    signals = EndingSignals()
    signals.install()
    try:
        return _serve(site, rec, layout, opts, session, ready, audit, fs, signals)
    finally:
        signals.loop_stopped()  # (already, unless the mount failed before its loop ran)
        for sig in signals.late:  # a Ctrl-C pressed again asked for what is done: not an error exit
            log.info("signal %s during the unmount: ignored", signal.Signals(sig).name)


class EndingSignals:
    """SIGINT, SIGTERM and SIGHUP, from just before the mount syscall to the process's exit.

    Until the loop's receiver takes over they are held for it (Python runs the handler in the
    main thread, whichever thread the kernel picked), so none kills the process with its mount
    left in place. Once the loop has stopped they are only noted for a grace period (an
    impatient second Ctrl-C); past it, the unmount is stuck (a worker waiting on a stalled
    store, the audit trail's lock) and a signal ends the process at once, by that signal, as
    `kiwi-restore umount` expects of its SIGTERM. The handler stays until the process exits:
    only the CLI's last lines run after serve()."""

    GRACE = 2.0  # seconds after the loop stopped

    def __init__(self) -> None:
        self.early: list[int] = []  # before the loop's receiver: the loop handles them
        self.late: list[int] = []  # after the loop stopped, within the grace
        self.stopped_at: float | None = None

    def install(self) -> None:
        for sig in ENDING_SIGNALS:
            signal.signal(sig, self._on_signal)

    def loop_stopped(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
            self.late.extend(self.early)  # given back by the receiver as it closed
            self.early.clear()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stopped_at is None:
            self.early.append(signum)
        elif time.monotonic() - self.stopped_at < self.GRACE:
            self.late.append(signum)
        else:
            log.warning("signal %s while the unmount has been stuck for %.0f s: exiting now",
                        signal.Signals(signum).name, time.monotonic() - self.stopped_at)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _serve(site: Site, rec: ContractRecord, layout: Layout, opts: MountOptions, session: str,
           ready: Callable[[str | None], None], audit: AuditWriter, fs: KiwiFS, signals: EndingSignals) -> int:
    import pyfuse3
    import trio

    snaps = layout.snapshots
    details = {"machines": sorted({s.machine for s in snaps}), "snapshots": [s.hex for s in snaps],
               "foreground": opts.foreground, "allow_other": opts.allow_other,
               "cache_bytes": opts.cache_bytes, "pid": os.getpid()}
    sealed = {"mountpoint": opts.mountpoint}
    try:
        pyfuse3.init(fs, opts.mountpoint, _mount_options(rec, opts))
    except Exception as exc:
        log.error("cannot mount on %s: %s", opts.mountpoint, exc)
        try:
            audit.refused({**details, "error": str(exc)}, sealed)
        finally:
            ready(_("cannot mount on {mp} ({err})").format(mp=opts.mountpoint, err=exc))
        return 1
    try:
        audit.start(details, sealed)
    except Exception as exc:  # no trail, no access
        log.error("cannot write the audit trail: %s", exc)
        pyfuse3.close(unmount=True)
        ready(_("cannot write the audit trail: {err}").format(err=exc))
        return 1
    started = time.monotonic()
    state = _state_path(site, opts.mountpoint) + ".json"
    try:  # lets `kiwi-restore umount` wait for this process
        os.makedirs(os.path.dirname(state), mode=0o700, exist_ok=True)
        with open(state, "w") as f:
            json.dump({"pid": os.getpid(), "mountpoint": opts.mountpoint, "contract": rec.name,
                       "session": session}, f)
    except OSError as exc:
        log.warning("cannot write %s: %s", state, exc)
    reason = ["unmounted"]
    clean = False
    try:
        log.info("contract %s: %d snapshot(s) mounted on %s (session %s)", rec.name, len(snaps),
                 opts.mountpoint, session)
        trio.run(_main, fs, site, rec, opts, ready, reason, signals)
        clean = True
    except BaseException as exc:
        reason[0] = f"failed: {type(exc).__name__}: {exc}"
        log.exception("the mount loop failed; the mount is left in place: kiwi-restore umount %s",
                      opts.mountpoint)
        ready(_("the mount failed: {err}").format(err=exc))
    finally:
        signals.loop_stopped()  # (done by the receiver, unless the loop failed before it ran)
        pyfuse3.close(unmount=clean)
        try:
            os.unlink(state)
        except FileNotFoundError:
            pass
        summary = fs.summary()
        log.info("session %s ended (%s): %s", session, reason[0], summary)
        audit.close({"reason": reason[0], "seconds": round(time.monotonic() - started, 3), **summary})
    return 0 if clean else 1


async def _main(fs: KiwiFS, site: Site, rec: ContractRecord, opts: MountOptions,
                ready: Callable[[str | None], None], reason: list[str], signals: EndingSignals) -> None:
    import pyfuse3
    import trio

    def end(sig: int) -> None:
        if reason[0] == "unmounted":
            reason[0] = f"signal {signal.Signals(sig).name}"
            log.info("%s: unmounting", reason[0])
            pyfuse3.terminate()
        else:  # already ending: one unmount is enough
            log.info("signal %s: already unmounting", signal.Signals(sig).name)

    async def receive() -> None:
        try:
            # what the receiver still holds when it closes, it raises again, into signals'
            # handler (before the loop counts as stopped: noted, as during the loop)
            with trio.open_signal_receiver(*ENDING_SIGNALS) as received:
                while signals.early:  # came before the loop ran
                    end(signals.early.pop(0))
                async for sig in received:
                    end(sig)
        finally:
            signals.loop_stopped()

    async def announce() -> None:
        try:
            # abandoned if the session ends first: this stat waits for the kernel's INIT,
            # which a terminated loop never answers (the unmount then fails it)
            st = await trio.to_thread.run_sync(os.stat, opts.mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            ready(_("the mount does not answer: {err}").format(err=exc))
            reason[0] = "not answering"
            pyfuse3.terminate()
            return
        _tune_readahead(st.st_dev)
        ready(None)

    async def watch_access() -> None:
        # the restore window may close, or the client ask for destruction, while mounted:
        # the same check as at mount time then ends the session (Art. 17, 18)
        interval = float(os.environ.get("KIWI_RESTORE_ACCESS_CHECK_SECONDS") or ACCESS_CHECK_SECONDS)
        while True:
            await trio.sleep(interval)
            try:
                await trio.to_thread.run_sync(service.ensure_access, site, site.contract(rec.name), "mount")
            except PolicyError as exc:
                reason[0] = "access ended"
                log.warning("%s: unmounting", exc)
                pyfuse3.terminate()
                return
            except Exception as exc:  # a registry hiccup must not end the session
                log.warning("access check failed: %s", exc)

    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        nursery.start_soon(receive)
        nursery.start_soon(announce)
        nursery.start_soon(watch_access)
        nursery.start_soon(_trim_memory)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _trim_memory() -> None:
    """Give freed heap pages back to the system now and then: the caches churn buffers of
    every size, and the holes they leave in the heap would otherwise stay resident."""
    import trio

    while True:
        await trio.sleep(TRIM_SECONDS)
        await trio.to_thread.run_sync(memory.trim)


def _tune_readahead(dev: int) -> None:
    """Raise this mount's kernel readahead (root only; harmless if refused)."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("readahead left as is (%s): %s", path, exc)


# -- unmount ---------------------------------------------------------------------------------------
def _try(cmd: list[str]) -> tuple[bool, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return False, f"{cmd[0]} not found"
    except subprocess.TimeoutExpired:
        return False, f"{' '.join(cmd)} timed out"
    return p.returncode == 0, (p.stderr or p.stdout).strip()


def umount(site: Site | None, mountpoint: str, wait: float = 15.0) -> str:
    """Unmount a kiwi-restore mount (live, or left dead by a crashed process) and wait for
    its process to finish writing the session's end to the audit trail."""
    mp = os.path.abspath(mountpoint)
    fstype = mounted(mp)
    if fstype is None:
        real = os.path.realpath(mp)
        fstype, mp = mounted(real), real
    if fstype is None:
        raise NotFound(_("{mp} is not mounted").format(mp=mountpoint))
    if fstype != FSTYPE:
        raise UsageError(_("{mp} is not a kiwi-restore mount ({type})").format(mp=mountpoint, type=fstype))
    pid = None
    state = None
    if site is not None:
        try:
            state = _state_path(site, mp) + ".json"
            with open(state) as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, KiwiError):
            pid = None
    errors = []
    for cmd in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp],
                ["umount", mp], ["umount", "-l", mp]):
        ok, err = _try(cmd)
        if ok and mounted(mp) != FSTYPE:
            break
        errors.append(err)
    if mounted(mp) == FSTYPE:
        raise KiwiError(_("cannot unmount {mp}: {err}").format(mp=mp, err="; ".join(e for e in errors if e)))
    if pid is not None:
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid) and _is_ours(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
    if state is not None and (pid is None or not alive(pid)):
        try:
            os.unlink(state)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return _("{mp} unmounted").format(mp=mp)


def _is_ours(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kiwi" in f.read()
    except OSError:
        return False
