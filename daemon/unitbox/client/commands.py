"""The client commands of `unitbox` (run, status, logs, cancel, files, runs):
their options, and the one place where their failures become a message and
an exit status. They never load the server's configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from unitbox.client import run as running
from unitbox.client.files import LocalError, save_files
from unitbox.client.http import DEFAULT_URL, Api, ApiError, Unreachable
from unitbox.client.terminal import Terminal, error_line, printable, run_row, run_summary, size
from unitbox.outcome import RunState

CLIENT_COMMANDS = ("run", "status", "logs", "cancel", "files", "runs")
FAILED = 1  # any other command that could not do its work
LOCAL_FAILURE = 2  # as argparse's usage errors: a local file that cannot be read or written


def add_client_commands(commands: Any) -> None:
    server = argparse.ArgumentParser(add_help=False)
    where = server.add_argument_group("server")
    where.add_argument("--url", help=f"the unitbox server (default $UNITBOX_URL, else {DEFAULT_URL})")
    where.add_argument("--token", help="a token of the server (default $UNITBOX_TOKEN, which `ps` cannot show)")

    _add_run(commands, server)

    status = commands.add_parser("status", parents=[server], help="show a run's state and result")
    status.add_argument("id", metavar="ID")
    status.add_argument("--json", action="store_true", help="the Run object as JSON (with its output inline)")
    status.set_defaults(client=_status)

    logs = commands.add_parser("logs", parents=[server], help="print a run's stdout and stderr",
                               description="Print a run's stdout and stderr (as kept so far) on this "
                                           "process's stdout and stderr.")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing as the run writes, until it ends; then exit as `unitbox run` would")
    logs.set_defaults(client=_logs)

    cancel = commands.add_parser("cancel", parents=[server], help="cancel a run")
    cancel.add_argument("id", metavar="ID")
    cancel.set_defaults(client=_cancel)

    files = commands.add_parser("files", parents=[server], help="list (or download) the files a run left")
    files.add_argument("id", metavar="ID")
    files.add_argument("--out", type=Path, metavar="DIR", help="download them into DIR (created)")
    files.add_argument("--json", action="store_true", help="the listing as JSON")
    files.set_defaults(client=_files)

    runs = commands.add_parser("runs", parents=[server], help="list runs, newest first")
    runs.add_argument("--state", choices=[state.value for state in RunState], help="only runs in this state")
    runs.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20, up to 1000)")
    runs.add_argument("--json", action="store_true", help="the page as JSON")
    runs.set_defaults(client=_runs)


def _add_run(commands: Any, server: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run", parents=[server], help="run a Python file on a server, its output here as it is written",
        description="Run SCRIPT on a unitbox server: its stdout and stderr come to this process's stdout and "
                    "stderr as the program writes them, and unitbox exits with the program's exit status "
                    "(timed out 124, cancelled 130, OOM-killed 137, killed by a signal 128+n, the service "
                    "failed 125). Ctrl-C cancels the run; a second Ctrl-C stops waiting at once.")
    run.add_argument("script", metavar="SCRIPT", help="the program (- reads it from stdin)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                     help="the program's arguments: everything after SCRIPT")
    limits = run.add_argument_group("limits (default: the server's)")
    limits.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit")
    limits.add_argument("--memory", type=int, metavar="MB", help="memory limit, no swap")
    limits.add_argument("--cpu", type=int, metavar="PERCENT", help="CPU quota; 100 = one core")
    limits.add_argument("--tasks", type=int, metavar="N", help="processes and threads at once")
    limits.add_argument("--output-kb", type=int, metavar="KB", help="cap on each of stdout and stderr")
    limits.add_argument("--disk", type=int, metavar="MB", help="the working directory's and /tmp's size")
    run.add_argument("--runtime", metavar="NAME", help="a runtime of the server (GET /runtimes)")
    run.add_argument("--stdin", metavar="FILE", help="feed FILE (- : this process's stdin) to the program")
    run.add_argument("--file", action="append", metavar="PATH",
                     help="an input file, put at PATH in the working directory (at its name if PATH is "
                          "absolute or has ..); repeat for more")
    run.add_argument("--entrypoint", metavar="NAME",
                     help="import SCRIPT and call NAME(); print what it returns as JSON after the output")
    run.add_argument("--lint", action="store_true", help="check SCRIPT with ruff first; findings on stderr")
    run.add_argument("--lint-only", action="store_true", help="only check SCRIPT; exit 1 if ruff finds anything")
    run.add_argument("--out", type=Path, metavar="DIR", help="download the files the run leaves into DIR")
    run.add_argument("--json", action="store_true",
                     help="print the final Run as JSON (output inline) instead of streaming the output")
    run.add_argument("--detach", action="store_true", help="print the run's id and return at once")
    run.set_defaults(client=running.run)


async def _status(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    run = await api.status(args.id, include_output=args.json)
    print(json.dumps(run, indent=2, ensure_ascii=False) if args.json else "\n".join(run_summary(run)))
    return 0


async def _logs(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    if args.follow:
        return running.exit_status(await running.follow_run(api, args.id, terminal))
    for stream in ("stdout", "stderr"):
        await api.copy(f"/output/{args.id}", terminal.sink(stream), params={"stream": stream})
    return 0


async def _cancel(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    going, run = await api.cancel(args.id)
    print(f"run {run['id']}: " + ("cancelling" if going else f"had already ended ({run['state']})"))
    return 0


async def _files(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    listing = await api.files(args.id)
    if args.json:
        print(json.dumps(listing, indent=2, ensure_ascii=False))
    if args.out is not None:
        saved = await save_files(api, listing["files"], args.out)
        if not args.json:
            print("\n".join(printable(str(path)) for path in saved))
    elif not args.json:
        for file in listing["files"]:
            print(f"{size(file['size']):>10}  {printable(file['path'])}")
    if listing.get("skipped_count"):
        terminal.say(f"{listing['skipped_count']} entries were not collected"
                     + (" (a cap was reached)" if listing.get("incomplete") else ""))
    return 0


async def _runs(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    page = await api.runs(args.state, args.limit)
    print(json.dumps(page, indent=2, ensure_ascii=False) if args.json
          else "\n".join(run_row(run) for run in page["runs"]) or "no runs")
    return 0


async def run_client(args: argparse.Namespace) -> int:
    """A client command in a running loop; its exit status (every failure reported on one line)."""
    url = args.url or os.environ.get("UNITBOX_URL") or DEFAULT_URL
    token = args.token or os.environ.get("UNITBOX_TOKEN") or None
    terminal = Terminal()
    failed = running.SERVICE_FAILED if args.command == "run" else FAILED
    try:
        async with Api(url, token) as api:
            status: int = await args.client(api, args, terminal)
            return status
    except (ApiError, Unreachable) as exc:
        terminal.say(error_line(exc, url, token=token is not None, files=getattr(args, "file", None)))
        return failed
    except LocalError as exc:
        terminal.say(str(exc))
        return LOCAL_FAILURE


def client_main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_client(args))
    except KeyboardInterrupt:  # outside `run`'s own Ctrl-C handling: nothing to cancel
        return running.EXIT_STATUS["cancelled"]
