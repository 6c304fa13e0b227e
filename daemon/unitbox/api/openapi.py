"""The OpenAPI 3.1 document, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from unitbox import __version__
from unitbox.api.files import FILE_SECURITY
from unitbox.api.models import (
    ErrorOut,
    FilesOut,
    HealthOut,
    NodesOut,
    OutputOut,
    RunOut,
    RunRequest,
    RunsPage,
    RuntimesOut,
    ServerLimitsOut,
    SubmitOut,
)

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "Malformed JSON or multipart body", "401": "Missing or wrong bearer token",
    "403": "The token may not do this (admins only)",
    "404": "Unknown id or path", "405": "Wrong method", "408": "Body not received within body_timeout_s",
    "413": "Body over the configured size",
    "415": "Wrong content type", "422": "Well-formed but invalid", "503": "Queue full or service unavailable",
}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json_body(ErrorOut, _ERRORS[code]) for code in codes}


def _id_param() -> list[dict[str, Any]]:
    return [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}]


def _resume_params() -> list[dict[str, Any]]:
    event_id = {"type": "string", "pattern": r"^\d{1,19}\.\d{1,19}$"}
    resume = "Resume after this event id (<stdout bytes>.<stderr bytes>)"
    return [{"name": "Last-Event-ID", "in": "header", "required": False, "schema": event_id,
             "description": f"{resume}; what EventSource sends when it reconnects."},
            {"name": "last_event_id", "in": "query", "required": False, "schema": event_id,
             "description": f"{resume}, for clients that cannot set headers; the header wins."}]


_EVENTS = ("Events until the run ends, then the response closes: `state` (data: the Run, as GET /status "
           "answers) first and at every change of state; `stdout` and `stderr` (data: {\"text\": \"…\"}, "
           "UTF-8, never a split character) as the run writes; `end` (data: the final Run). Every event has "
           "`id: <stdout bytes>.<stderr bytes>`; `: keepalive` comment lines every 15 s. A run already "
           "ended is replayed. See docs/api.md.")


def _wait_param() -> dict[str, Any]:
    return {"name": "wait", "in": "query", "required": False, "schema": {"type": "boolean"}}


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [RunRequest, RunOut, SubmitOut, OutputOut, RunsPage, RuntimesOut,
                                     ServerLimitsOut, HealthOut, NodesOut, FilesOut, ErrorOut]
    _, schemas = models_json_schema([(m, "serialization" if m is not RunRequest else "validation")
                                     for m in models], ref_template=_REF)
    submitted = {
        "200": _json_body(RunOut, "The finished run (when waiting)"),
        "202": {**_json_body(SubmitOut, "Accepted; poll status_url"),
                "headers": {"Location": {"schema": {"type": "string"}}}},
        **_errors("400", "401", "405", "408", "413", "415", "422", "503"),
    }
    multipart = {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "stdin": {"type": "string"},
        "args": {"type": "string", "description": "JSON list of strings"},
        "limits": {"type": "string", "description": "JSON object, as in /run-json"},
        "runtime": {"type": "string"}, "wait": {"type": "string", "enum": ["true", "false"]},
        "entrypoint": {"type": "string", "description": "As in /run-json"},
        "lint": {"type": "string", "enum": ["true", "false"]},
        "lint_only": {"type": "string", "enum": ["true", "false"]},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Input files, one part each; its filename is the path (e.g. data/in.csv)"}}}
    served = {name: {"schema": {"type": "string"}} for name in (*FILE_SECURITY, "Content-Disposition")}
    paths: dict[str, Any] = {
        "/run-json": {"post": {
            "summary": "Run code given as JSON", "operationId": "runJson", "parameters": [_wait_param()],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(RunRequest)}}},
            "responses": submitted}},
        "/run-file": {"post": {
            "summary": "Run an uploaded .py file", "operationId": "runFile", "parameters": [_wait_param()],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart}}},
            "responses": submitted}},
        "/status/{id}": {"get": {
            "summary": "A run's state and result", "operationId": "getStatus",
            "parameters": [*_id_param(), {
                "name": "include", "in": "query", "required": False, "schema": {"type": "string", "enum": ["output"]},
                "description": "output: also its stdout and stderr, up to inline_output_kb each"}],
            "responses": {"200": _json_body(RunOut, "The run"), **_errors("401", "404", "422")}}},
        "/output/{id}": {"get": {
            "summary": "A run's output so far", "operationId": "getOutput",
            "parameters": [*_id_param(), {"name": "stream", "in": "query", "required": False,
                                          "schema": {"type": "string", "enum": ["stdout", "stderr"]}}],
            "responses": {"200": {"description": "The output (raw bytes with ?stream=)", "content": {
                "application/json": {"schema": _ref(OutputOut)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors("401", "404", "422")}}},
        "/runs/{id}/cancel": {"post": {
            "summary": "Cancel a run", "operationId": "cancelRun", "parameters": _id_param(),
            "responses": {"200": _json_body(RunOut, "Already finished; unchanged"),
                          "202": _json_body(RunOut, "Stopping"), **_errors("401", "404")}}},
        "/runs/{id}": {"delete": {
            "summary": "Cancel a run (alias)", "operationId": "deleteRun", "parameters": _id_param(),
            "responses": {"200": _json_body(RunOut, "Already finished; unchanged"),
                          "202": _json_body(RunOut, "Stopping"), **_errors("401", "404")}}},
        "/runs/{id}/events": {"get": {
            "summary": "A run's state and output, live (Server-Sent Events)", "operationId": "runEvents",
            "parameters": [*_id_param(), *_resume_params()],
            "responses": {"200": {"description": _EVENTS, "content": {
                "text/event-stream": {"schema": {"type": "string"}}}}, **_errors("401", "404", "422")}}},
        "/runs/{id}/files": {"get": {
            "summary": "The files a run left", "operationId": "listFiles", "parameters": _id_param(),
            "responses": {"200": _json_body(FilesOut, "Its output files (none until it has ended)"),
                          **_errors("401", "404")}}},
        "/runs/{id}/files/{path}": {"get": {
            "summary": "One file a run left", "operationId": "getFile",
            "parameters": [*_id_param(), {"name": "path", "in": "path", "required": True,
                                          "schema": {"type": "string"}, "description": "As listed, e.g. out/plot.png"},
                           {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "Its bytes, Content-Type from its name, in a sandbox (CSP)", "headers": served,
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                "206": {"description": "The range asked for", "headers": served,
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors("401", "404")}}},
        "/runs": {"get": {
            "summary": "Runs, newest first", "operationId": "listRuns",
            "parameters": [
                {"name": "state", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": _json_body(RunsPage, "A page of runs"), **_errors("401", "422")}}},
        "/runtimes": {"get": {
            "summary": "Runtimes this server offers", "operationId": "listRuntimes",
            "responses": {"200": _json_body(RuntimesOut, "The runtimes"), **_errors("401")}}},
        "/limits": {"get": {
            "summary": "The limits a run gets by default, and the most it may ask for", "operationId": "getLimits",
            "responses": {"200": _json_body(ServerLimitsOut, "Defaults and maxima"), **_errors("401")}}},
        "/runs/{id}/code": {"get": {
            "summary": "A run's source, as submitted", "operationId": "getRunCode", "parameters": _id_param(),
            "responses": {"200": {"description": "The source bytes (UTF-8 unless its coding line says otherwise)",
                                  "content": {"text/x-python": {"schema": {"type": "string"}}}},
                          **_errors("401", "404")}}},
        "/nodes": {"get": {
            "summary": "The nodes sharing this one's run store (admins only)", "operationId": "listNodes",
            "responses": {"200": _json_body(NodesOut, "The nodes; one with a store of its own"),
                          **_errors("401", "403", "503")}}},
        "/healthz": {"get": {
            "summary": "Liveness: can the daemon reach systemd", "operationId": "healthz",
            "responses": {"200": _json_body(HealthOut, "Healthy"), "503": _json_body(HealthOut, "Unhealthy")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics",
            "description": "The Prometheus text format; OpenMetrics when the Accept header asks for it.",
            "responses": {"200": {"description": "The metrics, and the process's own (process_*)",
                                  "content": {media: {"schema": {"type": "string"}}
                                              for media in ("text/plain", "application/openmetrics-text")}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "unitbox", "version": __version__,
                 "description": "Run untrusted Python code, each run a hardened transient systemd unit."},
        "paths": paths,
        "components": {"schemas": schemas["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
