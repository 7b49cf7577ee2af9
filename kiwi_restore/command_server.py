"""`kiwi-restore command-server`: a warm runtime that runs this user's commands in forked children.

The server imports the CLI, the crypto and the FUSE runtime once, then waits on a Unix socket
(launcher.runtime_dir()). For each request (argv, cwd, umask, environment, and the caller's
stdin/stdout/stderr passed as file descriptors) it forks; the child takes the caller's
descriptors, directory, umask and environment and runs the command as `kiwi-restore` would
have, then reports its exit status. The server itself never opens a contract nor holds a key.

It declines (the caller then runs the command itself) when the request is malformed, when
its language differs from the server's (the CLI's help texts are translated at import), and
when a kiwi-restore module changed on disk since the server started: it then exits, so an
upgrade never runs old code (systemd restarts it).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import signal
import socket
import stat
import sys
import traceback

from . import i18n, launcher
from .errors import UsageError
from .i18n import _

# what a mount needs beyond the CLI; the S3 and SFTP clients stay lazy (their imports are
# heavy and only some contracts use them)
PRELOAD = ("kiwi_restore.cli", "kiwi_restore.lifecycle", "kiwi_restore.fuse.daemon", "kiwi_restore.fuse.fs",
           "kiwi_restore.fuse.audit", "kiwi_restore.exporter.export", "pyfuse3", "trio",
           "cryptography.hazmat.primitives.kdf.argon2")
MAX_REQUEST = 16 << 20
REQUEST_TIMEOUT = 10.0


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
    """One listening socket; one forked child per accepted command."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, launcher.SOCKET_NAME)
        self.catalog = i18n.catalog_for(os.environ)
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

    def serve(self, ready=None) -> None:
        """Accept commands until SIGTERM or SIGINT; the children (mounts too) live on."""
        assert self.sock is not None

        def stop(_signum: int, _frame: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
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

    def _handle(self, conn: socket.socket) -> str:
        fds: list[int] = []
        try:
            _pid, uid, _gid = memoryview(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)).cast("i")
            if uid != os.getuid():
                return "refused"
            conn.settimeout(REQUEST_TIMEOUT)
            head, fds, _flags, _addr = socket.recv_fds(conn, 8, 3)
            size = int.from_bytes(head, "big") if len(head) == 8 else -1
            if len(fds) != 3 or not 0 < size <= MAX_REQUEST:
                return "refused"
            payload = bytearray()
            while len(payload) < size:
                part = conn.recv(min(size - len(payload), 1 << 20))
                if not part:
                    return "refused"
                payload += part
            argv, cwd, umask, env = launcher.decode_request(bytes(payload))
            if _stale(self.stamps):
                conn.sendall(launcher.MSG_FALLBACK)
                return "stale"
            text_env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()}
            if i18n.catalog_for(text_env) != self.catalog:
                conn.sendall(launcher.MSG_FALLBACK)
                return "declined"
            conn.settimeout(None)
            pid = os.fork()
            if pid == 0:
                _run_child(self.sock, conn, fds, argv, cwd, umask, env)  # never returns
            print(_("command server: child {pid} runs a command").format(pid=pid), file=sys.stderr, flush=True)
            return "forked"
        except (OSError, ValueError) as exc:
            if not isinstance(exc, OSError) or exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                print(_("command server: a request failed: {err}").format(err=exc), file=sys.stderr, flush=True)
            return "refused"
        finally:
            for fd in fds:
                os.close(fd)


def _reopen_stdio() -> None:
    """Text streams on the caller's descriptors, buffered as Python's own start would."""
    def stream(fd: int, mode: str, template: object, errors: str | None = None) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=getattr(template, "encoding", None) or "utf-8",
                                errors=errors or getattr(template, "errors", None) or "strict",
                                line_buffering=mode == "w" and (fd == 2 or raw.isatty()))

    sys.stdin = stream(0, "r", sys.__stdin__)
    sys.stdout = stream(1, "w", sys.__stdout__)
    sys.stderr = stream(2, "w", sys.__stderr__, "backslashreplace")


def _run_child(listener: socket.socket, conn: socket.socket, fds: list[int], argv: list[bytes], cwd: bytes,
               umask: int, env: dict[bytes, bytes]) -> None:
    code = 70
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        listener.close()
        os.setsid()  # out of the server's session: its terminal's Ctrl-C is not ours
        conn.sendall(launcher.MSG_PID + os.getpid().to_bytes(8, "big"))
        # the caller never writes again: the connection turning readable means it is gone
        # (killed, its terminal closed), which is a hangup for us as it would be for it
        fcntl.fcntl(conn.fileno(), fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(conn.fileno(), fcntl.F_SETSIG, signal.SIGHUP)
        fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
        # a daemon the command forks (a detached mount) must not keep the caller waiting
        os.register_at_fork(after_in_child=conn.close)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3) for fd in fds]  # none of them clobbered by a dup2
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        for fd in set(fds + high) - {0, 1, 2}:
            os.close(fd)
        os.umask(umask)
        os.environb.clear()
        os.environb.update(env)
        os.chdir(cwd)
        _reopen_stdio()
        i18n.reset()
        sys.argv = [os.fsdecode(a) for a in argv]
        from .cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    except BaseException:  # the caller must hear something, and the server's loop never
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            conn.sendall(launcher.MSG_EXIT + bytes([code & 0xFF]))
        except OSError:
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
