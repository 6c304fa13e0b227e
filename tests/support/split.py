"""The packaged split inside a test host: the shipped units (units/), a
system user `unitbox` (in the test host's own /etc: an overlay), the
daemon as that user behind unitbox-broker.socket, and the root broker
started per connection. Drop-ins point the units at the checkout's venv
and a test config, and let them see the checkout; every other setting is
the shipped one."""

from __future__ import annotations

import os
import time

from tests.support.daemon import Client, free_port, wait_healthy
from tests.support.testhost import REPO, TestHost

VENV_UNITBOX = REPO / ".venv" / "bin" / "unitbox"
UNITS = ("unitbox-broker.socket", "unitbox-broker@.service", "unitbox.service", "unitbox.slice")
CONFIG = "/etc/unitbox/unitbox.toml"
STATE = "/var/lib/unitbox"
SOCKET = "/run/unitbox/broker.sock"
USER = "unitbox"


class Split:
    """unitbox.service (user unitbox) + unitbox-broker.socket in `host`, a
    test host of its own (the shipped names and paths are used as they are)."""

    def __init__(self, host: TestHost, config: str = "") -> None:
        self.host = host
        self.port = free_port()
        self.client = Client(f"http://127.0.0.1:{self.port}")
        self.config = f'listen = ["127.0.0.1:{self.port}"]\nlog_target = "journal"\n{config}'

    def install(self) -> None:
        host = self.host
        host.sh(f"getent passwd {USER} >/dev/null || useradd --system --user-group --no-create-home "
                f"--home-dir /nonexistent --shell /usr/sbin/nologin {USER}")
        host.sh("mkdir -p /run/unitbox-runs /etc/unitbox && chmod 700 /run/unitbox-runs")
        host.path(CONFIG).write_text(self.config)
        host.sh(f"chown root:{USER} {CONFIG} && chmod 640 {CONFIG}")
        path_env = f"Environment=PYTHONPATH={os.environ['PYTHONPATH']}\n" if os.environ.get("PYTHONPATH") else ""
        for unit in UNITS:
            host.path(f"/etc/systemd/system/{unit}").write_text((REPO / "units" / unit).read_text())
        drop_ins = {
            "unitbox.service": f"{VENV_UNITBOX} --config {CONFIG} serve --broker-socket {SOCKET}",
            "unitbox-broker@.service": f"{VENV_UNITBOX} --config {CONFIG} broker --socket-activated "
                                       f"--front-user {USER}",
        }
        # The checkout, wherever it is: the units' PrivateTmp= and ProtectHome= would hide a clone under
        # /tmp or /root (the package's code is in /usr, which they leave alone).
        see_checkout = f"BindReadOnlyPaths={REPO}\n" + (
            "ProtectHome=tmpfs\n" if REPO.is_relative_to("/home") or REPO.is_relative_to("/root") else "")
        for unit, command in drop_ins.items():
            host.sh(f"mkdir -p /etc/systemd/system/{unit}.d")
            host.path(f"/etc/systemd/system/{unit}.d/test.conf").write_text(
                f"[Service]\nExecStart=\nExecStart={command}\n{path_env}{see_checkout}")
        host.run("systemctl", "daemon-reload")

    def start(self, timeout: float = 30) -> None:
        self.install()
        self.host.run("systemctl", "start", "unitbox-broker.socket")
        self.host.run("systemctl", "start", "--no-block", "unitbox.service")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_healthy(self.client, timeout, lambda: f"the split daemon did not become healthy:\n{self.journal()}")

    def systemctl(self, *args: str) -> str:
        return self.host.run("systemctl", *args, check=False).stdout

    def journal(self, *units: str, since: float | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-n", "5000"]
        for unit in units or ("unitbox.service", "unitbox-broker@*"):
            argv += ["-u", unit]
        if since is not None:
            argv += ["--since", f"@{since:.0f}"]
        return self.host.run(*argv, check=False).stdout

    def brokers(self) -> list[str]:
        out = self.host.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                            "unitbox-broker@*", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def as_front(self, script: str, *args: str, user: str = USER, group: str = USER, timeout: float = 60) -> str:
        """Run Python `script` as the daemon's user (or `user`), as a daemon taken over would: its stdout."""
        path = f"/run/ubx-front-{time.monotonic_ns()}.py"
        self.host.path(path).write_text(script)
        identity = [] if user == "root" else ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--"]
        try:
            return self.host.run(*identity, "/usr/bin/python3", "-I", path, *args, timeout=timeout).stdout
        finally:
            self.host.path(path).unlink()

    def stop(self) -> None:
        """Stop both parts (the test host, of its own, goes with everything in it)."""
        self.host.run("systemctl", "stop", "unitbox.service", "unitbox-broker.socket", check=False, timeout=60)
