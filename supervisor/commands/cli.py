"""`hermes-gateway`: run the daemon, or write a service file for it."""

from __future__ import annotations

import argparse
import sys

from protocol import __version__
from supervisor import config as config_mod


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
    svc = sub.add_parser("install-service", help="write a systemd unit or launchd plist for this gateway")
    kind = svc.add_mutually_exclusive_group(required=True)
    kind.add_argument("--systemd", action="store_true")
    kind.add_argument("--launchd", action="store_true")
    svc.add_argument("--user", action="store_true", help="systemd: a user unit (the default for non-root)")
    svc.add_argument("--print", dest="print_only", action="store_true", help="print instead of writing")
    svc.add_argument("--config", default=None, help="config file the service runs with")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        cli = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            cfg = config_mod.load(cli)
            from supervisor.clients import exposure

            exposure.settle(cfg)  # bind, TLS, --token-file; HERMES_GATEWAY_TOKEN leaves the environment
        except (config_mod.ConfigError, ValueError) as exc:
            print(f"hermes-gateway: error: {exc}", file=sys.stderr)
            return 2
        from supervisor import daemon

        return daemon.run(cfg)
    if args.command == "install-service":
        from supervisor.commands import service

        return service.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
