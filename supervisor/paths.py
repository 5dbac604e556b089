"""The runtime dir (0700): token, gateway.json, lock, ipc sockets."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
from dataclasses import dataclass

from supervisor.dirs import private_dir


class LockHeld(RuntimeError):
    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"another hermes-gateway (pid {pid or '?'}) holds {path}")
        self.pid = pid


@dataclass(frozen=True)
class RuntimePaths:
    root: str

    @property
    def broker_endpoint(self) -> str:
        return f"ipc://{os.path.join(self.root, 'broker.sock')}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{os.path.join(self.root, 'control.sock')}"

    @property
    def token_file(self) -> str:
        return os.path.join(self.root, "token")

    @property
    def info_file(self) -> str:
        return os.path.join(self.root, "gateway.json")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.root, "gateway.lock")

    def ensure(self) -> None:
        """Refuse a dir others own or can write (supervisor/dirs.py), then make it 0700."""
        real = private_dir(self.root, "runtime dir")
        if stat.S_IMODE(os.stat(real).st_mode) != 0o700:
            os.chmod(real, 0o700)

    def lock(self) -> int:
        """Take the single-instance lock before binding anything; held for the life of the process."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.read(fd, 32).decode().strip() or 0) or None
            except ValueError:
                pid = None
            os.close(fd)
            raise LockHeld(self.lock_file, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.set_inheritable(fd, False)
        return fd

    def claim_lock(self, fd: int) -> None:
        """A restart's successor holds its predecessor's lock (the same open file): write our pid in it."""
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def write_token(self, token: str | None) -> str:
        token = token or secrets.token_urlsafe(32)
        _write_private(self.token_file, token + "\n")
        return token

    def write_info(self, info: dict) -> None:
        _write_private(self.info_file, json.dumps(info, indent=2) + "\n")

    def remove_live_files(self) -> None:
        for path in (self.info_file,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _write_private(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(6)}.tmp"  # fresh: nothing planted at it is followed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_info(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "gateway.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
