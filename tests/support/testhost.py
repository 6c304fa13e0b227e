"""A real systemd for the tests: boots tests/testhost/testhost.sh, runs
commands inside it, and always tears it down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "testhost" / "testhost.sh"
SCRATCH = Path("/var/tmp/unitbox-testhost")  # testhost.sh's scratch dirs, one per host
CHECK_CLEAN = REPO / "tests" / "testhost" / "check-clean.sh"
NAME_TAKEN = 3  # testhost.sh start's exit status when its scratch dir exists already
_counter = iter(range(1, 1_000_000))
_lock = threading.Lock()


# `make test` sets UBX_TEST_RUN to a tag of its own, so that its final
# check (check-clean.sh) looks only at the hosts this run made, never at a
# `make run` or another person's test run on the same machine.
RUN_TAG = os.environ.get("UBX_TEST_RUN") or str(os.getpid())


def unique_name(purpose: str) -> str:
    with _lock:
        return f"ubx-{RUN_TAG}-{purpose}-{next(_counter)}"


class TestHost:
    """systemd as PID 1 of private namespaces on an overlay of this machine's
    root; the checkout is bind-mounted live at the same path inside."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid

    @classmethod
    def boot(cls, name: str, *binds: Path) -> TestHost:
        env = {**os.environ, "UNITBOX_TESTHOST_OWNER": str(os.getpid())}
        done = subprocess.run(["bash", str(SCRIPT), "start", name, str(REPO), *map(str, binds)],
                              capture_output=True, text=True, env=env, check=False, timeout=120)
        if done.returncode != 0:
            if done.returncode != NAME_TAKEN:  # else the name is another host's: not ours to stop
                subprocess.run(["bash", str(SCRIPT), "stop", name], check=False, capture_output=True)
            raise RuntimeError(f"test host {name} did not boot:\n{done.stderr}")
        return cls(name, int(done.stdout.split()[-1]))

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", self.name], check=False, capture_output=True, timeout=120)

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-a", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, check=check, timeout=timeout)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def popen(self, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(self.command(*argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def mount_tmpfs(self, inside: str, size: str) -> None:
        """A small private filesystem at `inside` (e.g. a state dir that can fill up); `unmount` it after."""
        self.sh(f"mkdir -p {inside} && mount -t tmpfs -o size={size},mode=0700 tmpfs {inside}")

    def unmount(self, inside: str) -> None:
        self.sh(f"umount {inside} || umount -l {inside}", check=False)

    def path(self, inside: str) -> Path:
        """A path inside the host, seen from outside (through its PID 1's root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def units(self, pattern: str | None = None) -> list[str]:
        """Units matching `pattern`; by default those running a run: runs' own
        (unitbox-run-*) and warm units handed one (their description no longer says idle)."""
        if pattern is not None:
            return [line.split()[0] for line in self._list_units(pattern)]
        return self.units("unitbox-run-*") + [line.split()[0] for line in self._list_units("unitbox-warm-*")
                                              if "(idle)" not in line]

    def idle_warm_units(self) -> list[str]:
        return [line.split()[0] for line in self._list_units("unitbox-warm-*") if "(idle)" in line]

    def _list_units(self, pattern: str) -> list[str]:
        out = self.run("systemctl", "list-units", "--all", "--plain", "--no-legend", pattern).stdout
        return [line for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def booted(purpose: str, *binds: Path) -> Iterator[TestHost]:
    """A test host for the duration of the block, torn down even on SIGTERM."""
    host = TestHost.boot(unique_name(purpose), *binds)
    previous = signal.getsignal(signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()

    def interrupted(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the teardown short
        raise KeyboardInterrupt  # unwinds through the finally below
    if main:
        signal.signal(signal.SIGTERM, interrupted)
    try:
        yield host
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            host.stop()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)


def collect_stale_hosts() -> None:
    """Remove hosts left by an earlier, killed test run (their owner is gone)."""
    subprocess.run(["bash", str(SCRIPT), "gc"], check=False, capture_output=True, timeout=120)


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
