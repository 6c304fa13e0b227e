"""The command-line client (`unitbox run`, status, logs, cancel, files, runs)
against the real app over the fake systemd: the program's output copied to
stdout and stderr as it is written, exit statuses, --json, --detach, input
and output files, Ctrl-C, a dropped event stream resumed exactly, and the
one-line errors (401, 422 naming the option, 503, unreachable)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.support.daemon import free_port
from tests.support.fake_systemd import FakeSystemd, until
from unitbox.api.state import ENGINE
from unitbox.cli import _parser
from unitbox.client import run as running
from unitbox.client.commands import run_client
from unitbox.client.files import LocalError, local_path
from unitbox.client.http import Api, Event
from unitbox.client.terminal import Terminal
from unitbox.profile import unit_name

Client = TestClient[Any, web.Application]
TOKENS = {"alice": {"secret": "alice-secret"}}


@dataclass
class Ran:
    status: int
    stdout: str
    stderr: str


Cli = Callable[..., Awaitable[Ran]]


@pytest.fixture
def cli(capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`unitbox ARGV…` in this loop against `client`, its exit status and what it printed."""
    monkeypatch.delenv("UNITBOX_TOKEN", raising=False)
    # The server's logs (a handler another test may have left on a closed stream) are not the CLI's stderr.
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])

    async def call(client: Client | None, *argv: str) -> Ran:
        if client is not None:
            monkeypatch.setenv("UNITBOX_URL", str(client.make_url("")))
        status = await run_client(_parser().parse_args(list(argv)))
        out, err = capsysbinary.readouterr()
        return Ran(status, out.decode(), err.decode())
    return call


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "hello.py"
    path.write_text("print('hello')\n")
    return str(path)


async def test_run_prints_the_output_and_exits_with_the_programs_status(make_client: MakeClient, cli: Cli,
                                                                         script: str) -> None:
    client = await make_client(FakeSystemd(stdout=b"three\n", exit_status=3))
    ran = await cli(client, "run", script)
    assert (ran.status, ran.stdout, ran.stderr) == (3, "three\n", "")
    ran = await cli(await make_client(FakeSystemd(stdout=b"ok\n")), "run", script)
    assert (ran.status, ran.stdout) == (0, "ok\n")


async def test_output_streams_live_to_stdout_and_stderr_apart(make_client: MakeClient, cli: Cli, script: str,
                                                              capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    client = await make_client(fake)
    running_cli = asyncio.ensure_future(cli(client, "run", script, "--flag", "x"))
    await until(lambda: len(fake.units) == 1)
    name = next(iter(fake.units))
    unit = fake.units[name]
    fake.activate(name)
    seen_out = seen_err = b""
    for line in (b"one\n", b"two\n"):
        os.write(unit.fds["output"], line)
        os.write(unit.fds["error"], b"warn " + line)

        def arrived(expected: bytes = line) -> bool:
            nonlocal seen_out, seen_err
            out, err = capsysbinary.readouterr()
            seen_out, seen_err = seen_out + out, seen_err + err
            return seen_out.endswith(expected) and seen_err.endswith(b"warn " + expected)
        await until(arrived)  # each line before the run ends: streamed, not printed at the end
    assert not running_cli.done()
    fake.finish(name)
    ran = await running_cli
    assert ran.status == 0 and seen_out == b"one\ntwo\n" and seen_err == b"warn one\nwarn two\n"
    run_id = name.removeprefix("unitbox-run-").removesuffix(".service")
    assert client.app is not None
    assert (client.app[ENGINE].run_dir(run_id).inputs / "argv").read_bytes() == b"--flag\0x"


async def test_a_dropped_event_stream_resumes_from_its_last_id(make_client: MakeClient, cli: Cli, script: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    client = await make_client(fake)
    real_events = Api.events
    resumed_from: list[str] = []

    async def cut_once(self: Api, run_id: str, last_event_id: str = "") -> AsyncIterator[Event]:
        resumed_from.append(last_event_id)
        async for event in real_events(self, run_id, last_event_id):
            yield event
            if event.name == "stdout" and len(resumed_from) == 1:
                raise aiohttp.ServerDisconnectedError()
    monkeypatch.setattr(Api, "events", cut_once)
    running_cli = asyncio.ensure_future(cli(client, "run", script))
    await until(lambda: len(fake.units) == 1)
    name = next(iter(fake.units))
    fake.activate(name)
    os.write(fake.units[name].fds["output"], b"before\n")
    await until(lambda: len(resumed_from) == 2)
    os.write(fake.units[name].fds["output"], b"after\n")
    fake.finish(name)
    ran = await running_cli
    assert resumed_from == ["", "7.0"]
    assert ran.stdout == "before\nafter\n" and ran.status == 0


@pytest.mark.parametrize(("run", "status"), [
    ({"state": "succeeded", "exit_code": 0, "signal": None}, 0),
    ({"state": "failed", "exit_code": 3, "signal": None}, 3),
    ({"state": "failed", "exit_code": None, "signal": "SIGSEGV"}, 139),
    ({"state": "timed_out", "exit_code": None, "signal": "SIGKILL"}, 124),
    ({"state": "oom_killed", "exit_code": None, "signal": "SIGKILL"}, 137),
    ({"state": "cancelled", "exit_code": None, "signal": "SIGTERM"}, 130),
    ({"state": "error", "exit_code": None, "signal": None}, 125),
    ({"state": "running", "exit_code": None, "signal": None}, 125),
])
def test_exit_statuses(run: dict[str, Any], status: int) -> None:
    assert running.exit_status(run) == status


async def test_a_timeout_exits_124_and_says_so(make_client: MakeClient, cli: Cli, script: str) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake)
    running_cli = asyncio.ensure_future(cli(client, "run", "--timeout", "1", script))
    await until(lambda: len(fake.units) == 1)
    fake.finish(next(iter(fake.units)), result="timeout", exit_code="killed", exit_status="9")
    ran = await running_cli
    assert ran.status == 124
    assert ran.stderr.startswith("unitbox: run ") and "timed_out: the run reached its timeout_s limit" in ran.stderr


async def test_json_prints_the_final_run_with_its_output(make_client: MakeClient, cli: Cli, script: str) -> None:
    client = await make_client(FakeSystemd(stdout=b"fake output\n", exit_status=2))
    ran = await cli(client, "run", "--json", "--memory", "100", script)
    run = json.loads(ran.stdout)
    assert ran.status == 2 and run["state"] == "failed" and run["exit_code"] == 2
    assert run["stdout"] == "fake output\n" and run["limits"]["memory_mb"] == 100
    assert run == await (await client.get(f"/status/{run['id']}?include=output")).json()


async def test_detach_prints_the_id_and_returns(make_client: MakeClient, cli: Cli, script: str) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake)
    ran = await cli(client, "run", "--detach", script)
    assert ran.status == 0 and ran.stderr == ""
    run_id = ran.stdout.strip()
    assert (await (await client.get(f"/status/{run_id}")).json())["state"] in ("starting", "running")
    ran = await cli(client, "status", run_id)
    assert ran.status == 0 and f"id           {run_id}" in ran.stdout
    ran = await cli(client, "cancel", run_id)
    assert ran.status == 0 and ran.stdout == f"run {run_id}: cancelling\n"
    await until(lambda: fake.stopped == [unit_name(run_id)])
    ran = await cli(client, "logs", "--follow", run_id)
    assert ran.status == 130 and ran.stdout == "fake output\n"
    ran = await cli(client, "runs", "--state", "cancelled")
    assert ran.stdout.startswith(f"{run_id}  cancelled")


@pytest.fixture
def ctrl_c_taken(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once the CLI has its run and handles SIGINT: a Ctrl-C before that is the
    test runner's KeyboardInterrupt (a slow machine, e.g. a VM under TCG, gets there late)."""
    taken = asyncio.Event()
    enter = running.CtrlC.__aenter__

    async def entered(self: running.CtrlC) -> running.CtrlC:
        handler = await enter(self)
        taken.set()
        return handler
    monkeypatch.setattr(running.CtrlC, "__aenter__", entered)
    return taken


async def test_ctrl_c_cancels_the_run_and_shows_its_end(make_client: MakeClient, cli: Cli, script: str,
                                                       ctrl_c_taken: asyncio.Event) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake)
    running_cli = asyncio.ensure_future(cli(client, "run", script))
    await until(lambda: len(fake.units) == 1)
    await asyncio.wait_for(ctrl_c_taken.wait(), 5)
    await asyncio.sleep(0.1)  # following the events
    os.kill(os.getpid(), signal.SIGINT)
    ran = await running_cli
    assert fake.stopped == list(fake.units)
    assert ran.status == 130 and "cancelling run" in ran.stderr and "cancelled" in ran.stderr


async def test_a_second_ctrl_c_stops_waiting_at_once(make_client: MakeClient, cli: Cli, script: str,
                                                    ctrl_c_taken: asyncio.Event) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake, max_concurrent=1)
    await client.post("/run-json", json={"code": "x"})  # holds the slot: the CLI's run stays queued
    running_cli = asyncio.ensure_future(cli(client, "run", script))
    await asyncio.wait_for(ctrl_c_taken.wait(), 5)  # the unit seen is the slot holder's: the CLI's run is queued
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    ran = await asyncio.wait_for(running_cli, 5)
    assert ran.status == 130 and "stopped waiting" in ran.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


async def test_input_files_go_to_their_paths(make_client: MakeClient, cli: Cli, script: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.csv").write_text("a,b\n1,2\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    monkeypatch.chdir(tmp_path)
    ran = await cli(client, "run", "--json", "--file", "data/in.csv", "--file", str(tmp_path / "blob.bin"),
                    "--file", "../" + tmp_path.name + "/blob.bin", script)
    assert ran.status == 125 and ran.stderr == (  # blob.bin given twice: the option that gave it the second time
        f"unitbox: the server refused the request: --file ../{tmp_path.name}/blob.bin (files[2].path): "
        "'blob.bin' is given twice\n")
    ran = await cli(client, "run", "--json", "--file", "data/in.csv", "--file", str(tmp_path / "blob.bin"), script)
    run = json.loads(ran.stdout)
    assert run["input_files"] == 2
    assert client.app is not None
    placed = client.app[ENGINE].run_dir(run["id"]).inputs / "files"
    assert (placed / "data" / "in.csv").read_text() == "a,b\n1,2\n"
    assert (placed / "blob.bin").read_bytes() == bytes(range(256))


async def test_output_files_are_downloaded_and_checked(make_client: MakeClient, cli: Cli, script: str,
                                                       tmp_path: Path) -> None:
    files = {"plot.png": b"\x89PNG fake", "out/table.csv": b"x,y\n1,2\n"}
    fake = FakeSystemd()
    fake.leftovers = {f"files/{n}": content for n, content in enumerate(files.values())}
    fake.leftovers["files/manifest.json"] = json.dumps({
        "files": [{"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "blob": str(n)}
                  for n, (path, content) in enumerate(files.items())],
        "skipped": [], "skipped_count": 0, "incomplete": False}).encode()
    client = await make_client(fake)
    ran = await cli(client, "run", "--out", str(tmp_path / "got"), script)
    assert ran.status == 0
    assert {str(p.relative_to(tmp_path / "got")): p.read_bytes() for p in (tmp_path / "got").rglob("*")
            if p.is_file()} == files
    run_id = json.loads((await cli(client, "runs", "--json", "--limit", "1")).stdout)["runs"][0]["id"]
    ran = await cli(client, "files", run_id)
    assert ran.stdout.splitlines() == ["       9 B  plot.png", "       8 B  out/table.csv"]
    ran = await cli(client, "files", run_id, "--out", str(tmp_path / "again"))
    assert ran.stdout.splitlines() == [str(tmp_path / "again" / "plot.png"), str(tmp_path / "again" / "out/table.csv")]
    fake.leftovers["files/0"] = b"\x89PNG FAKE"  # the bytes served differ from the listing's SHA-256
    ran = await cli(client, "run", "--out", str(tmp_path / "bad"), script)
    assert ran.status == 2 and "plot.png: got 9 bytes with SHA-256" in ran.stderr
    assert not (tmp_path / "bad" / "plot.png").exists() and list((tmp_path / "bad").iterdir()) == []


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "", "a/\0"])
def test_an_output_path_that_would_leave_the_directory_is_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(LocalError, match="unsafe path"):
        local_path(tmp_path, path)


async def test_entrypoint_result_is_printed_after_the_output(make_client: MakeClient, cli: Cli, script: str) -> None:
    fake = FakeSystemd(stdout=b"working\n")
    fake.leftovers = {"return.json": b'{"answer": 42}'}
    client = await make_client(fake)
    ran = await cli(client, "run", "--entrypoint", "main", script)
    assert ran.status == 0 and ran.stdout == 'working\n{"answer": 42}\n'


async def test_tokens_from_the_option_or_the_environment(make_client: MakeClient, cli: Cli, script: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client(tokens=TOKENS)
    ran = await cli(client, "run", script)
    assert ran.status == 125 and ran.stderr == (f"unitbox: the server at {client.make_url('')} needs a token: "
                                                "--token or $UNITBOX_TOKEN\n")
    ran = await cli(client, "runs", "--token", "wrong")
    assert ran.status == 1 and "refused the token" in ran.stderr
    assert (await cli(client, "run", "--token", "alice-secret", script)).status == 0
    monkeypatch.setenv("UNITBOX_TOKEN", "alice-secret")
    ran = await cli(client, "runs")
    assert ran.status == 0 and len(ran.stdout.splitlines()) == 1


async def test_a_refused_limit_names_the_option(client: Client, cli: Cli, script: str) -> None:
    ran = await cli(client, "run", "--timeout", "0", script)
    assert ran.status == 125 and ran.stderr == ("unitbox: the server refused the request: --timeout "
                                                "(limits.timeout_s): must be greater than 0, got 0.0\n")
    ran = await cli(client, "run", "--entrypoint", "class", script)
    assert ran.stderr.startswith("unitbox: the server refused the request: --entrypoint (entrypoint): ")


async def test_a_full_queue_says_when_to_come_back(make_client: MakeClient, cli: Cli, script: str) -> None:
    client = await make_client(FakeSystemd(auto_finish=False), max_concurrent=1, queue_size=0)
    await client.post("/run-json", json={"code": "x"})
    ran = await cli(client, "run", script)
    assert ran.status == 125 and ran.stderr == ("unitbox: the server cannot take it now (queue_full): the queue is "
                                                "full (0 runs waiting); try again later (Retry-After: 1 s)\n")


async def test_an_unreachable_server_is_one_line(cli: Cli, script: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ran = await cli(None, "run", "--url", url, script)
    assert ran.status == 125
    assert ran.stderr == f"unitbox: cannot reach the unitbox server at {url}: Connection refused " \
                         "(is it running? --url or $UNITBOX_URL)\n"
    ran = await cli(None, "status", "--url", url, "0123456789abcdef")
    assert ran.status == 1 and ran.stderr.count("\n") == 1


async def test_an_unreadable_script_is_a_local_error(client: Client, cli: Cli, tmp_path: Path) -> None:
    ran = await cli(client, "run", str(tmp_path / "missing.py"))
    assert ran.status == 2 and ran.stderr == f"unitbox: cannot read the program {tmp_path}/missing.py: " \
                                             "No such file or directory\n"


async def test_logs_copies_both_streams_byte_for_byte(make_client: MakeClient, cli: Cli) -> None:
    client = await make_client(FakeSystemd(stdout=b"caf\xc3\xa9\n"))
    run_id = (await (await client.post("/run-json", json={"code": "x", "wait": True})).json())["id"]
    assert client.app is not None
    client.app[ENGINE].run_dir(run_id).output("stderr").write_bytes(b"oops\n")
    ran = await cli(client, "logs", run_id)
    assert (ran.status, ran.stdout, ran.stderr) == (0, "café\n", "oops\n")
    ran = await cli(client, "logs", "0123456789abcdef")
    assert ran.status == 1 and "404 not_found" in ran.stderr


def test_help_lists_server_and_client_commands_apart(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = capsys.readouterr().out
    server, client = text.index("server commands"), text.index("client commands")
    assert server < text.index("\n  serve ") < client < text.index("\n  run ") < text.index("\n  runs ")


@pytest.mark.parametrize(("option", "status", "stdout"), [("--lint", 0, "fake output\n"), ("--lint-only", 1, "")])
async def test_lint_findings_go_to_stderr_as_file_line_col(make_client: MakeClient, cli: Cli, script: str,
                                                           option: str, status: int, stdout: str) -> None:
    fake = FakeSystemd(stdout=stdout.encode())
    fake.leftovers = {"lint.json": json.dumps([{"location": {"row": 5, "column": 12}, "code": "F821",
                                                "message": "Undefined name `x`"}]).encode()}
    client = await make_client(fake)
    ran = await cli(client, "run", option, script)
    assert (ran.status, ran.stdout, ran.stderr) == (status, stdout, f"{script}:5:12: F821 Undefined name `x`\n")


async def test_a_queued_run_says_so_on_a_terminal_until_it_starts(make_client: MakeClient, cli: Cli, script: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    client = await make_client(fake, max_concurrent=1)
    await client.post("/run-json", json={"code": "x"})  # holds the only slot
    await until(lambda: len(fake.units) == 1)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    shown: list[str | None] = []
    show_status = Terminal.show_status
    monkeypatch.setattr(Terminal, "show_status", lambda self, message: [shown.append(message),
                                                                         show_status(self, message)])
    running_cli = asyncio.ensure_future(cli(client, "run", script))
    await until(lambda: shown)  # its follower has seen it queued
    first = next(iter(fake.units))
    fake.finish(first)
    await until(lambda: len(fake.units) == 2)
    second = next(name for name in fake.units if name != first)
    fake.activate(second)
    os.write(fake.units[second].fds["error"], b"from the program\n")
    fake.finish(second)
    ran = await running_cli
    run_id = second.removeprefix("unitbox-run-").removesuffix(".service")
    assert ran.stderr == f"unitbox: run {run_id} is queued, waiting for a free slot…\r\x1b[Kfrom the program\n"


async def test_the_program_may_come_from_stdin_and_stdin_must_be_text(client: Client, cli: Cli, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"print('from a pipe')\n")))
    run = json.loads((await cli(client, "run", "--json", "-")).stdout)
    assert client.app is not None
    assert client.app[ENGINE].run_dir(run["id"]).script.read_bytes() == b"print('from a pipe')\n"
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    ran = await cli(client, "run", "--stdin", str(tmp_path / "latin1.txt"), "-")
    assert ran.status == 2 and ran.stderr == (f"unitbox: --stdin {tmp_path}/latin1.txt: not UTF-8 text (the API "
                                              "takes stdin as text)\n")
    ran = await cli(client, "run", "--stdin", "-", "-")
    assert ran.status == 2 and "cannot both come from stdin" in ran.stderr


def test_a_reader_that_goes_away_stops_the_copying_not_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """`unitbox run x.py | head -1`: the rest goes nowhere, the run is still followed to its exit status."""
    read, write = os.pipe()
    os.close(read)
    with io.TextIOWrapper(io.BufferedWriter(io.FileIO(write, "w"))) as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        terminal = Terminal()
        terminal.write("stdout", "nobody reads this\n")
        terminal.sink("stdout").write(b"nor this\n")
        assert os.readlink(f"/proc/self/fd/{write}") == "/dev/null"
