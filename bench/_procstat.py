"""What the processes of a run cost, read from /proc: CPU by process tree, and which worker holds which connection."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one scan of /proc)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                out[int(entry.name)] = int(fields[1])
    return out


def tree(root: int) -> list[int]:
    """root and every process below it."""
    parents = _parents()
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) spent by a process tree so far, its reaped children included."""
    total = 0
    for pid in tree(root):
        fields = _stat(pid)
        if fields is not None:  # utime stime cutime cstime: a reaped child's time is in its parent's cutime
            total += sum(int(f) for f in fields[11:15])
    return total / TICK


def own_cpu() -> float:
    """CPU seconds of this process alone (not its children: the servers it started are counted apart)."""
    t = os.times()
    return t.user + t.system


def connections_by_worker(workers: list[int], server_port: int) -> dict[int, set[int]]:
    """For each worker pid, the client ports of the loopback TCP connections it has accepted on server_port."""
    peers: dict[int, int] = {}  # socket inode -> client port
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], int(f[9])
        if int(local.rsplit(":", 1)[1], 16) == server_port and inode:
            peers[inode] = int(remote.rsplit(":", 1)[1], 16)
    out: dict[int, set[int]] = {}
    for pid in workers:
        ports = out.setdefault(pid, set())
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                port = peers.get(int(link[8:-1]))
                if port is not None:
                    ports.add(port)
    return out
