"""`unitbox runtime …`: list the configured runtimes (build/remove: issue 7)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from unitbox.config import Config
from unitbox.runtimes import Runtimes


def _list(config: Config, _args: argparse.Namespace) -> int:
    for info in asyncio.run(Runtimes(config).describe()):
        packages = ", ".join(f"{n}=={v}" for n, v in info.packages.items()) or "standard library only"
        print(f"{info.name}\tPython {info.python}\t{packages}")
    return 0


def add_runtime_commands(commands: Any) -> None:
    runtime = commands.add_parser("runtime", help="manage runtimes (Python environments for runs)")
    actions = runtime.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list runtimes with their Python and packages")
    listing.set_defaults(handler=_list)
