"""`hermes-ps`: what the gateway's workers are doing, at a glance (like `ps`, `docker ps`, `supervisorctl status`).

It asks the running gateway over its control socket (ipc://<runtime-dir>/control.sock).
Exit codes: 0 ok, 1 error, 2 usage, 3 no gateway running (the message says where it looked).
Kept import-light on purpose: stdlib + pyzmq + msgpack, no table library, nothing from
the daemon's own modules (`--json` in a scrape loop should cost little more than zmq's import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
COLUMNS = ("SESSION", "PID", "STATE", "ATTACHED", "DETACHED_FOR", "IDLE", "CPU%", "RSS", "THREADS", "FDS", "UPTIME")
# --sort names -> row field; numeric fields sort largest first (like top), text ascending
SORT_FIELDS = {
    "session": "session", "key": "key", "pid": "pid", "kind": "kind", "state": "state", "attached": "attached",
    "detached_for": "detached_for", "detached": "detached_for", "idle": "idle", "cpu": "cpu", "cpu%": "cpu",
    "rss": "rss", "uss": "uss", "threads": "threads", "fds": "fds", "uptime": "uptime", "children": "children",
    "heartbeat": "heartbeat_age", "heartbeat_age": "heartbeat_age",
}
TEXT_FIELDS = {"session", "key", "kind", "state"}
KIND_ORDER = {"lobby": 0, "spare": 1, "session": 2, "dashboard": 3, "dashboard-pty": 4}


class NotRunning(Exception):
    """No gateway on this runtime dir (exit 3)."""


class ControlError(Exception):
    """The gateway is there but the request failed (exit 1)."""


def default_runtime_dir() -> str:
    """The gateway's default (supervisor.config._default_runtime_dir), restated to keep this command light."""
    env = os.environ.get("HERMES_GATEWAY_RUNTIME_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "hermes-supervisor")
    return f"/tmp/hermes-supervisor-{os.getuid()}"


# -- talking to the gateway ---------------------------------------------------------
def _recorded_pid(root: str) -> int | None:
    try:
        with open(os.path.join(root, "gateway.json")) as fh:
            return int(json.load(fh)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with open(os.path.join(root, "gateway.lock")) as fh:
            return int(fh.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _gateway_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a reused pid, or a zombie (empty cmdline), is not our gateway
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"hermes-gateway" in fh.read()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def locate(root: str) -> tuple[str, int | None]:
    """The control endpoint of a live gateway on `root`, or NotRunning saying what was missing."""
    sock = os.path.join(root, "control.sock")
    if not os.path.isdir(root):
        raise NotRunning(f"no gateway running: runtime dir {root} does not exist")
    if not os.path.exists(sock):
        raise NotRunning(f"no gateway running: {sock} does not exist")
    pid = _recorded_pid(root)
    if pid and not _gateway_alive(pid):
        raise NotRunning(f"no gateway running: pid {pid} recorded in {root} is gone (stale files)")
    return f"ipc://{sock}", pid


def request(root: str, cmd: str, timeout: float = 5.0, **fields: object) -> dict:
    """One request/reply on the control socket; raises NotRunning or ControlError."""
    import msgpack
    import zmq

    endpoint, pid = locate(root)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "cmd": cmd, **fields}, use_bin_type=True))
        deadline = time.monotonic() + timeout
        while not sock.poll(int(min(1.0, max(0.0, deadline - time.monotonic())) * 1000), zmq.POLLIN):
            if pid and not _gateway_alive(pid):  # checked every second: a dead gateway is not a timeout
                raise NotRunning(f"no gateway running: pid {pid} went away (looked in {root})")
            if time.monotonic() >= deadline:
                raise ControlError(f"gateway pid {pid or '?'} did not answer on {endpoint} within {timeout:g}s")
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from the gateway")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error") or "the gateway refused the request"))
    return reply


# -- presentation ---------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if not n:
        return "0" if n == 0 else "-"
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(max(0, s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def header(gw: dict) -> str:
    c = gw.get("counts", {})
    parts = [f"hermes-gateway pid {gw.get('pid')}", f"up {human_duration(gw.get('uptime'))}",
             f"{c.get('sessions', 0)} sessions ({c.get('attached', 0)} attached, {c.get('detached', 0)} detached)",
             f"{c.get('spares', 0)} spare", f"{c.get('workers', 0)} workers", f"{c.get('clients', 0)} clients"]
    if not gw.get("accepting", True):
        parts.append("DRAINING" if not gw.get("closing") else "STOPPING")
    return " · ".join(parts)


def _cell(row: dict, col: str) -> str:
    if col == "SESSION":
        if row["kind"] != "session":
            return f"({row['kind']})"
        return row["session"] or "(starting)"
    if col == "PID":
        return str(row["pid"] or "-")
    if col == "STATE":
        return row["state"] + (f":{row['stopping']}" if row.get("stopping") else "")
    if col == "ATTACHED":
        return str(row["attached"]) if row["kind"] == "session" else "-"
    if col == "DETACHED_FOR":
        return human_duration(row["detached_for"])
    if col == "IDLE":
        return human_duration(row["idle"])
    if col == "CPU%":
        return f"{row['cpu']:.1f}"
    if col == "RSS":
        return human_bytes(row["rss"])
    if col == "UPTIME":
        return human_duration(row["uptime"])
    return str(row[col.lower()])


def table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    left = {0, 2}  # text columns; numbers right-aligned
    out = []
    for line in cells:
        out.append("  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
                   .rstrip())
    return "\n".join(out)


def select(rows: list[dict], include_all: bool, sort: str | None) -> list[dict]:
    rows = [r for r in rows if include_all or r["kind"] == "session"]
    if sort is None:
        return sorted(rows, key=lambda r: (KIND_ORDER.get(r["kind"], 9), -(r["uptime"] or 0), r["pid"]))
    field = SORT_FIELDS[sort]
    present = [r for r in rows if r.get(field) is not None]
    missing = [r for r in rows if r.get(field) is None]
    present.sort(key=lambda r: r[field], reverse=field not in TEXT_FIELDS)
    return present + missing


def snapshot(root: str, args: argparse.Namespace) -> dict:
    reply = request(root, "list", timeout=args.timeout)
    return {"gateway": reply["gateway"], "workers": select(reply["workers"], args.all, args.sort)}


def render(doc: dict, args: argparse.Namespace) -> str:
    if args.quiet:
        return "\n".join(r["session"] for r in doc["workers"] if r["session"])
    if args.json:
        return json.dumps(doc, separators=(",", ":") if args.watch is not None else None,
                          indent=None if args.watch is not None else 2, default=str)
    return header(doc["gateway"]) + "\n" + table(doc["workers"])


# -- the command ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _sort_name(value: str) -> str:
    name = value.lower().lstrip("-")
    if name not in SORT_FIELDS:
        raise argparse.ArgumentTypeError(f"unknown field {value!r} (one of: {', '.join(sorted(set(SORT_FIELDS)))})")
    return name


def _seconds(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0.1 <= v <= 86400:
        raise argparse.ArgumentTypeError("seconds must be from 0.1 to 86400")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hermes-ps", description="List the hermes-gateway's live workers (one process per session).",
                epilog="exit status: 0 ok, 1 error, 2 usage, 3 no gateway running")
    p.add_argument("-a", "--all", action="store_true", help="also show the lobby and spare workers")
    p.add_argument("--json", action="store_true", help="one JSON document (with --watch: one JSON object per line)")
    p.add_argument("-w", "--watch", nargs="?", const=2.0, default=None, type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until interrupted")
    p.add_argument("-q", "--quiet", action="store_true", help="session ids only, one per line")
    p.add_argument("--sort", type=_sort_name, default=None, metavar="FIELD",
                   help="sort by a column (numbers largest first): cpu, rss, idle, uptime, pid, session, …")
    p.add_argument("--runtime-dir", default=None, metavar="D",
                   help="the gateway's runtime dir (default: $HERMES_GATEWAY_RUNTIME_DIR, "
                        "else $XDG_RUNTIME_DIR/hermes-supervisor, else /tmp/hermes-supervisor-$UID)")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="control request timeout")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--kill", metavar="SESSION", help="stop a session's worker through the stop ladder "
                                                       "(session id, stored key, or worker pid)")
    act.add_argument("--drain", action="store_true", help="stop accepting new sessions")
    act.add_argument("--undrain", action="store_true", help="accept new sessions again")
    act.add_argument("--stats", action="store_true", help="gateway counters and the config in force")
    p.add_argument("--reason", default=None, help="with --kill: the reason logged and counted (default operator_kill)")
    return p


def _action(root: str, args: argparse.Namespace) -> int:
    if args.kill is not None:
        fields = {"target": args.kill} | ({"reason": args.reason} if args.reason else {})
        reply = request(root, "kill", timeout=max(args.timeout, 660.0), **fields)
        k = reply["killed"]
        print(json.dumps(k) if args.json else
              f"stopped {k['kind']} {k['session'] or '-'} pid {k['pid']} reason={k['reason']} took={k['took']}s")
        return EXIT_OK
    cmd = "drain" if args.drain else "undrain" if args.undrain else "stats"
    reply = request(root, cmd, timeout=args.timeout)
    if args.json or args.stats:
        reply.pop("ok", None)
        reply.pop("v", None)
        print(json.dumps(reply, indent=2, default=str))
    else:
        print(f"accepting={'yes' if reply['accepting'] else 'no'} sessions={reply['sessions']}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reason is not None and args.kill is None:
        build_parser().error("--reason goes with --kill")
    root = os.path.abspath(os.path.expanduser(args.runtime_dir)) if args.runtime_dir else default_runtime_dir()
    try:
        if args.kill is not None or args.drain or args.undrain or args.stats:
            return _action(root, args)
        if args.watch is None:
            print(render(snapshot(root, args), args))
            return EXIT_OK
        return _watch(root, args)
    except NotRunning as exc:
        print(f"hermes-ps: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"hermes-ps: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `hermes-ps | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


def _watch(root: str, args: argparse.Namespace) -> int:
    clear = sys.stdout.isatty() and not args.json and not args.quiet
    while True:
        doc = snapshot(root, args)
        if args.json:
            doc["time"] = round(time.time(), 3)
        text = render(doc, args)
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + text + "\n")
        else:
            sys.stdout.write(text + ("\n" if args.json or args.quiet else "\n\n"))
        sys.stdout.flush()
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
