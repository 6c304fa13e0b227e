"""The `unitbox` command: `serve` runs the daemon; `runtime` manages runtimes;
`run`, `status`, `logs`, `cancel`, `files`, `runs` are a server's clients (unitbox.client)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from unitbox import __version__
from unitbox.config import Config, load_config
from unitbox.errors import ConfigError
from unitbox.logs import setup_logging

log = logging.getLogger(__name__)


SERVER_COMMANDS = ("serve", "check-config", "runtime", "broker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitbox", usage="%(prog)s [-h] [--version] [--config CONFIG] COMMAND ...",
        description="Run untrusted Python over HTTP, each run a hardened transient systemd unit.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unitbox {__version__}")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file of the server commands (default /etc/unitbox/unitbox.toml, "
                             "or $UNITBOX_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                     prog="unitbox")

    serve = commands.add_parser("serve", help="run the daemon (normally started by unitbox.service)")
    serve.add_argument("--listen", action="append", metavar="ADDR",
                       help="host:port or unix:/path; repeat for several (default 127.0.0.1:8080)")
    serve.add_argument("--state-dir", type=Path, help="where runs and the database live (default /var/lib/unitbox)")
    serve.add_argument("--broker-socket", type=Path, metavar="PATH",
                       help="connect to the broker there (unitbox-broker.socket) instead of starting it as a child")
    serve.add_argument("--max-concurrent", type=int, help="runs executing at once (default: CPU count)")
    serve.add_argument("--queue-size", type=int, help="runs waiting behind them (default 1000)")
    serve.add_argument("--slice", help="slice the run units go into (default unitbox.slice)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    broker = commands.add_parser("broker", help="the process that talks to systemd (started by `serve`, or by "
                                                "unitbox-broker.socket)")
    side = broker.add_mutually_exclusive_group(required=True)
    side.add_argument("--fd", type=int, help="the socket to the daemon (inherited from `serve`)")
    side.add_argument("--socket-activated", action="store_true",
                      help="the daemon connected to unitbox-broker.socket (Accept=yes): fd 3")
    broker.add_argument("--front-user", metavar="USER",
                        help="with --socket-activated: the only user (name or uid) the broker serves")
    broker.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    broker.add_argument("--slice", help=argparse.SUPPRESS)
    broker.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help=argparse.SUPPRESS)

    check = commands.add_parser("check-config", help="validate the configuration and print it")
    check.add_argument("--json", action="store_true", help="print as JSON")

    from unitbox.runtime_cli import add_runtime_commands
    add_runtime_commands(commands)
    from unitbox.client.commands import CLIENT_COMMANDS, add_client_commands
    add_client_commands(commands)
    parser.epilog = "\n\n".join([
        _command_list(commands, "server commands (on the server's host):", SERVER_COMMANDS),
        _command_list(commands, "client commands (a server over HTTP: --url or $UNITBOX_URL, --token or "
                                "$UNITBOX_TOKEN):", CLIENT_COMMANDS),
        "`unitbox COMMAND --help` tells more; `man unitbox` all of it."])
    return parser


def _command_list(commands: Any, title: str, names: tuple[str, ...]) -> str:
    helps = {choice.dest: choice.help for choice in commands._choices_actions}  # what add_parser(help=) kept
    return "\n".join([title, *(f"  {name:<14}{helps[name]}" for name in names)])


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("listen", "state_dir", "broker_socket", "max_concurrent", "queue_size", "slice", "log_level")
    return {name: getattr(args, name, None) for name in names}


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config, cli=_cli_overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(args, "client"):  # a client never reads the server's configuration
        from unitbox.client.commands import client_main
        return client_main(args)
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"unitbox: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_target)
    for name in config.ignored_env if args.command != "broker" else ():  # the daemon says it once
        log.warning("ignoring the environment variable %s: it names no setting", name)
    if args.command == "serve":
        from unitbox.fdbudget import ensure_fd_budget
        from unitbox.serve import serve
        from unitbox.store import ensure_store_support
        try:
            ensure_fd_budget(config)
            ensure_store_support(config)
        except ConfigError as exc:
            print(f"unitbox: {exc}", file=sys.stderr)
            return 2
        asyncio.run(serve(config))
        return 0
    if args.command == "broker":
        from unitbox.broker.peer import socket_activated_fd
        from unitbox.broker.server import run_broker
        try:
            fd = args.fd if args.fd is not None else socket_activated_fd(args.front_user)
        except ConfigError as exc:
            log.error("%s", exc)
            return 1
        asyncio.run(run_broker(config, fd))
        return 0
    if args.command == "check-config":
        print(config.model_dump_json(indent=2) if args.json else "configuration is valid")
        return 0
    result: int = args.handler(config, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
