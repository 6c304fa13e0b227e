"""The playground page's serving (api/playground.py) over a build of its own
in tmp_path, the config key that turns it off, and the two read-only
endpoints the page needs: GET /limits and GET /runs/<id>/code."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from unitbox.api import playground

Client = TestClient[Any, web.Application]
SCRIPT = "main-ABCD2345.js"
STYLE = "style-QRST6789.css"
HTML = (f'<!doctype html><link rel="stylesheet" href="/playground/assets/{STYLE}">'
        f'<script type="module" src="/playground/assets/{SCRIPT}"></script>')


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build as `make playground` lays it out: index.html, hashed assets, a .gz beside each."""
    root = tmp_path / "playground"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(HTML)
    for name, text in ((SCRIPT, "console.log('playground');\n" * 200), (STYLE, "body { color: #111; }\n")):
        (root / "assets" / name).write_text(text)
        (root / "assets" / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
    (tmp_path / "secret.txt").write_text("not an asset")
    monkeypatch.setattr(playground, "ASSETS", root)
    return root


@pytest.mark.parametrize("path", ["/", "/playground", "/playground/"])
async def test_the_page_is_served_revalidated_by_its_etag_and_confined_by_its_csp(
        make_client: MakeClient, built: Path, path: str) -> None:
    client = await make_client()
    reply = await client.get(path)
    assert reply.status == 200
    assert reply.content_type == "text/html"
    assert await reply.text() == HTML
    assert reply.headers["Cache-Control"] == "no-cache"
    csp = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    again = await client.get(path, headers={"If-None-Match": reply.headers["ETag"]})
    assert again.status == 304


async def test_the_hashed_assets_are_cached_for_a_year_and_gzipped_when_accepted(
        make_client: MakeClient, built: Path) -> None:
    client = await make_client()
    names = re.findall(r"/playground/assets/([\w.-]+)", HTML)
    assert names == [STYLE, SCRIPT]
    for name, media in ((SCRIPT, "text/javascript"), (STYLE, "text/css")):
        plain = await client.get(f"/playground/assets/{name}", headers={"Accept-Encoding": "identity"})
        assert plain.status == 200
        assert plain.content_type == media
        assert plain.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert await plain.read() == (built / "assets" / name).read_bytes()
        zipped = await client.get(f"/playground/assets/{name}", headers={"Accept-Encoding": "gzip"},
                                  auto_decompress=False)
        assert zipped.headers.get("Content-Encoding") == "gzip"
        assert gzip.decompress(await zipped.read()) == (built / "assets" / name).read_bytes()


@pytest.mark.parametrize("path", ["/playground/assets/main-ZZZZ2345.js", "/playground/assets/..%2F..%2Fsecret.txt",
                                  "/playground/assets/%2E%2E/index.html", "/playground/assets/main-ABCD2345.js.gz",
                                  "/playground/index.html"])
async def test_only_the_builds_own_asset_names_are_served(make_client: MakeClient, built: Path, path: str) -> None:
    client = await make_client()
    reply = await client.get(path)
    assert reply.status == 404
    assert "not an asset" not in await reply.text()


async def test_with_tokens_the_page_needs_none_and_the_api_still_does(make_client: MakeClient, built: Path) -> None:
    client = await make_client(tokens={"alice": {"secret": "alice-secret"}})
    for path in ("/", "/playground", f"/playground/assets/{SCRIPT}"):
        assert (await client.get(path)).status == 200, path
    for path in ("/runs", "/limits", "/runtimes", "/runs/0123456789abcdef/code", "/playgroundx"):
        assert (await client.get(path)).status == 401, path


async def test_playground_false_turns_every_page_route_into_a_404(make_client: MakeClient, built: Path) -> None:
    client = await make_client(playground=False)
    for path in ("/", "/playground", f"/playground/assets/{SCRIPT}"):
        reply = await client.get(path)
        assert reply.status == 404, path
        assert (await reply.json())["error"]["code"] == "not_found"
    assert (await client.get("/runtimes")).status == 200


async def test_a_page_never_built_is_a_404_that_says_how_to_build_it(
        make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(playground, "ASSETS", tmp_path / "nothing-here")
    client = await make_client()
    reply = await client.get("/")
    assert reply.status == 404
    assert "make playground" in (await reply.json())["error"]["message"]
    assert (await client.get("/healthz")).status == 200


async def test_limits_gives_the_servers_defaults_and_maxima(make_client: MakeClient) -> None:
    client = await make_client(limits={"timeout_s": 5}, max_limits={"timeout_s": 60, "memory_mb": 2048})
    body = await (await client.get("/limits")).json()
    assert body["defaults"]["timeout_s"] == 5
    assert body["maxima"]["timeout_s"] == 60
    assert body["maxima"]["memory_mb"] == 2048
    assert set(body["defaults"]) == set(body["maxima"]) == {"timeout_s", "memory_mb", "cpu_percent", "tasks",
                                                             "output_kb", "disk_mb"}


async def test_a_runs_code_is_served_byte_for_byte_and_inert(make_client: MakeClient) -> None:
    client = await make_client()
    source = "# -*- coding: utf-8 -*-\nprint('héllo <script>')\n"
    reply = await client.post("/run-json", json={"code": source})
    run_id = (await reply.json())["id"]
    code = await client.get(f"/runs/{run_id}/code")
    assert code.status == 200
    assert (await code.read()).decode() == source
    assert code.content_type == "text/x-python"
    assert code.headers["Content-Security-Policy"].startswith("sandbox")
    assert code.headers["X-Content-Type-Options"] == "nosniff"
    unknown = await client.get("/runs/0123456789abcdef/code")
    assert unknown.status == 404
