"""Issue 2 benchmark: create / prompt / events / persistence / resume figures from real gateways; prints one JSON document.

Everything is measured on the client side of a real WebSocket, against the installed
`hermes-gateway`, with baselines measured in the same run:
  * session.create round trip with a warm worker (--warm-pool 1, the pool refilled between creates)
    and with the pool empty (--warm-pool 0: a cold fork from the zygote), against starting the real
    worker code in a fresh interpreter with plain subprocess.Popen (Popen -> its hello on a ROUTER);
  * prompt round trip (one word, echo agent, prompt.submit -> message.complete), persistence on vs off;
  * events/s delivered to one client from one session and from 10 sessions (5,000-word echo prompts);
  * session.resume of a stored session of 1,000 and 20,000 messages (rows written with the Store).

Usage: .venv/bin/python bench/latency.py [--quick]   (progress on stderr, JSON on stdout, then one line per
figure on stderr)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, Gateway, machine, note, start_gateway, summary_ms  # noqa: E402
from protocol import frames  # noqa: E402
from worker.store import Store  # noqa: E402

TARGETS = {"create_warm_p50_ms": 5.0, "create_cold_p50_ms": 20.0, "prompt_p50_ms": 2.0, "events_per_s": 20_000,
           "persistence_overhead_p50_ms": 0.5, "resume_20k_ms": 500.0, "interrupt_p99_ms": 100.0}


class Lean:
    """A client that does as little as possible per frame, so the figures are the gateway's, not the client's.

    Responses are matched by integer id from the text prefix the gateway writes; events are matched by
    substring; nothing is decoded until a waiter asks for it.
    """

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.replies: dict[int, asyncio.Future] = {}
        self.watch: dict[str, asyncio.Future] = {}
        self.events = 0
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> "Lean":
        ws = await connect(url, max_size=None, compression=None, ping_interval=None)
        first = await ws.recv()
        assert '"gateway.ready"' in first
        return cls(ws)

    async def _read(self) -> None:
        prefix = len('{"jsonrpc":"2.0","id":')
        async for raw in self.ws:
            if raw.startswith('{"jsonrpc":"2.0","method":"event"'):
                self.events += 1
                if self.watch:
                    for key, fut in list(self.watch.items()):
                        if key in raw:
                            del self.watch[key]
                            fut.set_result(raw)
                continue
            rid = int(raw[prefix:raw.index(",", prefix)])
            fut = self.replies.pop(rid, None)
            if fut is not None:
                fut.set_result(raw)

    def expect(self, sid: str, type_: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.watch[f'"type":"{type_}","session_id":"{sid}"'] = fut
        return fut

    async def send(self, method: str, params: dict) -> asyncio.Future:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        return fut

    async def call(self, method: str, params: dict, timeout: float = 30) -> Any:
        raw = await asyncio.wait_for(await self.send(method, params), timeout)
        msg = json.loads(raw)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


# -- session.create --------------------------------------------------------------
async def wait_spare(gw: Gateway, want: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while gw.spares() < want:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not refill")
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # forked and titled; give it time to say hello


async def creates(gw: Gateway, n: int, warm: bool) -> list[float]:
    c = await Lean.open(gw.url)
    out = []
    for i in range(n + 2):
        if warm:
            await wait_spare(gw)
        else:
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        res = await c.call("session.create", {"cols": 80})
        took = time.perf_counter() - t0
        if i >= 2:  # the first two warm up the path
            out.append(took)
        await c.call("session.close", {"session_id": res["session_id"]})
    await c.close()
    return out


WORKER_BOOT = """
import os, sys
from worker.main import run
run(sys.argv[1].encode(), {{"kind": "spare", "endpoint": {endpoint!r}, "heartbeat_interval": 1.0,
    "runtime": "builtin", "agent": "echo", "echo_delay": 0.0, "slash_timeout": 30.0,
    "store_path": {store!r}, "data_dir": {data!r}}}, os.getppid())
"""

MINIMAL_BOOT = """
import sys, os, sqlite3, msgpack, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.IDENTITY, sys.argv[1].encode())
s.connect({endpoint!r})
s.send(msgpack.packb({{"v": 1, "k": "hello", "pid": os.getpid(), "kind": "spare"}}))
s.recv()
"""


def popen_baseline(n: int, real_worker: bool) -> list[float]:
    """Popen a fresh interpreter -> its hello frame on our ROUTER: what a worker start costs without a fork server."""
    tmp = Path(tempfile.mkdtemp(prefix="hgb-", dir="/tmp"))
    endpoint = f"ipc://{tmp}/bench.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    code = (WORKER_BOOT if real_worker else MINIMAL_BOOT).format(
        endpoint=endpoint, store=str(tmp / "sessions.db"), data=str(tmp))
    out = []
    try:
        for i in range(n + 1):
            ident = f"p{i}"
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", code, ident], cwd=str(ROOT), start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not router.poll(30_000):
                proc.kill()
                raise RuntimeError("a Popen'd worker never said hello")
            who, data = router.recv_multipart()
            took = time.perf_counter() - t0
            assert who == ident.encode() and frames.unpack(data)["k"] == "hello"
            if i >= 1:
                out.append(took)
            router.send_multipart([who, frames.pack(frames.STOP, reason="bench")])
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            while router.poll(0):  # its bye / heartbeats
                router.recv_multipart()
    finally:
        router.close(0)
        ctx.term()
        subprocess.run(["rm", "-rf", str(tmp)])
    return out


# -- prompts -------------------------------------------------------------------------
async def prompt_once(c: Lean, sid: str, text: str) -> float:
    done = c.expect(sid, "message.complete")
    t0 = time.perf_counter()
    reply = await c.send("prompt.submit", {"session_id": sid, "text": text})
    raw = await asyncio.wait_for(done, 30)
    took = time.perf_counter() - t0
    assert '"status":"streaming"' in await reply and '"status":"complete"' in raw
    return took


async def prompts_on_off(on: Gateway, off: Gateway, n: int) -> tuple[list[float], list[float]]:
    """Interleaved, so both see the same machine load."""
    a, b = await Lean.open(on.url), await Lean.open(off.url)
    sa = (await a.call("session.create", {"cols": 80}))["session_id"]
    sb = (await b.call("session.create", {"cols": 80}))["session_id"]
    for _ in range(20):
        await prompt_once(a, sa, "ping")
        await prompt_once(b, sb, "ping")
    ons, offs = [], []
    for i in range(n):
        first, second = ((a, sa, ons), (b, sb, offs)) if i % 2 == 0 else ((b, sb, offs), (a, sa, ons))
        for c, sid, sink in (first, second):
            sink.append(await prompt_once(c, sid, "ping"))
    hist = await a.call("session.history", {"session_id": sa})
    assert hist["count"] == 2 * (n + 20), "persistence on: every turn is in the transcript"
    for c, sid in ((a, sa), (b, sb)):
        await c.call("session.close", {"session_id": sid})
        await c.close()
    return ons, offs


async def interrupts(gw: Gateway, n: int) -> dict:
    """Mid-turn `session.interrupt` (echo agent, 50 ms a word): from the interrupt's answer, and from its send,
    to `message.complete {status: interrupted}` (issue 2: within 100 ms)."""
    c = await Lean.open(gw.url)
    sid = (await c.call("session.create", {"cols": 80}))["session_id"]
    text = " ".join(f"w{i}" for i in range(200))  # 10 s of words: the interrupt always lands mid-turn
    from_answer, from_send = [], []
    for _ in range(n):
        first = c.expect(sid, "message.delta")
        done = c.expect(sid, "message.complete")
        await c.call("prompt.submit", {"session_id": sid, "text": text})
        await asyncio.wait_for(first, 30)
        await asyncio.sleep(0.12)  # a few words in
        t0 = time.perf_counter()
        answer = await c.send("session.interrupt", {"session_id": sid})
        await asyncio.wait_for(answer, 30)
        t1 = time.perf_counter()
        raw = await asyncio.wait_for(done, 30)
        t2 = time.perf_counter()
        assert '"status":"interrupted"' in raw
        from_answer.append(max(0.0, t2 - t1))
        from_send.append(t2 - t0)
    await c.call("session.close", {"session_id": sid})
    await c.close()
    return {"answer_to_complete": summary_ms(from_answer), "send_to_complete": summary_ms(from_send)}


async def events_rate(gw: Gateway, sessions: int, words: int, rounds: int) -> dict:
    c = await Lean.open(gw.url)
    sids = []
    for _ in range(sessions):
        await wait_spare(gw)
        sids.append((await c.call("session.create", {"cols": 80}))["session_id"])
    text = " ".join(f"w{i}" for i in range(words))
    warm_up = [c.expect(sid, "message.complete") for sid in sids]
    for sid in sids:  # one short turn each first: the first turn of a fresh worker pays its page faults
        await c.call("prompt.submit", {"session_id": sid, "text": "warm up " * 50})
    await asyncio.wait_for(asyncio.gather(*warm_up), 60)
    rates = []
    for _ in range(rounds):
        before = c.events
        dones = [c.expect(sid, "message.complete") for sid in sids]
        t0 = time.perf_counter()
        await asyncio.gather(*(c.call("prompt.submit", {"session_id": sid, "text": text}) for sid in sids))
        await asyncio.wait_for(asyncio.gather(*dones), 120)
        took = time.perf_counter() - t0
        got = c.events - before
        assert got >= sessions * (words + 2), (got, sessions * (words + 2))
        rates.append(got / took)
    for sid in sids:
        await c.call("session.close", {"session_id": sid})
    await c.close()
    return {"sessions": sessions, "words_per_prompt": words, "events_per_round": sessions * (words + 2),
            "rounds": rounds, "events_per_s_median": round(statistics.median(rates)),
            "events_per_s_all": [round(r) for r in rates]}


# -- resume ------------------------------------------------------------------------------
def write_session(db_path: Path, key: str, n: int) -> None:
    """A stored session of n messages, written straight into the store (one transaction for the rows)."""
    store = Store(str(db_path))
    store.create_session(key, model="echo", source="bench")
    store.close()
    now = time.time()
    rows = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        text = (f"message {i}: " + "lorem ipsum dolor sit amet " * (2 + i % 5)).strip()
        rows.append((key, role, text, None if role == "user" else "complete", now + i * 1e-3, now + i * 1e-3))
    db = sqlite3.connect(str(db_path), timeout=30)
    with db:
        db.executemany("INSERT INTO messages(session_key, role, text, status, created_at, updated_at)"
                       " VALUES (?,?,?,?,?,?)", rows)
        db.execute("UPDATE sessions SET message_count = ?, updated_at = ? WHERE key = ?", (n, now, key))
    db.close()


async def resumes(gw: Gateway, n_messages: int, rounds: int) -> dict:
    key = time.strftime("%Y%m%d_%H%M%S_") + f"{n_messages:06x}"[-6:]
    write_session(gw.data_dir / "sessions.db", key, n_messages)
    c = await Lean.open(gw.url)
    times, size = [], 0
    for _ in range(rounds):
        await wait_spare(gw)
        rid_fut = None
        t0 = time.perf_counter()
        rid_fut = await c.send("session.resume", {"session_id": key, "cols": 80})
        raw = await asyncio.wait_for(rid_fut, 60)
        took = time.perf_counter() - t0
        res = json.loads(raw)["result"]
        assert res["message_count"] == n_messages and len(res["messages"]) == n_messages
        size = len(raw)
        times.append(took)
        await c.call("session.close", {"session_id": res["session_id"]})
    await c.close()
    return {"messages": n_messages, "reply_bytes": size, **summary_ms(times)}


# -- main --------------------------------------------------------------------------------
async def main_async(quick: bool) -> dict:
    scale = 0.3 if quick else 1.0
    n_create, n_prompt = int(40 * scale) or 5, int(300 * scale) or 20
    result: dict[str, Any] = {"bench": "latency", "machine": machine(), "targets": TARGETS}
    gws: list[Gateway] = []
    try:
        warm = start_gateway("--warm-pool", "1")
        gws.append(warm)
        cold = start_gateway("--warm-pool", "0")
        gws.append(cold)
        off = start_gateway("--warm-pool", "1", "--persist", "false")
        gws.append(off)
        slow = start_gateway("--warm-pool", "1", "--echo-delay", "0.05")
        gws.append(slow)

        note("session.create: warm pool …")
        create_warm = await creates(warm, n_create, warm=True)
        note("session.create: empty pool (cold fork) …")
        create_cold = await creates(cold, n_create, warm=False)
        note("baseline: Popen of the real worker code, and of a minimal zmq+msgpack+sqlite3 hello …")
        popen_real = await asyncio.to_thread(popen_baseline, max(5, int(12 * scale)), True)
        popen_min = await asyncio.to_thread(popen_baseline, max(5, int(12 * scale)), False)
        p = {"popen_real_worker": summary_ms(popen_real), "popen_minimal_hello": summary_ms(popen_min)}
        w, cl = summary_ms(create_warm), summary_ms(create_cold)
        result["session_create"] = {
            "warm_pool": w, "empty_pool_cold_fork": cl, **p,
            "speedup_p50_vs_popen_real": {"warm": round(p["popen_real_worker"]["p50_ms"] / w["p50_ms"], 1),
                                          "cold": round(p["popen_real_worker"]["p50_ms"] / cl["p50_ms"], 1)},
        }

        note("prompt round trip, persistence on vs off (interleaved) …")
        ons, offs = await prompts_on_off(warm, off, n_prompt)
        on_s, off_s = summary_ms(ons), summary_ms(offs)
        result["prompt_round_trip"] = {"text": "ping", **on_s}
        result["persistence"] = {"on": on_s, "off": off_s,
                                 "overhead_p50_ms": round(on_s["p50_ms"] - off_s["p50_ms"], 3)}

        note("session.interrupt mid-turn …")
        result["interrupt"] = await interrupts(slow, max(10, int(30 * scale)))
        result["interrupt"]["send_to_complete_vs_prompt_round_trip_p50"] = round(
            result["interrupt"]["send_to_complete"]["p50_ms"] / on_s["p50_ms"], 2)

        note("events/s: 1 session, then 10 …")
        words = 5000
        one = await events_rate(warm, 1, words, 3)
        ten = await events_rate(warm, 10, words, 2 if not quick else 1)
        result["events"] = {"one_session": one, "ten_sessions": ten}

        note("session.resume of 1,000 and 20,000 stored messages …")
        result["resume"] = {"1k": await resumes(warm, 1000, 3), "20k": await resumes(warm, 20000, 3)}
    finally:
        for gw in gws:
            gw.stop()

    met = {
        "create_warm_p50_ms": result["session_create"]["warm_pool"]["p50_ms"] <= TARGETS["create_warm_p50_ms"],
        "create_cold_p50_ms": result["session_create"]["empty_pool_cold_fork"]["p50_ms"]
        <= TARGETS["create_cold_p50_ms"],
        "prompt_p50_ms": result["prompt_round_trip"]["p50_ms"] <= TARGETS["prompt_p50_ms"],
        "events_per_s": min(result["events"]["one_session"]["events_per_s_median"],
                            result["events"]["ten_sessions"]["events_per_s_median"]) >= TARGETS["events_per_s"],
        "persistence_overhead_p50_ms": result["persistence"]["overhead_p50_ms"]
        <= TARGETS["persistence_overhead_p50_ms"],
        "resume_20k_ms": result["resume"]["20k"]["p50_ms"] <= TARGETS["resume_20k_ms"],
        "interrupt_p99_ms": result["interrupt"]["send_to_complete"]["p99_ms"] <= TARGETS["interrupt_p99_ms"],
    }
    result["targets_met"] = met
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def human_lines(result: dict) -> list[str]:
    """One short line per figure, for a person at the terminal (the JSON on stdout is for tools)."""
    t, met = result["targets"], result["targets_met"]

    def mark(key: str) -> str:
        return "met" if met[key] else "MISSED"

    sc, ev = result["session_create"], result["events"]
    w, c, pop = sc["warm_pool"], sc["empty_pool_cold_fork"], sc["popen_real_worker"]
    pr, per, it = result["prompt_round_trip"], result["persistence"], result["interrupt"]["send_to_complete"]
    return [
        f"session.create, warm worker:   p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms "
        f"(target p50 ≤ {t['create_warm_p50_ms']:g} ms: {mark('create_warm_p50_ms')})",
        f"session.create, cold fork:     p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms "
        f"(target p50 ≤ {t['create_cold_p50_ms']:g} ms: {mark('create_cold_p50_ms')})",
        f"Popen of a worker (baseline):  p50 {pop['p50_ms']:.0f} ms, so create is "
        f"{sc['speedup_p50_vs_popen_real']['warm']:g}× faster warm, {sc['speedup_p50_vs_popen_real']['cold']:g}× cold",
        f"prompt round trip:             p50 {pr['p50_ms']:.2f} ms, p99 {pr['p99_ms']:.2f} ms "
        f"(target p50 ≤ {t['prompt_p50_ms']:g} ms: {mark('prompt_p50_ms')})",
        f"persistence overhead:          p50 {per['overhead_p50_ms']:.3f} ms per prompt "
        f"(target ≤ {t['persistence_overhead_p50_ms']:g} ms: {mark('persistence_overhead_p50_ms')})",
        f"interrupt to complete:         p50 {it['p50_ms']:.1f} ms, p99 {it['p99_ms']:.1f} ms "
        f"(target p99 ≤ {t['interrupt_p99_ms']:g} ms: {mark('interrupt_p99_ms')})",
        f"events to one client:          {ev['one_session']['events_per_s_median']:,}/s from 1 session, "
        f"{ev['ten_sessions']['events_per_s_median']:,}/s from 10 (target ≥ {t['events_per_s']:,}/s: "
        f"{mark('events_per_s')})",
        f"session.resume:                1,000 messages p50 {result['resume']['1k']['p50_ms']:.0f} ms, "
        f"20,000 p50 {result['resume']['20k']['p50_ms']:.0f} ms (target ≤ {t['resume_20k_ms']:g} ms: "
        f"{mark('resume_20k_ms')})",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(main_async(args.quick))
    result["bench_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=2), flush=True)
    note("\n".join(["", *human_lines(result), f"({result['bench_seconds']:g} s; the JSON above has every figure)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
