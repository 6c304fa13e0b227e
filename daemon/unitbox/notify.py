"""sd_notify(3) and sd_listen_fds(3) for a daemon started by systemd:
READY/STATUS/WATCHDOG/STOPPING, socket activation, and the file descriptor
store (FDSTORE=1), which keeps the read ends of running units' output pipes
alive in PID 1 across a crash of the daemon. All no-ops outside systemd.

Hand-written on purpose: pystemd.daemon.notify (and python-systemd's) send
no file descriptors, and FDSTORE=1 is nothing without them; sd_listen_fds
is a dozen lines of environment parsing."""

from __future__ import annotations

import array
import os
import socket
import stat
from dataclasses import dataclass, field

SD_LISTEN_FDS_START = 3


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(*assignments: str, fds: list[int] | None = None) -> bool:
    address = _address()
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sock.sendmsg([message], rights, 0, address)
            else:
                sock.sendto(message, address)
        except OSError:
            return False
    return True


def fd_store_available() -> bool:
    """Whether systemd would keep our fds (it tells us FDSTORE is on via the
    unit's FileDescriptorStoreMax, which we cannot read: we assume so under
    systemd, and the store simply ignores fds beyond its maximum)."""
    return _address() is not None


def store_fd(fds: list[int], name: str) -> bool:
    return notify("FDSTORE=1", f"FDNAME={name}", fds=fds)


def forget_fd(name: str) -> bool:
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd expects pings within, if it set one for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


@dataclass(slots=True)
class InheritedFds:
    """What systemd passed us at start: listening sockets (socket activation)
    and pipes from the fd store, by name."""

    sockets: list[int] = field(default_factory=list)
    stored: dict[str, list[int]] = field(default_factory=dict)


def inherited_fds() -> InheritedFds:
    result = InheritedFds()
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return result
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    for index, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) else ""
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            result.sockets.append(fd)
        else:
            result.stored.setdefault(name, []).append(fd)
    return result
