"""Who is at the other end of the broker's socket. Spawned by `unitbox
serve`, the broker is given its end of a socketpair; in the packaged split,
unitbox-broker.socket (Accept=yes, mode 0660, group unitbox) hands each
connection to a broker of its own as fd 3, and the broker serves it only if
the kernel says the peer runs as the daemon's user (SO_PEERCRED): the
socket's permissions are the first gate, this the second."""

from __future__ import annotations

import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from unitbox.errors import ConfigError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded for the other end (at connect, or at socketpair)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def user_id(user: str) -> int:
    """A user name or a numeric uid → the uid."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"--front-user {user!r}: no such user") from None


def socket_activated_fd(front_user: str | None) -> int:
    """The connection systemd passed (fd 3), once its peer is the daemon's
    user; ConfigError (the broker exits) otherwise, logged."""
    if front_user is None:
        raise ConfigError("--socket-activated needs --front-user: the user the daemon runs as")
    allowed = user_id(front_user)
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise ConfigError("--socket-activated: no socket was passed (LISTEN_PID/LISTEN_FDS; "
                          "unitbox-broker.socket needs Accept=yes)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ConfigError("--socket-activated: fd 3 is not a connected AF_UNIX SOCK_SEQPACKET socket")
    peer = peer_of(sock)
    if peer.uid != allowed:
        sock.close()
        log.warning("broker: refused a connection from pid %d (uid %d): only uid %d (%s) is served",
                    peer.pid, peer.uid, allowed, front_user)
        raise ConfigError(f"the peer (pid {peer.pid}, uid {peer.uid}) is not the daemon's user")
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    return sock.detach()
