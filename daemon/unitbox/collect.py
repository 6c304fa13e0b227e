"""What a run leaves behind, taken into its run directory by its unit's
ExecStopPost: the files in its working directory (artifacts), the value its
entrypoint returned, and its lint report.

Run as root on the host, by path (`python -I -S collect.py …`, standard
library only: no site, no imports from the package), once every process of
the run is dead — so the tree it reads can no longer change under it. The
tree was still made by hostile code, so: no symlink is ever followed (each
step opens relative to its parent's fd with O_NOFOLLOW), only regular files
are read (a FIFO or device is never opened for reading: O_NONBLOCK, then
fstat), and every cap (entries looked at, files, bytes per file and in all,
depth, path length) holds before anything is copied. The judge0 CVE-2024-
28185/28189 class — host code following a sandbox-made symlink — has
nothing to follow here.

Into the run's ends directory (the broker's `<state_dir>/ends/<id>`: root's,
under a directory only root and the daemon's group may enter, so what it
writes there is readable by the daemon, 0644, and no one else):

    <run dir>/files/manifest.json   {"files": [{path, size, sha256, blob}], "skipped": […], "incomplete": bool}
    <run dir>/files/<blob>          the bytes of each collected file (blobs are numbers: no name from the run
                                    is ever used as a path on the host)
    <run dir>/return.json           what the entrypoint returned (at most result_bytes + 1 bytes)
    <run dir>/return.error          why it returned nothing
    <run dir>/lint.json             the linter's report
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys

# Files the box's `out` directory may hold (written by the bootstrap or the linter), with their caps.
CHANNELS = {"result.json": "return.json", "error": "return.error", "lint.json": "lint.json"}
ERROR_BYTES = 4096
LINT_BYTES = 1 << 20
SKIPPED_LISTED = 20  # skipped entries named in the manifest; the rest only counted
CHUNK = 1 << 16
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# Plain classes, not dataclasses: this runs once per run that leaves files, and
# `dataclasses` (which imports `inspect`) would double its start-up (≈13 ms).
class Caps:
    """files: files collected; file_bytes: per file (a bigger one is skipped, not
    cut); total_bytes; depth: directories below the working directory;
    path_chars; entries: directory entries looked at, collected or not
    (100,000 empty files cost little); result_bytes: the entrypoint's value."""

    FIELDS = ("files", "file_bytes", "total_bytes", "depth", "path_chars", "entries", "result_bytes")
    __slots__ = FIELDS

    def __init__(self, *, files: int, file_bytes: int, total_bytes: int, depth: int, path_chars: int,
                 entries: int, result_bytes: int) -> None:
        self.files, self.file_bytes, self.total_bytes = files, file_bytes, total_bytes
        self.depth, self.path_chars, self.entries, self.result_bytes = depth, path_chars, entries, result_bytes


class Collection:
    __slots__ = ("files", "incomplete", "seen", "skipped", "skipped_count", "total")

    def __init__(self) -> None:
        self.files: list[dict[str, object]] = []
        self.skipped: list[dict[str, str]] = []
        self.skipped_count = 0
        self.incomplete = False  # a cap on entries, files or total bytes stopped the walk
        self.total = 0
        self.seen = 0

    def skip(self, path: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_LISTED:
            self.skipped.append({"path": path[:300], "reason": reason})

    def manifest(self) -> dict[str, object]:
        return {"files": self.files, "skipped": self.skipped, "skipped_count": self.skipped_count,
                "incomplete": self.incomplete}


class _Stop(Exception):
    """A cap on the whole collection was reached."""


def collect_tree(work_fd: int, dest_fd: int, caps: Caps) -> Collection:
    """Copy the regular files under `work_fd` into blobs in `dest_fd`."""
    walker = _Walker(dest_fd, caps)
    try:
        walker.walk(work_fd, "", 0)
    except _Stop:
        walker.found.incomplete = True
    return walker.found


class _Walker:
    def __init__(self, dest_fd: int, caps: Caps) -> None:
        self.dest_fd = dest_fd
        self.caps = caps
        self.found = Collection()

    def walk(self, dir_fd: int, prefix: str, depth: int) -> None:
        caps, found = self.caps, self.found
        with os.scandir(dir_fd) as entries:
            names = sorted(entry.name for entry in entries)  # the same run, the same manifest
        for name in names:
            found.seen += 1
            if found.seen > caps.entries:
                raise _Stop
            path = prefix + name
            if len(path) > caps.path_chars or not _printable(name):
                found.skip(path, f"name longer than {caps.path_chars} characters or not printable")
                continue
            try:
                mode = os.lstat(name, dir_fd=dir_fd).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                self._descend(dir_fd, name, path + "/", depth)
            elif stat.S_ISREG(mode):
                self._take(dir_fd, name, path)
            else:
                kind = "symlink" if stat.S_ISLNK(mode) else "FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
                found.skip(path, f"{kind}: not collected")

    def _descend(self, dir_fd: int, name: str, path: str, depth: int) -> None:
        if depth >= self.caps.depth:
            self.found.skip(path, f"deeper than {self.caps.depth} directories")
            return
        try:
            sub = os.open(name, _DIR, dir_fd=dir_fd)
        except OSError:
            self.found.skip(path, "directory cannot be opened")
            return
        try:
            self.walk(sub, path, depth + 1)
        finally:
            os.close(sub)

    def _take(self, dir_fd: int, name: str, path: str) -> None:
        caps, found = self.caps, self.found
        try:
            fd = os.open(name, _READ, dir_fd=dir_fd)
        except OSError as exc:
            found.skip(path, f"cannot be opened ({errno.errorcode.get(exc.errno or 0, exc.errno)})")
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                found.skip(path, "not a regular file")
                return
            if info.st_size > caps.file_bytes:
                found.skip(path, f"{info.st_size} bytes: over the {caps.file_bytes}-byte cap per file")
                return
            if len(found.files) >= caps.files:
                raise _Stop
            if found.total + info.st_size > caps.total_bytes:
                found.skip(path, f"{info.st_size} bytes: over the {caps.total_bytes}-byte cap for all files")
                return
            blob = str(len(found.files))
            size, digest = _copy(fd, self.dest_fd, blob, caps.file_bytes)
            found.total += size
            found.files.append({"path": path, "size": size, "sha256": digest, "blob": blob})
        finally:
            os.close(fd)


def _printable(name: str) -> bool:
    return name.isprintable() and "\\" not in name


def _copy(fd: int, dest_fd: int, blob: str, cap: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    out = os.open(blob, _WRITE, 0o644, dir_fd=dest_fd)
    size = 0
    try:
        while size < cap and (chunk := os.read(fd, min(CHUNK, cap - size))):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            size += len(chunk)
    finally:
        os.close(out)
    return size, digest.hexdigest()


def copy_channel(out_fd: int, name: str, run_fd: int, dest: str, cap: int) -> None:
    """One file of the box's `out` directory, if it is a regular file: at most cap bytes."""
    try:
        fd = os.open(name, _READ, dir_fd=out_fd)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            _copy(fd, run_fd, dest, cap)
    except FileExistsError:
        pass  # taken before the program started (a lint report): a later copy is not the linter's
    finally:
        os.close(fd)


def collect(box: str, run_dir: str, caps: Caps) -> None:
    run_fd = os.open(run_dir, _DIR)
    try:
        with _opened(os.path.join(box, "out")) as out_fd:
            if out_fd is not None:
                caps_of = {"result.json": caps.result_bytes + 1, "error": ERROR_BYTES, "lint.json": LINT_BYTES}
                for name, dest in CHANNELS.items():
                    copy_channel(out_fd, name, run_fd, dest, caps_of[name])
        with _opened(os.path.join(box, "work")) as work_fd:
            if work_fd is None:
                return
            os.mkdir("files", 0o755, dir_fd=run_fd)
            dest_fd = os.open("files", _DIR, dir_fd=run_fd)
            try:
                found = collect_tree(work_fd, dest_fd, caps)
                data = json.dumps(found.manifest(), ensure_ascii=True).encode()
                tmp = os.open(".manifest.json", _WRITE, 0o644, dir_fd=dest_fd)
                try:
                    os.write(tmp, data)
                finally:
                    os.close(tmp)
                os.rename(".manifest.json", "manifest.json", src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
            finally:
                os.close(dest_fd)
    finally:
        os.close(run_fd)


class _opened:
    """A directory fd (no symlink followed), or None when there is none."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> int | None:
        try:
            self.fd = os.open(self.path, _DIR)
        except OSError:
            self.fd = None
        return self.fd

    def __exit__(self, *_: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def main(argv: list[str]) -> int:
    """collect.py FILES FILE_BYTES TOTAL_BYTES DEPTH PATH_CHARS ENTRIES RESULT_BYTES BOX RUN_DIR"""
    *numbers, box, run_dir = argv
    collect(box, run_dir, Caps(**dict(zip(Caps.FIELDS, map(int, numbers), strict=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
