"""What one streaming reply costs the worker, by length: the worker's CPU seconds for a turn of N words.

Issue 14 item 14: the reply was rebuilt per delta (`partial += word`), so doubling the
words quadrupled the cost. Starts a real gateway (echo agent: one delta per word), runs
one turn per size in a fresh session, and reads the session worker's CPU time before and
after. Prints one JSON document; `per_doubling` near 2 is linear, near 4 quadratic.
Usage: .venv/bin/python bench/reply_cost.py [WORDS ...]   (default 40000 80000 160000)
"""

from __future__ import annotations

import asyncio
import json
import sys

import psutil

from bench.common import machine, note, start_gateway
from tests.client import Client


async def one(url: str, gw, words: int) -> float:
    c = await Client.open(url)
    try:
        sid = await c.create()
        pid = None
        while pid is None:  # the worker titles itself just after it answers the create
            pid = next((p for p, t in gw.workers().items() if f"session={sid}" in t), None)
            await asyncio.sleep(0.02)
        proc = psutil.Process(pid)
        before = sum(proc.cpu_times()[:2])
        done = await c.turn(sid, "w " * words, timeout=600)
        assert done["payload"]["status"] == "complete", done["payload"].get("status")
        cpu = sum(proc.cpu_times()[:2]) - before
        await c.call("session.close", {"session_id": sid})
        return cpu
    finally:
        await c.close()


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [40_000, 80_000, 160_000]
    # a Python client reads ~100k events a second: a big send buffer, so the gateway never drops it as slow
    gw = start_gateway("--persist", "false", "--client-buffer", str(1 << 30))
    try:
        rows = []
        for n in sizes:
            cpu = asyncio.run(one(gw.url, gw, n))
            note(f"{n} words: worker cpu {cpu:.2f} s")
            rows.append({"words": n, "worker_cpu_s": round(cpu, 3), "us_per_word": round(cpu / n * 1e6, 2)})
        ratios = [round(b["worker_cpu_s"] / a["worker_cpu_s"], 2) for a, b in zip(rows, rows[1:])
                  if a["worker_cpu_s"] > 0 and b["words"] == 2 * a["words"]]
        print(json.dumps({"bench": "reply_cost", "rows": rows, "per_doubling": ratios, "machine": machine()}, indent=2))
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
