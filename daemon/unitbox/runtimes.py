"""Named runtimes: which interpreter (and which read-only package set) a run
uses. Never a path from a submitter: a run names one of

- `default`: the host's Python (`python` in the config) with the standard
  library only. Runs get `-I -S`, so not even Debian's dist-packages are on
  `sys.path`.
- `[runtimes.NAME]` in the config: an interpreter the operator provides
  (`python`, as runs see it, and optionally a `path` mounted read-only at the
  same place).
- runtimes built by `unitbox runtime build NAME -r requirements.txt`: venvs
  under `<state_dir>/runtimes/`, discovered by the daemon (no config edit, no
  restart): `<state_dir>/runtimes/NAME` is a symlink to the current build.
  A run gets it bind-mounted read-only at RUNTIME_DIR, so the state directory
  itself stays invisible to runs (InaccessiblePaths).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitbox.config import Config
from unitbox.errors import UnknownRuntime
from unitbox.profile import Runtime

log = logging.getLogger(__name__)

DEFAULT = "default"
UNKNOWN = "unknown"
RUNTIME_DIR = "/run/unitbox/runtime"
"""Where a built runtime appears inside a run (under the run's private /run)."""
MANIFEST = "unitbox-runtime.json"
"""Written by the build into the runtime: name, build time, Python, packages."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# Asked of each interpreter, with the flags runs get: its version and the
# distributions it can import (what a run really sees).
_DESCRIBE = (
    "import json,sys,importlib.metadata as m;"
    "print(json.dumps({'python':'%d.%d.%d'%sys.version_info[:3],"
    "'packages':{d.metadata['Name']:d.version for d in m.distributions() if d.metadata['Name']}}))"
)


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    name: str
    python: str
    packages: dict[str, str]


def check_name(name: str) -> str:
    """A runtime name: letters, digits, `_` and `-`, at most 64 characters."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a runtime name (letters, digits, '_' and '-', "
                         "starting with a letter or digit, at most 64 characters)")
    return name


def runtimes_dir(config: Config) -> Path:
    return config.state_dir / "runtimes"


def interpreter_flags(runtime: Runtime) -> list[str]:
    """The flags runs get (profile.py): -I always, -S for a stdlib-only runtime."""
    return ["-I", "-S"] if runtime.stdlib_only else ["-I"]


def host_python(runtime: Runtime) -> str:
    """The runtime's interpreter as the daemon (outside any run) reaches it."""
    if runtime.path and runtime.target and runtime.python.startswith(runtime.target.rstrip("/") + "/"):
        return runtime.path.rstrip("/") + runtime.python[len(runtime.target.rstrip("/")):]
    return runtime.python


def built_runtime(name: str, directory: Path) -> Runtime:
    """The Runtime of `directory/NAME`: mounted at RUNTIME_DIR, its venv
    interpreter run from there. The mount source is the symlink itself, so
    systemd resolves it when the run starts: a rebuild never changes a
    runtime under a running program."""
    return Runtime(name, f"{RUNTIME_DIR}/bin/python", str(directory / name), target=RUNTIME_DIR)


def discover(directory: Path) -> list[str]:
    """Names of the runtimes in `directory`: visible entries with a valid
    name whose `bin/python` exists (build's symlinks, or a venv an operator
    put there)."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entry.name for entry in entries
                  if NAME_PATTERN.fullmatch(entry.name) and os.path.exists(os.path.join(entry.path, "bin", "python")))


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Runtimes:
    """The runtimes this server offers. The built ones are re-read from
    `<state_dir>/runtimes/` whenever that directory changes, so `unitbox
    runtime build/remove` take effect for the next submission."""

    RACY_NS = 2_000_000_000
    """A directory changed this recently may change again within the same
    mtime tick: it is not trusted as a cache key until it is older."""

    def __init__(self, config: Config) -> None:
        self.directory = runtimes_dir(config)
        self._fixed = {DEFAULT: Runtime(DEFAULT, config.python, stdlib_only=True)}
        for name, section in sorted(config.runtimes.items()):
            self._fixed[name] = Runtime(name, section.python, section.path)
        self._built: dict[str, Runtime] = {}
        self._stamp: tuple[int, int] | None = None
        self._scanned = False
        self._described: dict[tuple[str, str], RuntimeInfo] = {}

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.directory)
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        built = {}
        for name in discover(self.directory):
            if name in self._fixed:
                log.warning("runtime %s in %s is shadowed by the built-in or configured one", name, self.directory)
            else:
                built[name] = built_runtime(name, self.directory)
        if not self._scanned or built.keys() != self._built.keys():
            log.log(logging.INFO if self._scanned else logging.DEBUG, "runtimes: %s", ", ".join([*self._fixed, *built]))
        self._scanned = True
        self._built = built
        fresh = stamp is not None and time.time_ns() - stamp[0] < self.RACY_NS
        self._stamp = None if fresh else stamp

    def _all(self) -> dict[str, Runtime]:
        self._refresh()
        return {**self._fixed, **self._built}

    def get(self, name: str | None) -> Runtime:
        runtimes = self._all()
        runtime = runtimes.get(name or DEFAULT)
        if runtime is None:
            known = ", ".join(runtimes)
            raise UnknownRuntime(f"runtime {name!r} is not defined on this server (known: {known})",
                                 details=[{"field": "runtime", "message": f"unknown runtime {name!r}"}])
        return runtime

    @property
    def names(self) -> list[str]:
        return list(self._all())

    async def describe(self) -> list[RuntimeInfo]:
        """Version and packages of every runtime, as runs see them (asked of
        each interpreter once per build, then cached)."""
        result = []
        for runtime in self._all().values():
            key = _cache_key(runtime)
            info = self._described.get(key) or await describe(runtime)
            if info.python != UNKNOWN:
                self._described[key] = info
            result.append(info)
        return result


def _cache_key(runtime: Runtime) -> tuple[str, str]:
    """A rebuild (a new version behind the same name) is a new key."""
    return runtime.name, os.path.realpath(runtime.path) if runtime.path else runtime.python


async def describe(runtime: Runtime) -> RuntimeInfo:
    """Asks the interpreter itself, with the flags runs get. Python "unknown"
    when it cannot answer (logged; not cached)."""
    python = host_python(runtime)
    process = None
    try:
        process = await asyncio.create_subprocess_exec(
            python, *interpreter_flags(runtime), "-c", _DESCRIBE,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        data = json.loads(out)
        packages = sorted(data["packages"].items(), key=lambda item: str(item[0]).lower())
        return RuntimeInfo(runtime.name, str(data["python"]), {str(k): str(v) for k, v in packages})
    except (OSError, ValueError, KeyError, TypeError, TimeoutError) as exc:
        log.warning("cannot describe runtime %s (%s): %s", runtime.name, python, exc or type(exc).__name__)
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        return RuntimeInfo(runtime.name, UNKNOWN, {})


def describe_sync(runtime: Runtime) -> RuntimeInfo:
    return asyncio.run(describe(runtime))
