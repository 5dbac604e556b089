"""A fake OpenAI-compatible server on 127.0.0.1: streamed chat.completions and chosen failures.

Tests, benchmarks and manual runs share it:

    with FakeOpenAI(reply="hello there", delay=0.01) as fake:   # in-process, in a thread
        fake.base_url                                            # http://127.0.0.1:PORT/v1

    python -m tests.fake_openai --port 8099 --delay 0.05 --reply "hello there"

Each request's behaviour is its *mode*, picked (first match wins) from a directive
`[fake:MODE,key=value,...]` in the last user message, the `X-Fake-Mode` header,
the one-shot queue `fake.queue`, or the server default `fake.mode`. Directive keys:
`delay` (s per token), `reply`, `reasoning`.

Modes: `ok`; any HTTP status such as `401`, `429` (sends Retry-After), `500`, `503`;
`stall` (read the request, never answer); `stall-mid` (stream the first token, then
nothing); `malformed` (a first token, then a data line that is not JSON); `drop` (a
first token, then close the connection mid-body); `reset` (close without answering).
Connection refused needs no mode: use a port nobody listens on (`free_port()`).

Every request is recorded in `fake.requests` with how it ended, so a test can see
that an interrupted client really closed the stream.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIRECTIVE = re.compile(r"\[fake:([^\]]*)\]")
_PIECES = re.compile(r"\s*\S+\s*|\s+")
_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def split_tokens(text: str) -> list[str]:
    """The reply's pieces, one per streamed chunk; they join back to `text` exactly."""
    return _PIECES.findall(text)


def free_port() -> int:
    """A loopback port that nothing listens on right now (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Record:
    """One request the fake received and how it ended."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    mode: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    outcome: str = "open"  # complete | error | client-closed | stalled | dropped | malformed
    sent_tokens: int = 0

    @property
    def messages(self) -> list[dict]:
        return list(self.body.get("messages") or [])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: ten agents connecting at once overflowed it now and then,
    # and the kernel's SYN retry added a whole second to one of them (seen in bench/compare_hermes.py)
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets an idle keep-alive connection is normal here; anything else is printed."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeOpenAI:
    """The server; start()/stop() or use it as a context manager."""

    def __init__(self, reply: str = "Hello from the fake model.", delay: float = 0.0, port: int = 0,
                 mode: str = "ok", reasoning: str = "", api_key: str | None = None,
                 model: str = "fake-model", retry_after: str = "7") -> None:
        self.reply = reply
        self.delay = delay
        self.mode = mode
        self.reasoning = reasoning
        self.api_key = api_key  # when set, a request without `Bearer <api_key>` gets 401
        self.model = model
        self.retry_after = retry_after
        self.queue: deque[str] = deque()  # one-shot modes for the next requests
        self.requests: list[Record] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", self._port), handler)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def last(self) -> Record:
        return self.requests[-1]

    def wait_outcome(self, record: Record, timeout: float = 10.0) -> str:
        """Wait until `record` ended; returns its outcome."""
        deadline = time.monotonic() + timeout
        while record.ended is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return record.outcome

    # -- per-request choices --------------------------------------------------
    def _choose(self, headers: dict[str, str], body: dict) -> tuple[str, dict[str, str]]:
        opts: dict[str, str] = {}
        mode = ""
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1].get("content") if users else ""
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        found = _DIRECTIVE.search(str(content or ""))
        if found:
            for item in found.group(1).split(","):
                key, eq, value = item.strip().partition("=")
                if eq:
                    opts[key.strip()] = value
                elif key:
                    mode = key
        with self._lock:
            if not mode:
                mode = headers.get("x-fake-mode", "")
            if not mode and self.queue:
                mode = self.queue.popleft()
        return mode or self.mode, opts


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- routes ---------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": self.fake.model, "object": "model",
                                                         "owned_by": "fake"}]})
        else:
            self._json(404, _error_body("not found", "invalid_request_error"))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        mode, opts = self.fake._choose(headers, body if isinstance(body, dict) else {})
        rec = Record(self.path, headers, body if isinstance(body, dict) else {}, mode)
        self.fake.requests.append(rec)
        try:
            self._serve(rec, opts)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            rec.outcome = "client-closed"
            self.close_connection = True
        finally:
            rec.ended = time.monotonic()

    # -- behaviour ------------------------------------------------------------
    def _serve(self, rec: Record, opts: dict[str, str]) -> None:
        fake, mode = self.fake, rec.mode
        if not self.path.rstrip("/").endswith("/chat/completions"):
            rec.outcome = "error"
            self._json(404, _error_body(f"unknown path {self.path}", "invalid_request_error"))
            return
        if fake.api_key is not None and rec.headers.get("authorization") != f"Bearer {fake.api_key}":
            rec.outcome = "error"
            self._json(401, _error_body("Incorrect API key provided.", "invalid_request_error",
                                        "invalid_api_key"))
            return
        if mode.isdigit():
            rec.outcome = "error"
            code = int(mode)
            extra = {"Retry-After": fake.retry_after} if code == 429 else {}
            kind = "rate_limit_exceeded" if code == 429 else "server_error" if code >= 500 else "invalid_request_error"
            self._json(code, _error_body(f"fake failure {code}", kind), extra)
            return
        if mode == "reset":
            rec.outcome = "dropped"
            self._drop()
            return
        if mode == "stall":
            rec.outcome = self._stall()
            return
        reply = opts.get("reply", fake.reply)
        reasoning = opts.get("reasoning", fake.reasoning)
        delay = float(opts.get("delay", fake.delay))
        if not rec.body.get("stream"):
            self._whole(rec, reply, reasoning)
            return
        self._stream(rec, mode, reply, reasoning, delay)

    def _stream(self, rec: Record, mode: str, reply: str, reasoning: str, delay: float) -> None:
        fake = self.fake
        include_usage = bool((rec.body.get("stream_options") or {}).get("include_usage"))
        cid, created, model = f"chatcmpl-fake{len(fake.requests)}", int(time.time()), rec.body.get("model") or fake.model
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(delta: dict, finish: str | None = None, usage: Any = None, choices: bool = True) -> None:
            obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
            if include_usage:
                obj["usage"] = usage
            self._event(json.dumps(obj))

        chunk({"role": "assistant", "content": ""})
        for piece in split_tokens(reasoning):
            chunk({"reasoning_content": piece})
        tokens = split_tokens(reply)
        for i, piece in enumerate(tokens):
            if i and delay and self._pause(delay):
                rec.outcome = "client-closed" if not fake.stopping.is_set() else "stalled"
                return
            chunk({"content": piece})
            rec.sent_tokens += 1
            if mode in ("stall-mid", "malformed", "drop"):
                break
        if mode == "stall-mid":
            rec.outcome = self._stall()
            return
        if mode == "malformed":
            self._event('{"choices": [{"delta": {"content": "broken')
            self._end()
            rec.outcome = "malformed"
            return
        if mode == "drop":
            rec.outcome = "dropped"
            self._drop()
            return
        chunk({}, finish="stop")
        if include_usage:
            prompt = _count_words(rec.messages)
            chunk({}, usage={"prompt_tokens": prompt, "completion_tokens": len(tokens),
                             "total_tokens": prompt + len(tokens)}, choices=False)
        self._event("[DONE]")
        self._end()
        rec.outcome = "complete"

    def _whole(self, rec: Record, reply: str, reasoning: str) -> None:
        prompt, out = _count_words(rec.messages), len(split_tokens(reply))
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if reasoning:
            message["reasoning_content"] = reasoning
        self._json(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                         "model": rec.body.get("model") or self.fake.model,
                         "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}})
        rec.outcome = "complete"

    # -- wire helpers ---------------------------------------------------------
    def _json(self, code: int, obj: dict, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code, _REASONS.get(code))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _stall(self) -> str:
        """Say nothing until the client goes away (-> client-closed) or the server stops (-> stalled)."""
        self._pause(None)
        return "stalled" if self.fake.stopping.is_set() else "client-closed"

    def _pause(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: for ever); True, ending the connection, if the client went away or we stop."""
        deadline = None if seconds is None else time.monotonic() + seconds
        sock = self.connection
        while not self.fake.stopping.is_set():
            left = 0.02 if deadline is None else min(0.02, deadline - time.monotonic())
            if left <= 0:
                return False
            readable, _, _ = select.select([sock], [], [], left)
            if readable:  # a streaming client sends nothing more: readable means it went away
                try:
                    sock.settimeout(0.02)
                    if not sock.recv(4096):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
                finally:
                    sock.settimeout(None)
        self.close_connection = True
        return True


def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _count_words(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").split()) for m in messages if isinstance(m, dict))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fake_openai", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds between streamed tokens")
    p.add_argument("--reply", default="Hello from the fake model.")
    p.add_argument("--reasoning", default="")
    p.add_argument("--mode", default="ok", help="default mode for every request (see the module doc)")
    p.add_argument("--api-key", default=None, help="require this bearer key (401 otherwise)")
    p.add_argument("--model", default="fake-model")
    args = p.parse_args(argv)
    fake = FakeOpenAI(reply=args.reply, delay=args.delay, port=args.port, mode=args.mode,
                      reasoning=args.reasoning, api_key=args.api_key, model=args.model).start()
    print(json.dumps({"url": fake.base_url, "port": fake.port}), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.1):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
