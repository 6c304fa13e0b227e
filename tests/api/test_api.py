"""Every endpoint and error status of docs/api.md, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.support.fake_systemd import FakeSystemd, until

Client = TestClient[Any, web.Application]


async def submit(client: Client, payload: dict[str, Any], query: str = "") -> tuple[int, dict[str, Any]]:
    reply = await client.post(f"/run-json{query}", json=payload)
    return reply.status, await reply.json()


async def wait_terminal(client: Client, run_id: str) -> dict[str, Any]:
    for _ in range(200):
        run: dict[str, Any] = await (await client.get(f"/status/{run_id}")).json()
        if run["state"] not in ("queued", "starting", "running"):
            return run
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} did not finish")


def error_code(body: dict[str, Any]) -> str:
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"code", "message"}
    return str(body["error"]["code"])


async def test_submit_returns_202_with_location_and_urls(client: Client) -> None:
    reply = await client.post("/run-json", json={"code": "print(1)"})
    assert reply.status == 202
    body = await reply.json()
    assert body["state"] in ("queued", "running", "starting")
    assert reply.headers["Location"] == f"/status/{body['id']}"
    assert body["status_url"] == f"/status/{body['id']}"
    assert body["output_url"] == f"/output/{body['id']}"
    assert len(body["id"]) <= 64


@pytest.mark.parametrize("path", ["/run-json", "/run-json/"])
@pytest.mark.parametrize("how", ["body", "query"])
async def test_wait_returns_the_finished_run(client: Client, path: str, how: str) -> None:
    payload: dict[str, Any] = {"code": "print(1)"}
    if how == "body":
        payload["wait"] = True
    reply = await client.post(path + ("?wait=true" if how == "query" else ""), json=payload)
    assert reply.status == 200
    run = await reply.json()
    assert run["state"] == "succeeded"
    assert run["exit_code"] == 0
    assert run["stdout_bytes"] == len(b"fake output\n")
    assert run["unit"] == f"unitbox-run-{run['id']}.service"
    assert run["limits"] == {"timeout_s": 10.0, "memory_mb": 256, "cpu_percent": 100, "tasks": 64,
                             "output_kb": 1024, "disk_mb": 64}
    assert run["created_at"].endswith("Z")


async def test_code_b64_is_accepted(client: Client) -> None:
    status, run = await submit(client, {"code_b64": base64.b64encode(b"print(2)").decode(), "wait": True})
    assert status == 200 and run["state"] == "succeeded"


async def test_status_output_and_trailing_slashes(client: Client) -> None:
    _, run = await submit(client, {"code": "print(1)", "wait": True})
    for path in (f"/status/{run['id']}", f"/status/{run['id']}/"):
        reply = await client.get(path)
        assert reply.status == 200 and (await reply.json())["id"] == run["id"]
    reply = await client.get(f"/output/{run['id']}/")
    output = await reply.json()
    assert output["stdout"] == "fake output\n" and output["stderr"] == "" and output["encoding"] == "utf-8"
    raw = await client.get(f"/output/{run['id']}?stream=stdout")
    assert raw.content_type == "application/octet-stream"
    assert await raw.read() == b"fake output\n"


async def test_invalid_utf8_output_is_replaced_in_json_and_raw_in_stream(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=b"ok \xff\xfe\x00 end"))
    _, run = await submit(client, {"code": "x=1", "wait": True})
    output = await (await client.get(f"/output/{run['id']}")).json()
    assert output["stdout"] == "ok \ufffd\ufffd\x00 end"
    assert await (await client.get(f"/output/{run['id']}?stream=stdout")).read() == b"ok \xff\xfe\x00 end"


async def test_failed_program_is_a_state_not_an_http_error(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(exit_status=3))
    status, run = await submit(client, {"code": "import sys; sys.exit(3)", "wait": True})
    assert status == 200
    assert (run["state"], run["exit_code"]) == ("failed", 3)


@pytest.mark.parametrize(("payload", "field"), [
    ({"code": "x", "bogus": 1}, "bogus"),
    ({"code": "x", "code_b64": "eA=="}, "code"),
    ({}, "code"),
    ({"code_b64": "!!!notbase64"}, "code_b64"),
    ({"code_b64": base64.b64encode(b"\xff\xfeprint(1)").decode()}, "code_b64"),
    ({"code": "print(1)\x00"}, "code"),
    ({"code": "x", "args": ["a\x00b"]}, "args"),
    ({"code": "x", "args": "notalist"}, "args"),
    ({"code": 5}, "code"),
    ({"code": "x", "limits": {"timeout_s": 0}}, "timeout_s"),
    ({"code": "x", "limits": {"timeout_s": -1}}, "timeout_s"),
    ({"code": "x", "limits": {"memory_mb": 10**9}}, "memory_mb"),
    ({"code": "x", "limits": {"tasks": "8"}}, "tasks"),
    ({"code": "x", "limits": {"tasks": True}}, "tasks"),
    ({"code": "x", "limits": {"tasks": 2.5}}, "tasks"),
    ({"code": "x", "limits": {"cpu_percent": 100 * 4096}}, "cpu_percent"),
    ({"code": "x", "limits": {"nope": 1}}, "nope"),
    ({"code": "x", "runtime": "nope"}, "nope"),
    ({"code": "x", "wait": "maybe"}, "wait"),
])
async def test_invalid_submissions_are_422_naming_the_problem(client: Client, payload: dict[str, Any],
                                                              field: str) -> None:
    status, body = await submit(client, payload)
    assert status == 422, body
    assert error_code(body) in ("invalid_input", "invalid_limits", "unknown_runtime")
    assert field in json.dumps(body["error"])


async def test_nan_limit_is_rejected(client: Client) -> None:
    reply = await client.post("/run-json", data='{"code": "x", "limits": {"timeout_s": NaN}}',
                              headers={"Content-Type": "application/json"})
    assert reply.status == 422
    assert "timeout_s" in (await reply.json())["error"]["message"]


async def test_malformed_json_is_400(client: Client) -> None:
    for body in (b'{"code": ', b"\xff\xfe", b"[1,"):
        reply = await client.post("/run-json", data=body, headers={"Content-Type": "application/json"})
        assert reply.status == 400, body
        assert error_code(await reply.json()) == "bad_request"


async def test_json_that_is_not_an_object_is_422(client: Client) -> None:
    reply = await client.post("/run-json", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert reply.status == 422


async def test_text_plain_is_415(client: Client) -> None:
    reply = await client.post("/run-json", data=b"print(1)", headers={"Content-Type": "text/plain"})
    assert reply.status == 415
    assert error_code(await reply.json()) == "unsupported_media_type"


async def test_get_on_run_json_is_405(client: Client) -> None:
    reply = await client.get("/run-json")
    assert reply.status == 405
    assert error_code(await reply.json()) == "method_not_allowed"
    assert "POST" in reply.headers["Allow"]


async def test_unknown_path_is_404_json(client: Client) -> None:
    reply = await client.get("/nope")
    assert reply.status == 404
    assert error_code(await reply.json()) == "not_found"


async def test_2mb_body_over_1mb_cap_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_request_kb=1024)
    big = io.BytesIO(json.dumps({"code": "#" + "x" * (2 * 1024 * 1024)}).encode())
    reply = await client.post("/run-json", data=big, headers={"Content-Type": "application/json"})
    assert reply.status == 413
    assert error_code(await reply.json()) == "payload_too_large"


async def test_multipart_over_cap_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_request_kb=64)
    form = FormData()
    form.add_field("file", b"#" + b"x" * 200_000, filename="big.py")
    reply = await client.post("/run-file", data=form)
    assert reply.status == 413


@pytest.mark.parametrize("path", ["/status/nope", "/output/nope", "/runs/nope/cancel"])
async def test_unknown_id_is_404(client: Client, path: str) -> None:
    reply = await (client.post(path) if path.endswith("cancel") else client.get(path))
    assert reply.status == 404
    assert error_code(await reply.json()) == "not_found"


async def test_delete_unknown_run_is_404(client: Client) -> None:
    assert (await client.delete("/runs/nope")).status == 404


async def test_run_file_upload_with_all_fields(client: Client) -> None:
    form = FormData()
    form.add_field("file", b"import sys\nprint(sys.argv)\n", filename="prog.py", content_type="text/x-python")
    form.add_field("args", json.dumps(["a", "b"]))
    form.add_field("stdin", "hello")
    form.add_field("limits", json.dumps({"timeout_s": 5}))
    form.add_field("runtime", "default")
    form.add_field("wait", "true")
    reply = await client.post("/run-file", data=form)
    assert reply.status == 200, await reply.text()
    run = await reply.json()
    assert run["state"] == "succeeded" and run["limits"]["timeout_s"] == 5


@pytest.mark.parametrize(("field", "value", "status"), [
    ("args", "not json", 422), ("args", '["a\\u0000"]', 422), ("args", "[1]", 422),
    ("limits", '{"tasks": 0}', 422), ("limits", "[]", 422), ("bogus", "1", 422), ("wait", "perhaps", 422),
])
async def test_run_file_bad_fields(client: Client, field: str, value: str, status: int) -> None:
    form = FormData()
    form.add_field("file", b"print(1)", filename="p.py")
    form.add_field(field, value)
    reply = await client.post("/run-file", data=form)
    assert reply.status == status, await reply.text()
    error_code(await reply.json())


async def test_run_file_needs_the_file_part_and_multipart(client: Client) -> None:
    form = FormData()
    form.add_field("stdin", "x")
    form.add_field("other", "y")
    reply = await client.post("/run-file", data=form)
    assert reply.status in (415, 422)
    reply = await client.post("/run-file", json={"code": "x"})
    assert reply.status == 415
    reply = await client.post("/run-file", data=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data"})
    assert reply.status in (400, 422)


async def test_binary_upload_is_422(client: Client) -> None:
    form = FormData()
    form.add_field("file", b"PK\x03\x04\x00\x00\xff\xfe" * 10, filename="prog.py")
    reply = await client.post("/run-file", data=form)
    assert reply.status == 422


async def test_cancel_queued_and_finished(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake, max_concurrent=1)
    _, first = await submit(client, {"code": "x"})
    _, second = await submit(client, {"code": "y"})
    assert (await (await client.get(f"/status/{second['id']}")).json())["state"] == "queued"
    reply = await client.delete(f"/runs/{second['id']}")
    assert reply.status == 202
    assert (await reply.json())["state"] == "cancelled"
    reply = await client.post(f"/runs/{first['id']}/cancel")
    assert reply.status == 202
    await until(lambda: fake.stopped == [f"unitbox-run-{first['id']}.service"])
    run = await wait_terminal(client, first["id"])
    assert run["state"] == "cancelled"
    reply = await client.post(f"/runs/{first['id']}/cancel")
    assert reply.status == 200  # already finished: unchanged


async def test_queue_full_is_503_with_retry_after_and_fifo(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake, max_concurrent=1, queue_size=2)
    ids = [(await submit(client, {"code": f"print({i})"}))[1]["id"] for i in range(3)]
    status, body = await submit(client, {"code": "print(3)"})
    assert status == 503
    assert error_code(body) == "queue_full"
    reply = await client.post("/run-json", json={"code": "x"})
    assert int(reply.headers["Retry-After"]) >= 1
    await until(lambda: fake.started == [f"unitbox-run-{ids[0]}.service"])
    for expected in ids:  # nothing accepted is lost, and the queue is FIFO
        await until(lambda: fake.started[-1] == f"unitbox-run-{expected}.service")  # noqa: B023
        fake.finish(fake.started[-1])
        await asyncio.sleep(0.05)
    states = [(await wait_terminal(client, i))["state"] for i in ids]
    assert states == ["succeeded"] * 3


async def test_runs_listing_pages_newest_first_and_filters(client: Client) -> None:
    ids = [(await submit(client, {"code": f"print({i})", "wait": True}))[1]["id"] for i in range(5)]
    reply = await client.get("/runs?limit=2")
    page = await reply.json()
    assert [r["id"] for r in page["runs"]] == ids[::-1][:2]
    seen = [r["id"] for r in page["runs"]]
    while page["next_cursor"]:
        page = await (await client.get(f"/runs?limit=2&cursor={page['next_cursor']}")).json()
        seen += [r["id"] for r in page["runs"]]
    assert seen == ids[::-1]
    page = await (await client.get("/runs?state=succeeded")).json()
    assert len(page["runs"]) == 5
    page = await (await client.get("/runs?state=failed")).json()
    assert page["runs"] == []
    assert (await client.get("/runs?state=bogus")).status == 422
    assert (await client.get("/runs?limit=0")).status == 422
    assert (await client.get("/runs?cursor=abc")).status == 422


async def test_healthz_ok_and_503_when_systemd_is_gone(make_client: MakeClient) -> None:
    fake = FakeSystemd()
    client = await make_client(fake)
    reply = await client.get("/healthz")
    assert reply.status == 200 and (await reply.json())["status"] == "ok"
    fake.reachable = False  # the next heartbeat finds out; /healthz itself never calls systemd
    for _ in range(100):
        reply = await client.get("/healthz/")
        if reply.status == 503:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 503
    assert "fake outage" in (await reply.json())["reason"]


async def test_metrics_are_prometheus_text(client: Client) -> None:
    await submit(client, {"code": "x", "wait": True})
    reply = await client.get("/metrics")
    text = await reply.text()
    assert reply.content_type == "text/plain"
    assert 'unitbox_runs_finished_total{state="succeeded"} 1' in text
    assert "unitbox_queue_depth 0" in text
    assert "unitbox_runs_in_flight 0" in text
    assert "unitbox_run_duration_seconds_count 1" in text
    assert "unitbox_submission_latency_seconds_bucket" in text


async def test_runtimes_lists_default(client: Client) -> None:
    body = await (await client.get("/runtimes")).json()
    assert body["runtimes"][0]["name"] == "default"
    assert body["runtimes"][0]["python"].startswith("3.")


async def test_openapi_document_is_valid_openapi_3(client: Client) -> None:
    from openapi_spec_validator import validate

    document = await (await client.get("/openapi.json")).json()
    validate(document)
    assert {"/run-json", "/run-file", "/status/{id}", "/output/{id}", "/runs", "/healthz"} <= set(document["paths"])


async def test_bearer_tokens(make_client: MakeClient) -> None:
    client = await make_client(tokens=["s3cret"])
    reply = await client.post("/run-json", json={"code": "x"})
    assert reply.status == 401
    assert error_code(await reply.json()) == "unauthorized"
    reply = await client.get("/status/x", headers={"Authorization": "Bearer wrong"})
    assert reply.status == 401
    reply = await client.post("/run-json", json={"code": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert reply.status == 202
    assert (await client.get("/healthz")).status == 200  # liveness stays open
