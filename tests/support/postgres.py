"""A throw-away PostgreSQL server from Debian's `postgresql` package, for
the store's contract tests and the daemon on PostgreSQL.

initdb makes a new cluster in a fresh directory (/tmp/ubx-pg-<run>-…) as
the `postgres` user (the server refuses root); it listens on a free
loopback port, which test hosts share with the machine, and on a socket in
that directory. Stopped and removed at the end: the machine's own clusters
(pg_lsclusters) are never touched."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.daemon import free_port
from tests.support.testhost import RUN_TAG

# `make test` sets it: there the server must be there (the Makefile installs it), not skipped.
REQUIRED = os.environ.get("UBX_REQUIRE_POSTGRESQL") == "1"
USER = "unitbox"  # the cluster's superuser; trust authentication on loopback (a test server)


def server_binaries() -> Path | None:
    """The newest server's bin/ (Debian 12: 15, Debian 13: 17), or None without one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class Postgres:
    def __init__(self, bindir: Path, settings: dict[str, str] | None = None) -> None:
        """`settings`: more `-c name=value` for the server (the cluster bench loads pg_stat_statements)."""
        self.bindir = bindir
        self.settings = settings or {}
        self.dir = Path(tempfile.mkdtemp(prefix=f"ubx-pg-{RUN_TAG}-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self._databases = itertools.count(1)

    def _as_postgres(self, *command: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True,
                              check=False, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}\n{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def create(self) -> None:
        owner = pwd.getpwnam("postgres")
        os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust",
                          "-E", "UTF8", "--no-sync", "--no-instructions")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1" + "".join(
            f" -c {name}={value}" for name, value in self.settings.items())
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        done = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"), "-D", str(self.data),
                               "status"], capture_output=True, check=False)
        return done.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", self.url(database), "-c", sql], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh, empty database's URL: one per test, so none sees another's runs."""
        name = f"t{next(self._databases)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        try:
            if self.data.exists() and self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> list[int]:
        """The server's processes: the postmaster and its children (backends, background workers)."""
        main = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True, check=False).stdout
        return [main, *(int(pid) for pid in children.split())]
