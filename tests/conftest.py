"""Fixtures that start the real installed gateway and leave nothing behind, even when a test fails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.procs import kill_all

BIN = Path(sys.executable).parent


def gateway_binary() -> str:
    path = BIN / "hermes-gateway"
    if not path.exists():
        pytest.fail(f"{path} not found: install the project first (make test does)")
    return str(path)


@dataclass
class Gateway:
    """A running `hermes-gateway run` process and the facts tests need about it."""

    proc: subprocess.Popen
    runtime_dir: Path
    data_dir: Path
    args: list[str]
    info: dict = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def token(self) -> str:
        return (self.runtime_dir / "token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def descendants(self) -> list[psutil.Process]:
        try:
            return self.process().children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> dict[int, str]:
        """pid -> process title, for every live worker (not the zygote)."""
        out = {}
        for p in self.descendants():
            try:
                title = " ".join(p.cmdline())
                if title.startswith("hermes-worker") and p.status() != psutil.STATUS_ZOMBIE:
                    out[p.pid] = title
            except psutil.Error:
                pass
        return out

    def session_workers(self) -> dict[int, str]:
        return {pid: t for pid, t in self.workers().items() if "session=" in t}


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_gateway(tmp: Path, *extra: str, env: dict | None = None, wait: bool = True,
                  runtime_dir: Path | None = None, data_dir: Path | None = None, preexec=None) -> Gateway:
    runtime_dir = runtime_dir or tmp / "run"
    data_dir = data_dir or tmp / "data"
    log_path = tmp / f"gateway-{int(time.time() * 1000)}.log"
    args = [gateway_binary(), "run", "--port", "0", "--runtime-dir", str(runtime_dir), "--data-dir", str(data_dir),
            *extra]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_GATEWAY_")}
    full_env.update(env or {})
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                            preexec_fn=preexec)
    gw = Gateway(proc=proc, runtime_dir=runtime_dir, data_dir=data_dir, args=args, log_path=log_path)
    _LIVE.append(gw)
    if wait:
        info_file = runtime_dir / "gateway.json"

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
            if info_file.exists():
                info = json.loads(info_file.read_text())
                return info if info.get("pid") == proc.pid else None
            return None

        gw.info = wait_for(ready, 20, what="gateway.json")
        wait_for(lambda: len(gw.workers()) >= 1, 10, what="lobby worker")
    return gw


_LIVE: list[Gateway] = []


def kill_tree(gw: Gateway, graceful: bool = True) -> None:
    """Stop the gateway and make sure every process it ever started is gone."""
    procs = gw.descendants()
    try:
        procs += [psutil.Process(pid) for pid in _journal_pids(gw)]
    except psutil.Error:
        pass
    if gw.proc.poll() is None and graceful:
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    if gw.proc.poll() is None:
        try:
            os.killpg(gw.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gw.proc.wait(5)
    kill_all(procs)


def _journal_pids(gw: Gateway) -> list[int]:
    try:
        rows = json.loads((gw.data_dir / "workers.json").read_text())
        return [int(r["pid"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return []


@pytest.fixture
def tmp_dirs():
    # short paths: ipc socket paths must stay under ~100 bytes
    path = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def worker_link(tmp_dirs):
    """A worker's real DEALER link (identity b"w-test") to a real ROUTER, as between a worker and the broker."""
    import zmq

    from worker.link import Link

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_dirs}/b.sock"
    router.bind(endpoint)
    link = Link(endpoint, b"w-test", heartbeat_interval=60)
    yield link, router
    link.close()
    router.close(linger=0)
    ctx.term()


@pytest.fixture
def gateway_factory(tmp_dirs):
    """start(*flags) -> Gateway; every gateway started is torn down with its whole tree."""
    started: list[Gateway] = []

    def start(*extra: str, **kwargs) -> Gateway:
        gw = start_gateway(tmp_dirs, *extra, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        kill_tree(gw)


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()


def run(coro, timeout: float = 60):
    """Run a coroutine to completion from a sync test."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pytest_sessionfinish(session, exitstatus):
    for gw in _LIVE:
        kill_tree(gw, graceful=False)
