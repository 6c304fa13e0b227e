"""The broker: the one process that talks to PID 1.

The HTTP daemon never calls systemd itself: pystemd's calls block and hold
the GIL for the whole round trip, which froze every request in flight. The
daemon starts `unitbox broker` (client.py supervises it, restarting it if it
dies) and speaks to it over a socketpair (wire.py) in the domain's words —
start run R, stop R, list our units, health — passing the runs' stdio fds
along. The broker (server.py) checks every request again (checks.py) and
builds each unit's profile itself, so the daemon cannot hand PID 1 an
arbitrary property."""
