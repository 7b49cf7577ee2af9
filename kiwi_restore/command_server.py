"""`kiwi-restore command-server`: a warm runtime that runs this user's commands in forked processes.

The server imports the CLI, the crypto and the FUSE runtime once, then waits on a Unix socket
(launcher.runtime_dir(); the protocol is in launcher.py). For each command it forks a
supervisor, which forks the command's process: that one takes the caller's descriptors,
working directory, umask, environment, stream encodings and signal dispositions and runs
the command as `kiwi-restore` would have; the supervisor reports how it ended (exit status
or signal). The server itself never opens a contract nor holds a key, and never parses the
environment a request carries: only its forked processes do.

It declines (the caller then runs the command itself) a request from a process confined
differently from itself (namespaces, root, capabilities, seccomp, no_new_privs, security
label, groups, priority: a sandboxed caller must not get an unsandboxed run), from another
installation or version of kiwi-restore, with another language or file-name encoding (the
CLI's help texts are translated at import), and any request once a kiwi-restore module
changed on disk since it started: it then exits, so an upgrade never runs old code.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import io
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback

from . import __version__, caller_context, i18n, launcher
from .errors import UsageError
from .i18n import _

# what a mount needs beyond the CLI; the S3 and SFTP clients stay lazy (their imports are
# heavy and only some contracts use them)
PRELOAD = ("kiwi_restore.cli", "kiwi_restore.lifecycle", "kiwi_restore.fuse.daemon", "kiwi_restore.fuse.fs",
           "kiwi_restore.fuse.audit", "kiwi_restore.exporter.export", "pyfuse3", "trio",
           "cryptography.hazmat.primitives.kdf.argon2")
MAX_REQUEST = 16 << 20
REQUEST_DEADLINE = 2.0  # for a whole request: one slow caller must not hold up the others
GO_TIMEOUT = 30.0


def _package_roots() -> tuple[str, ...]:
    import kiwi_restore
    from kiwi_restore import exporter, fuse

    return tuple(os.path.join(os.path.realpath(p), "") for m in (kiwi_restore, fuse, exporter) for p in m.__path__)


def module_stamps() -> dict[str, int]:
    """mtime_ns of every loaded kiwi-restore module file: a change means an upgrade or an edit."""
    roots = _package_roots()
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(roots):
            try:
                stamps[path] = os.stat(path).st_mtime_ns
            except OSError:
                stamps[path] = -1
    return stamps


def _stale(stamps: dict[str, int]) -> bool:
    for path, mtime in stamps.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


class CommandServer:
    """One listening socket; one forked supervisor and command process per accepted command."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, launcher.SOCKET_NAME)
        self.catalog = i18n.catalog_for(os.environ)
        self.root = launcher.package_root()
        self.fsencoding = launcher.fs_encoding()
        self.confinement = launcher.confinement(os.getpid())
        self.sock: socket.socket | None = None
        self.stamps: dict[str, int] = {}

    def bind(self) -> None:
        """Create the private folder and the socket; refuse a folder others could enter."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        if not launcher.private_to_us(self.folder, False):
            raise UsageError(_("{path} must be a directory of this user closed to others (mode 0700)").format(
                path=self.folder))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
            raise UsageError(_("a command server already listens on {path}").format(path=self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # none, or a socket a stopped server left behind
        finally:
            probe.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        self.sock = sock

    def preload(self) -> None:
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)
        self.stamps = module_stamps()
        # what is loaded now lives as long as the server: out of the collector's sight, a
        # command's collections neither walk it nor write to (and so copy) its pages
        gc.collect()
        gc.freeze()

    def serve(self, ready=None) -> None:
        """Accept commands until SIGTERM or SIGINT; the commands (mounts too) live on."""
        assert self.sock is not None

        def stop(_signum: int, _frame: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors reaped by the kernel
        if ready:
            ready()
        ino = os.lstat(self.path).st_ino
        try:
            while True:
                conn, _addr = self.sock.accept()
                with conn:
                    if self._handle(conn) == "stale":
                        print(_("kiwi-restore changed on disk: the command server stops"),
                              file=sys.stderr, flush=True)
                        return
        finally:
            self.sock.close()
            try:
                if os.lstat(self.path).st_ino == ino:  # not a successor's socket
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _decline(self, conn: socket.socket, why: str) -> str:
        try:
            conn.sendall(launcher.MSG_FALLBACK)
        except OSError:
            pass
        return why

    def _handle(self, conn: socket.socket) -> str:
        payload = bytearray()
        try:
            peer, uid, _gid = memoryview(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)).cast("i")
            if uid != os.getuid():
                return "refused"
            peer_confinement = launcher.confinement(peer)  # at once, while the caller waits on us
            deadline = time.monotonic() + REQUEST_DEADLINE
            conn.settimeout(REQUEST_DEADLINE)
            size = int.from_bytes(launcher.recv_exact(conn, 8), "big")
            if not 0 < size <= MAX_REQUEST:
                return "refused"
            payload = bytearray(size)
            view, got = memoryview(payload), 0
            while got < size:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                n = conn.recv_into(view[got:])
                if not n:
                    return "refused"
                got += n
            view.release()
            if _stale(self.stamps):  # first: a newer launcher may speak a newer protocol
                return self._decline(conn, "stale")
            fields = launcher.decode_head(payload)
            if (fields["root"], fields["version"]) != (self.root, __version__):
                return self._decline(conn, "another installation")
            if fields["fsencoding"] != self.fsencoding or i18n.catalog_for(fields["locale"]) != self.catalog:
                return self._decline(conn, "another locale")
            if peer_confinement != self.confinement:
                return self._decline(conn, "confined differently")
            conn.settimeout(None)
            if os.fork() == 0:
                _supervise(self.sock, conn, peer, payload)  # never returns
            return "forked"
        except (OSError, ValueError) as exc:
            if not isinstance(exc, OSError) or exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                print(_("command server: a request failed: {err}").format(err=exc), file=sys.stderr, flush=True)
            return "refused"
        finally:
            payload[:] = bytes(len(payload))  # the caller's environment (passphrase) leaves no trace here


def _supervise(listener: socket.socket, conn: socket.socket, caller: int, payload: bytearray) -> None:
    """In the forked supervisor: once the caller says go (and sends its descriptors), start
    the command's process in the caller's context, and tell the caller how it ended."""
    code = 70
    fds: list[int] = []
    try:
        # the caller's signals are the command's: held until it has set its own dispositions
        signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, n) for n in launcher.FORWARDED_SIGNALS])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        listener.close()
        os.setsid()  # out of the server's session: its terminal is none of ours
        try:
            conn.sendall(launcher.MSG_ACCEPT)
            conn.settimeout(GO_TIMEOUT)
            go, fds, _flags, _addr = socket.recv_fds(conn, 1, 4)
        except OSError:
            go = b""
        if go != launcher.MSG_GO or len(fds) != 4:  # the caller gave up and runs it itself
            os._exit(0)
        conn.settimeout(None)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            conn.close()
            _run_command(go_r, fds, payload)  # never returns
        os.close(go_r)
        payload[:] = bytes(len(payload))  # the command's copy is the only one left
        for fd in fds:  # the command's now: the caller's pipes must not wait on us
            os.close(fd)
        # everything that can fail comes before the go: after it, the command is watched
        try:
            caller_context.apply(caller_context.read(caller), pid)
            ended = os.pidfd_open(pid)
            conn.sendall(launcher.MSG_PID + pid.to_bytes(8, "big"))
        except (caller_context.NotCarried, OSError) as exc:
            os.kill(pid, signal.SIGKILL)  # it never started
            os.waitpid(pid, 0)
            _log(_("command server: handed back to the caller: {why}").format(why=exc))
            try:
                conn.sendall(launcher.MSG_FALLBACK)
            except OSError:
                pass
            os._exit(0)
        _log(_("command server: child {pid} runs a command").format(pid=pid))
        os.write(go_w, b"g")
        os.close(go_w)
        code = _watch(conn, pid, ended)
    except BaseException:  # never back into the server's loop
        traceback.print_exc()
    finally:
        os._exit(code)


def _log(message: str) -> None:
    """A line in the server's log; a log that cannot be written stops nothing."""
    try:
        print(message, file=sys.stderr, flush=True)
    except Exception:
        pass


def _watch(conn: socket.socket, pid: int, ended: int) -> int:
    """Until the command ends: the caller gone (killed, its terminal closed) is a hangup for
    it, and a stopped one is continued to receive it; then its status goes to the caller."""
    hung_up = False
    while True:
        ready = select.select([ended] if hung_up else [ended, conn], [], [])[0]
        if ended in ready:
            break
        hung_up = True  # the caller never writes again: readable means gone
        for signum in (signal.SIGHUP, signal.SIGCONT):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    _waited, status = os.waitpid(pid, 0)
    reply = (launcher.MSG_SIGNAL + bytes([os.WTERMSIG(status)]) if os.WIFSIGNALED(status)
             else launcher.MSG_EXIT + bytes([os.waitstatus_to_exitcode(status) & 0xFF]))
    try:
        conn.sendall(reply)
    except OSError:
        pass  # the caller is gone; nobody to tell
    return 0


def _reopen_stdio(params: list[tuple[str, str, bool, bool]]) -> None:
    """Text streams on the caller's descriptors, set up as Python had set up the caller's."""
    def stream(fd: int, mode: str, enc: str, errors: str, line: bool, through: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=enc, errors=errors, newline="\n", line_buffering=line,
                                write_through=through)

    sys.stdin = stream(0, "r", *params[0])
    sys.stdout = stream(1, "w", *params[1])
    sys.stderr = stream(2, "w", *params[2])


def _run_command(go: int, fds: list[int], payload: bytearray) -> None:
    """In the command's process: wait for the go (the caller's context is set on us by then),
    become the caller's process, and run."""
    code = 70
    try:
        if os.read(go, 1) != b"g":
            os._exit(0)  # handed back to the caller: nothing ran
        os.close(go)
        request = launcher.decode_request(payload)
        payload[:] = bytes(len(payload))
        for name in launcher.FORWARDED_SIGNALS:
            signum = getattr(signal, name)
            signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else signal.SIG_DFL)
        if signal.SIGINT not in request["ignored"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]  # none clobbered by a dup2
        for target, fd in enumerate(high[:3]):
            os.dup2(fd, target)
        os.fchdir(high[3])
        for fd in set(fds + high) - {0, 1, 2}:
            os.close(fd)
        os.umask(request["umask"])
        os.environb.clear()
        os.environb.update(request["env"])
        _reopen_stdio(request["streams"])
        i18n.reset()
        sys.argv = [os.fsdecode(a) for a in request["argv"]]
        from .cli import main

        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, request["blocked"])  # what came meanwhile lands now
            main()
            code = 0
        except KeyboardInterrupt:  # a Ctrl-C that came before main() could catch it
            print(_("interrupted"), file=sys.stderr)
            code = 130
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code & 0xFF)


def run(folder: str | None) -> None:
    """Bind, preload, and serve until stopped (the body of `kiwi-restore command-server`)."""
    if not folder:
        raise UsageError(_("no runtime directory: set XDG_RUNTIME_DIR or {env}").format(env=launcher.ENV_RUNTIME_DIR))
    server = CommandServer(folder)
    server.bind()
    server.preload()
    server.serve(lambda: print(_("command server listening on {path}").format(path=server.path),
                               file=sys.stderr, flush=True))
