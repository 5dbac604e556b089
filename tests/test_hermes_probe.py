"""Issue 13: the endpoint probes a spare's rehearsal made are made again when the session is created, and the
session's build takes each answer once instead of asking again; other arguments, or a second ask, go to the
endpoint as in Hermes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("agent") is None:
    pytest.skip("hermes-agent is not installed (make test installs it)", allow_module_level=True)

_CASE = textwrap.dedent("""
    import json, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from agent import model_metadata as mm
    from worker.hermes import probe

    seen = []

    class Endpoint(BaseHTTPRequestHandler):  # an OpenAI-compatible server that does not say its context length
        protocol_version = "HTTP/1.1"

        def answer(self):
            seen.append(self.path)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            found = self.path.rstrip("/").endswith("/models")
            body = json.dumps({"object": "list", "data": [{"id": "fake-model"}]} if found else {}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    if True:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        n = lambda: len(seen)
        assert probe.install()
        probe.record(True)                       # the rehearsal's build
        first = mm._query_local_context_length("fake-model", url)
        asked = n()
        assert asked >= 1
        probe.record(False)
        mm._query_local_context_length("fake-model", url)  # not recorded: outside the rehearsal
        base = n()
        asked = base - asked  # what one probe asks once the server's type is known (Hermes keeps that an hour)
        assert probe.start() == 1                # the session is created: the same probe, once
        assert probe.start() == 0                # nothing recorded any more
        deadline = time.monotonic() + 10
        while n() < base + asked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert n() == base + asked, (n(), base, asked)
        assert mm._query_local_context_length("fake-model", url) == first  # the build takes that answer ...
        assert n() == base + asked and probe.stats["taken"] == 1      # ... and asks nothing
        mm._query_local_context_length("fake-model", url)                    # a second ask goes out again
        assert n() == base + 2 * asked
        mm._query_local_context_length("other-model", url)                   # other arguments: asked
        assert n() > base + 2 * asked and probe.stats["taken"] == 1
    print("ok")
""")


def test_the_rehearsals_probes_start_at_create_and_are_taken_once(tmp_path):
    env = dict(os.environ, HERMES_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _CASE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
