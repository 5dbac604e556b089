"""The `openai` agent: tool-free turns streamed from any OpenAI-compatible chat.completions endpoint.

httpx gives us streaming with separate connect/read timeouts and a response that
closes its connection when abandoned. An interrupt must also end a read that is
blocked on a silent server, and closing a socket from another thread does not wake
a blocked recv on Linux; so a watcher thread shuts the turn's socket down
(SHUT_RDWR), which does. Sockets are learnt from httpx's documented `trace`
extension, so a stall before the response headers is interruptible too.

Imported by the fork server when `--agent openai`, so workers pay neither for importing
httpx (~180 ms) nor for loading the CA bundle (~70 ms, ~1.7 MiB, shared copy-on-write).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from typing import Any, Generator, Iterable, Iterator

import httpcore  # noqa: F401  (httpx imports it on first use: preload it with us)
import httpx

from worker.agents.base import AgentEvent, TurnResult

DEFAULT_TIMEOUT = 120.0  # s of silence from the server before a turn fails
CONNECT_TIMEOUT = 10.0
WATCH_INTERVAL = 0.02  # s: how often an interrupt is looked for while a read blocks
KEY_ENV = ("HERMES_GATEWAY_OPENAI_API_KEY", "OPENAI_API_KEY")
_ERROR_BODY_LIMIT = 4096
_TLS = httpx.create_ssl_context()  # built once, before the fork


class KeyFileError(Exception):
    """The configured API key file cannot be used (missing, empty, or readable by others)."""


class MalformedStream(Exception):
    pass


def load_api_key(key_file: str, environ: dict[str, str] | os._Environ) -> str | None:
    """The key from `key_file` (must be 0600 or stricter), else from the environment, else None."""
    if key_file:
        path = os.path.expanduser(key_file)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyFileError(f"API key file {path} does not exist") from None
        except OSError as exc:
            raise KeyFileError(f"cannot open API key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"API key file {path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyFileError(f"API key file {path} is open to other users (mode {mode:04o}); "
                                   f"refusing to use it: run `chmod 600 {path}`")
            key = fh.read(64 * 1024).decode("utf-8", "replace").strip()
        if not key:
            raise KeyFileError(f"API key file {path} is empty")
        return key
    for name in KEY_ENV:
        if environ.get(name):
            return environ[name].strip()
    return None


class _Connection:
    """An httpx client plus the sockets it opened, so an interrupt can shut them down."""

    def __init__(self, timeout: float) -> None:
        self.client = httpx.Client(
            verify=_TLS,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=1),
            headers={"user-agent": "hermes-supervisor"})
        self._streams: list[Any] = []
        self._lock = threading.Lock()

    def trace(self, name: str, info: dict) -> None:
        """httpx `trace` callback: remember each new connection's network stream."""
        if name in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.remember(info.get("return_value"))

    def remember(self, stream: Any) -> None:
        if stream is None:
            return
        with self._lock:
            self._streams = [s for s in self._streams if _sock(s) is not None] + [stream]

    def shutdown(self) -> None:
        """Wake any read blocked on this client's sockets: they see EOF at once."""
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            sock = _sock(s)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.client.close()


def _sock(stream: Any) -> socket.socket | None:
    try:
        sock = stream.get_extra_info("socket")
        return sock if sock is not None and sock.fileno() != -1 else None
    except Exception:
        return None


class _Watcher:
    """For one turn: when `cancel` is set, shut the connection's sockets down."""

    def __init__(self, cancel: threading.Event, conn: _Connection) -> None:
        self.cancel, self.conn, self.done = cancel, conn, threading.Event()
        self.thread = threading.Thread(target=self._run, name="openai-interrupt", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.cancel.wait(WATCH_INTERVAL):
                if not self.done.is_set():
                    self.conn.shutdown()
                return

    def stop(self) -> None:
        self.done.set()


class OpenAIAgent:
    name = "openai"

    def __init__(self, base_url: str, model: str, key_file: str = "", system_prompt: str = "",
                 timeout: float = DEFAULT_TIMEOUT, environ: dict[str, str] | None = None) -> None:
        self.base_url = base_url.strip().rstrip("/")
        self.model = model.strip()
        self.key_file = key_file
        self.system_prompt = system_prompt
        self.timeout = float(timeout)
        self.environ = os.environ if environ is None else environ
        self.origin = self.base_url.split("://", 1)[-1].split("/", 1)[0] or "the server"
        self._conn: _Connection | None = None
        self._conn_busy = threading.Lock()  # the session's turns share one client; a concurrent turn gets its own

    @classmethod
    def from_config(cls, config: dict) -> "OpenAIAgent":
        return cls(str(config.get("openai_base_url") or ""), str(config.get("openai_model") or ""),
                   str(config.get("openai_api_key_file") or ""), str(config.get("openai_system_prompt") or ""),
                   float(config.get("openai_timeout") or DEFAULT_TIMEOUT))

    def config_problem(self) -> str | None:
        if not self.base_url:
            return "the openai agent has no endpoint: set --openai-base-url (e.g. https://api.openai.com/v1)"
        if not self.base_url.startswith(("http://", "https://")):
            return f"--openai-base-url must start with http:// or https:// (got {self.base_url!r})"
        if not self.model:
            return "the openai agent has no model: set --openai-model"
        return None

    def messages(self, text: str, history: list[dict]) -> list[dict]:
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for m in history:  # interrupted/failed turns can leave empty replies: servers may reject those
            if m.get("role") in ("user", "assistant", "system") and m.get("content"):
                out.append({"role": m["role"], "content": m["content"]})
        out.append({"role": "user", "content": text})
        return out

    # -- a turn -----------------------------------------------------------------
    def run_turn(self, text: str, history: list[dict], cancel: threading.Event) -> Generator[AgentEvent, None, TurnResult]:
        problem = self.config_problem()
        if problem:
            return TurnResult(status="error", error=problem)
        try:
            key = load_api_key(self.key_file, self.environ)  # read per turn: a fixed or rotated key needs no restart
        except KeyFileError as exc:
            return TurnResult(status="error", error=str(exc))
        if cancel.is_set():
            return TurnResult(status="interrupted")
        conn, shared = self._acquire()
        watcher = _Watcher(cancel, conn)
        try:
            return (yield from self._stream(conn, text, history, key, cancel))
        except MalformedStream as exc:
            return self._failed(cancel, f"malformed stream from {self.origin}: {exc}")
        except httpx.HTTPError as exc:
            return self._failed(cancel, self._describe(exc))
        finally:
            watcher.stop()
            self._release(conn, shared)

    def _acquire(self) -> tuple[_Connection, bool]:
        if self._conn_busy.acquire(blocking=False):
            if self._conn is None:
                self._conn = _Connection(self.timeout)
            return self._conn, True
        return _Connection(self.timeout), False

    def _release(self, conn: _Connection, shared: bool) -> None:
        if shared:
            self._conn_busy.release()
        else:
            conn.close()

    def _failed(self, cancel: threading.Event, error: str) -> TurnResult:
        if cancel.is_set():  # the error is our own shutdown of the socket
            return TurnResult(status="interrupted")
        return TurnResult(status="error", error=error)

    def _stream(self, conn: _Connection, text: str, history: list[dict], key: str | None,
                cancel: threading.Event) -> Generator[AgentEvent, None, TurnResult]:
        body = {"model": self.model, "messages": self.messages(text, history), "stream": True,
                "stream_options": {"include_usage": True}}
        headers = {"accept": "text/event-stream"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        with conn.client.stream("POST", self.base_url + "/chat/completions", json=body, headers=headers,
                                extensions={"trace": conn.trace}) as resp:
            conn.remember(resp.extensions.get("network_stream"))
            if cancel.is_set():
                return TurnResult(status="interrupted")
            if resp.status_code >= 400:
                resp.read()
                return TurnResult(status="error", error=self._http_error(resp))
            if "json" in resp.headers.get("content-type", "") and "event-stream" not in resp.headers.get("content-type", ""):
                resp.read()
                return (yield from self._whole(resp))
            usage: dict = {}
            finished = False
            for event, data in _sse(resp.iter_lines()):
                if cancel.is_set():
                    return TurnResult(status="interrupted", usage=_usage(usage))
                if data == "[DONE]":
                    finished = True
                    break
                chunk = _json_object(data)
                if event == "error" or chunk.get("error"):
                    return TurnResult(status="error", usage=_usage(usage),
                                      error=f"{self.origin} reported an error mid-stream: {_error_message(chunk)}")
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if not isinstance(choice, dict):
                        raise MalformedStream(f"a choice is not an object: {choice!r:.80}")
                    delta = choice.get("delta") or {}
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        yield AgentEvent("reasoning.delta", {"text": reasoning})
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        yield AgentEvent("message.delta", {"text": content})
                    if choice.get("finish_reason"):
                        finished = True
            if cancel.is_set():
                return TurnResult(status="interrupted", usage=_usage(usage))
            if not finished:
                return TurnResult(status="error", usage=_usage(usage),
                                  error=f"the stream from {self.origin} ended before the reply finished")
            return TurnResult(status="complete", usage=_usage(usage))

    def _whole(self, resp: httpx.Response) -> Generator[AgentEvent, None, TurnResult]:
        """A server that ignored `stream: true` and sent one chat.completion."""
        obj = _json_object(resp.text)
        choices = obj.get("choices") or [{}]
        first = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else {}
        message = first.get("message") if isinstance(first.get("message"), dict) else {}
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            yield AgentEvent("reasoning.delta", {"text": reasoning})
        if isinstance(message.get("content"), str) and message["content"]:
            yield AgentEvent("message.delta", {"text": message["content"]})
        return TurnResult(status="complete", usage=_usage(obj.get("usage") or {}))

    # -- errors ---------------------------------------------------------------
    def _http_error(self, resp: httpx.Response) -> str:
        code = resp.status_code
        said = _error_message(_maybe_json(resp.content[:_ERROR_BODY_LIMIT])) or resp.text[:200].strip()
        tail = f": {said}" if said else ""
        status = f"{code} {resp.reason_phrase}".strip()
        if code == 401:
            return (f"bad API key: {self.origin} answered {status}{tail} "
                    "(set the key in a 0600 file given by --openai-api-key-file, or in OPENAI_API_KEY)")
        if code == 403:
            return f"forbidden: {self.origin} answered {status}{tail} (does this key have access to {self.model}?)"
        if code == 404:
            return (f"not found: {self.base_url}/chat/completions answered {status}{tail} "
                    "(check --openai-base-url, usually ending in /v1, and --openai-model)")
        if code == 429:
            after = resp.headers.get("retry-after")
            wait = f"; retry after {after}{' s' if after and after.strip().isdigit() else ''}" if after else ""
            return f"rate limited: {self.origin} answered {status}{wait}{tail}"
        if code >= 500:
            return f"server error: {self.origin} answered {status}{tail}"
        return f"{self.origin} answered {status}{tail}"

    def _describe(self, exc: httpx.HTTPError) -> str:
        where = self.origin
        if isinstance(exc, httpx.ConnectTimeout):
            return f"timed out connecting to {where} after {min(self.timeout, CONNECT_TIMEOUT):g} s"
        if isinstance(exc, httpx.ReadTimeout):
            return f"timed out: {where} sent nothing for {self.timeout:g} s"
        if isinstance(exc, httpx.TimeoutException):
            return f"timed out talking to {where}: {exc}"
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc)
            if "refused" in reason.lower():
                reason = "connection refused (is the server running?)"
            return f"cannot connect to {where}: {reason}"
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"{where} closed the connection before the reply finished: {exc}"
        if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
            return f"lost the connection to {where}: {exc}"
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
            return f"bad --openai-base-url {self.base_url!r}: {exc}"
        return f"request to {where} failed: {type(exc).__name__}: {exc}"


def _sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) for each server-sent event; comments, ids and retries are skipped."""
    event, data = "", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


def _json_object(data: str) -> dict:
    try:
        obj = json.loads(data)
    except ValueError:
        raise MalformedStream(f"a data line is not JSON: {data[:80]!r}") from None
    if not isinstance(obj, dict):
        raise MalformedStream(f"a data line is not a JSON object: {data[:80]!r}")
    return obj


def _maybe_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(obj: Any) -> str:
    if not isinstance(obj, dict):
        return ""
    err = obj.get("error", obj)
    if isinstance(err, dict):
        return str(err.get("message") or "")
    return str(err or "")


def _usage(raw: dict) -> dict:
    """OpenAI's usage as the gateway's {input, output, total}."""
    if not isinstance(raw, dict) or not raw:
        return {}

    def num(key: str) -> int:
        value = raw.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    prompt, completion = num("prompt_tokens"), num("completion_tokens")
    return {"input": prompt, "output": completion, "total": num("total_tokens") or prompt + completion}
