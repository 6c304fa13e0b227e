"""Input files read for a submission, output files saved from a run.

An output file's path was chosen by the run's program: it is checked here
again (relative, no `..`, no empty or odd components) before it names
anything on this machine, written beside its final name and renamed into
place only once its size and SHA-256 match the server's listing."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from unitbox.client.http import Api


class LocalError(Exception):
    """Something on this machine: a file that cannot be read or written."""


def input_file(given: str) -> dict[str, str]:
    """`--file PATH`: the file under the same relative path in the run's working
    directory, or under its own name when PATH is absolute or climbs (`..`)."""
    local = Path(given)
    try:
        content = local.read_bytes()
    except OSError as exc:
        raise LocalError(f"--file {given}: {exc.strerror or exc}") from None
    relative = PurePosixPath(given)
    if relative.is_absolute() or ".." in relative.parts:
        relative = PurePosixPath(relative.name)
    return {"path": str(relative), "content_b64": base64.b64encode(content).decode()}


def local_path(out_dir: Path, path: str) -> Path:
    """Where an output file goes under `out_dir`; LocalError for a path that would leave it."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise LocalError(f"the server listed an output file with an unsafe path {path!r}: not saved")
    return out_dir.joinpath(*parts)


async def save_files(api: Api, files: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Download every listed file into `out_dir` (created), each checked against its size and SHA-256."""
    saved = []
    for file in files:
        target = local_path(out_dir, str(file["path"]))
        descriptor, partial = _partial(target)
        try:
            with os.fdopen(descriptor, "wb") as into:
                copied = await api.copy(str(file["url"]), into)
            _commit(partial, target, file, copied)
        except BaseException:
            _discard(partial)
            raise
        saved.append(target)
    return saved


def _partial(target: Path) -> tuple[int, str]:
    """A new file beside `target` for its bytes until they are checked."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=target.parent, prefix=".unitbox-")
    except OSError as exc:
        raise LocalError(f"cannot write into {target.parent}: {exc.strerror or exc}") from None


def _commit(partial: str, target: Path, file: dict[str, Any], copied: int) -> None:
    digest = _sha256(Path(partial))
    if copied != file["size"] or digest != file["sha256"]:
        raise LocalError(f"{file['path']}: got {copied} bytes with SHA-256 {digest[:12]}…, the server listed "
                         f"{file['size']} bytes with {str(file['sha256'])[:12]}…: not saved")
    try:
        os.chmod(partial, 0o644 & ~_umask())  # as any new file here, not mkstemp's 0600
        os.replace(partial, target)
    except OSError as exc:
        raise LocalError(f"cannot save {target}: {exc.strerror or exc}") from None


def _discard(partial: str) -> None:
    Path(partial).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
