#!/bin/bash
# `make run`: the daemon in the foreground on 127.0.0.1:8080 until Ctrl-C.
# - PID 1 is systemd: installs unitbox.slice and runs the daemon from .venv.
# - otherwise (CI, build machines): boots the project's test host, runs the
#   daemon inside it (reachable from outside on 127.0.0.1:8080: the network
#   namespace is shared) and tears everything down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
LISTEN=${UNITBOX_LISTEN:-127.0.0.1:8080}
UNITBOX="$REPO/.venv/bin/unitbox"
playground_url() {  # the page of `make playground` (daemon/unitbox/playground/), served at /
  case "$LISTEN" in
    unix:*) echo "==> playground: over the socket $LISTEN (no browser URL)";;
    *) echo "==> playground: open http://$LISTEN/ in a browser";;
  esac
}

if [ "$(readlink /proc/1/exe 2>/dev/null)" = /usr/lib/systemd/systemd ] || [ -d /run/systemd/system ]; then
  echo "==> systemd is PID 1: installing units/unitbox.slice"
  install -m 0644 units/unitbox.slice /etc/systemd/system/unitbox.slice
  systemctl daemon-reload
  echo "==> unitbox serve --listen $LISTEN (Ctrl-C to stop)"
  playground_url
  exec "$UNITBOX" serve --listen "$LISTEN"
fi

NAME=ubx-run-$$
echo "==> PID 1 is not systemd: booting test host $NAME (a private systemd)"
bash tests/testhost/testhost.sh start "$NAME" "$REPO" >/dev/null
PID=$(cat /run/unitbox-testhost/$NAME.pid)
cleanup() {
  trap - INT TERM EXIT
  echo; echo "==> stopping the daemon and test host $NAME"
  bash tests/testhost/testhost.sh stop "$NAME"
}
trap cleanup INT TERM EXIT
nsenter -t "$PID" -a install -m 0644 "$REPO/units/unitbox.slice" /etc/systemd/system/unitbox.slice
nsenter -t "$PID" -a systemctl daemon-reload
echo "==> unitbox serve --listen $LISTEN inside $NAME (Ctrl-C to stop)"
playground_url
nsenter -t "$PID" -a "$UNITBOX" serve --listen "$LISTEN" &
wait $! || true
