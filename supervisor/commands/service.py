"""`hermes-gateway install-service`: a systemd unit or a launchd plist for this user and this venv.

Both run `hermes-gateway run` in the foreground and let the service manager restart
it after a crash (not after a clean stop). What happens to the workers when the
daemon dies under each is explained in docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import pwd
import shlex
import sys
from dataclasses import dataclass

from supervisor import config as config_mod

UNIT_NAME = "hermes-gateway.service"
LAUNCHD_LABEL = "ai.hermes.gateway"
WATCHDOG_SEC = 30  # the loop pings every 15 s; a loop wedged for 30 s gets the daemon restarted
THROTTLE_SEC = 10
LIMIT_NOFILE = 65536  # ~1,050 descriptors per 1,000 live sessions in the broker: room for --max-workers 10000
TASKS_MAX = 4096  # every worker, its threads, and what its agent runs
STATE_NAME = "hermes-supervisor"  # StateDirectory= and RuntimeDirectory= of a system unit
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


class UnitRefused(ValueError):
    """A unit this command will not write, and what to give instead."""


@dataclass(frozen=True)
class SystemdOptions:
    """Who a system unit runs as, and its resource knobs."""

    user: str = ""  # User= (an unprivileged account); "" with dynamic_user: DynamicUser=yes
    dynamic_user: bool = False
    allow_root: bool = False  # the explicit flag a root unit needs
    limit_nofile: int = LIMIT_NOFILE
    tasks_max: str = str(TASKS_MAX)
    memory_max: str = "infinity"


def check_run_as(opts: SystemdOptions) -> None:
    """Refuse a system unit that would run the agent and its tools as root, unless asked for explicitly."""
    if opts.dynamic_user and opts.user:
        raise UnitRefused("--dynamic-user and --user NAME exclude each other")
    if opts.dynamic_user:
        return
    if not opts.user:
        if opts.allow_root:
            return
        raise UnitRefused("a system unit would run the agent and its tools as root: give --user NAME (an "
                          "unprivileged account), --dynamic-user, or --allow-root to mean it")
    try:
        entry = pwd.getpwnam(opts.user)
    except KeyError:
        raise UnitRefused(f"--user {opts.user}: no such user on this machine") from None
    if entry.pw_uid == 0 and not opts.allow_root:
        raise UnitRefused(f"--user {opts.user} is root (uid 0): give an unprivileged account, or --allow-root")


def systemd_unit(user_unit: bool, config: str | None = None, opts: SystemdOptions | None = None) -> str:
    opts = opts or SystemdOptions()
    cmd = gateway_command(config)
    stop = _stop_timeout(config)
    file_values = config_mod.read_file(config) if config else {}
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
        "NotifyAccess=all",  # a restart's successor says MAINPID= and READY=1 before it is the main pid (docs/restart.md)
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
        f"RuntimeDirectory={STATE_NAME}",
        "RuntimeDirectoryMode=0700",
        f"Environment=HERMES_GATEWAY_RUNTIME_DIR=%t/{STATE_NAME}",
        "Environment=PYTHONUNBUFFERED=1",
        "UMask=0077",
        # the gateway raises its soft limit to this hard one at start: ~1 descriptor per live session, plus spares
        f"LimitNOFILE={int(opts.limit_nofile)}",
        f"TasksMax={opts.tasks_max}",
        f"MemoryMax={opts.memory_max}",
        # hardening that does not get in the way of an agent working on the user's files
        "NoNewPrivileges=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    if not user_unit:
        # never root unless asked (check_run_as): the agent runs tools, from a venv a user may own
        who = ["DynamicUser=yes"] if opts.dynamic_user else [f"User={opts.user}"] if opts.user else []
        at = lines.index("Type=notify")
        lines[at:at] = who
        if "data_dir" not in file_values:
            # the data dir of the account the unit runs as, made by systemd (0700, owned by that account)
            lines += [f"StateDirectory={STATE_NAME}", "StateDirectoryMode=0700",
                      f"Environment=HERMES_GATEWAY_DATA_DIR=%S/{STATE_NAME}"]
            data_dir = ""
        lines += [
            # the whole file system read-only but the data dir; homes read-only (the venv may live in one)
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            *(["ReadWritePaths=" + _systemd_quote("-" + data_dir)] if data_dir else []),
        ]
        if who:
            # an unprivileged account needs no capability; other users' processes stay out of sight
            lines += ["CapabilityBoundingSet=", "AmbientCapabilities=", "RemoveIPC=yes", "PrivateMounts=yes",
                      "ProtectProc=invisible"]
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
            run_as = args.user if isinstance(args.user, str) else ""
            user_unit = args.user is True or (os.getuid() != 0 and not run_as and not args.dynamic_user)
            opts = SystemdOptions(user=run_as, dynamic_user=args.dynamic_user, allow_root=args.allow_root,
                                  limit_nofile=args.limit_nofile or LIMIT_NOFILE,
                                  tasks_max=args.tasks_max or str(TASKS_MAX), memory_max=args.memory_max or "infinity")
            for knob in (opts.tasks_max, opts.memory_max):
                if not knob.replace(".", "").rstrip("KMGTP%").isdigit() and knob != "infinity":
                    raise UnitRefused(f"{knob!r} is not a size or count systemd takes (a number, 8G, 50%, infinity)")
            if not user_unit:
                check_run_as(opts)
            text = systemd_unit(user_unit, args.config, opts)
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
    except (config_mod.ConfigError, UnitRefused) as exc:
        print(f"hermes-gateway: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hermes-gateway: error: cannot write the service file: {exc}", file=sys.stderr)
        return 1
