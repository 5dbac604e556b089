"""GET /metrics on the gateway's own HTTP port, in the Prometheus text format (prometheus-client).

A custom collector reads the broker's tables at scrape time, so nothing is counted
twice and the worker counts are the same ones `hermes-ps` shows. Access: the same
token as the WebSocket (`?token=` or `Authorization: Bearer`), or, with
`--metrics-auth loopback`, any client connecting from a loopback address.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections import Counter
from http import HTTPStatus
from typing import Iterator

import psutil
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from aiohttp import web

from protocol import __version__
from supervisor.ops.control import with_figures
from supervisor.ops.port import Supervised
from supervisor.ops.sampler import Sampler

PATH = "/metrics"
NS = "hermes_gateway"
STOP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class GatewayCollector:
    def __init__(self, gateway: Supervised, sampler: Sampler) -> None:
        self.gateway = gateway
        self.sampler = sampler
        self.me = psutil.Process(os.getpid())

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        snap = g.snapshot()
        rows = [with_figures(r, self.sampler.figures.get(r["pid"])) for r in snap.workers]

        info = GaugeMetricFamily(f"{NS}_info", "Build and runtime of this gateway", labels=["version", "runtime", "agent"])
        info.add_metric([__version__, g.cfg.runtime, g.cfg.agent], 1)
        yield info
        yield GaugeMetricFamily(f"{NS}_uptime_seconds", "Seconds since the gateway started",
                                value=time.time() - g.started_at)
        yield GaugeMetricFamily(f"{NS}_accepting", "1 while new sessions are accepted (0: draining)",
                                value=1 if snap.gateway["accepting"] else 0)

        by_kind_state = Counter((r["kind"], r["state"]) for r in rows)
        workers = GaugeMetricFamily(f"{NS}_workers", "Worker processes by kind and state", labels=["kind", "state"])
        for kind in ("session", "lobby", "spare"):  # always present, so a dashboard shows 0, not "no data"
            by_kind_state.setdefault((kind, "idle"), 0)
        for (kind, state), n in sorted(by_kind_state.items()):
            workers.add_metric([kind, state], n)
        yield workers

        counts = snap.gateway["counts"]
        sessions = GaugeMetricFamily(f"{NS}_sessions", "Live sessions by attachment", labels=["attachment"])
        sessions.add_metric(["attached"], counts["attached"])
        sessions.add_metric(["detached"], counts["detached"])
        yield sessions
        yield GaugeMetricFamily(f"{NS}_clients", "Connected WebSocket clients", value=counts["clients"])

        reaps = CounterMetricFamily(f"{NS}_reaps", "Workers stopped, by reason", labels=["reason"])
        for reason, n in sorted(snap.gateway["reaps"].items()):
            reaps.add_metric([reason], n)
        yield reaps

        rpcs = CounterMetricFamily(f"{NS}_rpc", "Client calls by method and outcome (ok or error code)",
                                   labels=["method", "outcome"])
        for (method, outcome), n in sorted(snap.rpc_counts.items()):
            rpcs.add_metric([method, outcome], n)
        yield rpcs

        rejected = CounterMetricFamily(f"{NS}_ws_rejected", "WebSocket connections refused, by reason",
                                       labels=["reason"])
        for reason, n in sorted(snap.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected

        rss = GaugeMetricFamily(f"{NS}_worker_rss_bytes", "Sum of worker resident memory, by kind", labels=["kind"])
        uss = GaugeMetricFamily(f"{NS}_worker_uss_bytes", "Sum of worker unique memory, by kind", labels=["kind"])
        for kind in ("session", "lobby", "spare"):
            rss.add_metric([kind], sum(r["rss"] for r in rows if r["kind"] == kind))
            uss.add_metric([kind], sum(r["uss"] for r in rows if r["kind"] == kind))
        yield rss
        yield uss
        yield GaugeMetricFamily(f"{NS}_heartbeat_age_max_seconds", "Longest silence of any live worker",
                                value=max((r["heartbeat_age"] for r in rows  # the dashboard's rows have none
                                           if r["pid"] and not r["stopping"] and r["heartbeat_age"] is not None),
                                          default=0.0))

        try:
            with self.me.oneshot():
                mem, threads, fds = self.me.memory_info().rss, self.me.num_threads(), self.me.num_fds()
        except (psutil.Error, AttributeError):
            mem = threads = fds = 0
        yield GaugeMetricFamily(f"{NS}_broker_rss_bytes", "Broker resident memory (current, not peak)", value=mem)
        yield GaugeMetricFamily(f"{NS}_broker_threads", "Broker threads", value=threads)
        yield GaugeMetricFamily(f"{NS}_broker_fds", "Broker open file descriptors", value=fds)


class Metrics:
    def __init__(self, gateway: Supervised, sampler: Sampler) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway, sampler))
        ProcessCollector(namespace=NS, registry=self.registry)
        self.stop_seconds = Histogram(f"{NS}_stop_duration_seconds", "Stop ladder durations (ask to reaped)",
                                      buckets=STOP_BUCKETS, registry=self.registry)
        gateway.on_worker_stopped(lambda _reason, took: self.stop_seconds.observe(took))

    def install(self) -> None:
        self.gateway.add_route(PATH, self.handle)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def allowed(self, request: web.Request) -> tuple[bool, HTTPStatus, str]:
        cfg = self.gateway.cfg
        if cfg.metrics_auth == "loopback":
            host = request.remote or ""
            if _is_loopback(host):
                return True, HTTPStatus.OK, ""
            return False, HTTPStatus.FORBIDDEN, "forbidden: /metrics is loopback-only (--metrics-auth loopback)\n"
        token = self.gateway.token.encode()
        supplied = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            supplied = auth[7:].strip()
        if token and hmac.compare_digest(supplied.encode(), token):
            return True, HTTPStatus.OK, ""
        return False, HTTPStatus.UNAUTHORIZED, "unauthorized: give the gateway token (?token= or Authorization: Bearer)\n"

    async def handle(self, request: web.Request) -> web.Response:
        ok, status, why = self.allowed(request)
        if not ok:
            headers = {"WWW-Authenticate": 'Bearer realm="hermes-gateway"'} if status == HTTPStatus.UNAUTHORIZED else {}
            return web.Response(status=status, text=why, headers=headers)
        body, content_type = self.render(request.headers.get("Accept"))
        return web.Response(status=200, body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
