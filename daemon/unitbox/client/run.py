"""`unitbox run SCRIPT [ARGS…]`: submit a program, copy its output to this
terminal as it is written (GET /runs/<id>/events), and exit with its exit
status — or, for ends that are not an exit, the documented codes below
(packaging/unitbox.1, EXIT STATUS)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from unitbox.client.files import LocalError, input_file, save_files
from unitbox.client.http import Api, ApiError, Unreachable
from unitbox.client.terminal import Terminal, diagnostic_lines, error_line

# A run that did not end by exiting, as a shell would see a process end so
# (timeout(1): 124; killed by SIGKILL: 137; interrupted: 130).
EXIT_STATUS = {"timed_out": 124, "error": 125, "cancelled": 130, "oom_killed": 137}
SERVICE_FAILED = 125  # the run ended `error`, or the server could not be asked at all
LIMIT_OPTIONS = {"timeout": "timeout_s", "memory": "memory_mb", "cpu": "cpu_percent", "tasks": "tasks",
                 "output_kb": "output_kb", "disk": "disk_mb"}
CANCEL_SETTLE_S = 5.0  # how long a cancel request still in flight may take when the client leaves


def exit_status(run: dict[str, Any]) -> int:
    state = run["state"]
    if state in EXIT_STATUS:
        return EXIT_STATUS[state]
    if state not in ("succeeded", "failed"):
        return SERVICE_FAILED  # not over: never asked for, but never mistaken for success
    if run["exit_code"] is not None:
        return int(run["exit_code"])
    if run["signal"] is not None and run["signal"] in signal.Signals.__members__:
        return 128 + signal.Signals[run["signal"]].value
    return 0 if state == "succeeded" else 1


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /run-json body; LocalError for a file that cannot be read."""
    if args.script == "-" and args.stdin == "-":
        raise LocalError("the program and --stdin cannot both come from stdin (-)")
    source = _read(args.script, "the program")
    request: dict[str, Any] = {"code_b64": base64.b64encode(source).decode(), "args": args.args}
    limits = {field: getattr(args, option) for option, field in LIMIT_OPTIONS.items()
              if getattr(args, option) is not None}
    if limits:
        request["limits"] = limits
    if args.stdin is not None:
        try:
            request["stdin"] = _read(args.stdin, "--stdin").decode("utf-8")
        except UnicodeDecodeError:
            raise LocalError(f"--stdin {args.stdin}: not UTF-8 text (the API takes stdin as text)") from None
    if args.runtime is not None:
        request["runtime"] = args.runtime
    if args.entrypoint is not None:
        request["entrypoint"] = args.entrypoint
    if args.lint:
        request["lint"] = True
    if args.lint_only:
        request["lint_only"] = True
    if args.file:
        request["files"] = [input_file(given) for given in args.file]
    return request


def _read(name: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read {what} {name}: {exc.strerror or exc}") from None


async def follow_run(api: Api, run_id: str, terminal: Terminal, *, show_output: bool = True) -> dict[str, Any]:
    """Show the run's output as it comes (and `queued` on a terminal) until its end; the final Run."""
    async for event in api.follow(run_id):
        if event.name == "state":
            queued = event.data.get("state") == "queued"
            terminal.show_status(f"run {run_id} is queued, waiting for a free slot…" if queued else None)
        elif event.name in ("stdout", "stderr") and show_output:
            terminal.write(event.name, str(event.data.get("text", "")))
        elif event.name == "end":
            terminal.show_status(None)
            return dict(event.data)
    raise Unreachable("the event stream ended before the run did")


class CtrlC:
    """The first Ctrl-C asks the server to cancel the run, and the run is shown
    to its end; a second one stops waiting at once (the cancel stands)."""

    def __init__(self, api: Api, run_id: str, terminal: Terminal) -> None:
        self.api, self.run_id, self.terminal = api, run_id, terminal
        self.presses = 0
        self.waiting = asyncio.current_task()
        self.cancelling: asyncio.Task[None] | None = None

    @property
    def gave_up(self) -> bool:
        return self.presses >= 2

    async def __aenter__(self) -> CtrlC:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._pressed)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        if self.cancelling is not None:
            await asyncio.wait([self.cancelling], timeout=CANCEL_SETTLE_S)

    def _pressed(self) -> None:
        self.presses += 1
        if self.presses == 1:
            self.terminal.say(f"cancelling run {self.run_id} (Ctrl-C again to stop waiting)")
            self.cancelling = asyncio.create_task(self._cancel())
        elif self.presses == 2 and self.waiting is not None:
            self.waiting.cancel()

    async def _cancel(self) -> None:
        try:
            await self.api.cancel(self.run_id)
        except (ApiError, Unreachable) as exc:
            self.terminal.say(f"could not cancel run {self.run_id}: "
                              f"{error_line(exc, self.api.url, token=bool(self.api.headers))}")


async def run(api: Api, args: argparse.Namespace, terminal: Terminal) -> int:
    request = build_request(args)
    submitted = await api.submit(request)
    run_id = str(submitted["id"])
    if args.detach:
        print(json.dumps(submitted) if args.json else run_id, flush=True)
        return 0
    async with CtrlC(api, run_id, terminal) as ctrl_c:
        try:
            final = await follow_run(api, run_id, terminal, show_output=not args.json)
        except asyncio.CancelledError:
            if not ctrl_c.gave_up:
                raise
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
            terminal.say(f"stopped waiting; run {run_id} was asked to cancel (unitbox status {run_id})")
            return EXIT_STATUS["cancelled"]
    return await _finish(api, args, terminal, final)


async def _finish(api: Api, args: argparse.Namespace, terminal: Terminal, final: dict[str, Any]) -> int:
    """What comes after the output: the Run as JSON, or lint findings, the result, files, how it ended."""
    run_id = final["id"]
    if args.json:
        final = await api.status(run_id, include_output=True)
        print(json.dumps(final, indent=2, ensure_ascii=False), flush=True)
    else:
        script = "<stdin>" if args.script == "-" else args.script
        for line in diagnostic_lines(script, final.get("diagnostics") or []):
            terminal.write("stderr", line + "\n")
        if final.get("result_bytes") is not None:
            terminal.write("stdout", json.dumps(final.get("result"), ensure_ascii=False) + "\n")
    files = final.get("files") or []
    if args.out is not None and files:
        saved = await save_files(api, files, args.out)
        terminal.note(f"saved {len(saved)} output files in {args.out}")
    elif files:
        terminal.note(f"the run left {len(files)} files: unitbox files {run_id} --out DIR")
    if not args.json:
        _tell_how_it_ended(final, terminal)
    if args.lint_only:
        return 1 if final.get("lint_findings") else exit_status(final)
    return exit_status(final)


def _tell_how_it_ended(run: dict[str, Any], terminal: Terminal) -> None:
    """A line on stderr when the end was not the program's own exit, or lost something."""
    state, run_id = run["state"], run["id"]
    if state != "succeeded" and run["signal"] is not None and state == "failed":
        terminal.say(f"run {run_id} was killed by {run['signal']}" + (f": {run['error']}" if run["error"] else ""))
    elif state not in ("succeeded", "failed") or run["error"]:
        terminal.say(f"run {run_id} {state}" + (f": {run['error']}" if run["error"] else ""))
    for stream in ("stdout", "stderr"):
        if run[f"{stream}_truncated"]:
            terminal.say(f"run {run_id}: its {stream} went past output_kb ({run['limits']['output_kb']} KiB); "
                         "the rest was dropped")

