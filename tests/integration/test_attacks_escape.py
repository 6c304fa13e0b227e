"""The attack catalogue, part 2: hostile code trying to get out — network,
secrets on the filesystem, privilege, other runs (issue 5). Every hostile
program reports what it observed; the tests assert the exact refusal (errno)
and, where a layer could be the only thing standing, probe that layer on its
own (e.g. the private network namespace behind the address-family filter)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.daemon import Client, Daemon
from tests.support.hostile import (
    contained_afterwards,
    finished,
    main_pid,
    report_of,
    run_hostile,
    run_units,
    security_score,
    submit_hostile,
    wait_output,
    wait_running,
)
from tests.support.testhost import TestHost


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


@pytest.fixture(scope="module")
def planted(testhost: TestHost) -> Iterator[dict[str, str]]:
    """Secrets planted on the test host where a careless sandbox would show
    them: a daemon config with a token in /etc/unitbox (deliberately
    world-readable, so only the sandbox stands between it and a run), files
    in /root and /home."""
    token = secrets.token_hex(16)
    files = {
        "/etc/unitbox/unitbox.toml": f'tokens = ["{token}"]\n',
        "/root/unitbox-attack-secret": token,
        "/home/alice/unitbox-attack-secret": token,
    }
    for path, text in files.items():
        target = testhost.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)
        target.parent.chmod(0o755)
    yield {"token": token, **{p: p for p in files}}
    testhost.run("rm", "-rf", "/etc/unitbox", "/root/unitbox-attack-secret", "/home/alice")


# -- network ------------------------------------------------------------------------------------

def test_tcp_to_an_external_address_fails(client: Client) -> None:
    code = (
        "import socket\n"
        "report(connect=attempt(socket.create_connection, ('1.1.1.1', 80), 2),\n"
        "       by_name=attempt(socket.create_connection, ('deb.debian.org', 80), 2))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["connect"] == "EAFNOSUPPORT", seen  # RestrictAddressFamilies=AF_UNIX
    assert seen["by_name"] in ("EAFNOSUPPORT", "ENOENT", "-2", "-3", "-5"), seen  # or the lookup already failed


def test_udp_to_an_external_address_fails(client: Client) -> None:
    code = (
        "import socket\n"
        "def send():\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.sendto(b'x', ('1.1.1.1', 53))\n"
        "report(send=attempt(send))\n"
    )
    assert report_of(run_hostile(client, code)) == {"send": "EAFNOSUPPORT"}


def test_tcp_to_the_daemons_own_port_on_loopback_fails(client: Client, daemon: Daemon) -> None:
    code = (
        "import socket\n"
        f"report(v4=attempt(socket.create_connection, ('127.0.0.1', {daemon.port}), 2),\n"
        f"       v6=attempt(socket.create_connection, ('::1', {daemon.port}), 2),\n"
        f"       by_name=attempt(socket.create_connection, ('localhost', {daemon.port}), 2))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen == {"v4": "EAFNOSUPPORT", "v6": "EAFNOSUPPORT", "by_name": "EAFNOSUPPORT"}, seen


@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6", "AF_PACKET", "AF_NETLINK"])
def test_socket_creation_outside_af_unix_is_refused(client: Client, family: str) -> None:
    code = (
        "import socket\n"
        f"fam = socket.{family}\n"
        "kinds = {'stream': socket.SOCK_STREAM, 'dgram': socket.SOCK_DGRAM, 'raw': socket.SOCK_RAW}\n"
        "report(**{k: attempt(socket.socket, fam, t) for k, t in kinds.items()},\n"
        "       unix=attempt(socket.socket, socket.AF_UNIX, socket.SOCK_STREAM))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen == {"stream": "EAFNOSUPPORT", "dgram": "EAFNOSUPPORT", "raw": "EAFNOSUPPORT", "unix": "OK"}, seen


def test_private_network_namespace_has_only_loopback(client: Client, testhost: TestHost) -> None:
    # The layer behind the address-family filter: even a socket that got
    # through would find no interface but lo.
    code = "report(ifaces=sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))\n"
    assert report_of(run_hostile(client, code)) == {"ifaces": ["lo"]}
    host_ifaces = testhost.sh("ls /sys/class/net").split()
    assert set(host_ifaces) - {"lo"}, host_ifaces  # the host does have a network to hide


def test_dns_lookup_fails(client: Client) -> None:
    code = (
        "import socket\n"
        "def lookup(name):\n"
        "    try:\n"
        "        return sorted({a[4][0] for a in socket.getaddrinfo(name, 80)})\n"
        "    except socket.gaierror as e:\n"
        "        return f'gaierror {e.errno}'\n"
        "report(debian=lookup('deb.debian.org'), pypi=lookup('pypi.org'))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert str(seen["debian"]).startswith("gaierror") and str(seen["pypi"]).startswith("gaierror"), seen


def test_dbus_system_bus_and_systemd_sockets_are_unreachable(client: Client, testhost: TestHost) -> None:
    sockets = ["/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket", "/run/systemd/private",
               "/run/systemd/journal/socket", "/run/systemd/notify", "/run/systemd/userdb/io.systemd.DynamicUser",
               "/dev/log"]
    code = (
        "import socket\n"
        "def connect(path):\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "    s.settimeout(2)\n"
        "    s.connect(path)\n"
        f"paths = {sockets!r}\n"
        "report(**{p: attempt(connect, p) for p in paths},\n"
        "       abstract=attempt(connect, '\\0/org/freedesktop/systemd1/notify'),\n"
        "       listed=[l.split()[-1] for l in open('/proc/self/net/unix').readlines()[1:] if len(l.split()) > 7])\n"
    )
    seen = report_of(run_hostile(client, code))
    assert {seen[p] for p in sockets} == {"ENOENT"}, seen
    assert seen["abstract"] == "ECONNREFUSED", seen  # its own network namespace: no host abstract sockets
    assert seen["listed"] == [], seen
    assert testhost.sh("test -S /run/dbus/system_bus_socket && echo present").strip() == "present"


# -- filesystem secrecy -------------------------------------------------------------------------

def test_etc_shadow_is_unreadable(client: Client) -> None:
    code = ("report(exists=os.path.exists('/etc/shadow'), read=attempt(lambda: open('/etc/shadow').read()),\n"
            "       gshadow=attempt(lambda: open('/etc/gshadow').read()))\n")
    assert report_of(run_hostile(client, code)) == {"exists": True, "read": "EACCES", "gshadow": "EACCES"}


def test_daemon_config_with_tokens_is_invisible(client: Client, planted: dict[str, str]) -> None:
    code = (
        "def grab():\n"
        "    return open('/etc/unitbox/unitbox.toml').read()\n"
        "report(read=attempt(grab), listed=attempt(os.listdir, '/etc/unitbox'),\n"
        "       env=sorted(k for k in os.environ if 'TOKEN' in k.upper() or k.startswith('UNITBOX')))\n"
    )
    run = run_hostile(client, code)
    assert report_of(run) == {"read": "EACCES", "listed": "EACCES", "env": []}
    assert planted["token"] not in run["stdout"] + run["stderr"]


def test_the_running_daemons_own_config_file_is_unreadable(client: Client, daemon: Daemon,
                                                           testhost: TestHost) -> None:
    # The test daemon's config lives outside /etc/unitbox (--config, mode 0644):
    # the engine hides the file it was loaded from from every run.
    mode = testhost.sh(f"stat -c %a {daemon.config_path}").strip()
    seen = report_of(run_hostile(client, f"report(read=attempt(lambda: open({daemon.config_path!r}).read()))\n"))
    assert seen == {"read": "EACCES"}, (mode, seen)


def test_daemon_database_and_run_directories_are_invisible(client: Client, daemon: Daemon) -> None:
    state = daemon.state_dir
    code = (
        f"state = {state!r}\n"
        # Its own id, from its cgroup (a warm unit's: its slot; the whole state dir is hidden either way).
        "rid = open('/proc/self/cgroup').read().split('unitbox-')[1].split('.service')[0].split('-')[-1]\n"
        "report(listing=attempt(os.listdir, state), db=attempt(lambda: open(state + '/daemon/unitbox.db', 'rb').read()),\n"
        "       own_stdout=attempt(lambda: open(f'{state}/daemon/runs/{rid}/stdout', 'rb').read()),\n"
        "       own_result=attempt(lambda: open(f'{state}/ends/{rid}/result').read()),\n"
        "       default=attempt(os.listdir, '/var/lib/unitbox'))\n"
    )
    seen = report_of(run_hostile(client, code))
    # ENOENT: an empty tmpfs over the state dir's parent hides it without naming it (test_attacks_visibility)
    assert seen == {"listing": "ENOENT", "db": "ENOENT", "own_stdout": "ENOENT", "own_result": "ENOENT",
                    "default": "ENOENT"}, seen


def test_another_concurrent_runs_code_and_output_are_unreachable(client: Client, daemon: Daemon,
                                                                  testhost: TestHost) -> None:
    marker = "victim-" + secrets.token_hex(8)
    victim = client.submit(f"import time\nSECRET = {marker!r}\nprint(SECRET, flush=True)\n"
                           f"open('/tmp/secret', 'w').write(SECRET)\nopen('secret', 'w').write(SECRET)\n"
                           "time.sleep(30)\n")
    wait_output(client, victim, marker)
    pid = main_pid(testhost, client, victim)
    state, unit = daemon.state_dir, client.status(victim)["unit"]
    stage = victim if unit.startswith("unitbox-run-") else unit.removeprefix("unitbox-").removesuffix(".service")
    targets = [f"{state}/daemon/runs/{victim}/in/main.py", f"{state}/daemon/runs/{victim}/stdout",
               f"/run/unitbox-runs/{stage}/in/main.py", f"/run/systemd/transient/{unit}", f"/proc/{pid}/cmdline",
               f"/proc/{pid}/environ", f"/proc/{pid}/root/tmp/secret", f"/proc/{pid}/cwd/secret",
               f"/proc/{pid}/fd/1", f"/proc/{pid}/mem"]
    code = (
        f"targets = {targets!r}\n"
        f"marker = {marker[::-1]!r}[::-1]\n"  # not literally in this program's own code
        "found = []\n"
        "for top in ('/run', '/tmp', '/var/tmp', '/dev/shm', '/dev/mqueue', '/proc/self/cwd'):\n"
        "    for root, dirs, files in os.walk(top):\n"
        "        for f in files:\n"
        "            try:\n"
        "                if marker.encode() in open(os.path.join(root, f), 'rb').read(1 << 20): found.append(f)\n"
        "            except OSError: pass\n"
        "report(**{t: attempt(lambda: open(t, 'rb').read()) for t in targets}, found=found,\n"
        "       visible=os.path.exists(f'/proc/{targets[3].split(\"/\")[2]}'))\n"
    )
    run = run_hostile(client, code)
    client.request("POST", f"/runs/{victim}/cancel")
    seen = report_of(run)
    assert marker not in run["stdout"]
    assert seen.pop("found") == [] and seen.pop("visible") is False
    assert set(seen.values()) <= {"ENOENT", "EACCES"}, seen
    assert seen[f"{state}/daemon/runs/{victim}/in/main.py"] == "ENOENT"  # the state dir is hidden (an empty tmpfs over /var/lib)
    assert seen[f"/proc/{pid}/cmdline"] == "ENOENT"  # ProtectProc=invisible
    assert client.wait(victim)["state"] == "cancelled"


def test_root_and_home_are_hidden(client: Client, planted: dict[str, str]) -> None:
    code = (
        "report(root=attempt(os.listdir, '/root'), home=attempt(os.listdir, '/home'),\n"
        "       root_file=attempt(lambda: open('/root/unitbox-attack-secret').read()),\n"
        "       home_file=attempt(lambda: open('/home/alice/unitbox-attack-secret').read()),\n"
        "       run_user=attempt(os.listdir, '/run/user'))\n"
    )
    run = run_hostile(client, code)
    # ProtectHome=yes: /root, /home and /run/user are made inaccessible
    assert report_of(run) == {"root": "EACCES", "home": "EACCES", "root_file": "EACCES", "home_file": "EACCES",
                              "run_user": "ENOENT"}
    assert planted["token"] not in run["stdout"]


def test_proc_lists_only_the_runs_own_processes(client: Client) -> None:
    code = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '5'])\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "child.kill(); child.wait()\n"
        "report(pids=pids, expected=sorted([os.getpid(), child.pid]), pid1=os.path.exists('/proc/1'),\n"
        "       entries=sorted(p for p in os.listdir('/proc') if not p.isdigit()))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["pids"] == seen["expected"], seen
    assert seen["pid1"] is False
    assert "kcore" not in seen["entries"] and "sysrq-trigger" not in seen["entries"]  # ProcSubset=pid


def test_proc_1_environ_is_unreadable(client: Client) -> None:
    code = ("report(environ=attempt(lambda: open('/proc/1/environ', 'rb').read()),\n"
            "       cmdline=attempt(lambda: open('/proc/1/cmdline', 'rb').read()),\n"
            "       root=attempt(os.listdir, '/proc/1/root'),\n"
            "       self_environ=attempt(lambda: open('/proc/self/environ', 'rb').read()))\n")
    assert report_of(run_hostile(client, code)) == {"environ": "ENOENT", "cmdline": "ENOENT", "root": "ENOENT",
                                                    "self_environ": "OK"}


def test_mountinfo_shows_no_secrets_and_no_other_run(client: Client, planted: dict[str, str]) -> None:
    other = client.submit("import time; time.sleep(30)")
    wait_running(client, other)
    run = client.run("import sys; sys.stdout.write(open('/proc/self/mountinfo').read())")
    client.request("POST", f"/runs/{other}/cancel")
    mountinfo = run["stdout"]
    assert "/run/unitbox/code" in mountinfo  # it did read it
    assert other not in mountinfo
    assert planted["token"] not in mountinfo
    assert "unitbox.db" not in mountinfo
    assert client.wait(other)["state"] == "cancelled"


# -- privilege ----------------------------------------------------------------------------------

def test_setuid_0_is_refused(client: Client) -> None:
    code = ("report(setuid=attempt(os.setuid, 0), seteuid=attempt(os.seteuid, 0), setgid=attempt(os.setgid, 0),\n"
            "       setresuid=attempt(os.setresuid, 0, 0, 0), setgroups=attempt(os.setgroups, [0]),\n"
            "       uid=os.getuid(), euid=os.geteuid())\n")
    seen = report_of(run_hostile(client, code))
    assert seen.pop("uid") == seen.pop("euid") != 0
    assert set(seen.values()) == {"EPERM"}, seen


def test_setuid_binaries_gain_nothing_under_no_new_privileges(client: Client) -> None:
    # su (setuid root) waits for a password: while it does, its credentials
    # show whether exec gave it root. Under NoNewPrivileges it runs as us.
    code = (
        "import subprocess, time\n"
        "status = {l.split(':')[0]: l.split(':')[1].split() for l in open('/proc/self/status') if ':' in l}\n"
        "su = subprocess.Popen(['su', 'root', '-c', 'id -u'], stdin=subprocess.PIPE,\n"
        "                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "time.sleep(0.5)\n"
        "try:\n"
        "    su_uids = [l.split()[1:] for l in open(f'/proc/{su.pid}/status') if l.startswith('Uid:')][0]\n"
        "except OSError as e:\n"
        "    su_uids = errno.errorcode[e.errno]\n"
        "out, err = su.communicate(b'wrong\\n', timeout=10)\n"
        "mount = subprocess.run(['mount', '-t', 'tmpfs', 'none', '/tmp'], capture_output=True, text=True)\n"
        "report(nnp=status['NoNewPrivs'], cap_eff=status['CapEff'], cap_bnd=status['CapBnd'],\n"
        "       uid=os.getuid(), su_uids=su_uids, su_rc=su.returncode, su_out=out.decode(),\n"
        "       mount_rc=mount.returncode, mount_err=mount.stderr.strip().splitlines()[:1])\n"
    )
    seen = report_of(run_hostile(client, code))
    uid = str(seen["uid"])
    assert seen["nnp"] == ["1"] and seen["cap_eff"] == ["0000000000000000"] and seen["cap_bnd"] == ["0000000000000000"]
    assert seen["su_uids"] == [uid, uid, uid, uid], seen  # real, effective, saved, fs: the setuid bit was ignored
    assert seen["su_rc"] != 0 and seen["su_out"] == "", seen
    assert seen["mount_rc"] != 0, seen


def test_namespaces_cannot_be_created(client: Client) -> None:
    code = (
        "flags = {'user': 0x10000000, 'mnt': 0x00020000, 'net': 0x40000000, 'pid': 0x20000000,\n"
        "         'uts': 0x04000000, 'ipc': 0x08000000, 'cgroup': 0x02000000}\n"
        "import subprocess\n"
        "tool = subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True, text=True)\n"
        "def clone(flags):\n"  # raw clone(2) without a stack: a fork, if it were allowed
        "    ctypes.set_errno(0)\n"
        "    pid = libc.syscall(56, flags | 17, 0, 0, 0, 0)\n"  # SYS_clone, flags | SIGCHLD
        "    if pid == 0: os._exit(0)\n"
        "    if pid > 0: os.waitpid(pid, 0); return 'OK'\n"
        "    return errno.errorcode[ctypes.get_errno()]\n"
        "report(**{k: syscall('unshare', v) for k, v in flags.items()},\n"
        "       **{'clone_' + k: clone(v) for k, v in flags.items()}, clone_plain=clone(0),\n"
        "       setns=attempt(lambda: libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0) == 0 or\n"
        "                     (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'setns'))),\n"
        "       tool_rc=tool.returncode, tool_out=tool.stdout.strip())\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen.pop("tool_rc") != 0 and seen.pop("tool_out") != "0", seen
    assert seen.pop("clone_plain") == "OK", seen  # the probe works: a clone without namespace flags is a fork
    assert set(seen.values()) == {"EPERM"}, seen


def test_ptrace_is_refused(client: Client) -> None:
    code = (
        "import time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(10); os._exit(0)\n"
        "PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206\n"
        "res = dict(attach=syscall('ptrace', PTRACE_ATTACH, child, 0, 0),\n"
        "           seize=syscall('ptrace', PTRACE_SEIZE, child, 0, 0),\n"
        "           traceme=syscall('ptrace', PTRACE_TRACEME, 0, 0, 0),\n"
        "           mem=attempt(lambda: open(f'/proc/{child}/mem', 'rb').read(1)))\n"
        "os.kill(child, 9)\n"
        "report(**res)\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["attach"] == seen["seize"] == seen["traceme"] == "EPERM", seen
    assert seen["mem"] in ("EIO", "EPERM", "EACCES"), seen  # no ptrace access, no memory


def test_kill_of_pid_1_is_refused(client: Client, testhost: TestHost) -> None:
    code = ("import signal\n"
            "sigs = [signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGUSR1, signal.SIGRTMIN + 4]\n"
            "report(**{str(int(s)): attempt(os.kill, 1, s) for s in sigs}, probe=attempt(os.kill, 1, 0))\n")
    seen = report_of(run_hostile(client, code))
    assert set(seen.values()) == {"EPERM"}, seen
    assert testhost.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")


def test_keyctl_is_refused(client: Client) -> None:
    code = (
        "KEY_SPEC_SESSION_KEYRING, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_GET_KEYRING_ID = -3, 1, 0\n"
        "def raw(nr, *args):\n"
        "    ctypes.set_errno(0)\n"
        "    r = libc.syscall(nr, *args)\n"
        "    return 'OK' if r != -1 else errno.errorcode[ctypes.get_errno()]\n"
        "SYS_add_key, SYS_request_key, SYS_keyctl = 248, 249, 250\n"
        "report(add_key=raw(SYS_add_key, b'user', b'unitbox', b'secret', 6, KEY_SPEC_SESSION_KEYRING),\n"
        "       request_key=raw(SYS_request_key, b'user', b'unitbox', None, 0),\n"
        "       keyctl=raw(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),\n"
        "       join=raw(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, b'unitbox'))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen == {"add_key": "EPERM", "request_key": "EPERM", "keyctl": "EPERM", "join": "EPERM"}, seen


def test_kernel_module_loading_is_refused(client: Client) -> None:
    code = (
        "import glob\n"
        "def raw(nr, *args):\n"
        "    ctypes.set_errno(0)\n"
        "    return 'OK' if libc.syscall(nr, *args) != -1 else errno.errorcode[ctypes.get_errno()]\n"
        "SYS_init_module, SYS_delete_module, SYS_finit_module = 175, 176, 313\n"
        "mods = glob.glob('/lib/modules/*/kernel/**/*.ko*', recursive=True)\n"
        "fd = os.open(mods[0], os.O_RDONLY) if mods else os.open('/dev/null', os.O_RDONLY)\n"

        "report(init=raw(SYS_init_module, b'\\0' * 64, 64, b''), finit=raw(SYS_finit_module, fd, b'', 0),\n"
        "       delete=raw(SYS_delete_module, b'ext4', 0),\n"
        "       modprobe_path=attempt(lambda: open('/proc/sys/kernel/modprobe', 'w').write('/tmp/x')))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen == {"init": "EPERM", "finit": "EPERM", "delete": "EPERM", "modprobe_path": "ENOENT"}, seen


def test_sysctl_writes_are_refused(client: Client) -> None:
    code = (
        "targets = ['/proc/sys/kernel/hostname', '/proc/sys/vm/drop_caches', '/proc/sys/kernel/core_pattern',\n"
        "           '/proc/sys/net/ipv4/ip_forward', '/sys/kernel/mm/transparent_hugepage/enabled',\n"
        "           '/proc/sysrq-trigger']\n"
        "import socket\n"
        "report(**{t: attempt(lambda: open(t, 'w').write('1')) for t in targets},\n"
        "       sethostname=attempt(socket.sethostname, 'pwned'), hostname=socket.gethostname())\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen.pop("sethostname") == "EPERM" and seen.pop("hostname") != "pwned"
    # /proc/sys and /proc/sysrq-trigger do not exist under ProcSubset=pid; /sys holds only the CPU topology
    assert seen == {"/proc/sys/kernel/hostname": "ENOENT", "/proc/sys/vm/drop_caches": "ENOENT",
                    "/proc/sys/kernel/core_pattern": "ENOENT", "/proc/sys/net/ipv4/ip_forward": "ENOENT",
                    "/sys/kernel/mm/transparent_hugepage/enabled": "ENOENT", "/proc/sysrq-trigger": "ENOENT"}, seen


def test_chmod_setuid_and_setgid_are_refused(client: Client) -> None:
    code = (
        "import shutil, stat\n"
        "shutil.copy('/bin/sh', 'sh')\n"
        "created = attempt(os.open, 'made', os.O_CREAT | os.O_WRONLY, 0o4755)\n"
        "fd = os.open('plain', os.O_CREAT | os.O_WRONLY, 0o755)\n"
        "report(setuid=attempt(os.chmod, 'sh', 0o4755), setgid=attempt(os.chmod, 'sh', 0o2755),\n"
        "       fchmod=attempt(os.fchmod, fd, 0o6755), plain=attempt(os.chmod, 'sh', 0o755),\n"
        "       created=created,\n"
        "       mkdir_setgid=attempt(os.mkdir, 'd', 0o2777), mode=oct(stat.S_IMODE(os.stat('sh').st_mode)))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["setuid"] == seen["setgid"] == seen["fchmod"] == "EPERM", seen
    assert seen["plain"] == "OK" and seen["mode"] == "0o755", seen
    assert seen["created"] == "EPERM", seen  # open(O_CREAT) with a setuid mode, too
    assert seen["mkdir_setgid"] in ("EPERM", "OK"), seen


def test_device_nodes_cannot_be_created(client: Client) -> None:
    code = (
        "import stat\n"
        "report(char=attempt(os.mknod, 'mem', stat.S_IFCHR | 0o666, os.makedev(1, 1)),\n"
        "       block=attempt(os.mknod, 'sda', stat.S_IFBLK | 0o666, os.makedev(8, 0)),\n"
        "       tmp_char=attempt(os.mknod, '/tmp/null', stat.S_IFCHR | 0o666, os.makedev(1, 3)),\n"
        "       fifo=attempt(os.mkfifo, 'fifo'), dev=sorted(os.listdir('/dev')))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["char"] == seen["block"] == seen["tmp_char"] == "EPERM", seen
    assert seen["fifo"] == "OK"  # not a device: allowed
    assert not {"sda", "vda", "mem", "kmem", "port", "kmsg"} & set(seen["dev"]), seen["dev"]  # PrivateDevices


def test_personality_change_is_refused(client: Client) -> None:
    code = (
        "READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, PER_LINUX32 = 0x0400000, 0x0040000, 0x0008\n"
        "report(same=syscall('personality', 0), exec_all=syscall('personality', READ_IMPLIES_EXEC),\n"
        "       no_aslr=syscall('personality', ADDR_NO_RANDOMIZE), linux32=syscall('personality', PER_LINUX32),\n"
        "       after=syscall('personality', 0))\n"
    )
    seen = report_of(run_hostile(client, code))
    # LockPersonality: only the current persona (PER_LINUX) may be set; it is still the current one after
    assert seen == {"same": "OK", "exec_all": "EPERM", "no_aslr": "EPERM", "linux32": "EPERM", "after": "OK"}, seen


def test_other_privileged_syscalls_are_refused(client: Client) -> None:
    code = (
        "import time\n"
        "def raw(nr, *args):\n"
        "    ctypes.set_errno(0)\n"
        "    return 'OK' if libc.syscall(nr, *args) != -1 else errno.errorcode[ctypes.get_errno()]\n"
        "class sched_param(ctypes.Structure): _fields_ = [('prio', ctypes.c_int)]\n"
        "ts = (ctypes.c_long * 2)(0, 0)\n"
        "report(chroot=attempt(os.chroot, '/tmp'),\n"
        "       mount=syscall('mount', b'none', b'/tmp', b'tmpfs', 0, None),\n"
        "       umount=syscall('umount2', b'/run/unitbox/code', 2),\n"
        "       pivot_root=raw(155, b'/tmp', b'/tmp'),\n"
        "       reboot=raw(169, 0xfee1dead, 672274793, 0x4321fedc, None),\n"
        "       settime=syscall('clock_settime', 0, ts),\n"
        "       swapon=syscall('swapon', b'/tmp/swap', 0),\n"
        "       bpf=raw(321, 0, None, 0),\n"
        "       perf_event_open=raw(298, None, 0, -1, -1, 0),\n"
        "       userfaultfd=raw(323, 0),\n"
        "       acct=syscall('acct', b'/tmp/acct'),\n"
        "       realtime=attempt(os.sched_setscheduler, 0, os.SCHED_FIFO, os.sched_param(1)),\n"
        "       nice=attempt(os.setpriority, os.PRIO_PROCESS, 0, -5),\n"
        "       iopl=raw(172, 3), ioperm=raw(173, 0, 1024, 1),\n"
        "       kexec=raw(246, 0, 0, None, 0))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen.pop("nice") in ("EACCES", "EPERM"), seen
    assert set(seen.values()) == {"EPERM"}, seen


# -- cross-run ----------------------------------------------------------------------------------

def test_files_left_anywhere_writable_are_gone_for_the_next_run(client: Client) -> None:
    places = ["/run/unitbox/work", "/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/unitbox/tmp",
              "/run/unitbox/var-tmp"]
    marker = "left-" + secrets.token_hex(6)
    first = (
        f"places, marker = {places!r}, {marker!r}\n"
        "left = [p for p in places if attempt(lambda: open(os.path.join(p, marker), 'w').write('x')) == 'OK']\n"
        "libc.shmget.restype = ctypes.c_int\n"
        "shm = libc.shmget(0x5eed, 4096, 0o1666)\n"  # IPC_CREAT | 0666
        "msg = libc.msgget(0x5eed, 0o1666)\n"
        "report(left=left, shm=shm >= 0, msg=msg >= 0)\n"
    )
    second = (
        f"places, marker = {places!r}, {marker!r}\n"
        "found = [p for p in places if os.path.exists(os.path.join(p, marker))]\n"
        "anything = {p: sorted(os.listdir(p)) for p in places if os.path.isdir(p)}\n"
        "report(found=found, anything=anything, shm=syscall('shmget', 0x5eed, 0, 0),\n"
        "       msg=syscall('msgget', 0x5eed, 0))\n"
    )
    planted = report_of(run_hostile(client, first))
    assert set(planted["left"]) >= {"/run/unitbox/work", "/tmp", "/var/tmp", "/dev/shm"}, planted
    assert planted["shm"] is True and planted["msg"] is True
    seen = report_of(run_hostile(client, second))
    assert seen["found"] == [], seen
    assert all(v == [] for v in seen["anything"].values()), seen
    assert seen["shm"] == seen["msg"] == "ENOENT", seen  # PrivateIPC: SysV objects died with the run


def test_concurrent_runs_cannot_signal_or_read_each_other(client: Client, testhost: TestHost) -> None:
    hold = ("import time\nopen('/tmp/mine', 'w').write('private')\n"
            "report(uid=os.getuid())\ntime.sleep(6)\nreport(survived=True)\n")
    a, b = submit_hostile(client, hold), submit_hostile(client, hold)
    for run_id in (a, b):
        wait_output(client, run_id, '"uid"')
    pid_a, pid_b = main_pid(testhost, client, a), main_pid(testhost, client, b)
    attack = (
        "import signal\n"
        f"victims = [{pid_a}, {pid_b}]\n"
        "res = {}\n"
        "for v in victims:\n"
        "    res[f'{v}'] = dict(kill=attempt(os.kill, v, signal.SIGKILL), stop=attempt(os.kill, v, signal.SIGSTOP),\n"
        "        pidfd=attempt(lambda: os.pidfd_open(v)),\n"
        "        status=attempt(lambda: open(f'/proc/{v}/status').read()),\n"
        "        tmp=attempt(lambda: open(f'/proc/{v}/root/tmp/mine').read()),\n"
        "        prio=attempt(os.setpriority, os.PRIO_PROCESS, v, 19))\n"
        "report(**res)\n"
    )
    seen = report_of(run_hostile(client, attack))
    for pid in (pid_a, pid_b):
        assert seen[str(pid)]["kill"] == seen[str(pid)]["stop"] == "EPERM", seen
        assert seen[str(pid)]["status"] == seen[str(pid)]["tmp"] == "ENOENT", seen
        assert seen[str(pid)]["pidfd"] in ("OK", "EPERM", "ESRCH"), seen  # a pidfd grants nothing by itself
        assert seen[str(pid)]["prio"] == "EPERM", seen
    runs = [finished(client, r) for r in (a, b)]
    assert [r["state"] for r in runs] == ["succeeded", "succeeded"]
    assert all(report_of(r) == {"survived": True} for r in runs)


def test_kill_minus_one_spares_other_runs(client: Client) -> None:
    victim = submit_hostile(client, "import time\nreport(up=True)\ntime.sleep(4)\nreport(survived=True)\n")
    wait_output(client, victim, '"up"')
    killer = run_hostile(client, "import signal\nr = attempt(os.kill, -1, signal.SIGKILL)\nreport(kill_all=r)\n")
    assert killer["state"] == "succeeded", killer  # kill(-1) spares the caller itself
    assert report_of(killer)["kill_all"] in ("OK", "ESRCH"), killer  # there was nobody it may signal
    run = finished(client, victim)
    assert run["state"] == "succeeded", run
    assert report_of(run) == {"survived": True}


def test_abstract_unix_socket_is_not_shared_between_runs(client: Client) -> None:
    name = "\\0unitbox-attack-" + secrets.token_hex(4)
    server = submit_hostile(client, (
        "import socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        f"s.bind('{name}'); s.listen()\n"
        "report(listening=True)\ntime.sleep(4)\n"
    ))
    wait_output(client, server, '"listening"')
    seen = report_of(run_hostile(client, (
        "import socket\n"
        "def connect():\n"
        "    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(" f"'{name}')\n"
        "report(connect=attempt(connect))\n"
    )))
    assert seen == {"connect": "ECONNREFUSED"}, seen
    assert finished(client, server)["state"] == "succeeded"


def test_uids_are_never_equal_while_runs_live(client: Client) -> None:
    code = "import time\nreport(uid=os.getuid(), gid=os.getgid())\ntime.sleep(4)\n"
    with ThreadPoolExecutor(12) as pool:
        ids = list(pool.map(lambda _: submit_hostile(client, code), range(12)))
        runs = list(pool.map(lambda i: finished(client, i), ids))
    assert all(r["state"] == "succeeded" for r in runs), [r["state"] for r in runs]
    assert max(r["started_at"] for r in runs) < min(r["finished_at"] for r in runs)  # all 12 alive at once
    ids_seen = [report_of(r) for r in runs]
    uids = [s["uid"] for s in ids_seen]
    assert len(set(uids)) == 12, uids
    assert not {0, 65534} & set(uids)
    assert len({s["gid"] for s in ids_seen}) == 12


# -- the profile, as systemd scores it ----------------------------------------------------------

def test_every_live_run_unit_scores_at_most_1_in_systemd_analyze_security(client: Client,
                                                                             testhost: TestHost) -> None:
    variants = [{"timeout_s": 20}, {"timeout_s": 20, "memory_mb": 4096, "cpu_percent": 200, "tasks": 1024},
                {"timeout_s": 20, "memory_mb": 32, "cpu_percent": 5, "tasks": 4, "disk_mb": 1, "output_kb": 1},
                {"timeout_s": 20, "disk_mb": 4096, "output_kb": 65536}]
    ids = [client.submit("import time; time.sleep(30)", limits=limits) for limits in variants]
    ids.append(client.submit("import time, sys; time.sleep(30)", args=["--x"], stdin="y"))
    try:
        for run_id in ids:
            wait_running(client, run_id)
        live = [u for u in run_units(testhost) if testhost.run("systemctl", "is-active", u, check=False)
                .stdout.strip() == "active"]
        assert {client.status(i)["unit"] for i in ids} <= set(live)
        with ThreadPoolExecutor(4) as pool:
            scores = dict(zip(live, pool.map(lambda u: security_score(testhost, u), live), strict=True))
        assert all(score <= 1.0 for score in scores.values()), scores
    finally:
        for run_id in ids:
            client.request("POST", f"/runs/{run_id}/cancel")
    assert {client.wait(i)["state"] for i in ids} == {"cancelled"}
