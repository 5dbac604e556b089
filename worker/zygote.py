"""The fork server: a process that has already imported the worker code and forks workers on request.

Started by the broker as `python -m worker.zygote FD [--preload MOD ...]`, where FD is
one end of a SOCK_SEQPACKET socketpair. Requests and replies are msgpack maps:

  broker -> zygote  {"op": "spawn", "ident": bytes, "config": {...}}
  broker -> zygote  {"op": "adopt"}   (a restart: outlive this broker; the successor holds the socket)
  zygote -> broker  {"op": "spawned", "ident": bytes, "pid": int}
                    {"op": "adopted"}
                    {"op": "exited", "pid": int, "status": int}   (waitpid status, decoded)
                    {"op": "error", "ident": bytes, "message": str}

Forking a warm, gc-frozen parent costs a few ms; a fresh interpreter costs ~90 ms.
The zygote exits when the broker goes (EOF on the socket, PDEATHSIG = SIGTERM, or a
reparent), and on its way out SIGKILLs the process group of every worker it forked, so
whatever a worker started (tools, subprocesses) dies too. The workers' own PDEATHSIG
(SIGKILL) and parent check (in its main loop) are the backstop should the zygote itself be killed outright.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import select
import signal
import socket
import sys

import msgpack

from protocol.titles import ZYGOTE, set_title
from worker import guard
from worker.hermes import slash_fork
import worker.main  # noqa: F401  (preloaded so a fork does not pay for the import)

MAX_MSG = 1024 * 1024


def _decode_status(status: int) -> int:
    """Exit code, or -signal for a signal death (as subprocess reports it)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return status


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parent = os.getppid()
        self.children: set[int] = set()
        self.helpers: dict[int, int] = {}  # slash workers forked for a worker: pid -> the worker's group
        self.slash = slash_fork.listen()  # Hermes' slash workers, forked on a worker's request (hermes runtime)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the broker's business
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and so is a closed terminal (supervisor/ops/hangup.py)

    def _on_term(self, *_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(0)  # unwinds to main(), which kills the worker groups

    def kill_children(self) -> None:
        """SIGKILL every live worker's process group (the worker and all it started)."""
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.children.clear()
        for helper in self.helpers:
            _kill(helper)

    def send(self, **msg) -> None:
        try:
            self.sock.send(msgpack.packb(msg, use_bin_type=True))
        except OSError:
            sys.exit(0)

    def serve(self) -> None:
        while True:
            if self.parent and os.getppid() != self.parent:
                return
            try:
                ready, _, _ = select.select([self.sock, self.wake_r, *([self.slash] if self.slash else [])], [], [],
                                            0.5)
            except InterruptedError:
                ready = []
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            self.reap()
            if self.slash is not None and self.slash in ready:
                forked = slash_fork.serve_one(self.slash, [self.sock.fileno(), self.wake_r, self.wake_w])
                if forked is not None:
                    self.helpers[forked[0]] = forked[1]
            if self.sock in ready:
                data = self.sock.recv(MAX_MSG)
                if not data:
                    return  # the broker closed its end
                try:
                    req = msgpack.unpackb(data, raw=False)
                except Exception:
                    continue
                if isinstance(req, dict) and req.get("op") == "spawn":
                    self.spawn(req.get("ident", b""), req.get("config") or {})
                elif isinstance(req, dict) and req.get("op") == "adopt":
                    self.adopt()

    def adopt(self) -> None:
        """A restart: the broker that started us exits and its successor holds our socket. Outlive the one
        (no PDEATHSIG, no reparent check); the EOF of the socket, when the successor goes, still ends us."""
        guard.set_parent_death_signal(0)
        self.parent = 0
        self.send(op="adopted")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.helpers.pop(pid, None) is not None:
                continue
            self.children.discard(pid)
            if pid in self.helpers.values():  # a worker gone alone: its slash workers go with it
                for helper, group in list(self.helpers.items()):
                    if group == pid:
                        _kill(helper)
            self.send(op="exited", pid=pid, status=_decode_status(status))

    def spawn(self, ident: bytes, config: dict) -> None:
        zygote_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            self.send(op="error", ident=ident, message=f"fork failed: {exc}")
            return
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                self.sock.close()
                if self.slash is not None:
                    self.slash.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                if config.get("runtime") == "hermes":
                    os.setpgid(0, 0)  # a group, not a session: its slash workers (forked here) can join the group
                    # still in the broker's session, so a background group of its terminal: with `stty tostop`
                    # a write to it would stop the worker; ignored, the write goes through
                    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
                else:
                    guard.become_group_leader()
                guard.set_parent_death_signal()
                if os.getppid() != zygote_pid:
                    os._exit(1)
                from worker.main import run

                code = run(ident, config, parent_pid=zygote_pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        self.children.add(pid)
        self.send(op="spawned", ident=ident, pid=pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hermes-zygote")
    parser.add_argument("fd", type=int)
    parser.add_argument("--preload", action="append", default=[])
    args = parser.parse_args(argv)
    # SIGTERM, not SIGKILL: the handler takes every worker's group down before the zygote goes
    guard.set_parent_death_signal(signal.SIGTERM)
    set_title(ZYGOTE)
    for name in args.preload:
        importlib.import_module(name)
    sock = socket.socket(fileno=args.fd)
    zygote = Zygote(sock)
    gc.collect()
    gc.freeze()  # forked children then share the preloaded heap instead of copying it on first GC
    try:
        zygote.serve()
    except Exception:
        import traceback

        traceback.print_exc()
    finally:
        zygote.kill_children()
        slash_fork.unlink()
        # nothing to flush: skip interpreter teardown, whose atexit hooks and non-daemon threads
        # (from preloaded modules such as Hermes') held a stopping gateway for seconds
        os._exit(0)


if __name__ == "__main__":
    main()
