"""Runtimes on a real systemd (issue 7): a `scientific` runtime built with
`unitbox runtime build` inside the test host (numpy, pandas, matplotlib and
threadpoolctl from PyPI, pip's cache in the checkout's .cache/pip), found by
the running daemon without a restart, mounted read-only into runs."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import VENV_UNITBOX, Client, Daemon, multipart
from tests.support.testhost import REPO, TestHost

PACKAGES = ["numpy", "pandas", "matplotlib", "threadpoolctl"]
PIP_CACHE = REPO / ".cache" / "pip"


def unitbox(testhost: TestHost, daemon: Daemon, *args: str, timeout: float = 600) -> tuple[int, str]:
    """`unitbox runtime …` as root inside the test host, with the daemon's config."""
    done = testhost.run("env", f"PIP_CACHE_DIR={PIP_CACHE}", str(VENV_UNITBOX), "--config", daemon.config_path,
                        "runtime", *args, check=False, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def requirements(testhost: TestHost, name: str, lines: list[str]) -> str:
    path = f"/etc/unitbox-{name}-requirements.txt"
    testhost.path(path).write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def scientific(testhost: TestHost, daemon: Daemon) -> Iterator[dict[str, Any]]:
    """Built once for the module; its manifest, and how long the build took."""
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    code, output = unitbox(testhost, daemon, "build", "scientific", "-r",
                           requirements(testhost, "scientific", PACKAGES))
    assert code == 0, output
    manifest: dict[str, Any] = json.loads(
        runtime_root(testhost, daemon, "scientific").joinpath("unitbox-runtime.json").read_text())
    manifest["build_output"] = output
    manifest["build_s"] = time.monotonic() - began
    yield manifest
    unitbox(testhost, daemon, "remove", "scientific")


def runtime_root(testhost: TestHost, daemon: Daemon, name: str) -> Path:
    """The runtime's current build, seen from outside the test host."""
    link = testhost.path(f"{daemon.state_dir}/runtimes/{name}")
    return link.parent / os.readlink(link)


def tree_digest(root: Path) -> str:
    """Every file's path, size, mode and mtime: any write shows."""
    digest = hashlib.sha256()
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(base, name)
            info = os.lstat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{info.st_size}\0{info.st_mode}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def run_ok(client: Client, code: str, **fields: Any) -> dict[str, Any]:
    run = client.run(code, **fields)
    assert run["state"] == "succeeded", run
    return run


def test_build_shows_progress_and_records_the_versions(scientific: dict[str, Any]) -> None:
    output = scientific["build_output"]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "is ready"):
        assert step in output
    for package in PACKAGES:
        assert package in scientific["packages"], scientific["packages"]
        assert f"{package}=={scientific['packages'][package]}" in output
    assert scientific["python"].startswith("3.")
    assert scientific["build_s"] < 300


def test_numpy_and_pandas_compute_the_right_numbers(client: Client, scientific: dict[str, Any]) -> None:
    code = (
        "import numpy as np, pandas as pd\n"
        "a = np.array([[4.0, 7.0], [2.0, 6.0]])\n"
        "inv = np.linalg.inv(a)\n"
        "print(np.round(inv, 6).tolist(), np.allclose(a @ inv, np.eye(2)))\n"
        "df = pd.DataFrame({'k': ['a', 'b', 'a', 'b', 'c'], 'v': [1, 2, 3, 4, 5]})\n"
        "print(df.groupby('k')['v'].sum().to_dict(), df.groupby('k')['v'].mean().round(2).to_dict())\n"
        "print(np.__version__, pd.__version__)\n"
    )
    run = run_ok(client, code, runtime="scientific")
    assert run["runtime"] == "scientific"
    assert run["stdout"].splitlines() == [
        "[[0.6, -0.7], [-0.2, 0.4]] True",
        "{'a': 4, 'b': 6, 'c': 5} {'a': 2.0, 'b': 3.0, 'c': 5.0}",
        f"{scientific['packages']['numpy']} {scientific['packages']['pandas']}",
    ]


def test_pandas_reads_an_input_csv_and_main_returns_its_summary(client: Client,
                                                                scientific: dict[str, Any]) -> None:
    code = ("import pandas as pd\n"
            "def main():\n"
            "    df = pd.read_csv('data/sales.csv')\n"
            "    return {'rows': len(df), 'total': float(df['amount'].sum()),\n"
            "            'by_region': df.groupby('region')['amount'].sum().to_dict()}\n")
    csv = "region,amount\nnorth,10.5\nsouth,4\nnorth,1.5\n"
    run = run_ok(client, code, runtime="scientific", entrypoint="main",
                 files=[{"path": "data/sales.csv", "content": csv}])
    assert run["result"] == {"rows": 3, "total": 16.0, "by_region": {"north": 12.0, "south": 4.0}}


def test_a_matplotlib_figure_is_collected_and_served_as_png(client: Client, scientific: dict[str, Any]) -> None:
    code = ("import matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots(figsize=(4, 3), dpi=50)\n"
            "ax.plot([0, 1, 2], [0, 1, 4])\n"
            "fig.savefig('plot.png')\n")
    run = run_ok(client, code, runtime="scientific")
    plot = next(f for f in run["files"] if f["path"] == "plot.png")
    assert plot["media_type"] == "image/png"
    served = client.get(plot["url"])
    assert served.status == 200 and served.headers["Content-Type"] == "image/png"
    assert served.headers["Content-Disposition"].startswith("inline")
    png = served.body
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == plot["size"]
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (200, 150)
    assert hashlib.sha256(png).hexdigest() == plot["sha256"]


def test_run_file_takes_the_runtime_field(client: Client, scientific: dict[str, Any]) -> None:
    body, content_type = multipart({"file": ("main.py", b"import numpy\nprint(numpy.arange(5).sum())\n"),
                                    "runtime": (None, b"scientific"), "wait": (None, b"true")})
    reply = client.request("POST", "/run-file", body, content_type)
    assert reply.status == 200, reply.body
    run = reply.json()
    assert (run["state"], run["runtime"]) == ("succeeded", "scientific")
    assert client.get(f"/output/{run['id']}").json()["stdout"] == "10\n"


# A wheel made by hand in the run (pip installs it with no network), then pip
# install, pip uninstall and plain writes into the runtime: all EROFS.
TAMPER = r'''
import base64, hashlib, os, subprocess, sys, zipfile
import numpy
files = {"evil.py": b"X = 1\n",
         "evil-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n",
         "evil-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
def row(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"
with zipfile.ZipFile("evil-1.0-py3-none-any.whl", "w") as wheel:
    for name, data in files.items():
        wheel.writestr(name, data)
    wheel.writestr("evil-1.0.dist-info/RECORD", "".join(row(n, d) for n, d in files.items()) + "evil-1.0.dist-info/RECORD,,\n")
pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
for argv in (["install", "--no-index", "--no-deps", "evil-1.0-py3-none-any.whl"], ["uninstall", "-y", "numpy"]):
    done = subprocess.run(pip + argv, capture_output=True, text=True)
    print("pip", argv[0], done.returncode != 0, "Read-only file system" in done.stdout + done.stderr)
site = os.path.dirname(os.path.dirname(numpy.__file__))
for what, action in (("create", lambda: open(os.path.join(site, "evil.py"), "w")),
                     ("append", lambda: open(numpy.__file__, "a")),
                     ("unlink", lambda: os.unlink(numpy.__file__)),
                     ("chmod", lambda: os.chmod(numpy.__file__, 0o777)),
                     ("mkdir", lambda: os.mkdir(os.path.join(sys.prefix, "new"))),
                     ("pyvenv", lambda: open(os.path.join(sys.prefix, "pyvenv.cfg"), "w"))):
    try:
        action()
        print(what, "succeeded")
    except OSError as exc:
        print(what, exc.errno)
'''


def test_runs_cannot_install_into_or_modify_the_runtime(client: Client, testhost: TestHost, daemon: Daemon,
                                                       scientific: dict[str, Any]) -> None:
    root = runtime_root(testhost, daemon, "scientific")
    before = tree_digest(root)
    run = run_ok(client, TAMPER, runtime="scientific", limits={"timeout_s": 60, "memory_mb": 512})
    lines = run["stdout"].splitlines()
    assert lines[:2] == ["pip install True True", "pip uninstall True True"], run  # failed, read-only
    errors = dict(line.split() for line in lines[2:])
    assert errors.keys() == {"create", "append", "unlink", "chmod", "mkdir", "pyvenv"}, run
    assert {errors[w] for w in ("create", "unlink", "chmod", "mkdir")} == {"30"}, errors  # EROFS
    assert {errors["append"], errors["pyvenv"]} <= {"13", "30"}, errors  # EACCES: not the owner, checked first
    assert tree_digest(root) == before
    # The next run sees the runtime as it was built.
    numpy_init = next(root.glob("lib/python3*/site-packages/numpy/__init__.py"))
    check = ("import hashlib, importlib.util, numpy\n"
             "print(importlib.util.find_spec('evil'), numpy.__version__)\n"
             "print(hashlib.sha256(open(numpy.__file__, 'rb').read()).hexdigest())\n")
    run = run_ok(client, check, runtime="scientific")
    assert run["stdout"].splitlines() == [f"None {scientific['packages']['numpy']}",
                                          hashlib.sha256(numpy_init.read_bytes()).hexdigest()]


def test_the_state_directory_stays_invisible_to_a_runtime_run(client: Client, daemon: Daemon,
                                                              scientific: dict[str, Any]) -> None:
    code = ("import os, sys\n"
            f"for p in ({daemon.state_dir!r}, {daemon.state_dir + '/runtimes'!r}, {daemon.state_dir + '/daemon/unitbox.db'!r}):\n"
            "    try:\n"
            "        os.listdir(p) if os.path.isdir(p) else open(p, 'rb')\n"
            "        print(p, 'visible')\n"
            "    except OSError as exc:\n"
            "        print(p, exc.errno)\n"
            "print(sys.prefix, sys.executable)\n")
    run = run_ok(client, code, runtime="scientific")
    lines = run["stdout"].splitlines()
    assert all(line.endswith((" 13", " 2")) for line in lines[:3]), lines  # EACCES / ENOENT
    assert lines[3] == "/run/unitbox/runtime /run/unitbox/runtime/bin/python"


THREADS = (
    "import os, threadpoolctl, numpy as np\n"
    "m = np.random.default_rng(0).random((400, 400))\n"
    "print(round(float(np.linalg.inv(m @ m.T + np.eye(400)).trace()), 6) > 0)\n"
    "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])\n"
    "print(sorted({p['num_threads'] for p in threadpoolctl.threadpool_info()}))\n"
    "print(len(os.listdir('/proc/self/task')), len(os.sched_getaffinity(0)))\n"
)


@pytest.mark.parametrize(("cpu_percent", "cap"), [(100, 1), (200, 2)])
def test_import_numpy_works_with_tasks_16_and_its_threads_stay_under_the_cap(
        client: Client, scientific: dict[str, Any], cpu_percent: int, cap: int) -> None:
    run = run_ok(client, THREADS, runtime="scientific", limits={"tasks": 16, "cpu_percent": cpu_percent})
    flag, env, pools, counts = run["stdout"].splitlines()
    tasks, cpus = map(int, counts.split())
    assert (flag, env) == ("True", f"{cap} {cap}")
    assert pools == f"[{min(cap, cpus)}]"  # OpenBLAS: at most the cap (and at most the CPUs it may use)
    assert tasks <= cap + 1  # the main thread and the BLAS workers; well under tasks: 16


def test_matplotlib_draws_a_png_headless(client: Client, scientific: dict[str, Any]) -> None:
    code = (
        "import os, matplotlib, matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label='squares'); ax.legend(); ax.set_title('unitbox')\n"
        "fig.savefig('plot.png', dpi=50)\n"
        "data = open('plot.png', 'rb').read()\n"
        "print(matplotlib.get_backend().lower(), matplotlib.get_configdir(), os.getcwd())\n"
        "print(data[:8] == b'\\x89PNG\\r\\n\\x1a\\n', len(data) > 1000)\n"
    )
    run = run_ok(client, code, runtime="scientific", limits={"memory_mb": 512, "timeout_s": 60})
    assert run["stdout"].splitlines() == ["agg /tmp/matplotlib /run/unitbox/work", "True True"]
    assert "Matplotlib created a temporary" not in run["stderr"], run["stderr"]


def test_unknown_runtime_is_a_422_naming_it(client: Client) -> None:
    reply = client.post_json("/run-json", {"code": "print(1)", "runtime": "nope"})
    assert reply.status == 422
    error = reply.json()["error"]
    assert error["code"] == "unknown_runtime" and "'nope'" in error["message"]
    assert error["details"] == [{"field": "runtime", "message": "unknown runtime 'nope'"}]


def test_get_runtimes_lists_default_and_scientific_with_versions(client: Client, scientific: dict[str, Any]) -> None:
    runtimes = {r["name"]: r for r in client.get("/runtimes").json()["runtimes"]}
    assert {"default", "scientific"} <= runtimes.keys()
    assert runtimes["default"]["packages"] == {}  # the standard library only: no dist-packages
    assert runtimes["default"]["python"] == scientific["python"]  # both on the host's /usr/bin/python3
    assert runtimes["scientific"]["python"] == scientific["python"]
    for package in PACKAGES:
        assert runtimes["scientific"]["packages"][package] == scientific["packages"][package]


def test_default_runtime_sees_the_standard_library_only(client: Client) -> None:
    code = ("import sys, importlib.util\n"
            "print([p for p in sys.path if 'packages' in p], importlib.util.find_spec('yaml'))\n"
            "exit(3)\n")  # exit() still works under -S
    run = client.run(code)
    assert (run["state"], run["exit_code"]) == ("failed", 3), run
    assert run["stdout"] == "[] None\n"


def test_failed_build_leaves_the_runtime_in_place_and_remove_takes_effect(
        client: Client, testhost: TestHost, daemon: Daemon, scientific: dict[str, Any]) -> None:
    before = runtime_root(testhost, daemon, "scientific")
    code, output = unitbox(testhost, daemon, "build", "scientific", "-r",
                           requirements(testhost, "broken", ["unitbox-no-such-package-7f3a==0.0.1"]))
    assert code == 1 and "'scientific' is unchanged" in output, output
    assert runtime_root(testhost, daemon, "scientific") == before
    assert sorted(p.name for p in before.parent.iterdir() if p.name.startswith(".scientific.")) == [before.name]
    run_ok(client, "import numpy", runtime="scientific")

    # A second, empty runtime: found at once, then removed at once.
    code, output = unitbox(testhost, daemon, "build", "bare", "-r", requirements(testhost, "bare", ["# nothing"]))
    assert code == 0, output
    run = run_ok(client, "import sys; print(sys.prefix)", runtime="bare")
    assert run["stdout"] == "/run/unitbox/runtime\n"
    assert "bare" in {r["name"] for r in client.get("/runtimes").json()["runtimes"]}
    code, output = unitbox(testhost, daemon, "list")
    assert code == 0 and "\nbare\t" in "\n" + output and "scientific\t" in output, output
    code, output = unitbox(testhost, daemon, "remove", "bare")
    assert code == 0, output
    assert client.post_json("/run-json", {"code": "1", "runtime": "bare"}).status == 422
    assert "bare" not in {r["name"] for r in client.get("/runtimes").json()["runtimes"]}
