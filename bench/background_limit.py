"""1,000 prompt.background calls at once in one session: how many are taken, and what the worker holds.

Issue 14 item 4: each call used to start its own thread (and, with the openai agent, its own provider
request). Starts a real gateway (echo agent, 0.5 s per word, so every background turn lasts ~3 s), sends
1,000 calls without waiting, and reads the session worker's threads and RSS once all are answered.
Prints one JSON document. Usage: .venv/bin/python bench/background_limit.py
"""

from __future__ import annotations

import asyncio
import json

import psutil

from bench.common import start_gateway
from tests.client import Client


async def go(gw) -> dict:
    c = await Client.open(gw.url)
    sid = await c.create()
    await asyncio.sleep(0.3)
    pid = next(p for p, t in gw.workers().items() if f"session={sid}" in t)
    proc = psutil.Process(pid)
    base = proc.num_threads()
    ok = err = 0
    codes = set()
    reqs = [c.request("prompt.background", {"session_id": sid, "text": "a b c d e f"}, timeout=60) for _ in range(1000)]
    for r in await asyncio.gather(*reqs):
        if "result" in r: ok += 1
        else: err += 1; codes.add(r["error"]["code"])
    peak = proc.num_threads()
    rss = proc.memory_info().rss
    await c.close()
    return {"accepted": ok, "refused": err, "codes": sorted(codes), "threads_before": base, "threads_after_1000": peak, "rss_mib": round(rss / 2**20, 1)}

def main() -> None:
    gw = start_gateway("--echo-delay", "0.5")
    try:
        print(json.dumps({"bench": "background_limit", **asyncio.run(go(gw))}, indent=2))
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
