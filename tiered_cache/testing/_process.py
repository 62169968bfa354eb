"""Process control for the throwaway servers: start as our child (as another user when root), stop, kill, reap."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_TIMEOUT = 30.0  # seconds to wait for a server to accept connections or to exit
POLL = 0.02
# Tried in order when running as root (initdb/postgres refuse root); a test swaps this to cover "no postgres user".
_UNPRIVILEGED_USERS: tuple[str, ...] = ("postgres", "nobody")
# Redis would run as root, where any local user could CONFIG SET dir/dbfilename and SAVE over root's files.
_REDIS_USERS: tuple[str, ...] = ("redis", "nobody")
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _unprivileged_user(names: tuple[str, ...] | None = None) -> pwd.struct_passwd | None:
    """The user to run a server as when we are root (PostgreSQL refuses root); None when not root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    names = _UNPRIVILEGED_USERS if names is None else names
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        f"Running as root, and the server must not run as root, but none of the users {names} "
        "exists to run it as. Create one (e.g. `useradd --system postgres`) or run as a normal user."
    )


def user_kwargs(user: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess arguments that run the child as user (no supplementary groups), or nothing."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def run_as_name(user: pwd.struct_passwd | None) -> str:
    """Name of the OS user a server runs as: user, or ourselves when no switch is needed."""
    return user.pw_name if user is not None else pwd.getpwuid(os.geteuid()).pw_name


def free_port() -> int:
    """Ask the kernel for a free loopback port by binding port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> None:
    """In the forked child: die with SIGKILL when the parent dies, so a crashed test run leaves no orphans."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(1)


def spawn(args: list[str], *, log: Path, cwd: Path, user: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    """Start a server as our own child in its own session, logging to a file, optionally as another user."""
    kwargs = user_kwargs(user)
    # pdeathsig fires when the *thread* that forked exits, so only use it from the main thread.
    if _libc is not None and threading.current_thread() is threading.main_thread():
        parent = os.getpid()
        kwargs["preexec_fn"] = lambda: _child_setup(parent)
    with open(log, "ab") as out:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True, close_fds=True, **kwargs,
        )


def binary_version(cmd: list[str], pattern: str, label: str, user: pwd.struct_passwd | None,
                   hint: str = "") -> str:
    """Run `<binary> --version` (as the server's user, which also proves it can run the binary)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=READY_TIMEOUT, check=True,  # type: ignore[call-overload]
                             cwd="/", **user_kwargs(user))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        who = f" as {user.pw_name}" if user else ""
        raise RuntimeError(f"Cannot run {cmd[0]} --version{who}: {detail}.{hint}") from e
    m = re.search(pattern, out.stdout)
    return f"{label} {m.group(1)}" if m else out.stdout.strip()


def proc_children(pid: int) -> list[int]:
    """PIDs whose parent is pid (Linux /proc scan), to reap a killed postmaster's backends."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (zombies hold no shared memory or sockets)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc/self")  # no /proc: assume alive only if we could not tell otherwise


def wait_pids_gone(pids: list[int], timeout: float) -> None:
    """Poll until every pid has exited, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for our child to exit; True if it did within timeout."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False
