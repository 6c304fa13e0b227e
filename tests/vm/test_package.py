"""The operator story of the Debian package, on a real VM of the release it
was built for (Debian 12 or 13, conftest.DIST): the other release's package
refused, install, the daemon as the user unitbox and its broker as root (each
restarted alone), systemctl/journalctl, runs and their limits on cgroup v2,
restart, upgrade, remove, purge, and on Debian 12 the upgrade from 0.1.0. The
steps run in this order and build on each other."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.conftest import DIST, REPO, VM, step

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

CONFFILE = "/etc/unitbox/unitbox.toml"
# systemd-analyze security of the broker (root by necessity: the bus lets uid
# 0 start units), as measured on both releases.
BROKER_EXPOSURE_MAX = 3.0
# Debian 13 ships every file under /usr; on 12 the units stay where 0.1.0 put them.
UNIT_DIR = "/lib/systemd/system" if DIST == "bookworm" else "/usr/lib/systemd/system"


def _exposure(text: str) -> float:
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", text)
    assert found, text
    return float(found.group(1))


def _brokers(vm: VM) -> list[str]:
    """The live brokers: unitbox-broker@<n>-<peer pid>-<peer uid>.service, one per connection."""
    listing = vm.out("systemctl list-units --no-legend --plain --state=active 'unitbox-broker@*.service'",
                     check=False)
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _broker_processes(vm: VM) -> list[tuple[str, str]]:
    """The live brokers with their MainPIDs."""
    return [(unit, vm.out(f"systemctl show -p MainPID --value {unit}")) for unit in _brokers(vm)]


def _new_broker(vm: VM, old: list[tuple[str, str]], timeout: float = 60) -> list[tuple[str, str]]:
    """The brokers once a new broker process serves the daemon after `old` went."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        brokers = _broker_processes(vm)
        if brokers and brokers != old and all(pid not in ("", "0") for _, pid in brokers):
            return brokers
        time.sleep(0.5)
    return _broker_processes(vm)


def _user_of(vm: VM, unit: str) -> tuple[str, str]:
    """The unit's MainPID and the user it runs as (ps)."""
    pid = vm.out(f"systemctl show -p MainPID --value {unit}")
    return pid, vm.out(f"ps -o user= -p {pid}", check=False)


def _wait_running(vm: VM, run_id: str) -> None:
    deadline = time.monotonic() + 60
    while vm.curl("GET", f"/status/{run_id}")["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)


def test_the_other_releases_package_is_refused(vm: VM, other_deb: Path) -> None:
    vm.put(other_deb, f"/root/{other_deb.name}")
    done = vm.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{other_deb.name}", check=False)
    why = [line.strip() for line in done.stdout.splitlines() if "Depends:" in line]
    dpkg = vm.out("dpkg-query -W -f='${Status}' unitbox 2>&1", check=False)
    units = vm.out("systemctl list-unit-files --no-legend 'unitbox*'", check=False)
    step(f"apt install ./{other_deb.name} (the other release's package)",
         f"exit {done.returncode}: {' | '.join(why)}; dpkg: {dpkg}; unit files: {units or 'none'}")
    assert done.returncode != 0
    assert any("python3.1" in line and "not installable" in line for line in why), done.stdout + done.stderr
    assert "installed" not in dpkg and units == ""
    vm.sh(f"rm /root/{other_deb.name}")


def test_apt_install_succeeds(vm: VM, deb: Path) -> None:
    vm.put(deb, f"/root/{deb.name}")
    started = time.monotonic()
    done = vm.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{deb.name}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(("Setting up unitbox", "Created symlink"))]
    step(f"apt install ./{deb.name}", f"ok in {time.monotonic() - started:.0f} s: " + "; ".join(lines))
    assert any(line.startswith("Setting up unitbox") for line in lines)


def test_service_is_enabled_and_active(vm: VM) -> None:
    active = vm.out("systemctl is-active unitbox", check=False)
    enabled = vm.out("systemctl is-enabled unitbox", check=False)
    step("systemctl is-active unitbox; systemctl is-enabled unitbox", f"{active}, {enabled}")
    assert (active, enabled) == ("active", "enabled")
    vm.wait_healthy()


def test_status_shows_the_status_text(vm: VM) -> None:
    status = vm.out("systemctl status unitbox --no-pager", check=False)
    line = next((line.strip() for line in status.splitlines() if line.strip().startswith("Status:")), None)
    step("systemctl status unitbox", line)
    assert line is not None and line.startswith('Status: "Serving'), status


def test_installed_files_and_commands(vm: VM, deb: Path) -> None:
    outside_venv = vm.out("dpkg -L unitbox | grep -v '^/usr/lib/unitbox/' | sort")
    step("dpkg -L unitbox (without the venv's files)", " ".join(outside_venv.split()))
    for path in ("/usr/bin/unitbox", f"{UNIT_DIR}/unitbox.service", f"{UNIT_DIR}/unitbox.slice",
                 f"{UNIT_DIR}/unitbox-broker.socket", f"{UNIT_DIR}/unitbox-broker@.service",
                 "/usr/lib/sysusers.d/unitbox.conf", "/usr/lib/tmpfiles.d/unitbox.conf",
                 CONFFILE, "/usr/share/man/man1/unitbox.1.gz"):
        assert path in outside_venv.split()
    conffiles = vm.out("dpkg-query -W -f='${Conffiles}' unitbox")
    step("dpkg-query -W -f='${Conffiles}' unitbox", conffiles)
    assert CONFFILE in conffiles
    version = vm.out("unitbox --version")
    check = vm.out("unitbox check-config")
    step("unitbox --version; unitbox check-config", f"{version}; {check}")
    assert version == f"unitbox {deb.name.split('_')[1].split('~')[0]}" and check == "configuration is valid"
    paths = {CONFFILE: "640 root:unitbox", "/var/lib/unitbox": "755 root:root",
             "/var/lib/unitbox/daemon": "700 unitbox:unitbox", "/var/lib/unitbox/ends": "750 root:unitbox",
             "/run/unitbox/broker.sock": "660 root:unitbox", "/run/unitbox-runs": "700 root:root"}
    perms = vm.out(f"stat -c '%a %U:%G' {' '.join(paths)}").splitlines()
    step(f"stat -c '%a %U:%G' {' '.join(paths)}", " | ".join(perms))
    assert dict(zip(paths, perms, strict=True)) == paths
    vm.sh("test -f /var/lib/unitbox/daemon/unitbox.db && test -d /var/lib/unitbox/daemon/runs")


def test_the_daemon_runs_as_unitbox_and_only_its_broker_as_root(vm: VM) -> None:
    pid, user = _user_of(vm, "unitbox")
    uid = vm.out("id -u unitbox")
    socket = vm.out("systemctl is-active unitbox-broker.socket; systemctl is-enabled unitbox-broker.socket",
                    check=False).split()
    brokers = _brokers(vm)
    broker_pid, broker_user = _user_of(vm, brokers[0]) if brokers else ("", "")
    children = vm.out(f"ps -o pid=,user=,args= --ppid {pid}", check=False)
    step("ps -o user= of unitbox.service's MainPID; systemctl list-units 'unitbox-broker@*'",
         f"daemon pid {pid} as {user} (uid {uid}), children: {children or 'none'}; socket {' '.join(socket)}; "
         f"brokers {brokers}: pid {broker_pid} as {broker_user}")
    assert user == "unitbox" and socket == ["active", "enabled"] and children == ""
    assert len(brokers) == 1 and broker_user == "root"
    assert brokers[0].endswith(f"-{pid}-{uid}.service"), brokers  # its peer is the daemon


def test_the_brokers_socket_serves_only_the_daemons_user(vm: VM) -> None:
    """The socket's mode keeps out other users; root may connect, but the
    broker serves only the daemon's uid (SO_PEERCRED): it logs the refusal
    and hangs up, and its instance does not linger."""
    connect = ("python3 -c \"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
               "s.connect('/run/unitbox/broker.sock'); print(repr(s.recv(65536)))\"")
    brokers = _brokers(vm)
    other = vm.sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups {connect}", check=False)
    since = vm.out("date +%s")
    as_root = vm.sh(f"timeout 60 {connect}", check=False)
    deadline = time.monotonic() + 30
    while True:
        left = vm.out("systemctl list-units --all --no-legend --plain 'unitbox-broker@*.service'", check=False)
        if len(left.splitlines()) <= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    log = vm.out(f"journalctl -u 'unitbox-broker@*' --since @{since} -o cat --no-pager", check=False)
    step("connect to /run/unitbox/broker.sock as nobody, then as root",
         f"nobody: {other.stderr.strip().splitlines()[-1:]}; root: exit {as_root.returncode}, got "
         f"{as_root.stdout.strip()}; the broker logged {log.splitlines()}; broker units now: {left.splitlines()}")
    assert other.returncode != 0 and "PermissionError" in other.stderr, other
    assert as_root.returncode == 0 and as_root.stdout.strip() == "b''", as_root  # hung up on, unserved
    assert "refused a connection" in log and "(uid 0)" in log, log
    assert _brokers(vm) == brokers and len(left.splitlines()) == 1, left


def test_run_submitted_with_curl_succeeds(vm: VM) -> None:
    run = vm.curl("POST", "/run-json?wait=true", {"code": "import sys\nprint(6 * 7, sys.argv[1:])", "args": ["a"]})
    output = vm.curl("GET", f"/output/{run['id']}")
    step("curl -X POST localhost:8080/run-json?wait=true -d '{\"code\": \"print(6 * 7, …)\"}'",
         f"{run['state']}, exit {run['exit_code']}, stdout {output['stdout']!r}, cpu_ms {run['cpu_ms']}")
    assert run["state"] == "succeeded" and output["stdout"] == "42 ['a']\n"
    vm.runs["first"] = run["id"]


def test_run_unit_in_systemctl_and_journalctl(vm: VM) -> None:
    code = "import time\nprint('begin', flush=True)\ntime.sleep(20)\nprint('end')"
    accepted = vm.curl("POST", "/run-json", {"code": code, "limits": {"timeout_s": 60}})
    run_id = accepted["id"]
    deadline = time.monotonic() + 60
    while vm.curl("GET", f"/status/{run_id}")["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    unit = vm.curl("GET", f"/status/{run_id}")["unit"]  # its own, or the warm unit it was handed to
    status = vm.out(f"systemctl status {unit} --no-pager", check=False)
    step(f"systemctl status {unit}",
         " | ".join(line.strip() for line in status.splitlines()[:8] if line.strip()))
    assert "Active: active (running)" in status and f"/unitbox.slice/{unit}" in status, status
    security = vm.out(f"systemd-analyze security {unit} --no-pager 2>&1", check=False)
    step(f"systemd-analyze security {unit} (a live run)", f"exposure {_exposure(security)}")
    assert _exposure(security) <= 1.0
    run = vm.wait_run(run_id)
    assert run["state"] == "succeeded", run
    journal = vm.out(f"journalctl -u {unit} --no-pager -o short", check=False)
    step(f"journalctl -u {unit}", " | ".join(journal.splitlines()[-3:]))
    assert f"Started {unit}" in journal
    records = vm.out(f"journalctl UNITBOX_RUN_ID={run_id} --no-pager -o cat", check=False)
    step(f"journalctl UNITBOX_RUN_ID={run_id}", " | ".join(records.splitlines()))
    assert records and all(run_id in line for line in records.splitlines()) and "succeeded" in records
    fields = vm.out(f"journalctl UNITBOX_RUN_ID={run_id} -o verbose --no-pager | grep -E '^ *UNITBOX_' | sort -u")
    assert f"UNITBOX_UNIT={unit}" in fields


def test_security_exposure_of_the_daemon_and_its_broker(vm: VM) -> None:
    """The daemon without privilege scores better than the root daemon of
    0.2.0 (1.4); the broker, root by necessity, as low as it allows."""
    scores = {}
    for unit in ("unitbox.service", *_brokers(vm)[:1]):
        report = vm.out(f"systemd-analyze security {unit} --no-pager 2>&1", check=False)
        open_items = [line.split()[1] for line in report.splitlines() if line.startswith("✗")]
        scores[unit.split("@")[0]] = _exposure(report)
        step(f"systemd-analyze security {unit}", f"exposure {_exposure(report)}; still open: {', '.join(open_items)}")
    assert scores["unitbox.service"] < 1.4, scores
    assert scores["unitbox-broker"] <= BROKER_EXPOSURE_MAX, scores


def test_memory_hog_ends_oom_killed(vm: VM) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n"
    run = vm.curl("POST", "/run-json?wait=true", {"code": code, "limits": {"memory_mb": 64, "timeout_s": 60}})
    step("a memory hog with memory_mb 64",
         f"{run['state']}, signal {run['signal']}, memory_peak_bytes {run['memory_peak_bytes']}")
    assert run["state"] == "oom_killed", run
    assert run["memory_peak_bytes"] is not None and 32 << 20 < run["memory_peak_bytes"] <= 64 << 20


def test_cpu_quota_holds(vm: VM) -> None:
    # 20 %: the run's privileged ExecStopPost= (which records its outcome)
    # runs under the same quota; it used to be cut short by a 1 s stop bound
    # under TCG and the run ended as `error`. Its bound is now its own (30 s).
    code = ("import time\nt, c = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - t < 3:\n    pass\nprint(time.process_time() - c)\n")
    run = vm.curl("POST", "/run-json?wait=true", {"code": code, "limits": {"cpu_percent": 20, "timeout_s": 120}})
    loop_cpu = float(vm.curl("GET", f"/output/{run['id']}")["stdout"] or "nan")
    step("a 3 s busy loop with cpu_percent 20",
         f"{run['state']}, the loop's own CPU {loop_cpu:.2f} s; the unit's cpu_ms {run['cpu_ms']} "
         f"in {run['duration_ms']} ms {run['error'] or ''}")
    assert run["state"] == "succeeded", (run, vm.out(f"journalctl -u unitbox-run-{run['id']} -o cat", check=False))
    # A fifth of the loop's 3 s; unthrottled it would use all of them. The
    # unit's own cpu_ms is no measure of the quota: systemd 257 spawns every
    # Exec*= through systemd-executor, whose CPU (seconds under TCG) falls
    # partly outside the recorded start and end. Under TCG the quota's periods
    # overrun a little (about 26 % measured on both releases).
    assert loop_cpu <= 0.35 * 3, run


def test_timeout_holds(vm: VM) -> None:
    run = vm.curl("POST", "/run-json?wait=true", {"code": "while True:\n    pass\n", "limits": {"timeout_s": 2}})
    step("while True: pass with timeout_s 2", f"{run['state']} after {run['duration_ms']} ms")
    assert run["state"] == "timed_out", run
    # Killed at 2 s; the rest is the stop under TCG (4.6 s in all on Debian 13,
    # whose systemd-executor makes each Exec*= spawn slower).
    assert 1900 <= run["duration_ms"] <= 6000


def test_tmp_and_var_tmp_are_capped(vm: VM) -> None:
    """/tmp, /var/tmp and /dev/shm are directories of the run's box, one tmpfs
    of disk_mb bound over the PrivateTmp= the profile names: on systemd 252 and
    257 alike (257's implied PrivateTmp=disconnected would win over a tmpfs or
    a bind there). Its /sys is the empty skeleton on both."""
    code = ("import json, os, time\ntime.sleep(8)\nseen = {}\n"
            "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
            "    st, written, err = os.statvfs(d), 0, 0\n"
            "    try:\n"
            "        while written < 64 << 20:\n"  # 1 MiB files: the file size limit (disk_mb) is not the test
            "            with open(f'{d}/fill{written}', 'wb', buffering=0) as f:\n"
            "                written += f.write(b'x' * (1 << 20))\n"
            "    except OSError as e:\n"
            "        err = e.errno\n"
            "    seen[d] = [st.f_blocks * st.f_frsize, written, err]\n"
            "print(json.dumps({'fill': seen, 'sys': sorted(os.listdir('/sys'))}))\n")
    accepted = vm.curl("POST", "/run-json", {"code": code, "limits": {"disk_mb": 16, "timeout_s": 60}})
    unit = f"unitbox-run-{accepted['id']}.service"
    deadline = time.monotonic() + 60
    while vm.curl("GET", f"/status/{accepted['id']}")["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    binds = vm.out(f"systemctl show -p BindPaths --value {unit}")
    run = vm.wait_run(accepted["id"])
    seen = json.loads(vm.curl("GET", f"/output/{accepted['id']}")["stdout"])
    systemd = vm.out("systemctl --version | head -n1")
    step(f"a run fills /tmp, /var/tmp, /dev/shm with disk_mb 16 ({systemd})",
         f"{run['state']}; [size, bytes written, errno]: {seen['fill']}; /sys holds {seen['sys']}; "
         f"BindPaths: {binds}")
    assert run["state"] == "succeeded", run
    fill = seen["fill"]
    assert all(size == 16 << 20 and err == 28 for size, _, err in fill.values()), fill  # ENOSPC
    assert fill["/tmp"][1] >= 14 << 20 and sum(written for _, written, _ in fill.values()) <= 16 << 20, fill
    assert seen["sys"] == ["devices", "fs"], seen
    assert "/run/unitbox-runs/" in binds and ":/tmp" in binds, binds


def test_tmp_is_bounded_by_memory_mb(vm: VM) -> None:
    """The box's pages are charged to the run's memory cgroup with no swap: a
    run filling /tmp past memory_mb ends oom_killed, however large disk_mb."""
    code = "with open('/tmp/fill', 'wb', buffering=0) as f:\n    for _ in range(192):\n        f.write(b'x' * (1 << 20))\n"
    run = vm.curl("POST", "/run-json?wait=true",
                  {"code": code, "limits": {"memory_mb": 64, "disk_mb": 1024, "timeout_s": 60}})
    step("a run writes 192 MiB to /tmp with memory_mb 64, disk_mb 1024",
         f"{run['state']}, memory_peak_bytes {run['memory_peak_bytes']} {run['error'] or ''}")
    assert run["state"] == "oom_killed", run


def _records(vm: VM) -> dict[str, str]:
    return {run["id"]: run["state"] for run in vm.curl("GET", "/runs?limit=100")["runs"]}


def test_oom_flood_ends_at_the_first_kill_on_cgroup_v2(vm: VM) -> None:
    """Issue 12 finding 6 on pure cgroup v2: children overrunning memory_mb in
    a loop end the run at the first OOM kill (OOMPolicy=kill, and the OOM
    watch), not at timeout_s."""
    code = ("import os\nwhile True:\n    pid = os.fork()\n    if pid == 0:\n"
            "        hog = bytearray(256 << 20)\n        os._exit(0)\n    os.waitpid(pid, 0)\n")
    run = vm.curl("POST", "/run-json?wait=true", {"code": code, "limits": {"memory_mb": 64, "timeout_s": 30}})
    step("children allocating 256 MiB in a loop, memory_mb 64, timeout_s 30",
         f"{run['state']} after {run['duration_ms']} ms, signal {run['signal']}")
    assert run["state"] == "oom_killed", run
    assert run["duration_ms"] < 10_000, run  # at the first kill, not at the 30 s deadline


def test_fork_bombs_end_timed_out_with_their_outcome(vm: VM) -> None:
    """Found in the Debian 13 VM: systemd 257 spawns ExecStopPost= into the
    unit's cgroup, where a fork bomb's killed, unreaped tasks still count, so
    at TasksMax=<tasks> the outcome recorder could not start (half the bombs
    ended `error`). LimitNPROC= holds `tasks`; TasksMax= leaves room above it."""
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    states = []
    for _ in range(4):
        run = vm.curl("POST", "/run-json?wait=true", {"code": code, "limits": {"tasks": 24, "timeout_s": 2}})
        states.append((run["state"], run["error"]))
    step("4 fork bombs (tasks 24, timeout_s 2) one after another", f"{states}")
    assert states == [("timed_out", "the run reached its timeout_s limit")] * 4, states


def test_a_run_sees_no_other_run_nor_the_hosts_services_on_cgroup_v2(vm: VM) -> None:
    """Issue 12 finding 4 on pure cgroup v2: the cgroup tree a run can list
    names no other run and no host service; io_uring is refused (finding 3)."""
    other = vm.curl("POST", "/run-json", {"code": "import time\ntime.sleep(60)"})
    code = ("import os, ctypes, json\n"
            "names = [d for top, dirs, files in os.walk('/sys/fs/cgroup') for d in dirs]\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.syscall(425, 8, ctypes.create_string_buffer(120))\n"  # io_uring_setup
            "print(json.dumps({'names': names, 'uring': [r, ctypes.get_errno()]}))\n")
    try:
        run = vm.curl("POST", "/run-json?wait=true", {"code": code})
        seen = json.loads(vm.curl("GET", f"/output/{run['id']}")["stdout"])
    finally:
        vm.curl("POST", f"/runs/{other['id']}/cancel")
    step("a run lists /sys/fs/cgroup while another run is live, and calls io_uring_setup",
         f"{len(seen['names'])} cgroup dirs seen; io_uring_setup -> {seen['uring']}")
    assert not any(other["id"] in name for name in seen["names"]), seen
    assert "system.slice" not in seen["names"] and "unitbox.service" not in seen["names"], seen
    assert seen["uring"] == [-1, 1], seen  # EPERM


def test_restart_loses_no_record(vm: VM) -> None:
    before = _records(vm)
    code = "import time\nprint('before', flush=True)\ntime.sleep(10)\nprint('after')"
    in_flight = vm.curl("POST", "/run-json", {"code": code, "limits": {"timeout_s": 60}})["id"]
    deadline = time.monotonic() + 60
    while vm.curl("GET", f"/status/{in_flight}")["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    old_pid = vm.out("systemctl show -p MainPID --value unitbox")
    old_brokers = _broker_processes(vm)
    vm.sh("systemctl restart unitbox")
    new_pid, user = _user_of(vm, "unitbox")
    vm.wait_healthy()
    after = _records(vm)
    run = vm.wait_run(in_flight)
    output = vm.curl("GET", f"/output/{in_flight}")
    brokers = _new_broker(vm, old_brokers)
    step("systemctl restart unitbox (with a run in flight)",
         f"pid {old_pid} -> {new_pid} (as {user}); brokers {old_brokers} -> {brokers}; "
         f"{len(before)} records before, {len(after)} after; "
         f"the in-flight run: {run['state']}, stdout {output['stdout']!r}")
    assert old_pid != new_pid and user == "unitbox"
    uid = vm.out("id -u unitbox")
    assert len(brokers) == 1 and brokers != old_brokers and brokers[0][0].endswith(f"-{new_pid}-{uid}.service")
    assert {k: v for k, v in after.items() if k in before} == before
    assert run["state"] == "succeeded" and output["stdout"] == "before\nafter\n"


@pytest.mark.parametrize("how", ["systemctl kill --signal=SIGKILL", "systemctl stop", "systemctl restart"])
def test_the_broker_alone_killed_stopped_or_restarted_loses_nothing(vm: VM, how: str) -> None:
    """The daemon outlives its broker: killed or stopped, the daemon connects
    again and the socket starts a new instance; restarted, the instance's new
    process gets the same connection (systemd keeps it). Either way a run in
    flight ends with its true outcome and all its output."""
    code = "import time\nprint('before', flush=True)\ntime.sleep(8)\nprint('after')"
    daemon_pid = vm.out("systemctl show -p MainPID --value unitbox")
    in_flight = vm.curl("POST", "/run-json", {"code": code, "limits": {"timeout_s": 60}})["id"]
    _wait_running(vm, in_flight)
    old = _broker_processes(vm)
    assert len(old) == 1, old
    done = vm.sh(f"{how} {old[0][0]}", check=False)
    brokers = _new_broker(vm, old)
    run = vm.wait_run(in_flight)
    output = vm.curl("GET", f"/output/{in_flight}")
    again = vm.curl("POST", "/run-json?wait=true", {"code": "print('next')"})
    step(f"{how} {old[0][0]} (pid {old[0][1]}; with a run in flight)",
         f"exit {done.returncode} {done.stderr.strip()[:160]}; brokers -> {brokers}; daemon pid {daemon_pid} -> "
         f"{vm.out('systemctl show -p MainPID --value unitbox')}; the in-flight run: {run['state']}, "
         f"stdout {output['stdout']!r}; a new run: {again['state']}")
    assert len(brokers) == 1 and brokers[0][1] != old[0][1], (old, brokers)  # a new broker process
    assert (brokers[0][0] == old[0][0]) == (how == "systemctl restart"), (old, brokers)  # a new connection or not
    assert done.returncode == 0 and vm.out("systemctl show -p MainPID --value unitbox") == daemon_pid
    assert run["state"] == "succeeded" and output["stdout"] == "before\nafter\n", run
    assert again["state"] == "succeeded"


def _next_version(deb: Path, workdir: Path) -> Path:
    """The same package as version <v>+vmtest1: a real upgrade for dpkg."""
    tree = workdir / "tree"
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    workdir.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (\S+)$", text, re.M)
    assert version
    control.write_text(text.replace(version.group(0), f"Version: {version.group(1)}+vmtest1"))
    target = workdir / f"unitbox_{version.group(1)}+vmtest1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(target)],
                   check=True, capture_output=True)
    return target


def test_upgrade_restarts_and_keeps_records_and_config(vm: VM, deb: Path) -> None:
    if DIST == "bookworm":
        pytest.skip("on Debian 12 the upgrade is the real one, from 0.1.0 (the last step)")
    vm.sh(f"sed -i 's/^#queue_size = 1000$/queue_size = 500  # edited by the operator/' {CONFFILE}")
    before = _records(vm)
    old_pid = vm.out("systemctl show -p MainPID --value unitbox")
    newer = _next_version(deb, REPO / ".cache" / "vm" / "run" / "upgrade")
    vm.put(newer, f"/root/{newer.name}")
    vm.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{newer.name}")
    vm.wait_healthy()
    new_pid = vm.out("systemctl show -p MainPID --value unitbox")
    version = vm.out("dpkg-query -W -f='${Version}' unitbox")
    after = _records(vm)
    kept = vm.out(f"grep -c 'edited by the operator' {CONFFILE}")
    step(f"apt install ./{newer.name} (upgrade)",
         f"version {version}; pid {old_pid} -> {new_pid}; records {len(before)} -> {len(after)}; "
         f"edited conffile kept: {kept == '1'}")
    assert version.endswith("+vmtest1") and old_pid != new_pid
    assert {k: v for k, v in after.items() if k in before} == before
    assert kept == "1"
    assert vm.out("find /usr/lib/unitbox -name '*.pyc' | wc -l") != "0"  # postinst compiled the new files


def test_apt_remove_stops_it_and_keeps_config_and_state(vm: VM) -> None:
    vm.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y unitbox")
    active = vm.out("systemctl is-active unitbox unitbox-broker.socket", check=False).split()
    left = vm.out("ls -d /etc/unitbox/unitbox.toml /var/lib/unitbox/daemon/unitbox.db /var/lib/unitbox/daemon/runs 2>&1")
    gone = vm.out("ls -d /usr/lib/unitbox /usr/bin/unitbox /lib/systemd/system/unitbox.service "
                  "/lib/systemd/system/unitbox-broker.socket /run/unitbox/broker.sock 2>&1", check=False)
    step("apt remove unitbox", f"is-active (daemon, socket): {active}; brokers: {_brokers(vm) or 'none'}; "
         f"kept: {' '.join(left.split())}; removed: {'yes' if gone.count('No such file') == 5 else gone}")
    assert set(active) <= {"inactive", "unknown"} and _brokers(vm) == []
    assert gone.count("No such file") == 5, gone
    assert "rc  unitbox" in vm.out("dpkg -l unitbox | tail -n1")


def test_apt_purge_leaves_nothing_behind(vm: VM) -> None:
    vm.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y unitbox")
    files = vm.out("find / -xdev \\( -path /proc -o -path /sys \\) -prune -o -name '*unitbox*' -print "
                   "| grep -v '^/root/unitbox_' || true")
    units = vm.out("systemctl list-units --all --no-legend --plain 'unitbox*'; "
                   "systemctl list-unit-files --no-legend --plain 'unitbox*'; ls /run/systemd/transient | grep unitbox",
                   check=False)
    users = vm.out("getent passwd unitbox; getent group unitbox", check=False)
    dpkg = vm.out("dpkg -l unitbox 2>&1 | tail -n1", check=False)
    step("apt purge unitbox", f"files named *unitbox*: {files or 'none'}; units: {units or 'none'}; "
         f"user/group: {users or 'none'}; dpkg: {dpkg}")
    assert files == "" and units == "" and users == ""
    assert not dpkg.startswith(("ii", "rc"))


def test_upgrade_from_0_1_0_keeps_records_and_config(vm: VM, deb: Path, previous_deb: Path) -> None:
    """Issue 15: 0.1.0 (as landed, Debian 12 only) upgraded to this package
    keeps the records and the conffile the operator edited (Debian 12 only:
    the fixture skips elsewhere)."""
    vm.put(previous_deb, f"/root/{previous_deb.name}")
    vm.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{previous_deb.name}")
    vm.wait_healthy()
    old_version = vm.out("dpkg-query -W -f='${Version}' unitbox")
    first = vm.curl("POST", "/run-json?wait=true", {"code": "print('from 0.1.0')"})
    vm.sh(f"sed -i 's/^#queue_size = 1000$/queue_size = 500  # edited by the operator/' {CONFFILE}")
    before = _records(vm)
    old_pid = vm.out("systemctl show -p MainPID --value unitbox")
    # A run going through the upgrade: its 0.1.0 unit records its outcome in the old place.
    crossing = vm.curl("POST", "/run-json", {"code": "import time\nprint('before', flush=True)\ntime.sleep(20)\n"
                                                     "print('after')", "limits": {"timeout_s": 120}})["id"]
    _wait_running(vm, crossing)
    # 0.2.0 ships a conffile with new keys: dpkg asks whether to keep the edited one. Unattended, an
    # operator says keep (confold), as apt's prompt does by default; the new keys take their defaults.
    vm.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confold "
          f"./{deb.name}")
    vm.wait_healthy()
    version = vm.out("dpkg-query -W -f='${Version}' unitbox")
    new_pid = vm.out("systemctl show -p MainPID --value unitbox")
    after = _records(vm)
    output = vm.curl("GET", f"/output/{first['id']}")
    kept = vm.out(f"grep -c 'edited by the operator' {CONFFILE}")
    again = vm.curl("POST", "/run-json?wait=true", {"code": "print('after the upgrade')"})
    step(f"apt install ./{previous_deb.name}, a run, the conffile edited; then apt install ./{deb.name}",
         f"version {old_version} -> {version}; pid {old_pid} -> {new_pid}; records {len(before)} -> {len(after)}; "
         f"the 0.1.0 run's stdout {output['stdout']!r}; edited conffile kept: {kept == '1'}; "
         f"a new run: {again['state']}")
    assert old_version == "0.1.0" and version == deb.name.split("_")[1] and old_pid != new_pid
    assert first["state"] == "succeeded" and {k: v for k, v in after.items() if k in before} == before
    assert output["stdout"] == "from 0.1.0\n" and kept == "1" and again["state"] == "succeeded"
    assert vm.out("systemctl show -p FragmentPath --value unitbox") == f"{UNIT_DIR}/unitbox.service"
    # 0.1.0's data (root's, in /var/lib/unitbox, 0700) moved into daemon/, the daemon's user's.
    moved = vm.out("stat -c '%n %U' /var/lib/unitbox/daemon/unitbox.db "
                   f"/var/lib/unitbox/daemon/runs/{first['id']}/stdout; "
                   "stat -c '%n %a %U' /var/lib/unitbox /var/lib/unitbox/daemon; ls /var/lib/unitbox").splitlines()
    user = _user_of(vm, "unitbox")[1]
    step("after the upgrade: stat of the moved state; ls /var/lib/unitbox; the daemon's user", f"{moved}; {user}")
    assert moved[:4] == ["/var/lib/unitbox/daemon/unitbox.db unitbox",
                         f"/var/lib/unitbox/daemon/runs/{first['id']}/stdout unitbox",
                         "/var/lib/unitbox 755 root", "/var/lib/unitbox/daemon 700 unitbox"], moved
    assert not {"unitbox.db", "runs"} & set(moved[4:]) and user == "unitbox", moved
    run = vm.wait_run(crossing)
    output = vm.curl("GET", f"/output/{crossing}")
    step("the run started on 0.1.0 and going through the upgrade",
         f"{run['state']} {run['error'] or ''}; stdout {output['stdout']!r}")
    assert run["state"] == "succeeded" and output["stdout"] == "before\nafter\n", (run, output)
