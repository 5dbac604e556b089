"""Issue 13 item 1: a spare rehearses an agent build before it is handed a session, and leaves no trace of it;
and Hermes' CA-bundle check is kept per bundle file, never for a failure."""

from __future__ import annotations

import re
import shutil
import sqlite3

import pytest

from tests.client import Client
from tests.conftest import run, wait_for
from tests.test_hermes_runtime import REPLY, fake, gw  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)


def test_a_spare_rehearses_and_the_session_still_builds_its_own_agent(gw):
    wait_for(lambda: "spare rehearsed an agent build" in gw.log(), 20, what="a spare's rehearsal in the log")

    async def go():
        c = await Client.open(gw.url)
        try:
            created = await c.call("session.create", {"cols": 80}, timeout=20)
            sid, key = created["session_id"], created["stored_session_id"]
            info = await c.wait_event(lambda e: e["type"] == "session.info" and e.get("session_id") == sid, 30)
            assert info["payload"].get("model")
            done = await c.turn(sid, "hello", timeout=60)
            assert done["payload"]["text"] == REPLY
            assert all("gateway-rehearsal" not in str(e) for e in c.by_session[sid])  # nothing of it goes out
            await c.call("session.close", {"session_id": sid})
            return key
        finally:
            await c.close()

    key = run(go(), 80)
    with sqlite3.connect(f"file:{gw.data_dir / 'hermes-home' / 'state.db'}?mode=ro", uri=True) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM sessions")]
    assert key in ids and not [i for i in ids if "rehearsal" in i]  # the rehearsal wrote no row
    # the agent build and the first model request took TLS contexts the spare made in its idle time
    took = wait_for(lambda: re.findall(r"session's start took (\d+) TLS contexts from the spare's stock", gw.log()),
                    10, what="the stock's use in the log")
    assert int(took[0]) >= 2 and re.search(r"spare stocked [1-9]\d* TLS contexts", gw.log())
    # and its build took the endpoint's context-length probes started at create time (the fake server is local)
    assert int(re.findall(r"(\d+) endpoint probes answered early", gw.log())[0]) >= 1


def test_the_ca_bundle_check_is_kept_per_file_and_never_for_a_failure(tmp_path):
    pytest.importorskip("agent.ssl_guard")
    import certifi
    from agent import ssl_guard

    from worker.hermes import ca_check

    calls: list[str] = []
    original = getattr(ssl_guard._validate_bundle_path, "__wrapped__", ssl_guard._validate_bundle_path)

    def counted(label, value, *, require_substantial=False):
        calls.append(value)
        return original(label, value, require_substantial=require_substantial)

    check = ca_check._memoized(counted)
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    check("certifi", str(bundle), require_substantial=True)
    check("certifi", str(bundle), require_substantial=True)
    assert len(calls) == 1  # the same file: checked once
    bundle.write_text("not a certificate\n" * 100)  # replaced: checked again, and it fails as Hermes' does
    for _ in range(2):
        with pytest.raises(ssl_guard.SSLConfigurationError):
            check("certifi", str(bundle), require_substantial=True)
    assert len(calls) == 3  # a failure is never kept
