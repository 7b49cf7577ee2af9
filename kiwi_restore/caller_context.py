"""What a command server carries over from a caller to the command it runs for it.

A command run by kiwi-restore's command server must be held to what the caller was held to.
What the kernel attaches to a process and a root-owned parent can set on a child from
outside is copied onto the command's process before it starts: priority (nice), I/O
priority, scheduling policy, CPU affinity, OOM score adjustment, resource limits and cgroup
(memory and CPU limits, device and network policies of a systemd unit live there). What
cannot be copied (namespaces, root, capabilities, seccomp, security label: launcher.confinement)
must already be equal. Anything that cannot be copied makes the server hand the command
back to the caller, which then runs it itself.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

# ioprio_get/ioprio_set have no wrapper in Python's standard library
_IOPRIO_SYSCALLS = {"x86_64": (252, 251), "aarch64": (31, 30)}  # (get, set)
_IOPRIO_WHO_PROCESS = 1
_LIMITS = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))


class NotCarried(Exception):
    """Some part of the caller's context cannot be given to the command's process."""


@dataclass
class CallerContext:
    nice: int
    ioprio: int
    policy: int
    sched_priority: int
    affinity: set[int]
    oom_score_adj: bytes
    limits: dict[int, tuple[int, int]]
    cgroup: bytes


def _ioprio(op: int, *args: int) -> int:
    numbers = _IOPRIO_SYSCALLS.get(os.uname().machine)
    if numbers is None:
        raise NotCarried("I/O priority: unknown system call on " + os.uname().machine)
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(numbers[op], _IOPRIO_WHO_PROCESS, *args)
    if result < 0:
        raise NotCarried("I/O priority: " + os.strerror(ctypes.get_errno()))
    return result


def read(pid: int) -> CallerContext:
    """The context of process PID (the caller, alive: it waits for our answer)."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "rb") as f:
            oom = f.read().strip()
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            cgroup = f.read()
        return CallerContext(
            nice=os.getpriority(os.PRIO_PROCESS, pid), ioprio=_ioprio(0, pid),
            policy=os.sched_getscheduler(pid), sched_priority=os.sched_getparam(pid).sched_priority,
            affinity=os.sched_getaffinity(pid), oom_score_adj=oom,
            limits={r: resource.prlimit(pid, r) for r in _LIMITS}, cgroup=cgroup)
    except OSError as exc:
        raise NotCarried(f"caller {pid}: {exc}") from None


def apply(ctx: CallerContext, pid: int) -> None:
    """Give process PID (the command's, not started yet) the caller's context CTX."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            if f.read() != ctx.cgroup:
                _move_cgroup(ctx.cgroup, pid)
        for r, value in ctx.limits.items():
            resource.prlimit(pid, r, value)
        os.setpriority(os.PRIO_PROCESS, pid, ctx.nice)
        _ioprio(1, pid, ctx.ioprio)
        os.sched_setscheduler(pid, ctx.policy, os.sched_param(ctx.sched_priority))
        os.sched_setaffinity(pid, ctx.affinity)
        with open(f"/proc/{pid}/oom_score_adj", "wb") as f:
            f.write(ctx.oom_score_adj)
    except (OSError, ValueError) as exc:
        raise NotCarried(f"command {pid}: {exc}") from None


def _move_cgroup(cgroup: bytes, pid: int) -> None:
    # cgroup v2 only ("0::/path"): v1's several hierarchies are not carried over
    lines = cgroup.splitlines()
    if len(lines) != 1 or not lines[0].startswith(b"0::/"):
        raise NotCarried("the caller is in another cgroup, and this is not a cgroup v2 system")
    path = b"/sys/fs/cgroup" + lines[0][3:] + b"/cgroup.procs"
    with open(path, "wb") as f:
        f.write(b"%d" % pid)
