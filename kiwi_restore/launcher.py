"""The `kiwi-restore` entry point: hand the command to a warm command server, else run it here.

A Python start with the CLI's, the crypto's and the FUSE runtime's imports costs 0.3-0.5 s of
one core, most of a mount's start. `kiwi-restore command-server` (command_server.py) keeps
that runtime imported and forks a child per command, as Mercurial's chg does for hg. This
module is what every command loads first, so it imports nothing beyond os and sys until it
knows a server is there; with none, or one that cannot take the command, the command runs in
this process exactly as before.

Trust: the request carries the environment, passphrase included, so it only goes to a
socket in a directory that is ours and closed to others, and to a peer running as our uid.
"""

from __future__ import annotations

import os
import sys

ENV_RUNTIME_DIR = "KIWI_RESTORE_RUNTIME_DIR"
ENV_NO_SERVER = "KIWI_RESTORE_NO_COMMAND_SERVER"
SOCKET_NAME = "commands.sock"
REQUEST_MAGIC = b"kiwi-restore-request-1"
# server -> client messages, each one byte then a fixed-size payload
MSG_FALLBACK = b"F"  # run the command yourself (no payload)
MSG_PID = b"P"  # the child serving the command: 8-byte pid
MSG_EXIT = b"X"  # the command's exit status: 1 byte
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
PROMPT_FREE_ENV = ("KIWI_RESTORE_PASSPHRASE", "KIWI_RESTORE_PASSPHRASE_FILE")


def runtime_dir() -> str | None:
    """Where the server's socket lives: $KIWI_RESTORE_RUNTIME_DIR, else the user's runtime
    directory ($XDG_RUNTIME_DIR/kiwi-restore; /run/kiwi-restore for root), else none."""
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "kiwi-restore")
    return "/run/kiwi-restore" if os.getuid() == 0 else None


def private_to_us(path: str, is_socket: bool) -> bool:
    """PATH is ours and nobody else can write to it (or, for the directory, into it)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISSOCK(st.st_mode) if is_socket else stat.S_ISDIR(st.st_mode)
    return kind_ok and st.st_uid == os.getuid() and not st.st_mode & 0o022 and (
        is_socket or not st.st_mode & 0o077)


def may_prompt(argv: list[str]) -> bool:
    """Whether the command could ask for the passphrase on the terminal: a forked child of
    the server has no controlling terminal to ask on, so such a command runs here."""
    if any(os.environ.get(name) for name in PROMPT_FREE_ENV):
        return False
    if any(a == "--passphrase-file" or a.startswith("--passphrase-file=") for a in argv):
        return False
    return os.isatty(0)


def encode_request(argv: list[str], cwd: bytes, umask: int, env: dict[bytes, bytes]) -> bytes:
    """NUL-separated fields: magic, cwd, umask, argc, argv..., NAME=VALUE... (none of them
    can hold a NUL on Linux)."""
    fields = [REQUEST_MAGIC, cwd, b"%d" % umask, b"%d" % len(argv)]
    fields += [os.fsencode(a) for a in argv]
    fields += [k + b"=" + v for k, v in env.items()]
    return b"\0".join(fields)


def decode_request(payload: bytes) -> tuple[list[bytes], bytes, int, dict[bytes, bytes]]:
    """The inverse of encode_request; ValueError on anything else."""
    fields = payload.split(b"\0")
    if len(fields) < 4 or fields[0] != REQUEST_MAGIC:
        raise ValueError("not a kiwi-restore request")
    cwd, umask, argc = fields[1], int(fields[2]), int(fields[3])
    argv = fields[4:4 + argc]
    if len(argv) != argc or not 0 <= umask <= 0o777:
        raise ValueError("truncated request")
    env = {}
    for item in fields[4 + argc:]:
        name, sep, value = item.partition(b"=")
        if not sep or not name:
            raise ValueError("bad environment entry")
        env[name] = value
    return argv, cwd, umask, env


def _recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("the command server closed the connection")
        buf += part
    return buf


def _delegate(path: str) -> int | None:
    """Run sys.argv in a child of the server at PATH: its exit status, or None to run here."""
    # _socket, the C module: socket.py would import enum and selectors, more than this file
    import _socket
    import signal

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        _pid, uid, _gid = memoryview(sock.getsockopt(
            _socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)).cast("i")
        if uid != os.getuid():
            sock.close()
            return None
        umask = os.umask(0o077)
        os.umask(umask)
        payload = encode_request(sys.argv, os.getcwdb(), umask, dict(os.environb))
        stdio = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # three C ints
        sock.sendmsg([len(payload).to_bytes(8, "big")], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, stdio)])
        sock.sendall(payload)
        kind = _recv_exact(sock, 1)
        if kind != MSG_PID:
            return None  # MSG_FALLBACK, or a server that is going away
        child = int.from_bytes(_recv_exact(sock, 8), "big")
    except OSError:
        sock.close()
        return None  # no server listening (a stale socket), or it died: run here

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    # from here on the command runs in the child: Ctrl-C and kills reach it through us
    for name in FORWARDED_SIGNALS:
        signal.signal(getattr(signal, name), forward)
    try:
        if sock.recv(1) == MSG_EXIT:  # recv resumes by itself after a forwarded signal
            return _recv_exact(sock, 1)[0]
    except OSError:
        pass
    finally:
        sock.close()
    from .i18n import _

    sys.stderr.write("kiwi-restore: " + _("error") + ": " + _(
        "the command's process (pid {pid}) ended without a status").format(pid=child) + "\n")
    return 1


def main() -> None:
    if not os.environ.get(ENV_NO_SERVER) and not may_prompt(sys.argv):
        folder = runtime_dir()
        if folder and private_to_us(folder, False):
            path = os.path.join(folder, SOCKET_NAME)
            if private_to_us(path, True):
                status = _delegate(path)
                if status is not None:
                    sys.exit(status)
    from .cli import main as run_here

    run_here()
