#!/bin/sh
# /usr/bin/unitbox: the daemon's own virtualenv (/usr/lib/unitbox), isolated
# from PYTHON* variables, the user's site-packages and the working directory.
exec /usr/lib/unitbox/bin/python3 -I -m unitbox "$@"
