"""What a browser leaves behind: Hermes' own `hermes dashboard` alone vs. the gateway's --dashboard.

The same browser scenario against each (chromium via Playwright): /chat loads and its TUI draws,
2 refreshes with cleared storage, then "New chat"; the browser closes; after --wait seconds the
server's process tree is counted. Prints one JSON document.

    python bench/dashboard_leftovers.py [--wait 15] [--grace 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-webgl"]


def tree(pid: int) -> dict:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return {}
    out = {"processes": 0, "threads": 0, "rss_mb": 0.0, "node_tuis": 0}
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            out["processes"] += 1
            out["threads"] += p.num_threads()
            out["rss_mb"] += p.memory_info().rss / 2**20
            out["node_tuis"] += "tui_dist/entry.js" in " ".join(p.cmdline())
        except psutil.Error:
            pass
    out["rss_mb"] = round(out["rss_mb"], 1)
    return out


def browse(url: str) -> None:
    from playwright.sync_api import sync_playwright

    def screen(page) -> str:
        return page.evaluate("() => Array.from(document.querySelectorAll('.xterm-rows')).map(e => e.innerText).join('')")

    def drawn(page) -> None:
        deadline = time.monotonic() + 60
        while "❯" not in screen(page) and time.monotonic() < deadline:
            time.sleep(0.3)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".xterm-rows", timeout=60000)
        drawn(page)
        for _ in range(2):
            page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
            page.reload(wait_until="load")
            page.wait_for_selector(".xterm-rows", timeout=60000)
            drawn(page)
        page.get_by_role("button", name=re.compile("new chat", re.I)).first.click(timeout=10000)
        drawn(page)
        time.sleep(2)
        browser.close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, argv: list[str], env: dict, port: int, wait: float) -> dict:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        import urllib.request
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{name} did not start")
                time.sleep(0.3)
        time.sleep(2)
        idle = tree(proc.pid)
        browse(f"http://127.0.0.1:{port}/chat")
        time.sleep(wait)
        return {"before_browser": idle, f"after_close_plus_{wait:g}s": tree(proc.pid)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--wait", type=float, default=15.0)
    p.add_argument("--grace", type=float, default=5.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hg-bench-dash-"))
    env = dict(os.environ)
    port = free_port()
    alone = measure("hermes dashboard", [str(BIN / "hermes"), "dashboard", "--port", str(port), "--no-open",
                                         "--skip-build"], {**env, "HERMES_HOME": str(tmp / "home")}, port, args.wait)
    port = free_port()
    gateway = measure("hermes-gateway --dashboard",
                      [str(BIN / "hermes-gateway"), "run", "--dashboard", "--port", str(port), "--reap-grace",
                       str(args.grace), "--runtime-dir", str(tmp / "run"), "--data-dir", str(tmp / "data")],
                      {k: v for k, v in env.items() if not k.startswith("HERMES_GATEWAY_")}, port, args.wait)
    print(json.dumps({"scenario": "chat, 2 cleared-storage refreshes, New chat, browser closed",
                      "reap_grace": args.grace, "hermes_dashboard_alone": alone, "gateway_dashboard": gateway},
                     indent=1))


if __name__ == "__main__":
    main()
