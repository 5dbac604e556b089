"""`hermes-gateway`: run the daemon, write a service file for it, or open the Hermes TUI against it."""

from __future__ import annotations

import argparse
import sys

from protocol import __version__
from supervisor import config as config_mod
from supervisor import dirs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hermes-gateway", description="Gateway daemon for Hermes clients: one process per session.")
    parser.add_argument("--version", action="version", version=f"hermes-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the gateway in the foreground")
    config_mod.add_arguments(run)
    restart = sub.add_parser("restart", help="hand the port and every live session to a new gateway process "
                             "running the code now installed, without cutting a running turn")
    restart.add_argument("--runtime-dir", default=None, metavar="D", help="the gateway's runtime dir")
    restart.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the answer")
    svc = sub.add_parser("install-service", help="write a systemd unit or launchd plist for this gateway")
    kind = svc.add_mutually_exclusive_group(required=True)
    kind.add_argument("--systemd", action="store_true")
    kind.add_argument("--launchd", action="store_true")
    svc.add_argument("--user", nargs="?", const=True, default=False, metavar="NAME",
                     help="systemd: alone, a user unit (the default for non-root); with NAME, a system unit that"
                          " runs as that unprivileged account")
    svc.add_argument("--dynamic-user", action="store_true",
                     help="systemd: a system unit with DynamicUser=yes (its data in StateDirectory=)")
    svc.add_argument("--allow-root", action="store_true", help="systemd: write a system unit that runs as root")
    svc.add_argument("--limit-nofile", type=int, default=None, metavar="N", help="systemd: LimitNOFILE= (default 65536)")
    svc.add_argument("--tasks-max", default=None, metavar="N", help="systemd: TasksMax= (default 4096)")
    svc.add_argument("--memory-max", default=None, metavar="BYTES", help="systemd: MemoryMax=, e.g. 8G (default infinity)")
    svc.add_argument("--print", dest="print_only", action="store_true", help="print instead of writing")
    svc.add_argument("--config", default=None, help="config file the service runs with")
    tui = sub.add_parser("tui", help="open the Hermes TUI (bundled in hermes-agent) against the running gateway",
                         epilog="exit status: the TUI's, or 1 node/TUI missing, 2 usage, 3 no gateway running")
    from supervisor.commands import tui as tui_mod

    tui_mod.add_arguments(tui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        cli = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            cfg = config_mod.load(cli)
            # refused before anything is read or written there; from here on, the resolved paths only
            cfg.runtime_dir = dirs.private_dir(cfg.runtime_dir, "runtime dir")
            cfg.data_dir = dirs.private_dir(cfg.data_dir, "data dir")
            from supervisor.clients import exposure

            exposure.settle(cfg)  # bind, TLS, --token-file; HERMES_GATEWAY_TOKEN leaves the environment
        except (config_mod.ConfigError, dirs.UnsafeDir, ValueError) as exc:
            print(f"hermes-gateway: error: {exc}", file=sys.stderr)
            return 2
        from supervisor import daemon

        return daemon.run(cfg)
    if args.command == "restart":
        from supervisor.commands import restart as restart_mod

        return restart_mod.main(args)
    if args.command == "install-service":
        from supervisor.commands import service

        return service.main(args)
    if args.command == "tui":
        from supervisor.commands import tui as tui_mod

        return tui_mod.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
