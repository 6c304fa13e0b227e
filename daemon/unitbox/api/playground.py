"""The playground page (issue 17): GET / and /playground serve a single-page
app that runs code through this same API, and /playground/assets/<name> its
script and style sheet.

The page is built from web/ by esbuild at build time (`make playground`) into
daemon/unitbox/playground/ — index.html plus assets/ with a content hash in
every name — and shipped with the package: nothing is fetched from anywhere
else, so it works on an air-gapped host. The hashed assets are cached for a
year (a new build has new names); index.html is revalidated by its ETag on
every load, so a new build is picked up at once.

These paths are public (api/auth.py): the page and its assets are the same
for everyone and hold no data; the page asks for a token when the API
answers 401. `playground = false` in the config: none of these routes exist
(404). A page that was not built is a 404 that says so, and a warning at
startup, not a failed start: the API works without it."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from unitbox.errors import NotFound

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "playground"
PREFIX = "/playground/assets/"
_ASSET_NAME = re.compile(r"^[A-Za-z0-9_-]+-[A-Z0-9]{8}\.(js|css)$")  # esbuild's [name]-[hash]
_TYPES = {"js": "text/javascript", "css": "text/css"}
IMMUTABLE = "public, max-age=31536000, immutable"
# The page runs only its own script; it talks to this origin alone and shows
# images only from it (a run's files) or as data: URLs. CodeMirror sets inline styles.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
NOT_BUILT = "the playground is not built: `make playground` writes its assets to daemon/unitbox/playground/"


@dataclass(frozen=True, slots=True)
class Page:
    """index.html as built, read once at startup, and the names of its assets."""

    html: bytes
    etag: str
    assets: frozenset[str]

    @classmethod
    def load(cls, directory: Path) -> Page | None:
        try:
            html = (directory / "index.html").read_bytes()
            names = [p.name for p in (directory / "assets").iterdir() if _ASSET_NAME.match(p.name)]
        except FileNotFoundError:
            return None
        return cls(html, '"' + hashlib.sha256(html).hexdigest()[:32] + '"', frozenset(names))


def add_routes(app: web.Application, directory: Path | None = None) -> None:
    base = directory or ASSETS
    page = Page.load(base)
    if page is None:
        log.warning("%s (the API works without it)", NOT_BUILT)

    async def index(request: web.Request) -> web.Response:
        if page is None:
            raise NotFound(NOT_BUILT)
        headers = {hdrs.ETAG: page.etag, hdrs.CACHE_CONTROL: "no-cache", "Content-Security-Policy": PAGE_CSP,
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        if page.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=page.html, content_type="text/html", charset="utf-8", headers=headers)

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if page is None or name not in page.assets:  # only the build's own names: never a path from the URL
            raise NotFound(f"no such asset: {name}")
        kind = name.rsplit(".", 1)[-1]
        # FileResponse answers If-None-Match/If-Modified-Since and serves the .gz beside it when accepted.
        return web.FileResponse(base / "assets" / name, headers={
            hdrs.CACHE_CONTROL: IMMUTABLE, hdrs.CONTENT_TYPE: _TYPES[kind], "X-Content-Type-Options": "nosniff"})

    for path in ("/", "/playground", "/playground/"):
        app.router.add_get(path, index)
    app.router.add_get(PREFIX + "{name}", asset)


def is_public(path: str) -> bool:
    """The page and its assets: served to anyone, tokens or not."""
    return path in ("/", "/playground", "/playground/") or path.startswith(PREFIX)
