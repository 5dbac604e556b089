"""JSON-RPC 2.0 codec for the client side: validation, responses, events, error codes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

SESSION_NOT_FOUND = 4001
BAD_VALUE = 4002
SESSION_ID_REQUIRED = 4006
STORED_SESSION_NOT_FOUND = 4007
SESSION_BUSY = 4009
NO_CAPACITY = 4090
LIMIT_REACHED = 4290  # a per-session/per-connection limit; the message and data name it
TOO_MANY_IN_FLIGHT = 4029  # one connection has --max-inflight requests unanswered
RESUME_FAILED = 5000
SLASH_FAILED = 5030
AGENT_INIT_FAILED = 5032
STORE_UNAVAILABLE = 5031

MAX_ID_LEN = 256
MAX_BATCH = 64


class RpcError(Exception):
    """An error that becomes a JSON-RPC error object for one request."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_obj(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


@dataclass(slots=True)
class Request:
    id: Any  # None for a notification
    method: str
    params: dict
    is_notification: bool


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def result(req_id: Any, res: Any) -> str:
    return _dumps({"jsonrpc": "2.0", "id": req_id, "result": res})


def error(req_id: Any, code: int, message: str, data: Any = None) -> str:
    return _dumps({"jsonrpc": "2.0", "id": req_id, "error": RpcError(code, message, data).to_obj()})


def event(type_: str, session_id: str = "", payload: dict | None = None, seq: int | None = None) -> str:
    params: dict[str, Any] = {"type": type_, "session_id": session_id}
    if payload:
        params["payload"] = payload
    if seq is not None:
        params["seq"] = seq
    return _dumps({"jsonrpc": "2.0", "method": "event", "params": params})


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return len(value) <= MAX_ID_LEN
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return value == value and abs(value) < 1e300
    return value is None


def parse_message(text: str | bytes) -> Any:
    """Decode one frame; raises RpcError(-32700) on bad JSON, or on a lone surrogate escape ("\\ud800"):
    that is not Unicode, and echoing it back (in an id or a method name) made the reply unsendable."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {str(exc)[:200]}") from None
    probe = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if "\\ud" in probe or "\\uD" in probe:  # rare: only then look for an unpaired one
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RpcError(PARSE_ERROR, "parse error: lone surrogate escape (not valid Unicode)") from None
        except (ValueError, RecursionError):
            pass
    return obj


def validate(obj: Any) -> Request:
    """Check one decoded request object; raises RpcError with the request's id in `data`."""
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: expected an object")
    req_id = obj.get("id")
    has_id = "id" in obj
    if has_id and not _valid_id(req_id):
        raise RpcError(INVALID_REQUEST, "invalid request: id must be a string or a number")
    if obj.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', data={"id": req_id})
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "invalid request: method must be a non-empty string", data={"id": req_id})
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "invalid params: params must be an object", data={"id": req_id})
    return Request(id=req_id, method=method, params=params, is_notification=not has_id)
