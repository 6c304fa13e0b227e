"""The `unitbox` command: `serve` runs the daemon; `runtime` manages runtimes."""

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitbox", description="Run untrusted Python over HTTP, each run a hardened transient systemd unit.")
    parser.add_argument("--version", action="version", version=f"unitbox {__version__}")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default /etc/unitbox/unitbox.toml, or $UNITBOX_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (normally started by unitbox.service)")
    serve.add_argument("--listen", action="append", metavar="ADDR",
                       help="host:port or unix:/path; repeat for several (default 127.0.0.1:8080)")
    serve.add_argument("--state-dir", type=Path, help="where runs and the database live (default /var/lib/unitbox)")
    serve.add_argument("--max-concurrent", type=int, help="runs executing at once (default: CPU count)")
    serve.add_argument("--queue-size", type=int, help="runs waiting behind them (default 1000)")
    serve.add_argument("--slice", help="slice the run units go into (default unitbox.slice)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    broker = commands.add_parser("broker", help="the process that talks to systemd (started by `serve`)")
    broker.add_argument("--fd", type=int, required=True, help="the socket to the daemon (inherited)")
    broker.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    broker.add_argument("--slice", help=argparse.SUPPRESS)
    broker.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help=argparse.SUPPRESS)

    check = commands.add_parser("check-config", help="validate the configuration and print it")
    check.add_argument("--json", action="store_true", help="print as JSON")

    from unitbox.runtime_cli import add_runtime_commands
    add_runtime_commands(commands)
    return parser


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("listen", "state_dir", "max_concurrent", "queue_size", "slice", "log_level")
    return {name: getattr(args, name, None) for name in names}


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config, cli=_cli_overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        try:
            ensure_fd_budget(config)
        except ConfigError as exc:
            print(f"unitbox: {exc}", file=sys.stderr)
            return 2
        asyncio.run(serve(config))
        return 0
    if args.command == "broker":
        from unitbox.broker.server import run_broker
        asyncio.run(run_broker(config, args.fd))
        return 0
    if args.command == "check-config":
        print(config.model_dump_json(indent=2) if args.json else "configuration is valid")
        return 0
    result: int = args.handler(config, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
