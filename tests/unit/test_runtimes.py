"""Runtimes: discovery, the default's stdlib-only interpreter, the unit
properties a built runtime gives a run, and atomic builds (pip faked)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from unitbox.cli import main
from unitbox.config import Config, load_config
from unitbox.errors import UnknownRuntime
from unitbox.limits import Limits
from unitbox.profile import Collector, Runtime, build_profile
from unitbox.runtime_build import (
    BuildError,
    build,
    check_visible_to_runs,
    collect,
    grace_s,
    locked,
    remove,
)
from unitbox.runtimes import (
    MANIFEST,
    RUNTIME_DIR,
    Runtimes,
    check_name,
    describe_sync,
    host_python,
    interpreter_flags,
)

HOST_PYTHON = "/usr/bin/python3"


def config(tmp_path: Path, **settings: Any) -> Config:
    return load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path / "state"), **settings})


def fake_venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").symlink_to(HOST_PYTHON)
    return path


def props(runtime: Runtime) -> dict[str, Any]:
    return build_profile("r1", Limits(), ends_dir=PurePosixPath("/var/lib/unitbox/ends/r1"),
                         collector=Collector("/usr/bin/python3", "collect.py", (1, 2, 3, 4, 5, 6, 7)),
                         state_dir=PurePosixPath("/var/lib/unitbox"), slice_name="unitbox.slice", runtime=runtime)


# --- names, the default runtime, discovery ----------------------------------

@pytest.mark.parametrize("name", ["scientific", "sci-2", "a", "Py_311", "x" * 64])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a.b", "..", "x" * 65, "sp ace", "ünï"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a runtime name"):
        check_name(name)


def test_default_is_the_host_python_with_the_standard_library_only(tmp_path: Path) -> None:
    default = Runtimes(config(tmp_path)).get(None)
    assert default == Runtime("default", HOST_PYTHON, stdlib_only=True)
    assert interpreter_flags(default) == ["-I", "-S"]
    assert props(default)["ExecStart"][:4] == [":/usr/bin/python3", "-I", "-S", "-u"]


def test_default_describes_as_what_runs_see_no_dist_packages(tmp_path: Path) -> None:
    info = describe_sync(Runtimes(config(tmp_path)).get("default"))
    expected = subprocess.run([HOST_PYTHON, "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert (info.python, info.packages) == (expected, {})


def test_unknown_runtime_is_a_422_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UnknownRuntime) as caught:
        Runtimes(config(tmp_path)).get("nope")
    assert caught.value.status == 422
    assert "'nope'" in caught.value.message and "default" in caught.value.message
    assert caught.value.details == [{"field": "runtime", "message": "unknown runtime 'nope'"}]


def test_built_runtimes_are_discovered_and_mounted_at_the_runtime_dir(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg.state_dir / "runtimes"
    fake_venv(root / ".sci.20260101T000000Z-abcdef")
    (root / "sci").symlink_to(".sci.20260101T000000Z-abcdef")
    fake_venv(root / "plain")            # a venv put there by hand counts too
    fake_venv(root / ".hidden")          # hidden: a build in progress, retired, …
    (root / "empty").mkdir()             # no bin/python
    fake_venv(root / "bad.name")
    runtimes = Runtimes(cfg)
    assert runtimes.names == ["default", "plain", "sci"]
    sci = runtimes.get("sci")
    assert sci == Runtime("sci", f"{RUNTIME_DIR}/bin/python", str(root / "sci"), target=RUNTIME_DIR)
    assert host_python(sci) == str(root / "sci" / "bin" / "python")
    unit = props(sci)
    assert unit["ExecStart"][:3] == [":/run/unitbox/runtime/bin/python", "-I", "-u"]  # site-packages on: no -S
    assert f"{root / 'sci'}:/run/unitbox/runtime" in unit["BindReadOnlyPaths"]
    assert "/var/lib:mode=755" in unit["TemporaryFileSystem"]  # the state dir stays hidden (profile.hide_state_dir)


def test_a_configured_runtime_shadows_a_built_one_of_the_same_name(tmp_path: Path) -> None:
    cfg = config(tmp_path, runtimes={"sci": {"python": "/opt/sci/bin/python", "path": "/opt/sci"}})
    fake_venv(cfg.state_dir / "runtimes" / "sci")
    sci = Runtimes(cfg).get("sci")
    assert sci == Runtime("sci", "/opt/sci/bin/python", "/opt/sci")
    assert host_python(sci) == "/opt/sci/bin/python"
    assert "/opt/sci:/opt/sci" in props(sci)["BindReadOnlyPaths"]


def test_discovery_follows_the_directory_without_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg.state_dir / "runtimes"
    runtimes = Runtimes(cfg)
    assert runtimes.names == ["default"]          # no directory yet
    fake_venv(root / "one")
    assert runtimes.names == ["default", "one"]
    fake_venv(root / "two")                       # within the same mtime tick: still seen (racy stamps)
    assert runtimes.names == ["default", "one", "two"]
    (root / "one" / "bin" / "python").unlink()
    os.rmdir(root / "one" / "bin")
    os.rmdir(root / "one")
    assert runtimes.names == ["default", "two"]
    with pytest.raises(UnknownRuntime):
        runtimes.get("one")


def test_discovery_is_cached_while_the_directory_is_unchanged(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg.state_dir / "runtimes"
    fake_venv(root / "one")
    os.utime(root, ns=(10**18, 10**18))  # changed long ago: a stamp to trust
    runtimes = Runtimes(cfg)
    assert runtimes.names == ["default", "one"]
    fake_venv(root / "sneaky")
    os.utime(root, ns=(10**18, 10**18))  # same stamp: not looked at again
    assert runtimes.names == ["default", "one"]
    os.utime(root)
    assert runtimes.names == ["default", "one", "sneaky"]


# --- building and removing (pip faked; the venv and describe are real) --------

class FakePip:
    """Makes a real venv without pip (fast, offline) and 'installs' a
    distribution by writing its metadata, or fails like pip would."""

    def __init__(self, version: str = "1.0", fail: bool = False) -> None:
        self.version = version
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if argv[1:4] == ["-I", "-m", "venv"]:
            subprocess.run([argv[0], "-I", "-m", "venv", "--without-pip", argv[4]], check=True)
            return
        assert argv[1:5] == ["-I", "-m", "pip", "install"]
        if self.fail:
            raise subprocess.CalledProcessError(1, argv)
        venv = Path(argv[0]).parent.parent
        site = next(venv.glob("lib/python3*/site-packages"))
        info = site / f"demo-{self.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: demo\nVersion: {self.version}\n")
        (site / "demo.py").write_text(f"VERSION = {self.version!r}\n")
        (site / "demo.py").chmod(0o600)  # a careless umask: the build makes it readable for runs


@pytest.fixture
def requirements(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("demo==1.0\n")
    return path


def test_build_makes_a_venv_records_versions_and_switches_the_name(tmp_path: Path, requirements: Path) -> None:
    cfg = config(tmp_path)
    pip = FakePip()
    steps: list[str] = []
    built = build(cfg, "sci", requirements, say=steps.append, runner=pip)
    root = cfg.state_dir / "runtimes"
    assert os.readlink(root / "sci") == built.path.name
    assert built.path.name.startswith(".sci.") and built.replaced is None
    assert [s[:5] for s in steps] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert pip.calls[0][:4] == [HOST_PYTHON, "-I", "-m", "venv"]
    assert pip.calls[1][-2:] == ["-r", str(requirements.resolve())]
    manifest = json.loads((built.path / MANIFEST).read_text())
    assert manifest["packages"] == {"demo": "1.0"}
    assert manifest["requirements"] == "demo==1.0\n" and manifest["name"] == "sci"
    assert (cfg.state_dir.stat().st_mode & 0o777, root.stat().st_mode & 0o777) == (0o755, 0o755)  # the daemon, its own user in the package, lists them
    assert (next(built.path.glob("lib/python3*/site-packages/demo.py")).stat().st_mode & 0o777) == 0o644
    info = describe_sync(Runtimes(cfg).get("sci"))
    assert info.packages == {"demo": "1.0"}


def test_rebuild_replaces_atomically_and_keeps_the_old_one_for_running_runs(tmp_path: Path,
                                                                            requirements: Path) -> None:
    cfg = config(tmp_path)
    first = build(cfg, "sci", requirements, say=lambda _: None, runner=FakePip("1.0"))
    second = build(cfg, "sci", requirements, say=lambda _: None, runner=FakePip("2.0"))
    root = cfg.state_dir / "runtimes"
    assert second.replaced == first.path.name
    assert os.readlink(root / "sci") == second.path.name
    retired = [p.name for p in root.iterdir() if p.name.startswith(".retired.")]
    assert len(retired) == 1 and retired[0].endswith(first.path.name)
    assert describe_sync(Runtimes(cfg).get("sci")).packages == {"demo": "2.0"}


def test_a_failed_build_leaves_the_previous_runtime_in_place(tmp_path: Path, requirements: Path) -> None:
    cfg = config(tmp_path)
    first = build(cfg, "sci", requirements, say=lambda _: None, runner=FakePip("1.0"))
    root = cfg.state_dir / "runtimes"
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(subprocess.CalledProcessError):
        build(cfg, "sci", requirements, say=lambda _: None, runner=FakePip("2.0", fail=True))
    assert sorted(p.name for p in root.iterdir()) == before  # no half-made venv left
    assert os.readlink(root / "sci") == first.path.name
    with locked(root):  # and the lock was released
        pass


def test_build_refuses_names_it_does_not_own_and_interpreters_runs_cannot_see(tmp_path: Path,
                                                                             requirements: Path) -> None:
    cfg = config(tmp_path, runtimes={"mine": {"python": HOST_PYTHON}})
    for name, message in (("default", "standard library only"), ("mine", "defined in the config")):
        with pytest.raises(BuildError, match=message):
            build(cfg, name, requirements, runner=FakePip())
    with pytest.raises(ValueError, match="not a runtime name"):
        build(cfg, "../x", requirements, runner=FakePip())
    with pytest.raises(BuildError, match="No such file"):
        build(cfg, "sci", requirements.with_name("absent.txt"), runner=FakePip())
    for hidden in ("/root/.pyenv/bin/python3", "/home/u/py/bin/python", "/tmp/python3", str(cfg.state_dir / "py")):
        with pytest.raises(BuildError, match="runs cannot see"):
            check_visible_to_runs(hidden, cfg.state_dir)
    check_visible_to_runs(HOST_PYTHON, cfg.state_dir)
    plain = cfg.state_dir / "runtimes" / "plain"
    fake_venv(plain)
    with pytest.raises(BuildError, match="not a runtime built by"):
        build(cfg, "plain", requirements, runner=FakePip())


def test_one_build_at_a_time(tmp_path: Path, requirements: Path) -> None:
    cfg = config(tmp_path)
    (cfg.state_dir / "runtimes").mkdir(parents=True)
    with locked(cfg.state_dir / "runtimes"), pytest.raises(BuildError, match="another"):
        build(cfg, "sci", requirements, runner=FakePip())


def test_remove_unlists_at_once_and_deletes_after_the_grace(tmp_path: Path, requirements: Path) -> None:
    cfg = config(tmp_path)
    built = build(cfg, "sci", requirements, say=lambda _: None, runner=FakePip())
    runtimes = Runtimes(cfg)
    assert "sci" in runtimes.names
    now = 1_000_000.0
    assert remove(cfg, "sci", clock=lambda: now) == built.path.name
    assert runtimes.names == ["default"]
    root = cfg.state_dir / "runtimes"
    assert [p.name for p in root.iterdir() if p.name != ".lock"] == [f".retired.{int(now)}{built.path.name}"]
    assert collect(root, grace_s(cfg), now + grace_s(cfg) - 1) == []
    assert collect(root, grace_s(cfg), now + grace_s(cfg) + 1) == [f".retired.{int(now)}{built.path.name}"]
    assert [p.name for p in root.iterdir()] == [".lock"]
    with pytest.raises(BuildError, match="no built runtime 'sci'"):
        remove(cfg, "sci")
    with pytest.raises(BuildError, match="built in"):
        remove(cfg, "default")


def test_collect_retires_versions_no_name_points_to(tmp_path: Path) -> None:
    root = tmp_path / "runtimes"
    fake_venv(root / ".sci.20260101T000000Z-abcdef")  # a build that was killed
    fake_venv(root / ".sci.20260102T000000Z-abcdef")
    (root / "sci").symlink_to(".sci.20260102T000000Z-abcdef")
    (root / ".link-0123abcd").symlink_to(".sci.20260101T000000Z-abcdef")  # a switch that was killed
    collect(root, 60, 5000.0)
    assert sorted(p.name for p in root.iterdir()) == [
        ".retired.5000.sci.20260101T000000Z-abcdef", ".sci.20260102T000000Z-abcdef", "sci"]


# --- the command line -------------------------------------------------------------

def test_cli_list_and_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nlog_target = "stderr"\n')
    assert main(["--config", str(path), "runtime", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("default\tPython 3.") and "built in\tstandard library only" in out
    assert main(["--config", str(path), "runtime", "remove", "nope"]) == 1
    assert "no built runtime 'nope'" in capsys.readouterr().err
    assert main(["--config", str(path), "runtime", "build", "default", "-r", "/dev/null"]) == 1
    assert "pick another name" in capsys.readouterr().err
    assert main(["--config", str(path), "runtime", "build", "../etc", "-r", "/dev/null"]) == 1
    assert "not a runtime name" in capsys.readouterr().err
