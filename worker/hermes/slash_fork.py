"""Hermes' slash worker forked by the fork server instead of started as a fresh interpreter.

Hermes starts `python -m tui_gateway.slash_worker` per session (~0.3 s of CPU, ~37 MiB
USS). The fork server has Hermes (and `cli`, which the slash worker imports) loaded
already, so a fork of it is ready in milliseconds and shares that heap.

The session's worker asks over a unix socket the fork server listens on (0600, in the
broker's 0700 runtime dir, named by the fork server's pid so the broker sweeps a killed
one's file; a peer of another uid is refused, SO_PEERCRED). It sends
the child's stdin/stdout/stderr pipe ends with SCM_RIGHTS and the argv/env/cwd Hermes
chose; the fork server forks, puts the child into the *caller's* process group (so the
broker's group kill of the session takes it) and answers with the child's pid and a
pidfd, which the worker waits on and signals through (the child is not its own).
`ForkedSlash` is what Hermes' `_SlashWorker` gets from its `subprocess.Popen`: it
speaks Hermes' JSON-lines protocol over those pipes unchanged.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from typing import Any

SLASH_MODULE = "tui_gateway.slash_worker"
MAX_REQ = 256 * 1024
_FDS = 3  # stdin (read end), stdout (write end), stderr (write end)

# the directory the broker names for the socket (its runtime dir, 0700, checked by the broker): a zygote started
# without it (the builtin runtime) does not listen, and Hermes' Popen starts the slash worker as a subprocess
SOCKET_DIR_ENV = "HERMES_SUPERVISOR_SLASH_DIR"
# set in the fork server before it forks any worker, so each worker inherits where to ask
socket_path: str = ""


def socket_file(folder: str, zygote_pid: int) -> str:
    """Where the fork server `zygote_pid` listens: named by its pid so a broker can sweep a killed one's file."""
    return os.path.join(folder, f"slash-{zygote_pid}.sock")


def sweep(folder: str) -> list[str]:
    """Remove the sockets of fork servers that are gone (SIGKILLed: they could not unlink their own)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = name[len("slash-"):-len(".sock")] if name.startswith("slash-") and name.endswith(".sock") else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the fork server's side ---------------------------------------------------------------------
def listen() -> socket.socket | None:
    """Listen in the directory the broker named (taken out of the environment, so no worker's tools see it);
    None when it named none. The socket is 0600 in the broker's 0700 runtime dir; `socket_path` tells the
    workers forked afterwards where to ask."""
    global socket_path
    folder = os.environ.pop(SOCKET_DIR_ENV, "")
    if not folder:
        return None
    path = socket_file(folder, os.getpid())
    try:
        os.unlink(path)  # a pid reused from a SIGKILLed fork server's file
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    socket_path = path
    return sock


def unlink() -> None:
    if socket_path:
        try:
            os.unlink(socket_path)
        except OSError:
            pass


def _peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def serve_one(listener: socket.socket, close_in_child: list[int]) -> tuple[int, int] | None:
    """Accept one request and fork its slash worker; returns (the child's pid, its group) or None.

    The reply is {"pid": int} with the child's pidfd attached, or {"error": str}."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    fds: list[int] = []
    try:
        conn.settimeout(2.0)
        peer_pid, peer_uid = _peer(conn)
        if peer_uid != os.getuid():
            _reply(conn, {"error": "refused: another user"})
            return None
        data, fds = _recv_fds(conn)
        req = json.loads(data.decode())
        if len(fds) != _FDS or not isinstance(req, dict):
            _reply(conn, {"error": f"bad request: want {_FDS} descriptors and a JSON map"})
            return None
        pgid = os.getpgid(peer_pid)  # the caller's own group, never one it names
        pid = _fork(req, fds, pgid, close_in_child + [listener.fileno(), conn.fileno()])
        try:
            os.setpgid(pid, pgid)  # also here, so a group kill right after the reply cannot miss it
        except OSError:
            pass
        pidfd = os.pidfd_open(pid)
        try:
            _reply(conn, {"pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
        return pid, pgid
    except Exception as exc:
        try:
            _reply(conn, {"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        return None
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _recv_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _ = conn.recvmsg(MAX_REQ, socket.CMSG_LEN(_FDS * fds.itemsize))
    for level, type_, payload in anc:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return msg, list(fds)


def _reply(conn: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([data], anc)


def _fork(req: dict, fds: list[int], pgid: int, close: list[int]) -> int:
    argv = [str(a) for a in req.get("argv") or []]
    env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
    cwd = str(req.get("cwd") or "/")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, pgid)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        code = _run_slash(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return 0  # not reached


def _run_slash(argv: list[str]) -> int:
    """Run the slash worker's module as `python -m` would, with the arguments after the module name."""
    import runpy

    from protocol.titles import set_title

    args = argv[argv.index(SLASH_MODULE) + 1:] if SLASH_MODULE in argv else []
    set_title(f"hermes-slash {SLASH_MODULE}")  # tests and ps find it as they found the subprocess
    sys.argv = [SLASH_MODULE, *args]
    sys.stdin = open(0, "r", buffering=1, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:  # what `import cli` does in a fresh slash worker (the fork server undid it for its workers)
        setup_logging_inline()
    except Exception:
        pass
    import warnings

    # the fork server imported the module (so the child shares it); runpy warns that it runs it again as
    # __main__, and Hermes shows a dead slash worker's stderr to the client
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    runpy.run_module(SLASH_MODULE, run_name="__main__", alter_sys=True)
    return 0


def setup_logging_inline() -> None:
    """Hermes' logging as `import cli` sets it up (agent.log and errors.log, their levels, format and filters), with
    the file handlers on the root logger instead of behind a QueueListener thread (`_register_queued_handler`): a
    slash worker logs a few lines; this saves the child a thread (~0.1 MiB USS) and writes each record before the
    child's `os._exit`, which would drop what still waits in the queue. (Logging itself costs the child ~1.5 MiB:
    12.4 vs 10.8 MiB USS without it, mostly formatting and redacting records through the inherited heap.)"""
    import logging

    import hermes_logging as hl

    def register(handler: logging.Handler) -> None:
        hl._queued_file_handlers.append(handler)  # Hermes' own list: its idempotence check and getters read it
        logging.getLogger().addHandler(handler)

    queued = hl._register_queued_handler
    hl._register_queued_handler = register
    try:
        hl.setup_logging(mode="cli")
    finally:
        hl._register_queued_handler = queued


# -- the worker's side --------------------------------------------------------------------------
def wants_fork(argv: Any, kwargs: dict) -> bool:
    """A Popen of Hermes' slash worker that the fork server can serve (same interpreter, same HERMES_HOME)."""
    if not socket_path or not isinstance(argv, (list, tuple)) or SLASH_MODULE not in argv:
        return False
    env = kwargs.get("env") or os.environ
    return env.get("HERMES_HOME") == os.environ.get("HERMES_HOME")  # a profile home re-imports: a subprocess


class ForkedSlash:
    """The part of `subprocess.Popen` Hermes' `_SlashWorker` uses, for a child the fork server forked."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None) -> None:
        self.args = list(argv)
        self.returncode: int | None = None
        ours: list[int] = []
        theirs: list[int] = []
        for reading_child in (True, False, False):
            r, w = os.pipe()
            ours.append(w if reading_child else r)
            theirs.append(r if reading_child else w)
        try:
            req = {"argv": self.args, "env": dict(env if env is not None else os.environ), "cwd": cwd or os.getcwd()}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10.0)
                sock.connect(socket_path)
                sock.sendmsg([json.dumps(req).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
                data, fds = _recv_fds(sock)
            reply = json.loads(data.decode() or "{}")
            if "pid" not in reply or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"the fork server did not start the slash worker: {reply.get('error', 'no reply')}")
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self.pid = int(reply["pid"])
        self._pidfd = fds[0]
        self.stdin = open(ours[0], "w", buffering=1, encoding="utf-8")
        self.stdout = open(ours[1], "r", buffering=1, encoding="utf-8")
        self.stderr = open(ours[2], "r", buffering=1, encoding="utf-8")

    def poll(self) -> int | None:
        if self.returncode is None and self._pidfd >= 0:
            ready, _, _ = select.select([self._pidfd], [], [], 0)
            if ready:
                self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._pidfd >= 0:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._exited()
        return self.returncode if self.returncode is not None else 0

    def _exited(self) -> None:
        self.returncode = -1  # the fork server reaps it and knows the status; Hermes asks only "exited?"
        os.close(self._pidfd)
        self._pidfd = -1

    def send_signal(self, sig: int) -> None:
        if self._pidfd >= 0 and self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        if getattr(self, "_pidfd", -1) >= 0:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
