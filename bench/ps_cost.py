"""What `hermes-ps --json` costs per call: wall time against a bare interpreter, and its import time.

Starts a real gateway in a temp dir, runs each command N times, prints one JSON
document (median and p99 in ms, ratio vs the bare `python -c pass` baseline, and the
heaviest imports from -X importtime). Usage: .venv/bin/python bench/ps_cost.py [N]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float], base: float | None = None) -> dict:
    ms = sorted(ms)
    med = statistics.median(ms)
    doc = {"median_ms": round(med, 1), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1)}
    if base:
        doc["ratio_vs_bare_python"] = round(med / base, 2)
    return doc


def import_breakdown(cmd: list[str]) -> dict:
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    err = subprocess.run(cmd, capture_output=True, text=True, env=env).stderr
    top: dict[str, int] = {}
    total = 0
    for line in err.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header line
        name = parts[2]
        if name.startswith(" ") and not name.startswith("  "):  # top level, not a nested import
            top[name.strip()] = int(parts[1])
            total += int(parts[1])
    heaviest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:6])
    return {"top_level_imports_ms": round(total / 1000, 1),
            "heaviest_ms": {k: round(v / 1000, 1) for k, v in heaviest.items()}}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    tmp = Path(tempfile.mkdtemp(prefix="hg-bench-", dir="/tmp"))
    run_dir = tmp / "run"
    gw = subprocess.Popen([str(BIN / "hermes-gateway"), "run", "--port", "0", "--runtime-dir", str(run_dir),
                           "--data-dir", str(tmp / "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (run_dir / "control.sock").exists():
            if time.monotonic() > deadline or gw.poll() is not None:
                raise SystemExit("gateway did not start")
            time.sleep(0.05)
        ps_json = [str(BIN / "hermes-ps"), "--runtime-dir", str(run_dir), "--json", "--all"]
        ps_table = [str(BIN / "hermes-ps"), "--runtime-dir", str(run_dir), "--all"]
        bare = timed([sys.executable, "-c", "pass"], n)
        zmq_only = timed([sys.executable, "-c", "import zmq, msgpack"], n)
        base = statistics.median(bare)
        print(json.dumps({
            "runs": n,
            "bare_python": summary(bare),
            "import_zmq_msgpack": summary(zmq_only, base),
            "hermes_ps_json": summary(timed(ps_json, n), base),
            "hermes_ps_table": summary(timed(ps_table, n), base),
            "hermes_ps_json_imports": import_breakdown(ps_json),
        }, indent=2))
    finally:
        try:
            os.killpg(gw.pid, signal.SIGTERM)
            gw.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(gw.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
