"""The tables of docs/ that are generated from the code, so they cannot drift
from it: the routes (the app's ROUTES with the OpenAPI summaries), the Run
object and the request (the pydantic models' fields and descriptions), the
limits (defaults, maxima, descriptions) and the configuration reference
(`Config.model_fields` and its sections).

Each table sits in its file between two markers:

    <!-- generated: NAME (python -m tests.support.doctables --write) -->
    …
    <!-- end: NAME -->

`tests/unit/test_docs.py` fails when one differs from what the code gives;
`make docs` (this module with `--write`) rewrites them. The configuration's
meanings are prose, kept in the table itself: a rewrite keeps each key's
meaning and adds a row, with no meaning, for a new key, which the test
then reports as undocumented."""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from unitbox.api.app import ROUTES
from unitbox.api.models import LimitsIn, RunOut, RunRequest
from unitbox.api.openapi import build_openapi
from unitbox.config import Config
from unitbox.limits import LIMIT_NAMES, Limits, default_maxima

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) [^>]*-->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")

# Defaults that depend on the machine the model is evaluated on.
PER_CORE = "100 \N{MULTIPLICATION SIGN} CPU count"
MACHINE_DEFAULTS = {"max_concurrent": "CPU count", "max_limits.cpu_percent": PER_CORE}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cells(row: str) -> list[str]:
    """The cells of a markdown table row, `\\|` kept inside a cell."""
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(row.strip().strip("|"))]


# --- docs/api.md ---------------------------------------------------------------

def routes(_: str) -> str:
    paths = {"/openapi.json": {"get": {"summary": "This API as an OpenAPI 3.1 document"}}, **build_openapi()["paths"]}
    rows = []
    for method, route, _handler in ROUTES:
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route)  # {path:.+} → {path}, as the app's canonical form
        operation = paths[path][method.lower()]
        rows.append([f"[`{method} {path}`](#{slug(f'{method} {path}')})", operation["summary"]])
    return _table(["endpoint", "what"], rows)


def _json_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_json_type(option) for option in schema["anyOf"])
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return {"RunState": "state", "LimitsOut": "object (limits)", "LimitsIn": "object (limits)",
                "LintMode": '"off", "before" or "only"', "InputFileIn": "object (input file)",
                "DiagnosticOut": "object (diagnostic)", "FileOut": "object (file)"}.get(name, name)
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_json_type(schema.get('items', {}))}"
    if kind == "string" and schema.get("format") == "date-time":
        return "string (RFC 3339)"
    if "const" in schema:
        return json.dumps(schema["const"])
    return str(kind)


def _fields(model: type[BaseModel], mode: typing.Literal["validation", "serialization"]) -> Iterator[list[str]]:
    schema = model.model_json_schema(mode=mode)
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        field = model.model_fields[name]
        default = "" if name in required else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
        yield [f"`{name}`", _json_type(prop), default, prop.get("description", "")]


def run_object(_: str) -> str:  # every field is always present: no defaults to show
    return _table(["field", "type", "meaning"], [[f, t, m] for f, t, _, m in _fields(RunOut, "serialization")])


def run_request(_: str) -> str:
    return _table(["field", "type", "default", "meaning"], list(_fields(RunRequest, "validation")))


def limits(_: str) -> str:
    defaults, maxima = Limits(), default_maxima()
    rows = []
    for name in LIMIT_NAMES:
        maximum = PER_CORE if name == "cpu_percent" else f"{getattr(maxima, name):g}"
        rows.append([f"`{name}`", f"{getattr(defaults, name):g}", maximum,
                     LimitsIn.model_fields[name].description or ""])
    return _table(["limit", "default", "maximum (default)", "meaning"], rows)


# --- docs/operations.md -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConfigKey:
    key: str
    default: str


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _render_default(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _default(field: FieldInfo) -> Any:
    if field.is_required():
        return None
    return field.get_default(call_default_factory=True)


def config_keys() -> list[ConfigKey]:
    """Every key of the configuration, a section's as `section.key`, a named
    table's as `tokens.NAME.key`, with its default as the docs show it."""
    keys = []
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        section = _section(annotation)
        named = _section(typing.get_args(annotation)[-1]) if typing.get_origin(annotation) is dict else None
        if section is not None:
            parent = _default(field)
            for sub, subfield in section.model_fields.items():
                key = f"{name}.{sub}"
                value = getattr(parent, sub) if parent is not None else _default(subfield)
                keys.append(ConfigKey(key, MACHINE_DEFAULTS.get(key) or _render_default(value)))
        elif named is not None:
            for sub, subfield in named.model_fields.items():
                value = _default(subfield)
                keys.append(ConfigKey(f"{name}.NAME.{sub}", "required" if subfield.is_required()
                                      else _render_default(value)))
        else:
            keys.append(ConfigKey(name, MACHINE_DEFAULTS.get(name) or _render_default(_default(field))))
    return keys


def documented_meanings(body: str) -> dict[str, str]:
    meanings = {}
    for line in body.splitlines():
        if line.startswith("| `"):
            row = cells(line)
            meanings[row[0].strip("`")] = row[-1]
    return meanings


def config_reference(current: str) -> str:
    meanings = documented_meanings(current)
    return _table(["key", "default", "meaning"],
                  [[f"`{k.key}`", k.default, meanings.get(k.key, "")] for k in config_keys()])


# --- the blocks ---------------------------------------------------------------

Render = Callable[[str], str]
BLOCKS: dict[str, dict[str, Render]] = {
    "api.md": {"routes": routes, "run-object": run_object, "run-request": run_request, "limits": limits},
    "operations.md": {"config": config_reference},
}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def regenerate(text: str, renders: dict[str, Render]) -> str:
    def replace(match: re.Match[str]) -> str:
        render = renders.get(match["name"])
        return match.group(0) if render is None else match.group(1) + render(match["body"]) + match.group(4)
    return _BLOCK.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated tables in docs/")
    args = parser.parse_args()
    stale = []
    for name, renders in BLOCKS.items():
        path = DOCS / name
        text = path.read_text()
        new = regenerate(text, renders)
        if new != text:
            stale.append(name)
            if args.write:
                path.write_text(new)
    for name in stale:
        print(f"docs/{name}: {'rewritten' if args.write else 'out of date'}")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
