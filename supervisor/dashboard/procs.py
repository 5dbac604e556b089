"""The processes below a pid, read from /proc, so a dead dashboard's PTYs can still be found and stopped."""

from __future__ import annotations

import os
import signal


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """Every process below `root` as (pid, start time); the start time guards against a reused pid."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append((int(name), st[1]))
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            out.append((pid, start))
            todo.append(pid)
    return out


def kill_all(procs: list[tuple[int, int]], sig: int = signal.SIGKILL) -> int:
    """Signal each process (and its process group when it leads one) that is still the same process."""
    killed = 0
    for pid, start in procs:
        st = _stat(pid)
        if st is None or st[1] != start:
            continue
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
            killed += 1
        except OSError:
            pass
    return killed
