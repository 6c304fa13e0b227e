"""The attack catalogue, part 3: hostile input at the HTTP edge (issue 5).
Each is a clean 4xx with a JSON error, or a clean run result; never a 5xx,
and the daemon keeps serving."""

from __future__ import annotations

import base64
import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.daemon import Client, Daemon, Response
from tests.support.hostile import contained_afterwards
from tests.support.testhost import TestHost


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


def multipart(fields: dict[str, bytes], filename: str = "main.py") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f"--{boundary}\r\n".encode())
        extra = f'; filename="{filename}"' if name == "file" else ""
        body.write(f'Content-Disposition: form-data; name="{name}"{extra}\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n" if name == "file" else b"\r\n")
        body.write(value + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def upload(client: Client, fields: dict[str, bytes], wait: bool = True) -> Response:
    body, content_type = multipart(fields)
    return client.request("POST", "/run-file" + ("?wait=true" if wait else ""), body, content_type)


def refused(reply: Response, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:500])
    error: dict[str, Any] = json.loads(reply.body)["error"]
    assert error["code"] and error["message"]
    return error


def test_code_with_nul_bytes_is_a_clean_422(client: Client) -> None:
    source = b"print('a')\0print('b')\n"
    refused(client.post_json("/run-json", {"code": source.decode()}), 422)
    refused(client.post_json("/run-json", {"code_b64": base64.b64encode(source).decode()}), 422)
    refused(upload(client, {"file": source}), 422)


def test_ten_megabytes_of_code_over_the_cap_is_a_clean_413(client: Client) -> None:
    big = "x = 1\n" * (10 * 1024 * 1024 // 6)
    refused(client.post_json("/run-json", {"code": big}), 413)
    refused(upload(client, {"file": big.encode()}), 413)
    assert client.get("/healthz").status == 200


def test_binary_upload_is_a_clean_422(client: Client) -> None:
    refused(upload(client, {"file": bytes(range(256)) * 64}), 422)
    refused(upload(client, {"file": b"\x7fELF\x02\x01\x01" + b"\xff\xfe" * 512}), 422)  # no NUL, not UTF-8


def test_non_utf8_source_is_422_unless_its_encoding_is_declared(client: Client) -> None:
    latin1 = "print('caf\xe9')\n".encode("latin-1")
    refused(upload(client, {"file": latin1}), 422)
    refused(client.post_json("/run-json", {"code_b64": base64.b64encode(latin1).decode()}), 422)
    declared = b"# -*- coding: latin-1 -*-\n" + latin1
    reply = upload(client, {"file": declared})
    assert reply.status == 200, reply.body
    run = reply.json()
    assert run["state"] == "succeeded", run
    assert client.get(f"/output/{run['id']}").json()["stdout"] == "caf\xe9\n"
    lying = b"# -*- coding: utf-16 -*-\nprint(1)\n"
    assert upload(client, {"file": lying}).status in (200, 422)


def test_zip_disguised_as_a_py_file_is_a_clean_422(client: Client) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("__main__.py", "print('from the zip')")
    refused(upload(client, {"file": archive.getvalue()}), 422)
    refused(client.post_json("/run-json", {"code_b64": base64.b64encode(archive.getvalue()).decode()}), 422)


def test_args_with_nul_are_a_clean_422(client: Client) -> None:
    error = refused(client.post_json("/run-json", {"code": "pass", "args": ["ok", "bad\0arg"]}), 422)
    assert "args" in json.dumps(error)
    refused(upload(client, {"file": b"pass\n", "args": json.dumps(["a\0b"]).encode()}), 422)


def test_huge_stdin_within_the_cap_runs_and_over_it_is_413(client: Client) -> None:
    stdin = "s" * (900 * 1024)
    run = client.run("import sys; print(len(sys.stdin.read()))", stdin=stdin)
    assert run["state"] == "succeeded" and run["stdout"] == f"{len(stdin)}\n", run
    refused(client.post_json("/run-json", {"code": "pass", "stdin": "s" * (2 * 1024 * 1024)}), 413)
    refused(upload(client, {"file": b"pass\n", "stdin": b"s" * (2 * 1024 * 1024)}), 413)


def test_deeply_nested_json_is_a_clean_4xx(client: Client) -> None:
    nested = '{"code": "pass", "args": ' + "[" * 100_000 + "]" * 100_000 + "}"
    reply = client.request("POST", "/run-json", nested.encode(), "application/json")
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    limits = json.dumps(["x"]).join(["[" * 50_000, "]" * 50_000])
    assert 400 <= upload(client, {"file": b"pass\n", "args": limits.encode()}).status < 500
    assert client.get("/healthz").status == 200


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "true", '"10"', "null",
                                   "123456789012345678901234567890", "[1]", "{}"])
def test_hostile_limit_values_are_a_clean_422(client: Client, value: str) -> None:
    body = '{"code": "pass", "limits": {"timeout_s": ' + value + ', "memory_mb": ' + value + "}}"
    reply = client.request("POST", "/run-json", body.encode(), "application/json")
    if value == "null":  # null = "use the server's default"
        assert reply.status == 202, reply.body
        client.wait(reply.json()["id"])
        return
    refused(reply, 422)


def test_tiny_timeout_still_times_out_instead_of_running_unlimited(client: Client) -> None:
    # 1e-7 s rounds to RuntimeMaxSec=0 µs: that must be "at once", never "no limit".
    run = client.run("import time; time.sleep(30)", limits={"timeout_s": 1e-7})
    assert run["state"] == "timed_out", run
    assert run["duration_ms"] is None or run["duration_ms"] < 2000, run


def test_tiny_memory_limit_is_a_clean_oom_result(client: Client) -> None:
    run = client.run("print(sum(range(10)))", limits={"memory_mb": 1})
    assert (run["state"], run["signal"]) == ("oom_killed", "SIGKILL"), run


def test_tiny_disk_and_output_limits_are_a_clean_result(client: Client) -> None:
    # The smallest limits the API accepts still give a run that ends cleanly
    # (tasks below 2, which systemd cannot start, is a 422: see
    # test_attacks_owners.py::test_tasks_below_what_systemd_needs_is_a_422_naming_the_minimum).
    run = client.run("print(sum(range(10)))", limits={"tasks": 2, "disk_mb": 1, "output_kb": 1})
    assert (run["state"], run["stdout"]) == ("succeeded", "45\n"), run
    assert client.get("/healthz").status == 200


def test_malformed_requests_are_clean_4xx(client: Client) -> None:
    cases = [
        client.request("POST", "/run-json", b"{not json", "application/json"),
        client.request("POST", "/run-json", b"\xff\xfe{}", "application/json"),
        client.request("POST", "/run-json", b'["a list"]', "application/json"),
        client.request("POST", "/run-json", b'{"code": "pass", "evil": 1}', "application/json"),
        client.request("POST", "/run-json", b'{"code": "pass", "runtime": "../../../bin/sh"}', "application/json"),
        client.request("POST", "/run-json", b'{"code": "\\ud800"}', "application/json"),
        client.request("POST", "/run-json", b'{"code": "pass"}', "text/plain"),
        client.request("POST", "/run-file", b"--x\r\nbroken", "multipart/form-data; boundary=x"),
        client.request("POST", "/run-file", b"", "multipart/form-data"),
        client.request("GET", "/status/" + "a" * 5000),
        client.request("GET", "/status/..%2F..%2Fetc%2Fpasswd"),
        client.request("GET", "/output/..%2F..%2Funitbox.db?stream=stdout"),
        client.request("GET", "/runs?limit=99999999999999999999"),
        client.request("GET", "/runs?cursor=-1%20OR%201=1"),
    ]
    statuses = [reply.status for reply in cases]
    assert all(400 <= status < 500 for status in statuses), statuses
    assert client.get("/healthz").status == 200
