"""The `kiwi-restore` entry point: hand the command to a warm command server, else run it here.

A Python start with the CLI's, the crypto's and the FUSE runtime's imports costs 0.3-0.5 s of
one core, most of a mount's start. `kiwi-restore command-server` (command_server.py) keeps
that runtime imported and forks a process per command, as Mercurial's chg does for hg. This
module is what every command loads first, so it imports nothing heavy until it knows a
server is there; with none, or one that cannot take the command, the command runs in this
process exactly as before.

Trust: the request carries the environment, passphrase included, so it only goes to a
socket in a directory that is ours and closed to others, and to a peer running as our uid.

Protocol (one connection per command; every length is 8 bytes big-endian):
  caller -> server  length, request (encode_request)
  server -> caller  MSG_FALLBACK (run it yourself), or MSG_ACCEPT
  caller -> server  MSG_GO, with descriptors 0, 1, 2 and the working directory attached
                    (SCM_RIGHTS): only then does the command start, so a caller that gave
                    up waiting (and ran the command itself) never has it run twice, and a
                    stuck server never holds the caller's descriptors
  server -> caller  MSG_PID + the command's pid, then MSG_EXIT + status byte, or
                    MSG_SIGNAL + the signal that killed it
"""

from __future__ import annotations

import os
import sys

from . import __version__

ENV_RUNTIME_DIR = "KIWI_RESTORE_RUNTIME_DIR"
ENV_NO_SERVER = "KIWI_RESTORE_NO_COMMAND_SERVER"
SOCKET_NAME = "commands.sock"
REQUEST_MAGIC = b"kiwi-restore-request-2"
MSG_FALLBACK = b"F"
MSG_ACCEPT = b"A"
MSG_PID = b"P"
MSG_GO = b"G"
MSG_EXIT = b"X"
MSG_SIGNAL = b"S"
HANDSHAKE_TIMEOUT = 3.0  # the server answers in milliseconds; past this, run here
LOCALE_VARS = (b"LANGUAGE", b"LC_ALL", b"LC_MESSAGES", b"LANG")
# passed on to the command, unless the caller ignores them (nohup, background jobs)
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
PROMPT_FREE_ENV = ("KIWI_RESTORE_PASSPHRASE", "KIWI_RESTORE_PASSPHRASE_FILE")
STATUS_FIELDS = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters", "CapInh", "CapPrm", "CapEff",
                 "CapBnd", "CapAmb")
NAMESPACES = ("mnt", "pid", "user", "net", "ipc", "uts", "cgroup")


def runtime_dir() -> str | None:
    """Where the server's socket lives: $KIWI_RESTORE_RUNTIME_DIR, else /run/kiwi-restore
    for root, else $XDG_RUNTIME_DIR/kiwi-restore, else none."""
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        return explicit
    if os.getuid() == 0:
        return "/run/kiwi-restore"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "kiwi-restore") if xdg else None


def package_root() -> bytes:
    """This installation of kiwi-restore: a server of another one must not run our commands."""
    return os.fsencode(os.path.dirname(os.path.realpath(__file__)))


def fs_encoding() -> str:
    """How this Python turns file names into str: caller and server must agree."""
    return f"{sys.getfilesystemencoding()}:{sys.getfilesystemencodeerrors()}"


def confinement(pid: int) -> tuple:
    """What the kernel lets process PID do beyond its uid: must be equal for a caller and the
    server that runs its command, each checks the other (what can be carried over instead,
    priorities, limits, cgroup, is: caller_context.py). A fact that cannot be read stands as
    its errno, which only the same error on the other side equals."""
    facts: list[object] = []
    for ns in NAMESPACES:
        try:
            facts.append(os.readlink(f"/proc/{pid}/ns/{ns}"))
        except OSError as exc:
            facts.append(exc.errno)
    try:
        st = os.stat(f"/proc/{pid}/root")
        facts.append((st.st_dev, st.st_ino))
    except OSError as exc:
        facts.append(exc.errno)
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            lines = dict(line.rstrip(b"\n").split(b":\t", 1) for line in f if b":\t" in line)
        # groups decide what a user may open; root's (a login's "0", a service's none) do not
        names = STATUS_FIELDS if os.getuid() else tuple(n for n in STATUS_FIELDS if n != "Groups")
        facts.extend(lines.get(name.encode()) for name in names)
    except OSError as exc:
        facts.append(exc.errno)
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            facts.append(f.read())
    except OSError as exc:
        facts.append(exc.errno)
    return tuple(facts)


def private_to_us(path: str, is_socket: bool) -> bool:
    """PATH is ours and nobody else can write to it (or, for the directory, enter it)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISSOCK(st.st_mode) if is_socket else stat.S_ISDIR(st.st_mode)
    return kind_ok and st.st_uid == os.getuid() and not st.st_mode & 0o022 and (
        is_socket or not st.st_mode & 0o077)


def runs_here(argv: list[str]) -> bool:
    """Whether the command must run in this process: it could ask for the passphrase on the
    terminal (a server's process has no terminal to ask on), or it was started in the
    background of a terminal (job control must stop it if it reads the terminal)."""
    if not os.isatty(0):
        return False
    try:
        if os.tcgetpgrp(0) != os.getpgrp():
            return True
    except OSError:
        pass  # a terminal that is not our controlling one: no job control on it
    if any(os.environ.get(name) for name in PROMPT_FREE_ENV):
        return False
    return not any(a == "--passphrase-file" or a.startswith("--passphrase-file=") for a in argv)


def _stream_params(stream: object) -> bytes:
    """How Python set up one of our standard streams under the caller's environment."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    errors = getattr(stream, "errors", None) or "strict"
    return b"%s:%s:%d:%d" % (encoding.encode(), errors.encode(), bool(getattr(stream, "line_buffering", False)),
                            bool(getattr(stream, "write_through", False)))


def encode_request(argv: list[str], umask: int, env: dict[bytes, bytes], *, root: bytes | None = None,
                   ignored: list[int] = (), blocked: list[int] = ()) -> bytes:
    """NUL-separated fields (none can hold a NUL on Linux). The head is what the server
    checks before it forks: magic, installation, version, file-name encoding, the locale
    variables; the rest only the command's own process reads: argv, umask, streams,
    signals, environment."""
    head = [REQUEST_MAGIC, root if root is not None else package_root(), __version__.encode(),
            fs_encoding().encode()]
    head += [name + b"=" + env.get(name, b"") for name in LOCALE_VARS]
    body = [b"%d" % umask, _stream_params(sys.stdin), _stream_params(sys.stdout), _stream_params(sys.stderr),
            b",".join(b"%d" % s for s in ignored), b",".join(b"%d" % s for s in blocked), b"%d" % len(argv)]
    body += [os.fsencode(a) for a in argv]
    body += [k + b"=" + v for k, v in env.items()]
    return b"\0".join(head + body)


HEAD_FIELDS = 4 + len(LOCALE_VARS)


def decode_head(payload: bytes | bytearray) -> dict[str, object]:
    """The fields a server checks before forking (the environment is not parsed)."""
    end = -1
    for _ in range(HEAD_FIELDS):  # copy the head only, not a byte of the environment
        end = payload.find(b"\0", end + 1, 1 << 16)
        if end < 0:
            raise ValueError("not a kiwi-restore request")
    fields = bytes(payload[:end]).split(b"\0")
    if fields[0] != REQUEST_MAGIC:
        raise ValueError("not a kiwi-restore request")
    locale = {}
    for item in fields[4:]:
        name, _, value = item.partition(b"=")
        locale[name.decode(errors="replace")] = value.decode(errors="replace")
    return {"root": fields[1], "version": fields[2].decode(errors="replace"),
            "fsencoding": fields[3].decode(errors="replace"), "locale": locale}


def decode_request(payload: bytes | bytearray) -> dict[str, object]:
    """Everything, for the command's own process; ValueError on anything malformed."""
    fields = bytes(payload).split(b"\0")
    if len(fields) < HEAD_FIELDS + 7 or fields[0] != REQUEST_MAGIC:
        raise ValueError("not a kiwi-restore request")
    pos = HEAD_FIELDS
    umask = int(fields[pos])
    streams = []
    for raw in fields[pos + 1:pos + 4]:
        enc, errors, line, through = raw.decode().split(":")
        streams.append((enc, errors, line == "1", through == "1"))
    ignored = [int(s) for s in fields[pos + 4].split(b",") if s]
    blocked = [int(s) for s in fields[pos + 5].split(b",") if s]
    argc = int(fields[pos + 6])
    argv = fields[pos + 7:pos + 7 + argc]
    if len(argv) != argc or not 0 <= umask <= 0o777:
        raise ValueError("truncated request")
    env = {}
    for item in fields[pos + 7 + argc:]:
        name, sep, value = item.partition(b"=")
        if not sep or not name:
            raise ValueError("bad environment entry")
        env[name] = value
    return {"umask": umask, "streams": streams, "ignored": ignored, "blocked": blocked, "argv": argv, "env": env}


def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("the command server closed the connection")
        buf += part
    return buf


class _Forwarding:
    """Our signals, passed to the command once its pid is known (queued until then), and
    given back to us if the command goes back to us unstarted."""

    def __init__(self, ignored: list[int]) -> None:
        import signal

        self.signal = signal
        self.child = 0
        self.pending: list[int] = []
        ours = [getattr(signal, n) for n in FORWARDED_SIGNALS if getattr(signal, n) not in ignored]
        ours += [signal.SIGTSTP, signal.SIGCONT]
        self.before = {signum: signal.getsignal(signum) for signum in ours}
        for signum in ours:
            signal.signal(signum, self.stop if signum == signal.SIGTSTP else self.forward)

    def forward(self, signum: int, _frame: object = None) -> None:
        if not self.child:
            self.pending.append(signum)
            return
        try:
            os.kill(self.child, signum)
        except ProcessLookupError:
            pass

    def stop(self, _signum: int, _frame: object) -> None:  # Ctrl-Z: the command stops with us
        signal = self.signal
        self.forward(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, self.stop)  # continued (fg, bg): so is the command
        self.forward(signal.SIGCONT)

    def started(self, child: int) -> None:
        self.child = child
        for signum in self.pending:
            self.forward(signum)

    def give_back(self) -> None:
        """The command will run here: our handlers as they were, and what came meanwhile
        (but a Ctrl-Z already done with) delivered to us."""
        signal = self.signal
        for signum, handler in self.before.items():
            signal.signal(signum, handler)
        for signum in self.pending:
            if signum not in (signal.SIGSTOP, signal.SIGCONT):
                os.kill(os.getpid(), signum)


def _delegate(path: str) -> int | None:
    """Run sys.argv in a process of the server at PATH: its exit status, or None to run here."""
    # _socket, the C module: socket.py would import enum and selectors, more than this file
    import _socket
    import signal

    ignored = [getattr(signal, n) for n in FORWARDED_SIGNALS if signal.getsignal(getattr(signal, n)) == signal.SIG_IGN]
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    cwd = -1
    forwarding = None
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(path)
        server, uid, _gid = memoryview(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)).cast("i")
        if uid != os.getuid() or confinement(server) != confinement(os.getpid()):
            return None  # a listener held to less, or more, than we are gets nothing from us
        umask = os.umask(0o077)
        os.umask(umask)
        blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        payload = encode_request(sys.argv, umask, dict(os.environb), ignored=ignored, blocked=blocked)
        sock.sendall(len(payload).to_bytes(8, "big") + payload)
        if recv_exact(sock, 1) != MSG_ACCEPT:  # MSG_FALLBACK, or a server going away
            return None
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, cwd))  # C ints
        sock.settimeout(None)
        forwarding = _Forwarding(ignored)  # before the go: no signal of ours falls between
        sock.sendmsg([MSG_GO], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        return _follow(sock, forwarding)
    except OSError:
        if forwarding is not None:
            forwarding.give_back()
        return None  # no server listening (a stale socket), a stuck one, or one that died
    finally:
        sock.close()
        if cwd >= 0:
            os.close(cwd)


def _follow(sock, forwarding: _Forwarding) -> int | None:
    """The command's status (None: the server handed it back unstarted, run it here)."""
    signal = forwarding.signal
    try:
        kind = recv_exact(sock, 1)
    except OSError:
        kind = b""
    if kind != MSG_PID:  # handed back, or the server gone before the command could start
        forwarding.give_back()
        return None
    try:
        forwarding.started(int.from_bytes(recv_exact(sock, 8), "big"))
        kind = sock.recv(1)  # resumes by itself after a forwarded signal
        if kind == MSG_EXIT:
            return recv_exact(sock, 1)[0]
        if kind == MSG_SIGNAL:  # die of the same signal, as the caller's shell expects
            signum = recv_exact(sock, 1)[0]
            if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return 128 + signum
    except OSError:
        pass
    from .i18n import _

    sys.stderr.write("kiwi-restore: " + _("error") + ": " + _(
        "the command's process (pid {pid}) ended without a status").format(pid=forwarding.child or "?") + "\n")
    return 1


def _stdio_open() -> bool:
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False  # a closed one would be taken by our socket and handed over as stdio
    return True


def main() -> None:
    if not os.environ.get(ENV_NO_SERVER) and _stdio_open() and not runs_here(sys.argv):
        folder = runtime_dir()
        if folder and private_to_us(folder, False):
            path = os.path.join(folder, SOCKET_NAME)
            if private_to_us(path, True):
                status = _delegate(path)
                if status is not None:
                    sys.exit(status)
    from .cli import main as run_here

    run_here()
