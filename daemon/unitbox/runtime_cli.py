"""`unitbox runtime list | build NAME -r requirements.txt | remove NAME`.

Built runtimes live under `<state_dir>/runtimes/`; the daemon picks them up
for the next submission (no config edit, no restart)."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from unitbox.config import Config
from unitbox.runtime_build import BuildError, build, remove
from unitbox.runtimes import Runtimes, read_manifest


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _list(config: Config, args: argparse.Namespace) -> int:
    runtimes = Runtimes(config)
    for info in asyncio.run(runtimes.describe()):
        runtime = runtimes.get(info.name)
        manifest = read_manifest(Path(runtime.path)) if runtime.target and runtime.path else None
        origin = (f"built {manifest.get('built_at', '?')}" if manifest is not None
                  else "built in" if info.name == "default" else "config")
        if args.verbose:
            packages = ", ".join(f"{n}=={v}" for n, v in info.packages.items()) or "standard library only"
        else:
            packages = f"{len(info.packages)} packages" if info.packages else "standard library only"
        print(f"{info.name}\tPython {info.python}\t{origin}\t{packages}")
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the build, which removes its half-made venv


def _build(config: Config, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    began = time.monotonic()
    _say(f"building runtime {args.name!r} from {args.requirements}")
    try:
        built = build(config, args.name, args.requirements, python=args.python, pip_args=args.pip_args, say=_say)
    except (BuildError, ValueError) as exc:
        print(f"unitbox: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # not root, disk full, …
        print(f"unitbox: {exc}; runtime {args.name!r} is unchanged", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"unitbox: {' '.join(map(str, exc.cmd[:4]))} … failed (exit status {exc.returncode}); "
              f"runtime {args.name!r} is unchanged", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unitbox: interrupted; runtime {args.name!r} is unchanged", file=sys.stderr)
        return 130
    packages = built.manifest["packages"]
    _say(f"runtime {built.name!r} is ready in {time.monotonic() - began:.0f} s: Python {built.manifest['python']}, "
         f"{len(packages)} packages")
    for name, version in packages.items():
        print(f"    {name}=={version}")
    print(f'Runs use it with "runtime": "{built.name}" (the daemon sees it now; no restart needed).')
    return 0


def _remove(config: Config, args: argparse.Namespace) -> int:
    try:
        remove(config, args.name)
    except (BuildError, ValueError, OSError) as exc:
        print(f"unitbox: {exc}", file=sys.stderr)
        return 1
    print(f"removed runtime {args.name!r} (runs still using it keep it until they end)")
    return 0


def add_runtime_commands(commands: Any) -> None:
    runtime = commands.add_parser("runtime", help="manage runtimes (Python environments for runs)")
    actions = runtime.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list runtimes with their Python and packages")
    listing.add_argument("-v", "--verbose", action="store_true", help="list every package with its version")
    listing.set_defaults(handler=_list)

    building = actions.add_parser(
        "build", help="build (or rebuild) a runtime: a venv with pip, replaced atomically",
        description="Build a runtime under <state_dir>/runtimes/NAME: a venv of the host's Python with the "
                    "packages of a requirements file, installed by pip (it needs PyPI, or a local index: "
                    "--pip-args='--no-index --find-links DIR'). A failed build leaves the previous one in place.")
    building.add_argument("name", metavar="NAME", help="the runtime's name, as submissions give it")
    building.add_argument("-r", "--requirements", type=Path, required=True, metavar="FILE",
                          help="a pip requirements file (pin versions for reproducible builds)")
    building.add_argument("--python", metavar="PATH",
                          help="the interpreter to build on (default: `python` of the config, /usr/bin/python3)")
    building.add_argument("--pip-args", type=shlex.split, default=[], metavar="'ARGS'",
                          help="more arguments for `pip install`, e.g. "
                               "--pip-args='--no-index --find-links /srv/wheels' (pip also reads PIP_* and pip.conf)")
    building.set_defaults(handler=_build)

    removing = actions.add_parser("remove", help="remove a built runtime")
    removing.add_argument("name", metavar="NAME")
    removing.set_defaults(handler=_remove)
