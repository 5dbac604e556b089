"""Issue 7 benchmark: what one session costs with `--runtime hermes` against Hermes' own in-process gateway.

Both sides run the real hermes-agent 0.19.0 session code against the fake OpenAI-compatible
server (tests/fake_openai.py) in this process, N sessions each, one turn per session:

  * gateway: `hermes-gateway run --runtime hermes` (warm pool 1). Per session: session.create round trip,
    create -> `session.info` (agent built), first turn round trip; then, per session worker, USS / PSS /
    threads of the worker and of Hermes' slash-worker subprocess; the spare, lobby and fork server too.
  * baseline, measured in the same run: one Python process that imports `tui_gateway.server` and drives
    `dispatch()` itself (what `hermes serve` does per WebSocket message), the same N sessions in it: the
    process's USS and thread count before and after each session, and the same timings.

Usage: .venv/bin/python bench/hermes_worker.py [--sessions N]   (progress on stderr, JSON on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, note, start_gateway  # noqa: E402
from tests.client import Client  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

MIB = 1024 * 1024


def mem(pid: int) -> dict:
    p = psutil.Process(pid)
    info = p.memory_full_info()
    return {"uss_mib": round(info.uss / MIB, 1), "pss_mib": round(info.pss / MIB, 1),
            "rss_mib": round(info.rss / MIB, 1), "threads": p.num_threads()}


def slash_workers(worker: int) -> list[int]:
    """Hermes' slash workers of a session worker: its children, or forked by the fork server into its group."""
    out = []
    for k in psutil.process_iter():
        try:
            if k.pid != worker and os.getpgid(k.pid) == worker and "slash_worker" in " ".join(k.cmdline()):
                out.append(k.pid)
        except (psutil.Error, OSError):
            pass
    return out


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 1)


async def drive_gateway(url: str, sessions: int) -> list[dict]:
    c = await Client.open(url)
    out = []
    for _ in range(sessions):
        t0 = time.perf_counter()
        res = await c.call("session.create", {"cols": 80}, timeout=60)
        t1 = time.perf_counter()
        sid = res["session_id"]
        await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "session.info", 60)
        t2 = time.perf_counter()
        await c.turn(sid, "hello", timeout=60)
        t3 = time.perf_counter()
        await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)  # the slash worker is up
        t4 = time.perf_counter()
        out.append({"sid": sid, "create_ms": (t1 - t0) * 1000, "agent_ready_ms": (t2 - t0) * 1000,
                    "first_turn_ms": (t3 - t2) * 1000, "first_slash_ms": (t4 - t3) * 1000})
        await asyncio.sleep(1.0)  # let the warm pool refill, as between real users
    await asyncio.sleep(1.0)
    out.append(c)  # type: ignore[arg-type]  (kept open so the sessions stay attached while we measure)
    return out


def gateway_side(fake: FakeOpenAI, sessions: int) -> dict:
    gw = start_gateway("--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model", "fake-model",
                       "--warm-pool", "1")
    try:
        loop = asyncio.new_event_loop()
        rows = loop.run_until_complete(drive_gateway(gw.url, sessions))
        client = rows.pop()
        workers = gw.workers()
        per = []
        for row in rows:
            pid = next(p for p, t in workers.items() if f"session={row['sid']}" in t)
            slash = slash_workers(pid)
            row.update({f"worker_{k}": v for k, v in mem(pid).items()})
            row.update({f"slash_{k}": v for k, v in mem(slash[0]).items()} if slash else {})
            row["slash_workers"] = len(slash)
            per.append(row)
        zygote = next(p.pid for p in psutil.Process(gw.proc.pid).children() if "zygote" in " ".join(p.cmdline()))
        spare = next((p for p, t in workers.items() if t.endswith("spare")), None)
        lobby = next(p for p, t in workers.items() if t.endswith("lobby"))
        loop.run_until_complete(client.close())
        loop.close()
        return {"sessions": per, "zygote": mem(zygote), "lobby": mem(lobby), "spare": mem(spare) if spare else None,
                "broker": mem(gw.proc.pid)}
    finally:
        gw.stop()


_INPROC = r'''
import json, os, sys, threading, time
import psutil
import tui_gateway.server as server
proc = psutil.Process()
events = []
class T:
    def write(self, obj):
        if obj.get("method") == "event":
            events.append((time.perf_counter(), obj["params"].get("session_id"), obj["params"]["type"]))
        return True
    def close(self): pass
def wait(sid, kind, since):
    while not any(s == sid and k == kind and t >= since for t, s, k in list(events)):
        time.sleep(0.005)
def m():
    i = proc.memory_full_info()
    return {"uss_mib": round(i.uss / 1048576, 1), "threads": proc.num_threads()}
out = {"start": m(), "sessions": []}
t = T()
for n in range(int(sys.argv[1])):
    before = m()
    t0 = time.perf_counter()
    r = server.dispatch({"jsonrpc": "2.0", "id": n, "method": "session.create", "params": {"cols": 80}}, t)
    t1 = time.perf_counter()
    sid = r["result"]["session_id"]
    wait(sid, "session.info", t0)
    t2 = time.perf_counter()
    server.dispatch({"jsonrpc": "2.0", "id": 1000 + n, "method": "prompt.submit",
                     "params": {"session_id": sid, "text": "hello"}}, t)
    wait(sid, "message.complete", t2)
    t3 = time.perf_counter()
    done = threading.Event()
    class R(T):
        def write(self, obj):
            if obj.get("id") == 2000 + n: done.set()
            return True
    server.dispatch({"jsonrpc": "2.0", "id": 2000 + n, "method": "slash.exec",
                     "params": {"session_id": sid, "command": "help"}}, R())
    done.wait(60)
    t4 = time.perf_counter()
    time.sleep(1.0)
    after = m()
    slash = [c for c in proc.children() if "slash_worker" in " ".join(c.cmdline())]
    si = slash[-1].memory_full_info() if slash else None
    out["sessions"].append({"create_ms": (t1 - t0) * 1000, "agent_ready_ms": (t2 - t0) * 1000,
        "first_turn_ms": (t3 - t2) * 1000, "first_slash_ms": (t4 - t3) * 1000,
        "gateway_uss_delta_mib": round(after["uss_mib"] - before["uss_mib"], 1),
        "gateway_threads_delta": after["threads"] - before["threads"],
        "slash_uss_mib": round(si.uss / 1048576, 1) if si else None,
        "slash_pss_mib": round(si.pss / 1048576, 1) if si else None, "slash_workers": len(slash)})
out["end"] = m()
print(json.dumps(out), file=sys.__stdout__, flush=True)
for c in proc.children(recursive=True):
    c.kill()
os._exit(0)
'''


def baseline_side(fake: FakeOpenAI, sessions: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="hgb-home-", dir="/tmp"))
    (home / "config.yaml").write_text(
        f"model:\n  default: fake-model\n  provider: custom\n  base_url: {fake.base_url}\n")
    env = dict(os.environ, HERMES_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", _INPROC, str(sessions)], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=4)
    args = p.parse_args()
    with FakeOpenAI(reply="Hello from the fake model.") as fake:
        note("gateway --runtime hermes ...")
        gw = gateway_side(fake, args.sessions)
        note("baseline: Hermes' in-process gateway (dispatch() in one process) ...")
        base = baseline_side(fake, args.sessions)
    s, b = gw["sessions"], base["sessions"]
    doc = {
        "machine": machine(),
        "sessions": args.sessions,
        "gateway_hermes_runtime": {
            "create_ms_median": median(s, "create_ms"), "agent_ready_ms_median": median(s, "agent_ready_ms"),
            "first_turn_ms_median": median(s, "first_turn_ms"), "first_slash_ms_median": median(s, "first_slash_ms"),
            "worker_uss_mib_median": median(s, "worker_uss_mib"), "worker_pss_mib_median": median(s, "worker_pss_mib"),
            "worker_threads_median": median(s, "worker_threads"),
            "slash_uss_mib_median": median(s, "slash_uss_mib"), "slash_pss_mib_median": median(s, "slash_pss_mib"),
            "spare": gw["spare"], "lobby": gw["lobby"], "zygote": gw["zygote"], "broker": gw["broker"],
            "per_session": s,
        },
        "baseline_hermes_in_process": {
            "create_ms_median": median(b, "create_ms"), "agent_ready_ms_median": median(b, "agent_ready_ms"),
            "first_turn_ms_median": median(b, "first_turn_ms"), "first_slash_ms_median": median(b, "first_slash_ms"),
            "gateway_uss_delta_mib_median": median(b, "gateway_uss_delta_mib"),
            "gateway_threads_delta_median": median(b, "gateway_threads_delta"),
            "slash_uss_mib_median": median(b, "slash_uss_mib"), "slash_pss_mib_median": median(b, "slash_pss_mib"),
            "process": {"start": base["start"], "end": base["end"]}, "per_session": b,
        },
    }
    g, bb = doc["gateway_hermes_runtime"], doc["baseline_hermes_in_process"]
    doc["ratio"] = {
        "per_session_uss_worker_vs_in_process_delta": round(g["worker_uss_mib_median"]
                                                            / max(0.1, bb["gateway_uss_delta_mib_median"]), 1),
        "agent_ready_ms_gateway_vs_in_process": round(g["agent_ready_ms_median"] / bb["agent_ready_ms_median"], 2),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
