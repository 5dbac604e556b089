"""The data and runtime dirs must be ours alone before anything is read from or written to them.

The data dir holds every conversation and the journal the start-up sweep kills by; the
runtime dir holds the token and the sockets. Another local user who can write into
either (or swap a symlink on the way to it) could read the conversations, plant a
journal, or redirect a write. So a dir is resolved (symlinks followed once, here), and
refused unless it and every dir above it are safe: owned by us (or root, above it) and
not writable by others, except a sticky dir like /tmp above it.
"""

from __future__ import annotations

import os
import stat


class UnsafeDir(PermissionError):
    """One line saying which dir is refused and why."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def private_dir(path: str, what: str) -> str:
    """Create `path` (0700) if missing; return its real path, or raise UnsafeDir."""
    uid = os.getuid()
    _check_links(path, what, uid)
    real = os.path.realpath(path)
    try:
        os.makedirs(real, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UnsafeDir(f"{what} {path}: cannot create it: {exc.strerror}") from None
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{what} {path} is not a directory")
    if st.st_uid != uid:
        raise UnsafeDir(f"{what} {real} is owned by uid {st.st_uid}, not by this user ({uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDir(f"{what} {real} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w it")
    parent = os.path.dirname(real)
    while True:
        pst = os.lstat(parent)
        if pst.st_uid not in (0, uid):
            raise UnsafeDir(f"{what} {real}: {parent} above it is owned by uid {pst.st_uid}")
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            raise UnsafeDir(f"{what} {real}: {parent} above it is writable by others and not sticky")
        if parent == os.path.dirname(parent):
            return real
        parent = os.path.dirname(parent)


def _check_links(path: str, what: str, uid: int) -> None:
    """Every symlink on the way must be ours or root's: another user's link could be swapped at any time."""
    current = "/"
    for part in os.path.abspath(path).split(os.sep)[1:]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # the rest is created by us
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, uid):
                raise UnsafeDir(f"{what} {path}: {current} is a symlink owned by uid {st.st_uid}")
            current = os.path.realpath(current)
