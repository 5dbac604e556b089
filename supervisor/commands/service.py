"""`hermes-gateway install-service`: a systemd unit or a launchd plist for this user and this venv.

Both run `hermes-gateway run` in the foreground and let the service manager restart
it after a crash (not after a clean stop). What happens to the workers when the
daemon dies under each is explained in docs/operations.md.
"""

from __future__ import annotations

import argparse
import getpass
import os
import plistlib
import shlex
import sys

from supervisor import config as config_mod

UNIT_NAME = "hermes-gateway.service"
LAUNCHD_LABEL = "ai.hermes.gateway"
WATCHDOG_SEC = 30  # the loop pings every 15 s; a loop wedged for 30 s gets the daemon restarted
THROTTLE_SEC = 10
_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "operations.md")


def gateway_command(config: str | None) -> list[str]:
    """The venv's own entry point (not a PATH lookup), so the service runs the code this venv has."""
    exe = os.path.join(os.path.dirname(sys.executable), "hermes-gateway")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "supervisor.commands.cli"]
    cmd.append("run")
    if config:
        cmd += ["--config", os.path.abspath(os.path.expanduser(config))]
    return cmd


def _stop_timeout(config: str | None) -> float:
    """The --stop-timeout the service will run with, so the manager waits long enough for the drain."""
    try:
        return config_mod.load({"config": config}).stop_timeout
    except config_mod.ConfigError:
        return config_mod.Config().stop_timeout


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-=:+,@" for c in arg):
        return arg.replace("%", "%%")
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def systemd_unit(user_unit: bool, config: str | None = None) -> str:
    cmd = gateway_command(config)
    stop = _stop_timeout(config)
    data_dir = config_mod.load({"config": config}).data_dir if config else config_mod.Config().data_dir
    lines = [
        "[Unit]",
        "Description=Hermes gateway: one worker process per agent session",
        *([f"Documentation=file://{_DOCS}"] if os.path.exists(_DOCS) else []),
        "After=network.target",
        "",
        "[Service]",
        # READY=1 once the port listens and the lobby worker registered; WATCHDOG=1 from the event loop
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in cmd),
        "ExecReload=/bin/kill -HUP $MAINPID",
        # SIGTERM to the daemon only: it finalizes every worker itself; whatever is left then gets SIGKILL
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(stop) + 10}",
        f"WatchdogSec={WATCHDOG_SEC}",
        # one worker killed by the OOM killer is a reclaimed session, not a failed gateway
        "OOMPolicy=continue",
        "Restart=on-failure",
        "RestartSec=2",
        # the ipc sockets and the token live here (0700); hermes-ps finds them through this variable
        "RuntimeDirectory=hermes-supervisor",
        "RuntimeDirectoryMode=0700",
        "Environment=HERMES_GATEWAY_RUNTIME_DIR=%t/hermes-supervisor",
        "Environment=PYTHONUNBUFFERED=1",
        "UMask=0077",
        # hardening that does not get in the way of an agent working on the user's files
        "NoNewPrivileges=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    if not user_unit:
        user = getpass.getuser()
        if os.getuid() != 0:
            lines.insert(lines.index("Type=notify"), f"User={user}")
        lines += [
            "ProtectSystem=full",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "ReadWritePaths=" + _systemd_quote("-" + data_dir),
        ]
    lines += ["", "[Install]", "WantedBy=" + ("default.target" if user_unit else "multi-user.target"), ""]
    return "\n".join(lines)


def launchd_plist(config: str | None = None) -> bytes:
    home = os.path.expanduser("~")
    logs = os.path.join(home, "Library", "Logs", "hermes-gateway")
    stop = _stop_timeout(config)
    doc = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": gateway_command(config),
        "RunAtLoad": True,
        # restart after a crash or a kill, not after a clean exit (SIGTERM drain exits 0)
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_SEC,
        # launchd sends SIGTERM, waits this long, then SIGKILL: leave room for the drain
        "ExitTimeOut": int(stop) + 10,
        "ProcessType": "Interactive",
        "StandardOutPath": os.path.join(logs, "gateway.out.log"),
        "StandardErrorPath": os.path.join(logs, "gateway.err.log"),
        "WorkingDirectory": home,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "Umask": 0o077,
    }
    return plistlib.dumps(doc, fmt=plistlib.FMT_XML, sort_keys=False)


def _unit_path(user_unit: bool) -> str:
    if user_unit:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(base, "systemd", "user", UNIT_NAME)
    return os.path.join("/etc/systemd/system", UNIT_NAME)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    if args.config and not os.path.isfile(os.path.expanduser(args.config)):
        print(f"hermes-gateway: error: config file {args.config} does not exist", file=sys.stderr)
        return 2
    try:
        if args.systemd:
            user_unit = args.user or os.getuid() != 0
            text = systemd_unit(user_unit, args.config)
            if args.print_only:
                sys.stdout.write(text)
                return 0
            path = _unit_path(user_unit)
            _write(path, text.encode())
            ctl = "systemctl --user" if user_unit else "systemctl"
            print(f"wrote {path}\nnext:\n  {ctl} daemon-reload\n  {ctl} enable --now {UNIT_NAME}\n"
                  f"  hermes-ps --runtime-dir {'$XDG_RUNTIME_DIR' if user_unit else '/run'}/hermes-supervisor"
                  + ("\n  loginctl enable-linger $USER   # to keep it running while you are logged out"
                     if user_unit else ""))
            return 0
        data = launchd_plist(args.config)
        if args.print_only:
            sys.stdout.write(data.decode())
            return 0
        if sys.platform != "darwin":
            print("hermes-gateway: error: launchd is macOS only; use --print to see the plist", file=sys.stderr)
            return 1
        path = os.path.join(os.path.expanduser("~"), "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")
        os.makedirs(os.path.join(os.path.expanduser("~"), "Library", "Logs", "hermes-gateway"), exist_ok=True)
        _write(path, data)
        print(f"wrote {path}\nnext:\n  launchctl bootstrap gui/{os.getuid()} {shlex.quote(path)}\n"
              f"  launchctl kickstart -k gui/{os.getuid()}/{LAUNCHD_LABEL}")
        return 0
    except config_mod.ConfigError as exc:
        print(f"hermes-gateway: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hermes-gateway: error: cannot write the service file: {exc}", file=sys.stderr)
        return 1
