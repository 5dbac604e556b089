"""Shared bench helpers: start the installed gateway in a temp dir, percentiles, machine facts."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.procs import kill_all

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def note(*parts: object) -> None:
    """Progress goes to stderr; stdout carries only the JSON document."""
    print(*parts, file=sys.stderr, flush=True)


@dataclass
class Gateway:
    proc: subprocess.Popen
    root: Path
    info: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def workers(self) -> dict[int, str]:
        out = {}
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in kids:
            try:
                title = " ".join(p.cmdline())
                if title.startswith("hermes-worker") and p.status() != psutil.STATUS_ZOMBIE:
                    out[p.pid] = title.strip()
            except psutil.Error:
                pass
        return out

    def spares(self) -> int:
        return sum(1 for t in self.workers().values() if t.endswith("spare"))

    def stop(self) -> None:
        procs = []
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        kill_all(procs)
        shutil.rmtree(self.root, ignore_errors=True)


def start_gateway(*flags: str) -> Gateway:
    """`hermes-gateway run --port 0` in a fresh temp dir; returns once gateway.json names it."""
    root = Path(tempfile.mkdtemp(prefix="hgb-", dir="/tmp"))
    args = [str(BIN / "hermes-gateway"), "run", "--port", "0", "--runtime-dir", str(root / "run"),
            "--data-dir", str(root / "data"), "--log-level", "warning", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_GATEWAY_")}
    log = open(root / "gateway.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    gw = Gateway(proc, root)
    info_file = root / "run" / "gateway.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}: {(root / 'gateway.log').read_text()[-2000:]}")
        if info_file.exists():
            info = json.loads(info_file.read_text())
            if info.get("pid") == proc.pid:
                gw.info = info
                break
        time.sleep(0.05)
    else:
        gw.stop()
        raise RuntimeError("gateway did not start in 30 s")
    while len(gw.workers()) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return gw


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def summary_ms(seconds: list[float]) -> dict:
    ms = [v * 1000 for v in seconds]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem.total / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
