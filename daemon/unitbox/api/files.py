"""GET /runs/<id>/files and /runs/<id>/files/<path>: the files a run left in
its working directory, as the collector took them (collect.py); and GET
/runs/<id>/code, the source it was given (for the playground's shared links). A path is
looked up in the run's manifest and its bytes served from the numbered blob:
no name the run chose is ever used as a path on the host.

The bytes are the run's: a page it wrote (HTML, SVG with script) must not
act in the service's origin, where the playground keeps its token. So every
file is served with `Content-Security-Policy: sandbox` (a unique origin, no
scripts), `nosniff`, and as an attachment unless it is an image or plain
text a browser shows inertly."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import hdrs, web

from unitbox.api.auth import caller_of
from unitbox.api.models import FileOut, FilesOut
from unitbox.api.state import ENGINE
from unitbox.errors import NotFound

INLINE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "text/plain", "text/csv", "application/json")
FILE_SECURITY = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
}


async def list_files(request: web.Request) -> web.Response:
    record, found = await request.app[ENGINE].output_files(request.match_info["id"], caller_of(request))
    body = FilesOut(id=record.id, files=[FileOut.of(record.id, f) for f in found.files], skipped=found.skipped,
                    skipped_count=found.skipped_count, incomplete=found.incomplete)
    return web.Response(text=body.model_dump_json(), content_type="application/json", charset="utf-8")


async def get_file(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    record, found = await engine.output_files(request.match_info["id"], caller_of(request))
    path = request.match_info["path"]
    file = next((f for f in found.files if f.path == path), None)
    if file is None:
        state = "it has not ended yet" if not record.state.terminal else "it left no such file"
        raise NotFound(f"run {record.id} has no output file {path!r}: {state}")
    name = quote(path.rsplit("/", 1)[-1])
    disposition = "inline" if file.media_type in INLINE_TYPES else "attachment"
    headers = {**FILE_SECURITY, hdrs.CONTENT_TYPE: file.media_type,
               hdrs.CONTENT_DISPOSITION: f"{disposition}; filename*=UTF-8''{name}"}
    return web.FileResponse(engine.run_dir(record.id).blob(file.blob), headers=headers)


async def code(request: web.Request) -> web.StreamResponse:
    """The source as submitted: bytes, as the interpreter read them (UTF-8 unless a coding line says otherwise)."""
    engine = request.app[ENGINE]
    record = await engine.get(request.match_info["id"], caller_of(request))
    script = engine.run_dir(record.id).script
    headers = {**FILE_SECURITY, hdrs.CONTENT_TYPE: "text/x-python",
               hdrs.CONTENT_DISPOSITION: "inline; filename=main.py"}
    if not script.is_file():
        if (queued := await engine.queued_code(record)) is not None:  # in the shared queue: from the store
            return web.Response(body=queued, headers=headers)
        raise NotFound(f"run {record.id} has no code stored")  # a run refused before its directory was made
    return web.FileResponse(script, headers=headers)
