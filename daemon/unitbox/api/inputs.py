"""Input files at the edge: each path made relative and normal, or a 422
naming the bad entry; the caps of [files] in the config. What passes is
written under the run's `in/files/` (rundir.py) and copied into its working
directory when it starts."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from unitbox.config import FilesSection
from unitbox.errors import InvalidInput

NAME_BYTES = 255  # a directory entry's name (NAME_MAX)


def _bad(index: int, field: str, message: str) -> InvalidInput:
    where = f"files[{index}].{field}"
    return InvalidInput(f"{where}: {message}", details=[{"field": where, "message": message}])


def normal_path(raw: str, index: int, max_chars: int) -> str:
    """`raw` as a relative path with no `.`, `..` or empty component."""
    if "\0" in raw:
        raise _bad(index, "path", "contains a NUL byte")
    if not raw:
        raise _bad(index, "path", "is empty")
    if raw.startswith("/"):
        raise _bad(index, "path", "must be relative to the working directory, not absolute")
    if "\\" in raw:
        raise _bad(index, "path", "contains a backslash: separate directories with /")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _bad(index, "path", "must not contain '..'")
    if not parts:
        raise _bad(index, "path", "names no file")
    path = "/".join(parts)
    if len(path) > max_chars:
        raise _bad(index, "path", f"is {len(path)} characters long: over the {max_chars}-character limit")
    for part in parts:
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad(index, "path", "is not valid UTF-8") from None
        if size > NAME_BYTES:
            raise _bad(index, "path", f"has a component of {size} bytes: over {NAME_BYTES}")
    return path


def decode_content(index: int, text: str | None, b64: str | None) -> bytes:
    if (text is None) == (b64 is None):
        raise _bad(index, "content", "give exactly one of content and content_b64")
    if text is not None:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(index, "content", "contains lone surrogates: it is not valid UTF-8") from None
    try:
        return base64.b64decode(b64 or "", validate=True)
    except (binascii.Error, ValueError):
        raise _bad(index, "content_b64", "is not valid base64") from None


def check_files(entries: Sequence[tuple[str, bytes]], caps: FilesSection) -> tuple[tuple[str, bytes], ...]:
    """(normal path, content) for each entry: counted, sized, no path given
    twice, none both a file and a directory."""
    if len(entries) > caps.input_count:
        raise InvalidInput(f"{len(entries)} input files: over the limit of {caps.input_count}",
                           details=[{"field": "files", "message": "too many files"}])
    total = sum(len(content) for _, content in entries)
    if total > caps.input_kb * 1024:
        raise InvalidInput(f"the input files hold {total} bytes: over the {caps.input_kb} KiB limit",
                           details=[{"field": "files", "message": "too large"}])
    checked: dict[str, bytes] = {}
    for index, (raw, content) in enumerate(entries):
        path = normal_path(raw, index, caps.path_chars)
        if path in checked:
            raise _bad(index, "path", f"{path!r} is given twice")
        checked[path] = content
    directories = {"/".join(path.split("/")[:n]) for path in checked for n in range(1, path.count("/") + 1)}
    for index, path in enumerate(checked):
        if path in directories:
            raise _bad(index, "path", f"{path!r} is both a file and a directory")
    return tuple(checked.items())
