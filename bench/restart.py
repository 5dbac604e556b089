"""What a restart costs a running turn (issue 16): `hermes-gateway restart` while a reply streams.

Per run: one session streams an echo reply of WORDS words at 10 ms a word; half a second
in, `hermes-gateway restart` hands everything to a new broker. The client reconnects the
moment its connection closes (1012) and resumes by the runtime id, as the TUI does. A
prober opens a fresh WebSocket every 10 ms throughout.

Printed (JSON on stdout, progress on stderr):
  port_refused_ms   the longest stretch in which a fresh connection was refused (0: never refused; the
                    successor holds the same listening socket, connections wait in its backlog)
  connect_p99_ms    the slowest fresh connection during the restart (what waiting in the backlog cost)
  reattach_ms       from the 1012 close to the resume's answer on a new connection
  turn_delay_ms     the streamed turn's duration minus the same turn's without a restart, same run
  cut_ms, restart_ms  the broker's own figures (the cut; request -> successor serving)
Usage: .venv/bin/python bench/restart.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, machine, note, start_gateway  # noqa: E402

WORDS = 200


async def _open(url: str):
    ws = await connect(url, max_size=None)
    json.loads(await ws.recv())  # gateway.ready
    return ws


async def _call(ws, rid: int, method: str, params: dict) -> dict:
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("id") == rid:
            return msg


async def _until_complete(ws, sid: str, seqs: list[int]) -> bool:
    """Read events until the turn completes (True) or the connection closes (False)."""
    try:
        async for raw in ws:
            msg = json.loads(raw)
            p = msg.get("params") or {}
            if msg.get("method") == "event" and p.get("session_id") == sid and "seq" in p:
                seqs.append(p["seq"])
                if p["type"] == "message.complete":
                    return True
    except Exception:
        pass
    return False


async def turn(url: str, text: str, restart_root: str | None) -> dict:
    ws = await _open(url)
    sid = (await _call(ws, 1, "session.create", {"cols": 80}))["result"]["session_id"]
    seqs: list[int] = []
    t0 = time.monotonic()
    await _call(ws, 2, "prompt.submit", {"session_id": sid, "text": text})
    out: dict = {}
    if restart_root is None:
        await _until_complete(ws, sid, seqs)
    else:
        async def restart() -> None:
            await asyncio.sleep(0.5)
            done = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
                [str(BIN / "hermes-gateway"), "restart", "--runtime-dir", restart_root],
                capture_output=True, text=True, timeout=60))
            out["restart"] = done.stdout.strip() or done.stderr.strip()

        task = asyncio.ensure_future(restart())
        finished = await _until_complete(ws, sid, seqs)
        closed = time.monotonic()
        if not finished:
            port = json.loads((Path(restart_root) / "gateway.json").read_text())["port"]
            ws = await _open(url.rsplit(":", 1)[0] + f":{port}/api/ws?" + url.split("?", 1)[1])
            res = await _call(ws, 3, "session.resume", {"session_id": sid})
            out["reattach_ms"] = round((time.monotonic() - closed) * 1000, 2)
            out["same_session"] = res.get("result", {}).get("session_id") == sid
            await _until_complete(ws, sid, seqs)
        await task
    out["turn_s"] = time.monotonic() - t0
    out["contiguous"] = seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else False
    await ws.close()
    return out


async def probe(url: str, stop: asyncio.Event, samples: list[float], refused: list[float]) -> None:
    while not stop.is_set():
        t = time.monotonic()
        try:
            ws = await asyncio.wait_for(_open(url), 10)
            samples.append(time.monotonic() - t)
            await ws.close()
        except (OSError, asyncio.TimeoutError):
            refused.append(t)
        await asyncio.sleep(0.01)


def _refused_stretch(times: list[float]) -> float:
    if not times:
        return 0.0
    longest, start, prev = 0.0, times[0], times[0]
    for t in times[1:]:
        if t - prev > 0.05:
            start = t
        prev = t
        longest = max(longest, prev - start + 0.01)
    return max(longest, 0.01)


async def one(gw, text: str) -> dict:
    url = gw.info["url"]
    base = await turn(url, text, None)
    stop = asyncio.Event()
    samples: list[float] = []
    refused: list[float] = []
    prober = asyncio.ensure_future(probe(url, stop, samples, refused))
    r = await turn(url, text, str(gw.root / "run"))
    stop.set()
    await prober
    gw.info = json.loads((gw.root / "run" / "gateway.json").read_text())
    return {"baseline_turn_s": round(base["turn_s"], 3), "turn_s": round(r["turn_s"], 3),
            "turn_delay_ms": round((r["turn_s"] - base["turn_s"]) * 1000, 1), "reattach_ms": r.get("reattach_ms"),
            "same_session": r.get("same_session"), "contiguous": r["contiguous"],
            "port_refused_ms": round(_refused_stretch(refused) * 1000, 1) if refused else 0.0,
            "connect_p99_ms": round(sorted(samples)[int(0.99 * (len(samples) - 1))] * 1000, 1) if samples else None,
            "restart": r.get("restart", "")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    text = " ".join(f"w{i}" for i in range(WORDS))
    gw = start_gateway("--echo-delay", "0.01", "--log-level", "info")
    runs = []
    try:
        for i in range(args.runs):
            note(f"run {i + 1}/{args.runs} …")
            runs.append(asyncio.run(one(gw, text)))
    finally:
        pid = gw.info.get("pid")
        if pid and pid != gw.proc.pid:
            try:
                psutil.Process(pid).send_signal(signal.SIGTERM)
                psutil.Process(pid).wait(15)
            except psutil.Error:
                pass
        gw.stop()
    key = lambda k: [r[k] for r in runs if r.get(k) is not None]  # noqa: E731
    doc = {"bench": "restart", "machine": machine(), "words": WORDS, "runs": runs,
           "median": {k: statistics.median(key(k)) for k in
                      ("turn_delay_ms", "reattach_ms", "port_refused_ms", "connect_p99_ms") if key(k)},
           "all_contiguous": all(r["contiguous"] for r in runs), "all_same_session": all(r["same_session"] for r in runs)}
    print(json.dumps(doc, indent=2))
    note("restart: " + ", ".join(f"{k} {v}" for k, v in doc["median"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
