"""`kiwi-restore command-server` and the launcher in front of every command: a real server
process on a real Unix socket, the real console script as the caller, real FUSE mounts.

What must hold: a command served by the server behaves as it does run in its own process
(output, exit status, working directory, umask, signals, a mount's life), and whenever the
server cannot be trusted or is out of date the command runs in its own process instead.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_fuse import alive, mounted, snapshot_dirs, umount
from test_s3_support import s3_contract, s3_store  # noqa: F401 (fixtures)

from kiwi_restore import launcher

SCRIPT = str(Path(sys.executable).with_name("kiwi-restore"))
CHILD_LINE = "command server: child "


class Server:
    """A `kiwi-restore command-server` on a private runtime directory, its log in a file."""

    def __init__(self, runtime: Path, log: Path) -> None:
        self.runtime, self.log_path = runtime, log
        self.env = {**os.environ, launcher.ENV_RUNTIME_DIR: str(runtime)}
        self.env.pop(launcher.ENV_NO_SERVER, None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([SCRIPT, "command-server"], env={**self.env, launcher.ENV_NO_SERVER: "1"},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while "listening on" not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the command server did not start"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> int:
        return self.log().count(CHILD_LINE)

    def last_child(self) -> int:
        """The pid of the command's process the server started last."""
        return int(self.log().rsplit(CHILD_LINE, 1)[1].split()[0])

    def run(self, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([SCRIPT, *args], capture_output=True, env={**self.env, **(env or {})},
                              stdin=subprocess.DEVNULL, timeout=120, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(home: Path, tmp_path: Path):
    runtime = tmp_path / "runtime"
    srv = Server(runtime, tmp_path / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def test_a_command_runs_in_a_child_of_the_server_as_it_would_alone(server: Server, contract: str) -> None:
    cases = [(["contract", "list"], {}), (["snapshots", contract, "--json"], {}), (["snapshots", "nosuch"], {}),
             (["--help"], {}), (["snapshots", "né"], {"PYTHONIOENCODING": "latin-1"})]  # the caller's encoding
    for args, env in cases:
        before = server.children()
        served = server.run(*args, env=env)
        assert server.children() == before + 1, server.log()
        alone = server.run(*args, env={**env, launcher.ENV_NO_SERVER: "1"})
        assert server.children() == before + 1  # the second one did not go through the server
        assert (served.returncode, served.stdout, served.stderr) == (alone.returncode, alone.stdout, alone.stderr)
        if args == ["--help"]:
            assert served.returncode == 0 and b"command-server" in served.stdout
    assert b"'n\xe9'" in served.stderr  # latin-1, as the caller asked
    unknown = server.run("snapshots", "nosuch")
    assert unknown.returncode != 0 and b"nosuch" in unknown.stderr


def test_the_child_takes_the_callers_directory_umask_and_environment(server: Server, contract: str,
                                                                     tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"hello\n")
    assert server.run("backup", contract, str(src), "-m", "pc1").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    before = server.children()
    p = server.run("restore", contract, "latest", "--machine", "pc1", "--target", "out", cwd=work,
                   preexec_fn=lambda: os.umask(0o077), env={"KIWI_RESTORE_ACTOR": "support-7"})
    assert p.returncode == 0, p.stderr
    assert server.children() == before + 1
    restored = work / "out" / str(src).lstrip("/") / "d" / "f.txt"
    assert restored.read_bytes() == b"hello\n"
    assert stat.S_IMODE((work / "out").stat().st_mode) == 0o700  # made under the caller's umask
    # the audit trail names the actor of the caller's environment
    assert "support-7" in run_cli("audit", "show", "--json", check=True).stdout.decode()


def test_a_mount_through_the_server_follows_its_caller(server: Server, contract: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a" * 1000)
    assert server.run("backup", contract, str(src), "-m", "pc1").returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def foreground() -> subprocess.Popen:
        caller = subprocess.Popen([SCRIPT, "mount", contract, str(mnt), "--foreground"], env=server.env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not mounted(mnt):
            assert caller.poll() is None, caller.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        snap = snapshot_dirs(mnt, "pc1")[0]
        assert (mnt / "pc1" / snap / str(src).lstrip("/") / "a.txt").read_bytes() == b"a" * 1000
        return caller

    # Ctrl-C on the caller reaches the mount, which unmounts cleanly
    caller = foreground()
    child = server.last_child()
    caller.send_signal(signal.SIGINT)
    out, err = caller.communicate(timeout=60)
    assert caller.returncode == 0, err
    assert b"unmounted" in out + err
    assert not mounted(mnt)
    umount(mnt, child)
    # a caller killed outright is a hangup for the mount: it unmounts, nothing left behind
    caller = foreground()
    child = server.last_child()
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 30
    while (mounted(mnt) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(mnt) and not alive(child)
    # detached: the command returns once the mount answers, the daemon outlives the child
    p = server.run("mount", contract, str(mnt))
    assert p.returncode == 0, p.stderr
    assert mounted(mnt)
    p = server.run("umount", str(mnt))
    assert p.returncode == 0 and not mounted(mnt)
    assert server.proc.poll() is None  # all along, the server itself went on


def test_a_caller_confined_otherwise_runs_its_command_itself(server: Server, contract: str) -> None:
    # a sandbox (its own mount namespace, no_new_privs) must not be shed by having the
    # server run the command: the caller runs it itself
    for wrapper in (["unshare", "--mount"], ["setpriv", "--no-new-privs"]):
        p = subprocess.run([*wrapper, SCRIPT, "contract", "list"], capture_output=True, env=server.env,
                           stdin=subprocess.DEVNULL, timeout=120)
        assert p.returncode == 0 and b"acme" in p.stdout, (wrapper, p.stderr)
    assert server.children() == 0
    assert server.run("contract", "list").returncode == 0 and server.children() == 1


def test_the_callers_priorities_and_limits_are_the_commands(server: Server, contract: str, tmp_path: Path) -> None:
    from kiwi_restore import caller_context

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    run_cli("backup", contract, str(src), "-m", "pc1", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    caller = subprocess.Popen(["nice", "-n", "5", "ionice", "-c", "3", "prlimit", "--nofile=100:200", "--",
                               "taskset", "-c", "0", "choom", "-n", "300", "--",
                               SCRIPT, "mount", contract, str(mnt), "--foreground"], env=server.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not mounted(mnt):
            assert caller.poll() is None, caller.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.children() == 1
        command = server.last_child()
        ctx = caller_context.read(command)
        assert ctx.nice == 5
        assert ctx.ioprio >> 13 == 3  # the idle class
        assert ctx.limits[resource.RLIMIT_NOFILE] == (100, 200)
        assert ctx.affinity == {0}
        assert ctx.oom_score_adj == b"300"
    finally:
        caller.send_signal(signal.SIGINT)
        caller.communicate(timeout=60)
    assert caller.returncode == 0 and not mounted(mnt)


def _other_cgroup(tmp_path: Path) -> Path:
    """A cgroup of our own next to ours: on cgroup v2 in the unified tree, on v1 in the pids
    hierarchy (skip where cgroups cannot be made)."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    if len(lines) == 1 and lines[0].startswith("0::"):
        base = Path("/sys/fs/cgroup") / lines[0][3:].lstrip("/")
    else:
        rel = next((ln.split(":", 2)[2] for ln in lines if ln.split(":")[1] == "pids"), None)
        if rel is None:
            pytest.skip("no pids hierarchy on this cgroup v1 system")
        base = Path("/sys/fs/cgroup/pids") / rel.lstrip("/")
    group = base / f"kiwi-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    return group


def test_a_caller_in_another_cgroup_has_its_command_run_there_or_runs_it_itself(server: Server, contract: str,
                                                                                  tmp_path: Path) -> None:
    group = _other_cgroup(tmp_path)
    v2 = str(group).startswith("/sys/fs/cgroup/") and not str(group).startswith("/sys/fs/cgroup/pids/")
    try:
        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        p = subprocess.run([SCRIPT, "contract", "list"], capture_output=True, env=server.env,
                           stdin=subprocess.DEVNULL, timeout=120, preexec_fn=enter)
        assert p.returncode == 0 and b"acme" in p.stdout, p.stderr
        if v2:  # moved into the caller's cgroup by the server, and run there
            assert server.children() == 1
        else:  # v1: handed back before it started, and run by the caller itself
            assert server.children() == 0
            assert "handed back to the caller" in server.log()
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _raw_request(server: Server, root: bytes) -> tuple[socket.socket, bytes]:
    """A request as the launcher sends it, but from the installation ROOT."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.runtime / launcher.SOCKET_NAME))
    env = {k.encode(): v.encode() for k, v in server.env.items()}
    payload = launcher.encode_request(["kiwi-restore", "machine", "add", "acme", "pc9"], 0o022, env, root=root)
    sock.sendall(len(payload).to_bytes(8, "big") + payload)
    return sock, sock.recv(1)


def test_another_installation_and_a_caller_who_gave_up_get_nothing_run(server: Server, contract: str) -> None:
    sock, reply = _raw_request(server, b"/opt/another/kiwi_restore")
    sock.close()
    assert reply == launcher.MSG_FALLBACK
    # ours, but the caller leaves before saying go: the command must not run
    sock, reply = _raw_request(server, launcher.package_root())
    assert reply == launcher.MSG_ACCEPT
    sock.close()
    time.sleep(1)
    assert server.children() == 0
    assert b"pc9" not in run_cli("machine", "list", contract, check=True).stdout
    # a server that does not answer (stopped here): the caller runs the command itself, once
    server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        p = server.run("machine", "add", contract, "pc9")
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - t0 >= launcher.HANDSHAKE_TIMEOUT
    finally:
        server.proc.send_signal(signal.SIGCONT)
    time.sleep(1)  # the server reads the abandoned request now, and must not run it
    assert server.children() == 0
    assert run_cli("machine", "list", contract, check=True).stdout.count(b"pc9") == 1


def test_a_caller_with_a_closed_standard_stream_runs_its_command_itself(server: Server, contract: str) -> None:
    # a closed stdout: alone the command's output goes nowhere and it succeeds; our socket
    # must not become the command's stdout
    for closed in (0, 1):
        codes = []
        for alone in (True, False):
            env = {**server.env, **({launcher.ENV_NO_SERVER: "1"} if alone else {})}
            p = subprocess.run([SCRIPT, "contract", "list"], env=env, stderr=subprocess.PIPE, timeout=60,
                               **({"stdout": subprocess.DEVNULL} if closed == 0 else {"stdin": subprocess.DEVNULL}),
                               preexec_fn=lambda fd=closed: os.close(fd))
            codes.append(p.returncode)
        assert codes[0] == codes[1]
    assert server.children() == 0


def test_another_language_runs_in_its_own_process(server: Server, contract: str) -> None:
    before = server.children()
    p = server.run("snapshots", "nosuch", env={"LANG": "fr_FR.UTF-8", "LANGUAGE": "fr"})
    assert server.children() == before
    assert b"erreur" in p.stderr  # the French catalogue, which the server had not loaded


def test_a_changed_module_stops_the_server_and_runs_the_command_alone(server: Server, contract: str) -> None:
    import kiwi_restore.units as module

    path = module.__file__
    st = os.stat(path)
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        p = server.run("contract", "list")
        assert p.returncode == 0 and b"acme" in p.stdout
        server.proc.wait(timeout=30)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert server.children() == 0
    assert "changed on disk" in server.log()
    assert not (server.runtime / launcher.SOCKET_NAME).exists()
    # and with no server at all, the launcher runs the command itself
    p = server.run("contract", "list")
    assert p.returncode == 0 and b"acme" in p.stdout


def test_a_runtime_directory_others_can_enter_is_not_trusted(server: Server, contract: str) -> None:
    os.chmod(server.runtime, 0o755)
    try:
        p = server.run("contract", "list")
        assert p.returncode == 0 and b"acme" in p.stdout
        assert server.children() == 0  # the environment (passphrase) was not sent there
    finally:
        os.chmod(server.runtime, 0o700)
    server.stop()
    os.chmod(server.runtime, 0o755)
    p = run_cli("command-server", env={launcher.ENV_RUNTIME_DIR: str(server.runtime)}, timeout=60)
    assert p.returncode != 0 and b"0700" in p.stderr


def test_one_server_per_socket_and_a_dead_ones_socket_is_replaced(server: Server, tmp_path: Path) -> None:
    p = run_cli("command-server", env={launcher.ENV_RUNTIME_DIR: str(server.runtime)}, timeout=60)
    assert p.returncode != 0 and b"already listens" in p.stderr
    server.proc.kill()
    server.proc.wait()
    sock = server.runtime / launcher.SOCKET_NAME
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # left behind by the killed server
    p = server.run("contract", "list")  # a socket nobody listens on: run here
    assert p.returncode == 0
    second = Server(server.runtime, tmp_path / "second.log")
    try:
        p = second.run("contract", "list")
        assert p.returncode == 0 and second.children() == 1
    finally:
        second.stop()


def _controlling_terminal(tty: int):
    def setup() -> None:
        os.setsid()
        fcntl.ioctl(tty, termios.TIOCSCTTY, 0)  # the launcher's own terminal, in the foreground

    return setup


def test_a_command_that_may_ask_for_the_passphrase_on_its_terminal_runs_alone(server: Server) -> None:
    primary, secondary = os.openpty()
    try:
        env = {**server.env}
        env.pop("KIWI_RESTORE_PASSPHRASE")
        p = subprocess.run([SCRIPT, "--version"], env=env, stdin=secondary, capture_output=True, timeout=60,
                           preexec_fn=_controlling_terminal(secondary))
        assert p.returncode == 0
        assert server.children() == 0
        p = subprocess.run([SCRIPT, "--version"], env=server.env, stdin=secondary, capture_output=True, timeout=60,
                           preexec_fn=_controlling_terminal(secondary))
        assert p.returncode == 0 and server.children() == 1  # the passphrase comes from the environment
    finally:
        os.close(primary)
        os.close(secondary)


def _waiting_at_a_prompt(server: Server, contract: str, tty: tuple[int, int], cwd: Path,
                         ignore: int | None = None, alone: bool = False) -> subprocess.Popen:
    """`contract destroy-request` waiting for its confirmation on a terminal (TTY: the
    pseudo-terminal's two ends), run alone or through the server."""
    primary, secondary = tty
    env = {**server.env, **({launcher.ENV_NO_SERVER: "1"} if alone else {})}
    before = server.children()

    def setup() -> None:
        if ignore is not None:
            signal.signal(ignore, signal.SIG_IGN)  # as nohup does

    while select.select([primary], [], [], 0.05)[0]:  # what the previous one wrote
        os.read(primary, 4096)
    caller = subprocess.Popen([SCRIPT, "contract", "destroy-request", contract], env=env, cwd=cwd,
                              stdin=secondary, stdout=secondary, stderr=secondary, preexec_fn=setup)
    seen = b""
    deadline = time.monotonic() + 60
    while b"confirm" not in seen:
        assert caller.poll() is None, caller.communicate()
        assert time.monotonic() < deadline, seen
        if select.select([primary], [], [], 0.1)[0]:
            seen += os.read(primary, 4096)
    assert server.children() == before + (0 if alone else 1)
    # signal only once it sits in its read of the terminal (a signal before would find
    # Python's handlers not yet set, alone or served alike)
    command = caller.pid if alone else server.last_child()
    read_call = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)
    while read_call and _syscall(command) != read_call:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    caller.command = command
    return caller


def _syscall(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return ""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def test_signals_end_a_served_command_as_they_end_one_alone(server: Server, contract: str, tmp_path: Path) -> None:
    tty = os.openpty()
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            codes = []
            for alone in (True, False):
                caller = _waiting_at_a_prompt(server, contract, tty, tmp_path, alone=alone)
                caller.send_signal(sig)
                caller.communicate(timeout=60)
                codes.append(caller.returncode)
            assert codes[0] == codes[1], (sig, codes)
            assert codes[0] == (130 if sig == signal.SIGINT else -sig)  # Ctrl-C: "aborted", 130
        # the command killed outright: the caller dies the same way
        caller = _waiting_at_a_prompt(server, contract, tty, tmp_path)
        os.kill(caller.command, signal.SIGKILL)
        caller.communicate(timeout=60)
        assert caller.returncode == -signal.SIGKILL
        # Ctrl-Z stops the command with its caller; the caller killed while stopped: the
        # command is continued to receive its hangup, and ends
        caller = _waiting_at_a_prompt(server, contract, tty, tmp_path)
        caller.send_signal(signal.SIGTSTP)
        deadline = time.monotonic() + 30
        while _state(caller.command) != "T" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(caller.command) == "T"
        caller.kill()
        caller.communicate(timeout=60)
        while alive(caller.command) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(caller.command)
        # an ignored signal stays ignored (nohup), through the server too
        caller = _waiting_at_a_prompt(server, contract, tty, tmp_path, ignore=signal.SIGHUP)
        caller.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert caller.poll() is None
        caller.send_signal(signal.SIGTERM)
        caller.communicate(timeout=60)
        assert caller.returncode == -signal.SIGTERM
    finally:
        for fd in tty:
            os.close(fd)
    # nothing was confirmed: the contract was never marked for destruction
    assert b"destroy" not in run_cli("contract", "status", contract, check=True).stdout.lower()


def test_a_contract_on_s3_through_the_server(s3_contract: str, server: Server, tmp_path: Path) -> None:  # noqa: F811
    # the S3 client is not preloaded: the command's process imports it, as a command alone does
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"on s3\n")
    p = server.run("backup", s3_contract, "-m", "pc1", str(src))
    assert p.returncode == 0, p.stderr
    served = server.run("ls", s3_contract, "latest", str(src / "d"))
    alone = server.run("ls", s3_contract, "latest", str(src / "d"), env={launcher.ENV_NO_SERVER: "1"})
    assert server.children() == 2
    assert served.returncode == 0 and b"f.txt" in served.stdout
    assert (served.returncode, served.stdout, served.stderr) == (alone.returncode, alone.stdout, alone.stderr)
