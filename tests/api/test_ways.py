"""The ways to run (API v1.1) through the real app and engine over the fake
systemd: entrypoint and result, lint and diagnostics, input files (JSON and
multipart), output files and their two endpoints, output inline. What the
fake's ExecStopPost leaves in the run directory (`fake.leftovers`) stands for
what the sandbox and the collector would have left; the sandbox side itself
is tested on the real test host (tests/integration/)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.api.test_owners import TOKENS, as_, looks_unknown
from tests.support.fake_systemd import FakeSystemd, until
from unitbox import launcher
from unitbox.api.state import ENGINE
from unitbox.profile import unit_name
from unitbox.unit_scripts import LINT_SCRIPT, LINT_SELECT, LINTER_PATH

Client = TestClient[Any, web.Application]
NEW_FIELDS = {"entrypoint": None, "lint": "off", "input_files": 0, "output_files": None, "result_bytes": None,
              "lint_findings": None, "result": None, "diagnostics": None, "files": None}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture
def ruff(tmp_path: Path) -> str:
    """A file where the config says ruff is: the fake never runs it."""
    path = tmp_path / "ruff"
    path.write_bytes(b"")
    return str(path)


async def submit(client: Client, payload: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    reply = await client.post("/run-json", json=payload, headers=headers)
    return reply.status, await reply.json()


async def ran(client: Client, **payload: Any) -> dict[str, Any]:
    """A waited run's answer (it must be accepted)."""
    status, run = await submit(client, {"code": "print(1)", "wait": True, **payload})
    assert status == 200, run
    return run


def the_422(body: dict[str, Any]) -> str:
    """The one field a 422 names."""
    assert body["error"]["code"] == "invalid_input", body
    fields = [d["field"] for d in body["error"]["details"]]
    assert len(fields) == 1, body
    return str(fields[0])


def run_dir(client: Client, run_id: str) -> Path:
    return client.app[ENGINE].run_dir(run_id).path


# --- entrypoint, lint: the request ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["1abc", "class", "None", "a" * 101, "a-b", "", "main()", "a b", "main\n"])
async def test_an_entrypoint_that_is_not_a_function_name_is_422(client: Client, name: str) -> None:
    status, body = await submit(client, {"code": "x = 1", "entrypoint": name})
    assert (status, the_422(body)) == (422, "entrypoint")


async def test_an_entrypoint_is_recorded_and_handed_to_the_sandbox_with_the_result_cap(
        make_client: MakeClient) -> None:
    client = await make_client(result_kb=3)
    run = await ran(client, entrypoint="a" * 100)
    assert run["entrypoint"] == "a" * 100
    assert (run_dir(client, run["id"]) / "in" / "entry").read_text() == f"{'a' * 100} 3072"
    plain = await ran(client)
    assert not (run_dir(client, plain["id"]) / "in" / "entry").exists()


async def test_an_entrypoint_is_looked_up_as_python_spells_it(client: Client) -> None:
    run = await ran(client, entrypoint="\ufb01t")  # "ﬁt": Python's parser stores `def ﬁt` as `fit` (NFKC)
    assert run["entrypoint"] == "fit"
    assert (run_dir(client, run["id"]) / "in" / "entry").read_text().startswith("fit ")


async def test_lint_only_with_an_entrypoint_is_422(client: Client, ruff: str) -> None:
    status, body = await submit(client, {"code": "x = 1", "lint_only": True, "entrypoint": "main"})
    assert (status, the_422(body)) == (422, "entrypoint")


@pytest.mark.parametrize("flag", ["lint", "lint_only"])
async def test_lint_without_ruff_is_422_and_nothing_is_started(make_client: MakeClient, tmp_path: Path,
                                                               flag: str) -> None:
    fake = FakeSystemd()
    client = await make_client(fake, lint={"ruff": str(tmp_path / "no-ruff-here")})
    status, body = await submit(client, {"code": "x = 1", flag: True})
    assert (status, the_422(body)) == (422, "lint")
    assert "ruff" in body["error"]["message"]
    assert fake.start_requests == []


async def test_lint_runs_ruff_before_the_program_and_lint_only_instead_of_it(make_client: MakeClient,
                                                                             ruff: str) -> None:
    fake = FakeSystemd()
    fake.leftovers = {"lint.json": b"[]"}
    client = await make_client(fake, lint={"ruff": ruff})
    before = await ran(client, lint=True)
    only = await ran(client, lint=True, lint_only=True)
    assert (before["lint"], only["lint"]) == ("before", "only")
    assert (before["lint_findings"], before["diagnostics"]) == (0, [])
    before_unit, only_unit = (fake.properties[unit_name(r["id"])] for r in (before, only))
    assert [step[-1] for step in before_unit["ExecStartPre"][1:]] == ["unitbox-lint",
                                                                       before_unit["ExecStopPost"][8]]
    assert LINT_SELECT in before_unit["ExecStartPre"][1][2]
    # The host's ruff is bound in at a fixed path: runs may not see where it lives (a venv under /tmp).
    for unit in (before_unit, only_unit):
        assert f"{ruff}:{LINTER_PATH}" in unit["BindReadOnlyPaths"]
    assert only_unit["ExecStart"][2] == LINT_SCRIPT and len(only_unit["ExecStartPre"]) == 1
    plain = await ran(client)
    assert (plain["lint"], plain["lint_findings"]) == ("off", None)
    assert not any(LINTER_PATH in path for path in fake.properties[unit_name(plain["id"])]["BindReadOnlyPaths"])


# --- input files ------------------------------------------------------------------------------------------------

OK_FILE = {"path": "ok.txt", "content": "fine"}


@pytest.mark.parametrize(("second", "field"), [
    ({"path": "../x", "content": ""}, "files[1].path"),
    ({"path": "/etc/x", "content": ""}, "files[1].path"),
    ({"path": "a/../../x", "content": ""}, "files[1].path"),
    ({"path": "a/..", "content": ""}, "files[1].path"),
    ({"path": "a\u0000b", "content": ""}, "files[1].path"),
    ({"path": "a\\b", "content": ""}, "files[1].path"),
    ({"path": "", "content": ""}, "files[1].path"),
    ({"path": "./", "content": ""}, "files[1].path"),
    ({"path": "a" * 256, "content": ""}, "files[1].path"),
    ({"path": "d/" + "é" * 128, "content": ""}, "files[1].path"),  # 130 characters, a 256-byte name
    ({"path": "\ud800", "content": ""}, "files[1].path"),
    ({"path": "ok.txt", "content": "again"}, "files[1].path"),
    ({"path": "./ok.txt", "content": "again"}, "files[1].path"),
    ({"path": "ok.txt/inner", "content": ""}, "files[0].path"),  # ok.txt, files[0], is now also a directory
    ({"path": "x", "content_b64": "!!not base64"}, "files[1].content_b64"),
    ({"path": "x", "content": "a", "content_b64": "YQ=="}, "files[1].content"),
    ({"path": "x"}, "files[1].content"),
    ({"path": "x", "content": "\udc80"}, "files[1].content"),
])
async def test_each_bad_input_file_is_a_422_naming_its_entry(client: Client, second: dict[str, Any],
                                                            field: str) -> None:
    status, body = await submit(client, {"code": "x = 1", "files": [OK_FILE, second]})
    assert (status, the_422(body)) == (422, field)
    assert body["error"]["message"].startswith(field) or field == "files"


async def test_a_path_given_twice_after_normalisation_is_422(client: Client) -> None:
    status, body = await submit(client, {"code": "x", "files": [{"path": "a//b", "content": ""},
                                                               {"path": "a/./b", "content": ""}]})
    assert (status, the_422(body)) == (422, "files[1].path")
    assert "'a/b' is given twice" in body["error"]["message"]


async def test_a_path_both_a_file_and_a_directory_is_422(client: Client) -> None:
    status, body = await submit(client, {"code": "x", "files": [{"path": "a/b", "content": ""},
                                                               {"path": "a", "content": ""}]})
    assert (status, the_422(body)) == (422, "files[1].path")


async def test_path_caps_follow_the_config(make_client: MakeClient) -> None:
    client = await make_client(files={"path_chars": 400})
    long_ok = "/".join(["b" * 255, "c" * 100])
    assert (await ran(client, files=[{"path": long_ok, "content": ""}]))["input_files"] == 1
    status, body = await submit(client, {"code": "x", "files": [{"path": "b" * 256, "content": ""}]})
    assert (status, the_422(body)) == (422, "files[0].path")
    assert "256 bytes" in body["error"]["message"]
    status, body = await submit(client, {"code": "x", "files": [{"path": "b/" * 200 + "c", "content": ""}]})
    assert (status, the_422(body)) == (422, "files[0].path")
    assert "401 characters" in body["error"]["message"]


async def test_too_many_or_too_large_input_files_are_422(make_client: MakeClient) -> None:
    fake = FakeSystemd()
    client = await make_client(fake, files={"input_count": 2, "input_kb": 1})
    files = [{"path": f"f{i}", "content": "x"} for i in range(3)]
    status, body = await submit(client, {"code": "x", "files": files})
    assert (status, the_422(body)) == (422, "files")
    assert "over the limit of 2" in body["error"]["message"]
    big = base64.b64encode(b"\0" * 1025).decode()
    status, body = await submit(client, {"code": "x", "files": [{"path": "big", "content_b64": big}]})
    assert (status, the_422(body)) == (422, "files")
    assert "1025 bytes" in body["error"]["message"]
    at_caps = [{"path": "a", "content_b64": base64.b64encode(b"\0" * 1000).decode()}, {"path": "b", "content": "x" * 24}]
    assert (await ran(client, files=at_caps))["input_files"] == 2
    assert len(fake.start_requests) == 1


async def test_input_files_are_stored_normalised_for_the_sandbox_to_copy(client: Client) -> None:
    files = [{"path": "data//./in.csv", "content": "a,b\n1,2\n"}, {"path": "raw.bin", "content_b64": "AP8A"},
             {"path": "empty", "content": ""}, {"path": "ünï cödé.txt", "content": "é"}]
    run = await ran(client, files=files)
    assert run["input_files"] == 4
    stored = run_dir(client, run["id"]) / "in" / "files"
    assert sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file()) == [
        "data/in.csv", "empty", "raw.bin", "ünï cödé.txt"]
    assert (stored / "data" / "in.csv").read_bytes() == b"a,b\n1,2\n"
    assert (stored / "raw.bin").read_bytes() == b"\x00\xff\x00"
    assert (stored / "ünï cödé.txt").read_bytes() == "é".encode()
    assert {oct(p.stat().st_mode & 0o777) for p in stored.rglob("*")} == {"0o644", "0o755"}


Part = tuple[str, bytes, str | None]  # name, content, filename


async def post_form(client: Client, *parts: Part) -> ClientResponse:
    """A /run-file form as curl sends it (`-F 'files=@in.csv;filename=data/in.csv'`): the filename raw.
    (aiohttp's FormData would send data%2Fin.csv: it percent-encodes a filename's slashes.)"""
    body = b""
    for name, content, filename in (("file", b"print(1)", "prog.py"), *parts):
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return await client.post("/run-file", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


BOUNDARY = "unitbox-test-boundary"


async def test_multipart_files_parts_are_input_files_named_by_their_filename(client: Client) -> None:
    reply = await post_form(client, ("files", b"a,b\n", "data/in.csv"), ("files", b"\x00\x01", "blob.bin"),
                            ("entrypoint", b"main", None), ("wait", b"true", None))
    assert reply.status == 200, await reply.text()
    run = await reply.json()
    assert (run["input_files"], run["entrypoint"], run["lint"]) == (2, "main", "off")
    stored = run_dir(client, run["id"]) / "in" / "files"
    assert (stored / "data" / "in.csv").read_bytes() == b"a,b\n"
    assert (stored / "blob.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize(("parts", "field"), [
    ([("files", b"x", None)], "files[0].path"),
    ([("files", b"x", "")], "files[0].path"),
    ([("files", b"x", "ok"), ("files", b"y", None)], "files[1].path"),
    ([("files", b"x", "../up")], "files[0].path"),
    ([("files", b"x", "a/../../x")], "files[0].path"),
    ([("files", b"x", "a"), ("files", b"y", "./a")], "files[1].path"),
    ([("entrypoint", b"not a name", None)], "entrypoint"),
    ([("lint", b"maybe", None)], "lint"),
    ([("lint_only", b"2", None)], "lint_only"),
    ([("lint_only", b"true", None), ("entrypoint", b"main", None)], "entrypoint"),
])
async def test_bad_multipart_ways_are_422(client: Client, parts: list[Part], field: str) -> None:
    reply = await post_form(client, *parts)
    assert (reply.status, the_422(await reply.json())) == (422, field)


@pytest.mark.parametrize("name", ["entrypoint", "lint", "stdin", "file"])
async def test_other_multipart_fields_are_still_refused_twice(client: Client, name: str) -> None:
    reply = await post_form(client, (name, b"main", None), (name, b"main", None))
    assert reply.status == 422
    assert "given twice" in (await reply.json())["error"]["message"]


async def test_multipart_lint_without_ruff_is_422(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(lint={"ruff": str(tmp_path / "absent")})
    reply = await post_form(client, ("lint", b"true", None))
    assert (reply.status, the_422(await reply.json())) == (422, "lint")


# --- the answer: v1 unchanged, inline output --------------------------------------------------------------------

async def test_a_v1_request_answers_as_before_with_the_new_fields_at_their_defaults(client: Client) -> None:
    run = await ran(client)
    assert {k: run[k] for k in NEW_FIELDS} == NEW_FIELDS
    assert (run["stdout"], run["stderr"], run["inline_truncated"]) == ("fake output\n", "", False)
    assert (run["state"], run["exit_code"], run["error"]) == ("succeeded", 0, None)
    status = await (await client.get(f"/status/{run['id']}")).json()
    assert {k: status[k] for k in NEW_FIELDS} == NEW_FIELDS
    assert (status["stdout"], status["stderr"], status["inline_truncated"]) == (None, None, None)
    assert {k: v for k, v in status.items() if k not in ("stdout", "stderr", "inline_truncated")} == \
           {k: v for k, v in run.items() if k not in ("stdout", "stderr", "inline_truncated")}
    reply = await client.post("/run-json", json={"code": "print(1)"})
    assert reply.status == 202
    assert set(await reply.json()) == {"id", "state", "status_url", "output_url"}


async def test_inline_output_is_cut_at_inline_output_kb_never_inside_a_character(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=b"x" * 1023 + "é!".encode()), inline_output_kb=1)
    run = await ran(client)
    assert (run["stdout"], run["inline_truncated"], run["stdout_bytes"]) == ("x" * 1023, True, 1026)
    included = await (await client.get(f"/status/{run['id']}?include=output")).json()
    assert (included["stdout"], included["stderr"], included["inline_truncated"]) == ("x" * 1023, "", True)
    whole = await (await client.get(f"/output/{run['id']}")).json()
    assert whole["stdout"] == "x" * 1023 + "é!"


async def test_inline_output_that_fits_is_whole(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=("x" * 1022 + "é").encode()), inline_output_kb=1)
    run = await ran(client)
    assert (run["stdout"], run["inline_truncated"]) == ("x" * 1022 + "é", False)


async def test_include_takes_only_output(client: Client) -> None:
    run = await ran(client)
    for value in ("stdout", "output,files", "OUTPUT"):
        reply = await client.get(f"/status/{run['id']}?include={value}")
        assert (reply.status, the_422(await reply.json())) == (422, "include")
    assert (await client.get(f"/status/{run['id']}?include=")).status == 200


async def test_a_run_waited_past_wait_max_s_answers_202_without_details(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(auto_finish=False), wait_max_s=0.05)
    status, body = await submit(client, {"code": "x", "wait": True})
    assert status == 202 and "stdout" not in body


# --- result -----------------------------------------------------------------------------------------------------

async def finished_with(make_client: MakeClient, leftovers: dict[str, bytes], *, exit_status: int = 0,
                        **payload: Any) -> tuple[Client, dict[str, Any]]:
    fake = FakeSystemd(exit_status=exit_status)
    fake.leftovers = leftovers
    client = await make_client(fake, **payload.pop("config", {}))
    return client, await ran(client, **payload)


async def test_the_entrypoints_value_is_the_result(make_client: MakeClient) -> None:
    value = b'{"a": [1, 2.5, "\\u00e9", null, true]}'
    client, run = await finished_with(make_client, {"return.json": value}, entrypoint="main")
    assert (run["state"], run["error"]) == ("succeeded", None)
    assert (run["result"], run["result_bytes"]) == ({"a": [1, 2.5, "é", None, True]}, len(value))
    status = await (await client.get(f"/status/{run['id']}")).json()
    assert (status["result"], status["result_bytes"]) == (run["result"], len(value))
    page = await (await client.get("/runs")).json()
    assert (page["runs"][0]["result"], page["runs"][0]["result_bytes"]) == (None, len(value))


@pytest.mark.parametrize("value", [b"null", b"0", b'""', b"[]"])
async def test_a_falsy_result_is_still_a_result(make_client: MakeClient, value: bytes) -> None:
    _, run = await finished_with(make_client, {"return.json": value}, entrypoint="main")
    assert (run["state"], run["result"], run["result_bytes"]) == ("succeeded", json.loads(value), len(value))


@pytest.mark.parametrize(("value", "reason"), [
    (b'{"a": NaN}', "not valid JSON"), (b"[Infinity]", "not valid JSON"), (b"{'a': 1}", "not valid JSON"),
    (b"", "not valid JSON"), (b"\xff", "not valid JSON"), (b"[" * 1024, "not valid JSON"),
    (b"1" * 1025, "over the result_kb limit"),
])
async def test_a_forged_or_oversized_value_fails_the_run(make_client: MakeClient, value: bytes,
                                                         reason: str) -> None:
    client, run = await finished_with(make_client, {"return.json": value}, entrypoint="main",
                                      config={"result_kb": 1})
    assert run["state"] == "failed" and reason in run["error"]
    assert (run["result"], run["result_bytes"]) == (None, None)
    status = await (await client.get(f"/status/{run['id']}")).json()
    assert (status["state"], status["result"]) == ("failed", None)


async def test_a_value_at_result_kb_is_taken(make_client: MakeClient) -> None:
    _, run = await finished_with(make_client, {"return.json": b"1" * 1024}, entrypoint="main",
                                 config={"result_kb": 1})
    assert (run["state"], run["result_bytes"]) == ("succeeded", 1024)


async def test_why_the_entrypoint_returned_nothing_is_the_error(make_client: MakeClient) -> None:
    _, run = await finished_with(make_client, {"return.error": b"the script must define main()"},
                                 exit_status=1, entrypoint="main")
    assert (run["state"], run["exit_code"], run["result"]) == ("failed", 1, None)
    assert run["error"] == "the script must define main()"


async def test_an_entrypoint_run_that_left_no_value_and_no_reason_has_no_result(make_client: MakeClient) -> None:
    _, run = await finished_with(make_client, {}, entrypoint="main")
    assert (run["state"], run["result"], run["result_bytes"]) == ("succeeded", None, None)


async def test_a_value_left_by_a_script_run_is_ignored(make_client: MakeClient) -> None:
    _, run = await finished_with(make_client, {"return.json": b"42"})
    assert (run["state"], run["result"], run["result_bytes"], run["error"]) == ("succeeded", None, None, None)


# --- diagnostics ------------------------------------------------------------------------------------------------

def finding(code: str | None, row: int, column: int, message: str = "m") -> dict[str, Any]:
    return {"code": code, "message": message, "location": {"row": row, "column": column},
            "end_location": {"row": row, "column": column + 1}, "filename": "/run/unitbox/code/main.py"}


REPORT = [finding("F401", 9, 1, "`os` imported but unused"), finding("F821", 3, 7, "Undefined name `y`"),
          finding(None, 2, 5, "SyntaxError: Expected an expression"), finding("E999", 3, 1),
          finding("F632", 4, 4), finding("F706", 5, 1), finding("B006", 6, 20), finding("E711", 7, 8),
          finding("F841", 3, 2), {"code": "F401"}, "not a finding", finding("F401", 0, 1), finding("F401", 1, True)]


async def test_diagnostics_come_from_rufs_report_sorted_by_line_with_severities(make_client: MakeClient,
                                                                                ruff: str) -> None:
    client, run = await finished_with(make_client, {"lint.json": json.dumps(REPORT).encode()}, lint=True,
                                      config={"lint": {"ruff": ruff}})
    assert run["state"] == "succeeded" and run["error"] is None
    assert [(d["line"], d["column"], d["code"], d["severity"]) for d in run["diagnostics"]] == [
        (2, 5, "invalid-syntax", "error"), (3, 1, "E999", "error"), (3, 2, "F841", "warning"),
        (3, 7, "F821", "error"), (4, 4, "F632", "error"), (5, 1, "F706", "error"), (6, 20, "B006", "warning"),
        (7, 8, "E711", "warning"), (9, 1, "F401", "warning")]
    assert run["diagnostics"][0]["message"] == "SyntaxError: Expected an expression"
    assert run["lint_findings"] == 9
    status = await (await client.get(f"/status/{run['id']}")).json()
    assert status["diagnostics"] == run["diagnostics"]
    page = await (await client.get("/runs")).json()
    assert (page["runs"][0]["diagnostics"], page["runs"][0]["lint_findings"]) == (None, 9)


async def test_at_most_200_diagnostics(make_client: MakeClient, ruff: str) -> None:
    report = [finding("F401", 1000 - i, 1) for i in range(250)]
    _, run = await finished_with(make_client, {"lint.json": json.dumps(report).encode()}, lint=True,
                                 config={"lint": {"ruff": ruff}})
    assert run["lint_findings"] == len(run["diagnostics"]) == 200
    assert "more than 200 findings, the first 200 kept" in run["error"]
    assert [d["line"] for d in run["diagnostics"]] == sorted(d["line"] for d in run["diagnostics"])


@pytest.mark.parametrize(("report", "reason"), [
    (b"not json", "not valid JSON"), (b'{"a": 1}', "not a list"), (b"[NaN]", "not valid JSON"),
    (b" " * (1 << 20) + b"[]", "over 1024 KiB"),
])
async def test_a_broken_report_is_an_error_but_the_program_ran(make_client: MakeClient, ruff: str, report: bytes,
                                                               reason: str) -> None:
    _, run = await finished_with(make_client, {"lint.json": report}, lint=True, config={"lint": {"ruff": ruff}})
    assert (run["state"], run["lint_findings"], run["diagnostics"]) == ("succeeded", None, None)
    assert reason in run["error"]


@pytest.mark.parametrize("leftovers", [{}, {"lint.json": b"garbage"}])
async def test_lint_only_without_a_usable_report_fails(make_client: MakeClient, ruff: str,
                                                       leftovers: dict[str, bytes]) -> None:
    _, run = await finished_with(make_client, leftovers, lint_only=True, config={"lint": {"ruff": ruff}})
    assert (run["state"], run["lint"], run["lint_findings"]) == ("failed", "only", None)
    assert "linter" in run["error"]


async def test_lint_only_with_a_report_succeeds(make_client: MakeClient, ruff: str) -> None:
    report = json.dumps([finding("F821", 1, 1)]).encode()
    _, run = await finished_with(make_client, {"lint.json": report}, lint_only=True, config={"lint": {"ruff": ruff}})
    assert (run["state"], run["lint_findings"], run["diagnostics"][0]["severity"]) == ("succeeded", 1, "error")


async def test_a_report_left_by_an_unlinted_run_is_ignored(make_client: MakeClient) -> None:
    _, run = await finished_with(make_client, {"lint.json": json.dumps([finding("F821", 1, 1)]).encode()})
    assert (run["lint_findings"], run["diagnostics"]) == (None, None)


# --- output files -----------------------------------------------------------------------------------------------

def entry(path: str, content: bytes, blob: str) -> dict[str, Any]:
    return {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "blob": blob}


CSV, HTML, TEXT = b"a,b\n1,2\n", b"<script>alert(1)</script>", "é\n".encode()
MANIFEST = {"files": [entry("plot.png", PNG, "0"), entry("data/out.csv", CSV, "1"), entry("page.html", HTML, "2"),
                      entry("my notes.txt", TEXT, "3"), entry("a.tar.gz", b"gz", "4"), entry("odd.zzq", b"?", "5"),
                      entry("evil.txt", b"secret", "../secret"), entry("evil2.txt", b"secret", "/etc/x"),
                      {"path": 5, "size": 1, "sha256": "0" * 64, "blob": "6"}],
            "skipped": [{"path": "link", "reason": "a symlink"}, {"path": "fifo", "reason": "not a regular file"}],
            "skipped_count": 2, "incomplete": False}
OUTPUTS = {"files/manifest.json": json.dumps(MANIFEST).encode(), "files/0": PNG, "files/1": CSV, "files/2": HTML,
           "files/3": TEXT, "files/4": b"gz", "files/5": b"?", "secret": b"secret"}
KEPT = ["plot.png", "data/out.csv", "page.html", "my notes.txt", "a.tar.gz", "odd.zzq"]


async def test_collected_files_are_listed_in_the_run_and_by_their_endpoint(make_client: MakeClient) -> None:
    client, run = await finished_with(make_client, OUTPUTS)
    assert run["state"] == "succeeded" and run["output_files"] == len(KEPT)
    assert run["error"] == "output files: 2 not collected"
    assert [f["path"] for f in run["files"]] == KEPT
    png = run["files"][0]
    assert png == {"path": "plot.png", "size": len(PNG), "sha256": hashlib.sha256(PNG).hexdigest(),
                   "media_type": "image/png", "url": f"/runs/{run['id']}/files/plot.png"}
    assert run["files"][3]["url"] == f"/runs/{run['id']}/files/my%20notes.txt"
    listing = await (await client.get(f"/runs/{run['id']}/files")).json()
    assert listing == {"id": run["id"], "files": run["files"], "skipped": MANIFEST["skipped"], "skipped_count": 2,
                       "incomplete": False}
    page = await (await client.get("/runs")).json()
    assert (page["runs"][0]["files"], page["runs"][0]["output_files"]) == (None, len(KEPT))


@pytest.mark.parametrize(("path", "media_type", "disposition", "body"), [
    ("plot.png", "image/png", "inline; filename*=UTF-8''plot.png", PNG),
    ("data/out.csv", "text/csv", "inline; filename*=UTF-8''out.csv", CSV),
    ("page.html", "text/html", "attachment; filename*=UTF-8''page.html", HTML),
    ("my%20notes.txt", "text/plain", "inline; filename*=UTF-8''my%20notes.txt", TEXT),
    ("a.tar.gz", "application/octet-stream", "attachment; filename*=UTF-8''a.tar.gz", b"gz"),
    ("odd.zzq", "application/octet-stream", "attachment; filename*=UTF-8''odd.zzq", b"?"),
])
async def test_a_file_is_served_with_its_type_and_the_security_headers(make_client: MakeClient, path: str,
                                                                       media_type: str, disposition: str,
                                                                       body: bytes) -> None:
    client, run = await finished_with(make_client, OUTPUTS)
    reply = await client.get(f"/runs/{run['id']}/files/{path}")
    assert reply.status == 200 and await reply.read() == body
    assert reply.content_type == media_type
    assert reply.headers["Content-Disposition"] == disposition
    assert reply.headers["Content-Security-Policy"].startswith("sandbox; default-src 'none'")
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Cross-Origin-Resource-Policy"] == "same-origin"


async def test_a_file_is_served_in_ranges(make_client: MakeClient) -> None:
    client, run = await finished_with(make_client, OUTPUTS)
    reply = await client.get(f"/runs/{run['id']}/files/plot.png", headers={"Range": "bytes=8-11"})
    assert reply.status == 206 and await reply.read() == PNG[8:12]
    assert reply.headers["Content-Range"] == f"bytes 8-11/{len(PNG)}"


@pytest.mark.parametrize("path", ["nope.txt", "evil.txt", "evil2.txt", "secret", "manifest.json", "0",
                                  "files/0", "data", "PLOT.PNG", "plot.png/"])
async def test_a_path_the_manifest_does_not_list_as_kept_is_404(make_client: MakeClient, path: str) -> None:
    client, run = await finished_with(make_client, OUTPUTS)
    reply = await client.get(f"/runs/{run['id']}/files/{path}")
    assert reply.status == 404
    body = await reply.json()
    assert body["error"]["code"] == "not_found" and "it left no such file" in body["error"]["message"]


async def test_a_broken_manifest_means_no_files(make_client: MakeClient) -> None:
    client, run = await finished_with(make_client, {"files/manifest.json": b"{not json", "files/0": PNG})
    assert run["state"] == "succeeded" and run["files"] == [] and run["output_files"] == 0
    listing = await (await client.get(f"/runs/{run['id']}/files")).json()
    assert (listing["files"], listing["incomplete"]) == ([], True)


async def test_a_run_that_left_nothing_has_no_files(client: Client) -> None:
    run = await ran(client)
    assert (run["files"], run["output_files"]) == (None, None)
    listing = await (await client.get(f"/runs/{run['id']}/files")).json()
    assert listing == {"id": run["id"], "files": [], "skipped": [], "skipped_count": 0, "incomplete": False}


async def test_a_run_still_going_has_no_files_yet(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    fake.leftovers = OUTPUTS
    client = await make_client(fake)
    _, body = await submit(client, {"code": "x"})
    await until(lambda: unit_name(body["id"]) in fake.units)
    assert (await (await client.get(f"/runs/{body['id']}/files")).json())["files"] == []
    reply = await client.get(f"/runs/{body['id']}/files/plot.png")
    assert reply.status == 404
    assert "it has not ended yet" in (await reply.json())["error"]["message"]
    fake.finish(unit_name(body["id"]))
    await until(lambda: fake.units[unit_name(body["id"])].end is not None)
    await client.app[ENGINE].wait(body["id"], 5)
    assert (await (await client.get(f"/status/{body['id']}")).json())["output_files"] == len(KEPT)
    assert await (await client.get(f"/runs/{body['id']}/files/plot.png")).read() == PNG


async def test_another_tokens_files_are_404_like_an_unknown_run(make_client: MakeClient) -> None:
    fake = FakeSystemd()
    fake.leftovers = OUTPUTS
    client = await make_client(fake, tokens=TOKENS)
    status, run = await submit(client, {"code": "x", "wait": True}, **as_("alice"))
    assert status == 200 and run["output_files"] == len(KEPT)
    for path in ("/runs/{}/files", "/runs/{}/files/plot.png", "/status/{}?include=output"):
        await looks_unknown(client, "GET", path, run["id"], "bob")
        for token in ("alice", "ops"):
            assert (await client.get(path.format(run["id"]), headers=as_(token))).status == 200


async def test_a_run_is_not_seen_ended_before_its_leftovers_are_read(make_client: MakeClient,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reading, go_on = threading.Event(), threading.Event()
    real = launcher.summarize

    def slow_summarize(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        go_on.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "summarize", slow_summarize)
    fake = FakeSystemd()
    fake.leftovers = {"return.json": b"42"}
    client = await make_client(fake)
    _, body = await submit(client, {"code": "def main(): return 42", "entrypoint": "main"})
    await until(reading.is_set)
    try:
        seen = await (await client.get(f"/status/{body['id']}")).json()
    finally:
        go_on.set()
    assert seen["state"] in ("starting", "running") or seen["result"] == 42
