"""Named runtimes: which interpreter (and which read-only package set) a run
uses. `default` is the host's Python with the standard library only; the
operator defines the others in the config. Never a path from a submitter."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from unitbox.config import Config
from unitbox.errors import UnknownRuntime
from unitbox.profile import Runtime

log = logging.getLogger(__name__)

DEFAULT = "default"

# Asked of each interpreter once: its version and installed distributions.
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


class Runtimes:
    def __init__(self, config: Config) -> None:
        self._runtimes = {DEFAULT: Runtime(DEFAULT, config.python)}
        for name, section in sorted(config.runtimes.items()):
            self._runtimes[name] = Runtime(name, section.python, section.path)
        self._described: dict[str, RuntimeInfo] = {}

    def get(self, name: str | None) -> Runtime:
        runtime = self._runtimes.get(name or DEFAULT)
        if runtime is None:
            known = ", ".join(sorted(self._runtimes))
            raise UnknownRuntime(f"runtime {name!r} is not defined on this server (known: {known})",
                                 details=[{"field": "runtime", "message": f"unknown runtime {name!r}"}])
        return runtime

    @property
    def names(self) -> list[str]:
        return list(self._runtimes)

    async def describe(self) -> list[RuntimeInfo]:
        """Version and packages of every runtime (asked once, then cached)."""
        for name, runtime in self._runtimes.items():
            if name not in self._described:
                self._described[name] = await _describe(runtime)
        return [self._described[name] for name in self._runtimes]


async def _describe(runtime: Runtime) -> RuntimeInfo:
    # -I: the standard library and the runtime's own site-packages only.
    try:
        process = await asyncio.create_subprocess_exec(
            runtime.python, "-I", "-c", _DESCRIBE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        data = json.loads(out)
        return RuntimeInfo(runtime.name, str(data["python"]), dict(sorted(data["packages"].items())))
    except (OSError, ValueError, KeyError, TimeoutError) as exc:
        log.warning("cannot describe runtime %s (%s): %s", runtime.name, runtime.python, exc)
        return RuntimeInfo(runtime.name, "unknown", {})
