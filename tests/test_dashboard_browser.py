"""The dashboard's /chat in a real browser (Debian's chromium via Playwright) through the gateway's port."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
import uuid

import psutil
import pytest

from tests.conftest import BIN, wait_for

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-webgl"]
GRACE = 3


def _skip_reason() -> str | None:
    if importlib.util.find_spec("hermes_cli") is None:
        return "hermes-agent (the hermes extra) is not installed: make test installs it"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: the test extra has it"
    if not os.path.exists(CHROMIUM) or shutil.which("node") is None:
        return f"{CHROMIUM} or node is missing: make test installs chromium with apt (root only)"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""), pytest.mark.timeout(150)]


def _tuis(gw) -> list[int]:
    out = []
    for p in gw.descendants():
        try:
            if "tui_dist/entry.js" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def _screen(page) -> str:
    return page.evaluate("() => Array.from(document.querySelectorAll('.xterm-rows')).map(e => e.innerText).join('\\n')")


def _footer(page) -> int | None:
    found = re.findall(r"(\d+) sessions?", _screen(page))
    return int(found[-1]) if found else None


def test_chat_in_a_browser_refreshes_keep_one_session_and_closing_reaps_everything(gateway_factory):
    from playwright.sync_api import sync_playwright

    gw = gateway_factory("--dashboard", "--reap-grace", str(GRACE), "--list-grace", "1")
    url = f"http://127.0.0.1:{gw.port}/chat"
    marker = uuid.uuid4().hex[:8]
    prompt = f"echo this back {marker}"  # the echo agent's reply is the prompt
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector(".xterm-rows", timeout=30000)
            wait_for(lambda: "❯" in _screen(page), 40, 0.3, "the TUI's prompt in the page")
            page.locator(".xterm-helper-textarea").first.focus()
            page.keyboard.type(prompt, delay=20)
            wait_for(lambda: marker in _screen(page), 10, 0.2, "the typed prompt in the page")
            page.wait_for_timeout(300)  # a keystroke in the same chunk as the text reads as a paste
            page.keyboard.press("Enter")
            try:
                wait_for(lambda: _screen(page).count(marker) >= 2, 40, 0.3, "the reply rendered in the page")
            except AssertionError:
                print("SCREEN:", _screen(page))
                raise
            wait_for(lambda: len(gw.session_workers()) >= 1, 10, what="the TUI's session worker")
            stable = set(gw.session_workers())
            feeds: list[list[str]] = []  # frames of each page's /api/events, newest page last

            def on_ws(ws) -> None:
                if "/api/events" in ws.url:
                    frames: list[str] = []
                    feeds.append(frames)
                    ws.on("framereceived", lambda payload: frames.append(str(payload)))
            page.on("websocket", on_ws)
            for _ in range(5):
                page.reload(wait_until="load")
                page.wait_for_selector(".xterm-rows", timeout=30000)
                wait_for(lambda: "❯" in _screen(page) and _footer(page) is not None, 40, 0.3,
                         "the TUI again after a refresh")
                assert _footer(page) <= 2, _screen(page)
                # the same PTY and TUI: its session stays on the same worker pid (the sidebar's is new each time)
                wait_for(lambda: len(gw.session_workers()) <= 2, 10, 0.2, "at most the TUI's and the sidebar's worker")
                stable &= set(gw.session_workers())
                assert len(stable) == 1 and len(_tuis(gw)) == 1, (stable, gw.session_workers(), _tuis(gw))
            # better than Hermes alone: the refreshed page's sidebar feed gets the reattached chat's events
            wait_for(lambda: feeds, 10, what="the refreshed page's /api/events")
            before = len(feeds[-1])
            again = f"and again {marker}"
            page.locator(".xterm-helper-textarea").first.focus()
            page.keyboard.type(again, delay=20)
            wait_for(lambda: again in _screen(page), 10, 0.2, "the second prompt in the page")
            page.wait_for_timeout(300)
            page.keyboard.press("Enter")
            wait_for(lambda: _screen(page).count(again) >= 2, 40, 0.3, "the second reply")
            wait_for(lambda: len(feeds[-1]) > before, 10, 0.2, "events on the refreshed page's /api/events")
            for _ in range(2):  # cleared storage: a new attach token, so a new PTY and TUI
                page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
                page.reload(wait_until="load")
                page.wait_for_selector(".xterm-rows", timeout=30000)
                wait_for(lambda: "❯" in _screen(page), 40, 0.3, "a fresh TUI after clearing storage")
            page.get_by_role("button", name=re.compile("new chat", re.I)).first.click(timeout=10000)
            wait_for(lambda: "❯" in _screen(page), 40, 0.3, "the TUI after New chat")
            wait_for(lambda: len(_tuis(gw)) >= 2, 20, 0.3, "the new tabs' TUIs")
        finally:
            browser.close()
    t0 = time.monotonic()
    wait_for(lambda: not _tuis(gw) and not gw.session_workers(), GRACE * 3 + 15, 0.3,
             "no TUI and no session worker after the browser closed")
    ps = subprocess.run([str(BIN / "hermes-ps"), "-a", "--runtime-dir", str(gw.runtime_dir)],
                        capture_output=True, text=True, timeout=20).stdout
    rows = [line for line in ps.splitlines()[2:] if line.strip()]
    assert all(line.startswith("(") for line in rows), ps  # only the lobby and the spare, no session
    print(f"\nreclaimed {time.monotonic() - t0:.1f} s after the browser closed (reap_grace {GRACE})")
