"""The tables a restart hands over, as plain data (msgpack): workers, sessions with their replay buffers, counts.

Times are sent as ages (monotonic clocks differ between processes). Every client is
disconnected at the cut, so every session arrives detached, its grace clock started
at the cut; its replay buffer and delivered seq let a resuming client get exactly
what it missed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from protocol import lifecycle
from supervisor.broker.broker import Broker
from supervisor.broker.table import Session, Worker


def dump(b: Broker, now: float) -> dict[str, Any]:
    workers = []
    for w in b.workers.values():
        if not w.pid:
            continue  # its fork is not reported yet: the successor kills it when it is (unknown ident)
        stopping = w.stopping or ""
        if not stopping and w.kind == lifecycle.SESSION and w.session is None:
            stopping = lifecycle.Reason.SURPLUS  # claimed by a create in flight whose client is cut off
        workers.append({
            "ident": w.ident, "kind": w.kind, "pid": w.pid, "create_time": w.create_time, "state": w.state,
            "ready": w.ready, "stopping": stopping, "age": now - w.spawned_at, "seq": w.seq,
            "meta": dict(w.meta), "caps": sorted(w.caps), "zygote": w.zygote or b.launcher.pid,
        })
    sessions = []
    for s in b.sessions.sessions.values():
        if s.worker.stopping:
            continue
        sessions.append({
            "sid": s.sid, "key": s.key, "worker": s.worker.ident, "created_at": s.created_at,
            "idle": now - s.last_active, "detached_for": now - s.detached_at if s.detached_at is not None else 0.0,
            "close_on_disconnect": s.close_on_disconnect, "delivered_seq": s.delivered_seq,
            "replay": [[seq, data] for seq, data in s.replay], "dropped_upto": s.dropped_upto,
        })
    return {"v": 1, "workers": workers, "sessions": sessions, "reaps": dict(b.reaps),
            "end_notes": list(b.end_notes.waiting), "accepting": b.accepting}


def load(b: Broker, state: dict[str, Any], now: float) -> list[tuple[Worker, str]]:
    """Fill a fresh broker's tables from a predecessor's; returns the adopted workers (held until released),
    each with the reason to stop it ("" to keep it: a session's)."""
    loop = asyncio.get_running_loop()
    adopted: list[tuple[Worker, str]] = []
    by_ident: dict[bytes, Worker] = {}
    for row in state["workers"]:
        ready = bool(row["ready"])
        w = Worker(ident=row["ident"], kind=row["kind"], spawned_at=now - float(row["age"]), ready=ready,
                   state=row["state"], last_heartbeat=now, seq=int(row["seq"]), meta=row["meta"],
                   caps=frozenset(row["caps"]), hello=loop.create_future(), exited=loop.create_future())
        if ready:
            w.hello.set_result(True)
        w.zygote = int(row["zygote"])  # a predecessor's: it reports this worker's exit
        b.workers.add(w)
        b.workers.launched(w, int(row["pid"]), float(row["create_time"]))
        by_ident[w.ident] = w
        # the predecessor's lobby and spares run the old code: replaced by ours; sessions are kept
        reason = str(row["stopping"] or "")
        if not reason and w.kind != lifecycle.SESSION:
            reason = lifecycle.Reason.SURPLUS
        adopted.append((w, reason))
    for row in state["sessions"]:
        w = by_ident.get(row["worker"])
        if w is None:
            continue
        s = Session(sid=row["sid"], key=row["key"], worker=w, created_at=float(row["created_at"]),
                    detached_at=now - float(row["detached_for"]) if row["detached_for"] else now,
                    last_active=now - float(row["idle"]), close_on_disconnect=bool(row["close_on_disconnect"]),
                    delivered_seq=int(row["delivered_seq"]), dropped_upto=int(row["dropped_upto"]))
        s.replay = deque((int(seq), bytes(data)) for seq, data in row["replay"])
        s.replay_bytes = sum(len(data) for _, data in s.replay)
        b.sessions.restore(s)
        b.workers.journal.update(w.pid, kind=lifecycle.SESSION, session=s.key or s.sid)
    b.reaps.update(state.get("reaps") or {})
    if not state.get("accepting", True):
        b.set_accepting(False)  # a drained gateway stays drained across a restart
    for data in state.get("end_notes") or []:
        b.end_notes.waiting.append(bytes(data))
    return adopted

