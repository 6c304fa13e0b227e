"""The docs say what the code does: generated tables match, every route,
state, error code, unit setting and configuration key is documented, and
every relative link (and #anchor) in README.md, SECURITY.md and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest

from tests.support import doctables
from tests.support.doctables import DOCS, ROOT, blocks, cells, config_keys, documented_meanings, slug
from unitbox.api import errors as api_errors
from unitbox.api.app import create_app
from unitbox.api.openapi import build_openapi
from unitbox.broker.checks import Refused
from unitbox.config import load_config
from unitbox.errors import UnitboxError
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.profile import Collector, Runtime, build_profile

LINKED_FILES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS.glob("*.md"))]
# Error codes written out where they are answered, not as an error class.
LITERAL_CODES = {(400, "malformed_json"): "daemon/unitbox/api/errors.py",
                 (503, "too_many_connections"): "daemon/unitbox/api/guard.py"}


def read(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize(("name", "block"), [(n, b) for n, r in doctables.BLOCKS.items() for b in r])
def test_generated_tables_match_the_code(name: str, block: str) -> None:
    current = blocks(read(name))
    assert block in current, f"docs/{name} has no generated block {block!r}"
    assert current[block] == doctables.BLOCKS[name][block](current[block]), \
        f"docs/{name}: the {block} table is out of date: run `make docs`"


def test_every_config_key_is_documented_and_no_other() -> None:
    meanings = documented_meanings(blocks(read("operations.md"))["config"])
    keys = {k.key for k in config_keys()}
    assert sorted(k for k in keys if not meanings.get(k)) == [], "write their meaning in docs/operations.md"
    assert sorted(set(meanings) - keys) == [], "docs/operations.md documents keys the config does not have"


def registered_routes() -> set[tuple[str, str]]:
    """The API's routes (the playground page's are not the API: docs/operations.md has it)."""
    config = load_config(Path("/dev/null"), environ={"UNITBOX_PLAYGROUND": "false"}, cli={"state_dir": "/nonexistent"})
    app = create_app(SimpleNamespace(config=config), manage_engine=False)  # type: ignore[arg-type]
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    bare = {(method, path) for method, path in routes if not path.endswith("/")}
    assert {(m, p + "/") for m, p in bare} == routes - bare, "every path also answers with a trailing slash"
    return bare


def test_api_md_has_a_section_for_every_route_the_app_registers() -> None:
    headings = re.findall(r"^#{2,4} `(GET|POST|PUT|PATCH|DELETE) (/\S*)`\s*$", read("api.md"), re.M)
    assert sorted(set(headings)) == sorted(registered_routes())
    assert len(headings) == len(set(headings))


def test_the_openapi_document_has_every_route_but_itself() -> None:
    documented = {(m.upper(), p) for p, ops in build_openapi()["paths"].items() for m in ops}
    assert documented == registered_routes() - {("GET", "/openapi.json")}


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


def test_every_run_state_is_documented() -> None:
    rows = table_rows(read("api.md"), "| state |")
    assert [row[0].strip("`") for row in rows] == [s.value for s in RunState]
    assert [row[1] == "yes" for row in rows] == [s.terminal for s in RunState]


def answered_codes() -> set[tuple[int, str]]:
    classes: list[type[UnitboxError]] = [UnitboxError]
    for cls in classes:
        classes += cls.__subclasses__()
    classes.remove(Refused)  # the broker's answer to the daemon, which raises BrokerRefused (systemd_error)
    for (_, code), path in LITERAL_CODES.items():
        assert f'"{code}"' in (ROOT / path).read_text()
    return {(c.status, c.code) for c in classes} | set(api_errors._HTTP_CODES.items()) | set(LITERAL_CODES)


def test_every_error_code_is_documented_with_its_status() -> None:
    rows = table_rows(read("api.md"), "| status | code |")
    assert sorted((int(row[0]), row[1].strip("`")) for row in rows) == sorted(answered_codes())
    assert "`http_error`" in read("api.md")  # the fallback code of any other status aiohttp raises


@pytest.mark.parametrize("native_cgroups", [False, True])
def test_every_unit_setting_is_in_sandbox_md(native_cgroups: bool) -> None:
    profile = build_profile("0123456789abcdef", Limits(), ends_dir=PurePosixPath("/var/lib/unitbox/ends/x"),
                            collector=Collector("/usr/bin/python3", "collect.py", (1, 2, 3, 4, 5, 6, 7)),
                            state_dir=PurePosixPath("/var/lib/unitbox"), slice_name="unitbox.slice",
                            runtime=Runtime("sci", "/opt/sci/bin/python", path="/opt/sci"),
                            native_private_cgroups=native_cgroups)
    text = read("sandbox.md")
    assert [key for key in profile if f"`{key}=" not in text] == []


# --- links ------------------------------------------------------------------------------------------------------

def without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S),
                              re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text()))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for link in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.is_relative_to(root) or not file.exists():
            broken.append(f"{link}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n## Durability: restarts, crashes, full disks\n## A\n## A\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[ok](other.md#durability-restarts-crashes-full-disks) [ok](other.md#a-1) "
                    "[ok](#page) [ok](https://example.org/x) `[not a link](gone.md)`\n"
                    "[gone](gone.md) [bad](other.md#nowhere) [bad](#nowhere) [out](../x.md)\n")
    (tmp_path.parent / "x.md").touch()
    assert broken_links(page, tmp_path) == [
        "gone.md: no such file", "other.md#nowhere: no heading #nowhere in other.md",
        "#nowhere: no heading #nowhere in page.md", "../x.md: no such file"]
    assert slug("`GET /status/{id}`") == "get-statusid"
