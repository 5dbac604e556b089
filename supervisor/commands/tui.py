"""`hermes-gateway tui`: the Node TUI bundled in the hermes-agent wheel, pointed at the running gateway.

Hermes' own launcher (`hermes`, `hermes --tui`) stops at its "Hermes isn't configured yet" prompt
when no provider is set up, although the gateway's builtin runtime needs none; the bundle itself
(hermes_cli/tui_dist/entry.js) only needs HERMES_TUI_GATEWAY_URL. So this runs the bundle directly,
with the URL and token the gateway wrote into its runtime dir (found as `hermes-ps` finds them), and
a throwaway HERMES_HOME when the user has none of their own.
Exit codes: the TUI's own, or 1 (node or the TUI missing), 2 usage, 3 no gateway running.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from supervisor.commands.ps import EXIT_NOT_RUNNING, NotRunning, default_runtime_dir, locate

EXIT_MISSING = 1
# the bundle needs require(esm) and friends: unflagged from Node 20.19 on the 20 line, 22.7 on the 22 line
NODE_NEEDED = "Node ≥ 20.19 (or ≥ 22.7 on the 22 line)"
HERMES_PIN = "hermes-agent==0.19.0"  # the `hermes` extra in pyproject.toml


class Unavailable(Exception):
    """Something this machine lacks for the TUI (exit 1); the message says what to do."""


@dataclass(frozen=True)
class Target:
    url: str  # ws://host:port/api/ws?token=…
    runtime_dir: str


def node_version_ok(version: str) -> bool:
    """`node --version` output (e.g. 'v20.19.1') against NODE_NEEDED."""
    m = re.match(r"v?(\d+)\.(\d+)", version.strip())
    if not m:
        return False
    major, minor = int(m.group(1)), int(m.group(2))
    if major == 20:
        return minor >= 19
    if major == 22:
        return minor >= 7
    return major >= 23


def find_node(path: str | None = None) -> str:
    node = shutil.which("node", path=path)
    if node is None:
        raise Unavailable(f"node is not on PATH: the Hermes TUI is a Node program and needs {NODE_NEEDED}")
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20)
        version = out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"{node} --version failed ({exc}): the Hermes TUI needs {NODE_NEEDED}") from None
    if not node_version_ok(version):
        raise Unavailable(f"{node} is {version or 'of unknown version'}, too old: the Hermes TUI needs {NODE_NEEDED}")
    return node


def find_entry() -> Path:
    """hermes_cli/tui_dist/entry.js from the installed hermes-agent wheel."""
    try:
        spec = importlib.util.find_spec("hermes_cli")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        entry = Path(list(spec.submodule_search_locations)[0]) / "tui_dist" / "entry.js"
        if entry.is_file():
            return entry
    raise Unavailable(f"the Hermes TUI is not installed (it ships in the {HERMES_PIN} wheel): install the hermes "
                      f"extra with `make tui` in the source tree, or `{sys.executable} -m pip install '{HERMES_PIN}'`")


def find_gateway(root: str) -> Target:
    """The live gateway on `root` (NotRunning as `hermes-ps` says it) and its client URL with the token."""
    locate(root)
    from supervisor.paths import read_info

    info = read_info(root)
    if not info or not info.get("port"):
        raise NotRunning(f"no gateway running: {os.path.join(root, 'gateway.json')} is missing or unreadable")
    try:
        token = Path(root, "token").read_text().strip()
    except OSError as exc:
        raise NotRunning(f"no gateway running: cannot read its token ({exc})") from None
    host = info.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return Target(url=f"ws://{host}:{info['port']}/api/ws?token={token}", runtime_dir=root)


def hermes_home(environ: dict[str, str]) -> tuple[str, bool]:
    """(HERMES_HOME for the TUI, whether it is a throwaway one to remove afterwards)."""
    own = environ.get("HERMES_HOME")
    if own:
        return own, False
    default = Path(environ.get("HOME") or os.path.expanduser("~")) / ".hermes"
    if default.is_dir():
        return str(default), False
    return tempfile.mkdtemp(prefix="hermes-tui-home-"), True


def run_tui(node: str, entry: Path, target: Target, resume: str | None) -> int:
    env = dict(os.environ)
    home, throwaway = hermes_home(env)
    env["HERMES_HOME"] = home
    env["HERMES_TUI_GATEWAY_URL"] = target.url
    env.pop("HERMES_TUI_RESUME", None)
    if resume:
        env["HERMES_TUI_RESUME"] = resume
    try:
        proc = subprocess.Popen([node, "--expose-gc", str(entry)], env=env)

        def forward(signum: int, _frame: object) -> None:  # a closed terminal or a kill: pass it on, then clean up
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the TUI's (it runs in raw mode)
        code = proc.wait()
        return 128 - code if code < 0 else code
    finally:
        if throwaway:
            shutil.rmtree(home, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime-dir", default=None, metavar="D",
                   help="the gateway's runtime dir (default: as hermes-ps: $HERMES_GATEWAY_RUNTIME_DIR, "
                        "else $XDG_RUNTIME_DIR/hermes-supervisor, else /tmp/hermes-supervisor-$UID)")
    p.add_argument("--resume", default=None, metavar="KEY", help="resume the session with this stored key")


def main(args: argparse.Namespace) -> int:
    root = os.path.abspath(os.path.expanduser(args.runtime_dir)) if args.runtime_dir else default_runtime_dir()
    try:
        node = find_node()
        entry = find_entry()
        target = find_gateway(root)
    except Unavailable as exc:
        print(f"hermes-gateway tui: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except NotRunning as exc:
        print(f"hermes-gateway tui: {exc} (start one with `make run` or `hermes-gateway run`)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return run_tui(node, entry, target, args.resume)
