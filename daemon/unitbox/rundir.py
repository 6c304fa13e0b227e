"""A run's two directories under the state dir: the daemon's own (its
inputs, sent to the broker to stage, and its captured output) and the
broker's (what the unit's privileged steps recorded: the outcome and what
the run left). No run can reach the state dir at all.

    daemon/runs/<id>/   0700, the daemon's user
      in/main.py        the source
      in/argv           sys.argv[1:], NUL-separated
      in/entry          "<function> <result cap>" when an entrypoint is called
      in/files/…        input files, copied into the working directory at the start
      stdin             fed to the program as its standard input
      stdout, stderr    captured output, each capped at output_kb
    ends/<id>/          root's (ends/ is 0750 root:<the daemon's group>): the daemon reads, never writes
      result            written by the unit's privileged ExecStopPost
      return.json, return.error, lint.json, files/   what the run left (collect.py)

Runs recorded before 0.3.0 (one root daemon) kept the second part in the first: read there.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unitbox.config import Config
from unitbox.outcome import Outcome, parse_result_file

log = logging.getLogger(__name__)

# The daemon's files as 0.1 and 0.2 kept them: right in the state directory.
LEGACY_NAMES = ("unitbox.db", "unitbox.db-wal", "unitbox.db-shm", "runs")


def prepare_data_dir(config: Config) -> None:
    """The daemon's directory (0700) and its runs/; a state directory laid
    out by 0.1 or 0.2 is moved into it first, once (the package's postinst
    does the same before the daemon runs as its own user, who could not).
    Blocking: call from a worker thread."""
    data, state = config.data_dir, config.state_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    data.chmod(0o700)
    if not config.database_path.exists() and (state / "unitbox.db").exists():
        for name in LEGACY_NAMES:
            if (state / name).exists():
                os.rename(state / name, data / name)
        log.info("moved the database and runs/ from %s into %s (the layout of unitbox 0.3)", state, data)
    config.runs_dir.mkdir(mode=0o700, exist_ok=True)


@dataclass(frozen=True, slots=True)
class RunDir:
    path: Path
    ends_path: Path

    @classmethod
    def of(cls, config: Config, run_id: str) -> RunDir:
        return cls(config.runs_dir / run_id, config.ends_dir / run_id)

    @property
    def ends(self) -> Path:
        """Where root recorded what the run left (its own directory for a run from before 0.3.0)."""
        return self.path if not self.ends_path.exists() and (self.path / "result").exists() else self.ends_path

    @property
    def inputs(self) -> Path:
        return self.path / "in"

    @property
    def script(self) -> Path:
        return self.inputs / "main.py"

    @property
    def stdin(self) -> Path:
        return self.path / "stdin"

    def output(self, stream: str) -> Path:
        return self.path / stream

    @property
    def result(self) -> Path:
        return self.ends / "result"

    @property
    def returned(self) -> Path:
        return self.ends / "return.json"

    @property
    def return_error(self) -> Path:
        return self.ends / "return.error"

    @property
    def lint_report(self) -> Path:
        return self.ends / "lint.json"

    @property
    def files(self) -> Path:
        return self.ends / "files"

    @property
    def manifest(self) -> Path:
        return self.files / "manifest.json"

    def blob(self, name: str) -> Path:
        """An output file's bytes: `name` is the manifest's blob number, never a path from the run."""
        if not name.isdigit():
            raise ValueError(f"not a blob name: {name!r}")
        return self.files / name

    def create(self, code: bytes, stdin: bytes, args: list[str], *,
               files: Sequence[tuple[str, bytes]] = (), entry: str | None = None) -> None:
        """Write the run's inputs, on disk when this returns: a run is
        acknowledged after this, and must survive a power loss (store.py has
        the measured cost). `files`: (checked relative path, content) pairs.
        Blocking: call from a worker thread."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.inputs.mkdir(mode=0o755, exist_ok=True)
        self.inputs.chmod(0o755)
        _write(self.script, code, 0o644)
        _write(self.inputs / "argv", "\0".join(args).encode("utf-8", "surrogatepass"), 0o644)
        if entry is not None:
            _write(self.inputs / "entry", entry.encode(), 0o644)
        _write(self.stdin, stdin, 0o600)
        synced = {self.inputs, self.path, self.path.parent}
        for relative, content in files:
            # Paths were checked at the edge (api/inputs.py): relative, no `..`; O_EXCL|O_NOFOLLOW all the same.
            target = self.inputs / "files" / relative
            for parent in reversed(target.relative_to(self.inputs).parents[:-1]):
                directory = self.inputs / parent
                if directory not in synced:
                    directory.mkdir(exist_ok=True)
                    directory.chmod(0o755)  # whatever the daemon's umask: the run's user reads them
                    synced.add(directory)
            _write(target, content, 0o644, exclusive=True)
        # A new name is durable once its parent directory is synced.
        for directory in sorted(synced, key=lambda p: -len(p.parts)):
            _fsync_dir(directory)

    def read_outcome(self) -> tuple[Outcome, float] | None:
        """The recorded outcome and when it was written (≈ when the unit ended)."""
        try:
            text = self.result.read_text(errors="replace")
            written = self.result.stat().st_mtime
        except FileNotFoundError:
            return None
        outcome = parse_result_file(text, written)
        return (outcome, written) if outcome is not None else None

    def remove(self) -> None:
        """The daemon's part; the broker removes its own (`forget`)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _write(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    flags = os.O_EXCL | os.O_NOFOLLOW if exclusive else os.O_TRUNC
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
