"""The broker's own directories for a run, made before its unit starts: the
staging directory on the host's /run (the run's inputs, copied in here, are
mounted read-only into the run) and the ends directory (where the unit's
privileged steps record the outcome and take the run's files).

The daemon writes a run's inputs into its own state and sends the broker an
open descriptor of that `in/` directory, never a path: the broker copies
from it, as root, only what the daemon's user owns (so a daemon taken over
cannot have root read a file for it), only regular files and directories
(no symlink followed: every step is opened relative to its parent with
O_NOFOLLOW, and checked after opening), within the sizes the configuration
allows. Every path root writes is under a directory only root can change:
nothing the daemon could swap for a symlink (the Judge0 CVE-2024-28185/28189
class)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from unitbox.broker.checks import Refused
from unitbox.config import Config

CHUNK = 1 << 16
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
BOOKKEEPING_FILES = 3  # main.py, argv, entry
BOOKKEEPING_BYTES = 64 << 10  # argv and entry, beside the request body's cap


@dataclass(slots=True)
class InputBudget:
    """What one run's `in/` may hold, from the broker's configuration: the
    request body caps the code and the files together; the files' own caps."""

    entries: int
    bytes: int
    depth: int

    @classmethod
    def of(cls, config: Config) -> InputBudget:
        files = config.files
        return cls(entries=BOOKKEEPING_FILES + 2 * files.input_count + 1,  # each file and its directory, files/
                   bytes=config.max_request_kb * 1024 + BOOKKEEPING_BYTES,
                   depth=files.path_chars // 2 + 2)

    def take(self, size: int) -> None:
        self.entries -= 1
        self.bytes -= size
        if self.entries < 0 or self.bytes < 0:
            raise Refused("the run's inputs are larger than the configuration allows")


def stage_inputs(stage_root: Path, run_id: str, inputs_fd: int, owner: int, budget: InputBudget) -> None:
    """Copy the tree open at `inputs_fd` (the daemon's `runs/<id>/in`) to the
    run's staging directory, as `in/`. A retry of the same start keeps the
    copy made first (its unit may be running on it)."""
    _check_owned(os.fstat(inputs_fd), owner, "the inputs directory", directory=True)
    os.makedirs(stage_root, mode=0o700, exist_ok=True)
    _check_root_dir(stage_root)
    stage = stage_root / run_id
    with contextlib.suppress(FileExistsError):
        os.mkdir(stage, 0o700)
    _check_root_dir(stage)
    target = stage / "in"
    if target.exists():
        return
    partial = stage / f"in.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial, 0o755)
    try:
        _copy_tree(inputs_fd, partial, owner, budget, depth=0)
        partial.chmod(0o755)  # whatever the umask: the run's dynamic user reads its inputs
        os.rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def copy_inputs(target: Path, inputs_fd: int, owner: int, budget: InputBudget) -> None:
    """Copy the tree open at `inputs_fd` into `target`, an empty directory the
    broker made: a warm unit's `in/`, mounted into it already (so its
    contents change, not the directory; broker/warm.py)."""
    _check_owned(os.fstat(inputs_fd), owner, "the inputs directory", directory=True)
    _copy_tree(inputs_fd, target, owner, budget, depth=0)


def drop_stage(stage_root: Path, run_id: str) -> None:
    """A start that failed: no unit will use or remove the staging directory."""
    shutil.rmtree(stage_root / run_id, ignore_errors=True)


def make_ends(ends_root: Path, run_id: str) -> Path:
    """`<state_dir>/ends/<id>`, root's: made here, written by the unit's privileged steps."""
    ends_root.mkdir(mode=0o750, parents=True, exist_ok=True)
    _check_root_dir(ends_root)
    ends = ends_root / run_id
    with contextlib.suppress(FileExistsError):
        os.mkdir(ends, 0o755)
    _check_root_dir(ends)
    return ends


def forget_ends(ends_root: Path, run_id: str) -> None:
    shutil.rmtree(ends_root / run_id, ignore_errors=True)


def _check_root_dir(path: Path) -> None:
    """A directory of the broker's own: a real directory (no symlink), owned by root."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise Refused(f"{path} is not a directory of the broker's own")


def _check_owned(info: os.stat_result, owner: int, what: str, *, directory: bool) -> None:
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        raise Refused(f"{what} is not a {'directory' if directory else 'regular file'}")
    if info.st_uid != owner:
        raise Refused(f"{what} is owned by uid {info.st_uid}, not by the daemon's (uid {owner})")


def _copy_tree(source_fd: int, target: Path, owner: int, budget: InputBudget, *, depth: int) -> None:
    if depth > budget.depth:
        raise Refused("the run's inputs are nested deeper than the configuration allows")
    for name in sorted(os.listdir(source_fd)):
        mode = os.lstat(name, dir_fd=source_fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise Refused(f"input {name!r} is neither a regular file nor a directory")
        try:
            fd = os.open(name, _DIR if stat.S_ISDIR(mode) else _READ, dir_fd=source_fd)
        except OSError as exc:  # swapped for a link meanwhile (ELOOP), or not readable by root without privilege
            raise Refused(f"input {name!r} cannot be opened: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)  # what was opened, not what lstat saw: it may have been swapped between
            _check_owned(info, owner, f"input {name!r}", directory=stat.S_ISDIR(mode))
            budget.take(info.st_size if stat.S_ISREG(info.st_mode) else 0)
            if stat.S_ISDIR(info.st_mode):
                os.mkdir(target / name)
                (target / name).chmod(0o755)  # whatever the umask: the run's dynamic user reads its inputs
                _copy_tree(fd, target / name, owner, budget, depth=depth + 1)
            else:
                _copy_file(fd, target / name, info.st_size)
        finally:
            os.close(fd)


def _copy_file(fd: int, target: Path, size: int) -> None:
    """At most `size` bytes (what fstat said, and what the budget took): a file growing meanwhile is cut."""
    out = os.open(target, _WRITE, 0o644)
    try:
        os.fchmod(out, 0o644)  # whatever the umask
        left = size
        while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            left -= len(chunk)
    finally:
        os.close(out)
