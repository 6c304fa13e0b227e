"""Building and removing runtimes: venvs under `<state_dir>/runtimes/`.

    runtimes/
      .lock                                   one build or remove at a time
      scientific -> .scientific.<build-id>    the name runs use (a symlink)
      .scientific.<build-id>/                 a venv + unitbox-runtime.json
      .retired.<epoch>.scientific.<build-id>/ replaced or removed; deleted once
                                              no run can still have it mounted

A build makes a new `.NAME.<build-id>` venv with the host's Python and pip,
records its packages, then points NAME at it with one rename(2): runs that
start afterwards get the new one, a failed or interrupted build leaves the
old one in place. The old version is renamed aside, not deleted: a run that
already has it mounted keeps working, and it goes at a later build or remove
once it is older than the longest run (max_limits.timeout_s + a minute).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_IMODE, S_ISDIR, S_ISREG
from typing import Any

from unitbox import __version__
from unitbox.config import Config
from unitbox.profile import Runtime
from unitbox.runtimes import DEFAULT, MANIFEST, UNKNOWN, check_name, describe_sync, runtimes_dir

LOCK = ".lock"
RETIRED = ".retired."
VERSION = re.compile(r"\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.(\d{8}T\d{6}Z-[0-9a-f]{6})")
LINK_TMP = re.compile(r"\.link-[0-9a-f]+")
# Runs cannot see these (ProtectHome, private /run and /tmp): an interpreter
# there would not start inside a run.
HIDDEN_FROM_RUNS = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/dev/shm")
GRACE_EXTRA_S = 60.0

Runner = Callable[[list[str]], None]
Say = Callable[[str], None]


class BuildError(Exception):
    """Why a build or remove cannot go ahead (a message for the operator)."""


def run_command(argv: list[str]) -> None:
    """Runs a build step with the operator's terminal (pip draws its progress
    bars there); a non-zero exit raises CalledProcessError."""
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def new_build_id(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(3)


def grace_s(config: Config) -> float:
    """How long a replaced version is kept: a run that mounted it just before
    the switch can still be running for max_limits.timeout_s."""
    return config.max_limits.timeout_s + GRACE_EXTRA_S


def check_visible_to_runs(python: str, state_dir: Path) -> None:
    for path in {os.path.abspath(python), os.path.realpath(python)}:
        for hidden in (*HIDDEN_FROM_RUNS, str(state_dir)):
            if path == hidden or path.startswith(hidden.rstrip("/") + "/"):
                raise BuildError(f"{python} is under {hidden}, which runs cannot see; "
                                 "build with an interpreter such as /usr/bin/python3")
    if not os.access(python, os.X_OK):
        raise BuildError(f"{python}: no such interpreter")


def check_buildable(config: Config, name: str) -> None:
    check_name(name)
    if name == DEFAULT:
        raise BuildError("'default' is the host's Python with the standard library only; pick another name")
    if name in config.runtimes:
        raise BuildError(f"runtime {name!r} is defined in the config ([runtimes.{name}]); pick another name")


def prepare(directory: Path) -> None:
    """`<state_dir>/runtimes/`, root's and world-readable: the daemon (its own
    user, in the package) lists the runtimes, a run's dynamic user reads its
    mount. Runs never see the state directory itself (the profile hides it)."""
    directory.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.parent.chmod(0o755)  # 0700 as 0.1 and 0.2 made it: the daemon could not list it
    directory.mkdir(mode=0o755, exist_ok=True)
    directory.chmod(0o755)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another `unitbox runtime build` or `remove` is at work in {directory}") from None
        yield
    finally:
        os.close(fd)


def retire(directory: Path, version: str, now: float) -> None:
    os.rename(directory / version, directory / f"{RETIRED}{int(now)}{version}")


def retired_at(name: str) -> int | None:
    if not name.startswith(RETIRED):
        return None
    stamp = name[len(RETIRED):].split(".", 1)[0]
    return int(stamp) if stamp.isdigit() else None


def collect(directory: Path, grace: float, now: float) -> list[str]:
    """Deletes retired versions older than `grace`; retires versions no name
    points to (a build that was killed, or a crash mid-switch). Call it with
    the lock held. Returns what it deleted."""
    live = set()
    entries = list(os.scandir(directory))
    for entry in entries:
        if entry.is_symlink() and not entry.name.startswith("."):
            live.add(os.readlink(entry.path))
    deleted = []
    for entry in entries:
        if (stamp := retired_at(entry.name)) is not None:
            if now - stamp > grace:
                shutil.rmtree(entry.path, ignore_errors=True)
                deleted.append(entry.name)
        elif VERSION.fullmatch(entry.name) and entry.name not in live and entry.is_dir(follow_symlinks=False):
            retire(directory, entry.name, now)
        elif LINK_TMP.fullmatch(entry.name) and entry.is_symlink():
            os.unlink(entry.path)
    return deleted


def switch(directory: Path, name: str, version: str) -> str | None:
    """Points `name` at `version` atomically; returns the version it replaced."""
    link = directory / name
    previous = os.readlink(link) if link.is_symlink() else None
    temporary = directory / f".link-{secrets.token_hex(8)}"
    os.symlink(version, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return previous


def make_readable(root: Path) -> None:
    """Everything readable (and traversable/executable where it was for its
    owner) by anyone, writable by root only: runs have a dynamic user."""
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            info = os.lstat(path)
            if not (S_ISDIR(info.st_mode) or S_ISREG(info.st_mode)):
                continue  # symlinks and the like
            mode = (S_IMODE(info.st_mode) & ~0o7022) | 0o444
            if info.st_mode & 0o100 or S_ISDIR(info.st_mode):
                mode |= 0o111
            if mode != S_IMODE(info.st_mode):
                os.chmod(path, mode)
    root.chmod(0o755)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@dataclass(frozen=True)
class Built:
    name: str
    path: Path
    manifest: dict[str, Any]
    replaced: str | None


def build(config: Config, name: str, requirements: Path, *, python: str | None = None,
          pip_args: list[str] | None = None, say: Say = print, runner: Runner = run_command,
          clock: Callable[[], float] = time.time) -> Built:
    check_buildable(config, name)
    python = python or config.python
    check_visible_to_runs(python, config.state_dir)
    try:
        wanted = requirements.read_text()
    except OSError as exc:
        raise BuildError(f"{requirements}: {exc.strerror or exc}") from None
    directory = runtimes_dir(config)
    link = directory / name
    if link.exists() and not link.is_symlink():
        raise BuildError(f"{link} is not a runtime built by `unitbox runtime build`; move it away first")
    prepare(directory)
    with locked(directory):
        collect(directory, grace_s(config), clock())
        began = clock()
        version = f".{name}.{new_build_id(began)}"
        path = directory / version
        interpreter = str(path / "bin" / "python")
        try:
            with umask(0o022):
                say(f"[1/4] creating a venv with {python} in {path}")
                runner([python, "-I", "-m", "venv", str(path)])
                say(f"[2/4] installing the packages of {requirements} with pip")
                runner([interpreter, "-I", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                        "--no-warn-script-location", "-r", str(requirements.resolve()), *(pip_args or [])])
            say("[3/4] recording the package versions")
            info = describe_sync(Runtime(name, interpreter))
            if info.python == UNKNOWN:
                raise BuildError(f"the new environment's interpreter {interpreter} does not start")
            manifest = {
                "name": name, "build_id": version.rsplit(".", 1)[1],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
                "build_seconds": round(clock() - began, 1), "python": info.python, "interpreter": python,
                "requirements": wanted, "pip_args": pip_args or [], "packages": info.packages,
                "unitbox": __version__,
            }
            (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            make_readable(path)
            os.sync()  # the files are on disk before the name points at them
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        say(f"[4/4] switching {name!r} to the new build")
        replaced = switch(directory, name, version)
        if replaced is not None and VERSION.fullmatch(replaced) and (directory / replaced).is_dir():
            retire(directory, replaced, clock())
    return Built(name, path, manifest, replaced)


def remove(config: Config, name: str, *, clock: Callable[[], float] = time.time) -> str:
    """Removes the name at once (later submissions get a 422); the files go
    once no run can still have them mounted. Returns the retired version."""
    check_name(name)
    if name == DEFAULT or name in config.runtimes:
        raise BuildError(f"runtime {name!r} is not a built one (it is "
                         f"{'built in' if name == DEFAULT else 'defined in the config'}); nothing to remove")
    directory = runtimes_dir(config)
    link = directory / name
    if not directory.is_dir():
        raise BuildError(f"there is no built runtime {name!r} in {directory}")
    with locked(directory):
        if not link.is_symlink():
            if link.exists():
                raise BuildError(f"{link} is not a runtime built by `unitbox runtime build`; remove it by hand")
            raise BuildError(f"there is no built runtime {name!r} in {directory}")
        version = os.readlink(link)
        link.unlink()
        if VERSION.fullmatch(version) and (directory / version).is_dir():
            retire(directory, version, clock())
        collect(directory, grace_s(config), clock())
    return version
